"""The Ray Serve path (`sdloom serve --ray`) on a local Ray cluster: two CPU replicas of the
embedded model behind Ray's HTTP proxy, N concurrent txt2img clients; prints which replica
(X-Sdloom-Replica, a process id) answered each request, the status codes, and whether one seed
gave one image whichever replica made it. `pip install 'ray[serve]'` first.

Usage: python bench/bench_ray_serve.py [--clients 8] [--steps 4]
"""
from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.request

from bench_server_load import digest, free_port, post


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    import ray
    from ray import serve

    from sdloom.limits import DEFAULT_LIMITS
    from sdloom.server.ray_serve import start
    ray.init(num_cpus=4, include_dashboard=False)  # two replicas of 1 CPU each, and Serve
    port = free_port()
    t = time.perf_counter()
    start("local", "127.0.0.1", port, dict(model=None, device="cpu", max_queue=4,
                                           limits=DEFAULT_LIMITS, outdir="/tmp/sdloom-ray"),
          {}, replicas=2, gpus=0, max_queue=4, blocking=False)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(base + "/internal/ping", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    ready = time.perf_counter() - t
    body = {"prompt": "a red apple", "steps": a.steps, "sampler_name": "Euler", "seed": 7,
            "width": 128, "height": 128}
    results = []
    lock = threading.Lock()

    def client() -> None:
        code, headers, resp = post(base + "/sdapi/v1/txt2img", body)
        with lock:
            results.append((code, headers.get("X-Sdloom-Replica"),
                            digest(resp) if code == 200 else None))

    t = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(a.clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    by_replica: dict[str, int] = {}
    for _, rep, _ in results:
        by_replica[str(rep)] = by_replica.get(str(rep), 0) + 1
    images = {d for _, _, d in results if d}
    print(json.dumps({"replicas_ready_s": round(ready, 1), "requests": len(results),
                      "status_codes": sorted(c for c, _, _ in results),
                      "requests_per_replica": by_replica, "replicas_used": len(by_replica),
                      "one_image_for_the_seed": len(images) == 1, "wall_s": round(wall, 2)}))
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
