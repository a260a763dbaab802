"""Fuzz `sdloom serve` from its own OpenAPI schema with schemathesis (a bench, not a test: it
takes minutes; `pip install schemathesis` first). A fresh server process with the embedded
model and small limits (so generated requests stay cheap) on a loopback port; the check is
`not_a_server_error`: no request may get a 5xx other than a 503 from the full queue.

Usage: python bench/fuzz_api.py [--max-examples 20] [--seconds 900]
Prints schemathesis' summary and a JSON line {"server_errors": N, ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

from bench_server_load import start_server


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-examples", type=int, default=20)
    ap.add_argument("--seconds", type=int, default=900)
    a = ap.parse_args()
    st = shutil.which("schemathesis") or os.path.join(os.path.dirname(sys.executable),
                                                      "schemathesis")
    if not os.path.exists(st):
        raise SystemExit("schemathesis is not installed: pip install schemathesis")
    limits = ["max_steps=4", "max_side=256", "max_pixels=65536", "max_batch_size=2",
              "max_images=2", "max_image_pixels=1048576"]
    server, base = start_server(["--max-queue", "4"]
                                + [x for lim in limits for x in ("--limit", lim)])
    try:
        t = time.perf_counter()
        run = subprocess.run([st, "run", base + "/openapi.json", "--checks",
                              "not_a_server_error", "--max-examples", str(a.max_examples),
                              "--request-timeout", "120", "--workers", "1"],
                             capture_output=True, text=True, timeout=a.seconds)
        text = run.stdout + run.stderr
        print(text[-6000:])
        failures = len(re.findall(r"Server error", text))
        print(json.dumps({"schemathesis_exit": run.returncode, "server_errors": failures,
                          "server_alive": server.poll() is None,
                          "seconds": round(time.perf_counter() - t, 1)}))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
