"""A bounded load test of `sdloom serve` on loopback: N concurrent clients (default 4× the
queue) each send A1111 txt2img requests to a fresh server process with the embedded model.

Checks, printed as JSON: every request completes (200) or is turned away with 503 +
Retry-After, zero other 5xx; the server answers /internal/ping afterwards; a seed gives the
image a single request gives; the server's resident memory after the run against before it.

Usage: python bench/bench_server_load.py [--max-queue 2] [--clients 8] [--requests 3]
       [--steps 4]
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def post(url: str, body: dict, timeout: float = 600):
    """(status, headers (case-insensitive), JSON body or {})."""
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, {}


def digest(resp: dict) -> str:
    return hashlib.sha256(base64.b64decode(resp["images"][0])).hexdigest()[:16]


def start_server(args: list[str]) -> tuple[subprocess.Popen, str]:
    """`sdloom serve` with the embedded model on a free loopback port, once it answers."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.join(os.path.dirname(__file__), "..", "src"), os.environ.get("PYTHONPATH", "")]))
    server = subprocess.Popen([sys.executable, "-m", "sdloom.cli", "serve", "--port", str(port),
                               "--device", "cpu", *args],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):  # wait for the model to load
        try:
            urllib.request.urlopen(base + "/internal/ping", timeout=1)
            return server, base
        except OSError:
            if server.poll() is not None:
                raise SystemExit("server exited: " + server.stderr.read().decode()[-2000:])
            time.sleep(0.2)
    server.terminate()
    raise SystemExit("server did not answer in 120 s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-queue", type=int, default=2)
    ap.add_argument("--clients", type=int, help="concurrent clients (default 4× the queue)")
    ap.add_argument("--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    clients = a.clients or 4 * a.max_queue
    server, base = start_server(["--max-queue", str(a.max_queue)])
    try:
        body = {"prompt": "a red apple", "steps": a.steps, "sampler_name": "Euler",
                "width": 128, "height": 128}
        status, _, single = post(base + "/sdapi/v1/txt2img", {**body, "seed": 11})
        assert status == 200, status
        want = digest(single)
        before = rss_mib(server.pid)
        results: list[tuple[int, float, str | None, str | None]] = []
        lock = threading.Lock()

        def client(k: int) -> None:
            for i in range(a.requests):
                t = time.perf_counter()
                seed = 11 if (k + i) % 3 == 0 else 1000 + 10 * k + i
                code, headers, resp = post(base + "/sdapi/v1/txt2img", {**body, "seed": seed})
                d = digest(resp) if code == 200 and seed == 11 else None
                with lock:
                    results.append((code, time.perf_counter() - t, headers.get("Retry-After"),
                                    d))
                if code == 503:
                    time.sleep(float(headers.get("Retry-After", "1")))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        alive = urllib.request.urlopen(base + "/internal/ping", timeout=5).status == 200
        after = rss_mib(server.pid)
        codes: dict[str, int] = {}
        for c, *_ in results:
            codes[str(c)] = codes.get(str(c), 0) + 1
        ok = [dt for c, dt, *_ in results if c == 200]
        same = [d for *_, d in results if d is not None]
        out = {"clients": clients, "requests": len(results), "max_queue": a.max_queue,
               "status_codes": codes,
               "other_5xx": sum(n for c, n in codes.items() if c.startswith("5") and c != "503"),
               "every_503_has_retry_after": all(r for c, _, r, _ in results if c == 503),
               "server_alive": alive, "wall_s": round(wall, 2),
               "images_per_s": round(len(ok) / wall, 2),
               "latency_s_median": round(sorted(ok)[len(ok) // 2], 2) if ok else None,
               "latency_s_max": round(max(ok), 2) if ok else None,
               "seed_11_images": len(same), "seed_11_all_equal_single": all(d == want
                                                                            for d in same),
               "rss_mib_before": round(before, 1), "rss_mib_after": round(after, 1)}
        print(json.dumps(out))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
