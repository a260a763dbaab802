"""Replay a hostile suite against sdloom and count how it answers (bounded: < 5 min on 2 cores).

  python bench/hostile.py [--port 7911] [--examples 8] [--budget 240]

Three parts, all on the embedded model:
  1. `sdloom info` on bad checkpoints (truncated, huge header, pickle payload, empty, not a
     file, random bytes) and `sdloom generate` with bad values, in-process;
  2. bad, unauthenticated and oversized HTTP requests against `sdloom serve` run as a
     subprocess on 127.0.0.1 (with --api-auth and small --limit values so valid jobs are cheap);
  3. schemathesis, generating valid and invalid (positive and negative) requests from the
     server's own OpenAPI schema (skipped with a note when schemathesis is not installed).

Prints one JSON object: tried / refused_cleanly / accepted / 5xx / tracebacks /
internal_errors / server_restarts / max_rss_mb, per part and in total. A clean refusal is a
4xx with A1111's JSON error body, or a CLI exit 1/2 with one `sdloom: error:` line.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import pickle
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

USER, PASSWORD = "bench", "pässwörd"
AUTH = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
LIMITS = ["max_steps=4", "max_side=128", "max_pixels=16384", "max_images=2",
          "max_batch_size=2", "max_body_bytes=2000000", "max_image_pixels=1000000"]
SHAPE = {"error", "detail", "body", "errors"}


class Tally:
    def __init__(self):
        self.c = {"tried": 0, "refused_cleanly": 0, "accepted": 0, "5xx": 0, "tracebacks": 0,
                  "internal_errors": 0, "other": 0}
        self.bad: list[str] = []

    def add(self, kind: str, what: str = "") -> None:
        self.c["tried"] += 1
        self.c[kind] += 1
        if kind not in ("refused_cleanly", "accepted") and len(self.bad) < 20:
            self.bad.append(f"{kind}: {what}"[:300])


# ---------------------------------------------------------------------- 1. command line
def cli_part(tmp: Path) -> Tally:
    from sdloom.cli import main
    from sdloom.pipelines.engine import EMBEDDED_MODEL
    t = Tally()
    good = EMBEDDED_MODEL.read_bytes()
    files = {"truncated.safetensors": good[:4096], "empty.safetensors": b"",
             "huge-header.safetensors": struct.pack("<Q", 2 ** 40) + b"{}",
             "header-lies.safetensors": struct.pack("<Q", 60) + json.dumps(
                 {"x": {"dtype": "F32", "shape": [1 << 20, 1 << 20],
                        "data_offsets": [0, 4]}}).encode()[:60],
             "random.safetensors": os.urandom(5000), "random.ckpt": os.urandom(5000),
             "text.ckpt": b"not a pickle"}

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {tmp / 'PWNED'}",)
    files["pickle.ckpt"] = pickle.dumps({"state_dict": Evil()})
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    (tmp / "folder.safetensors").mkdir()
    cases = [["info", str(tmp / n)] for n in [*files, "folder.safetensors", "missing.ckpt"]]
    base = ["generate", "x", "-q", "--steps", "1", "--output", str(tmp / "out")]
    for extra in (["--width", "0"], ["--width", "-8"], ["--width", "100000"], ["--cfg", "nan"],
                  ["--cfg", "inf"], ["--eta", "nan"], ["--steps", "-1"], ["--steps", "0"],
                  ["--steps", "99999999"], ["--batch-size", "0"], ["--n-iter", "-3"],
                  ["--seed", str(2 ** 64)], ["--seed", "-7"], ["--hires-scale", "-1"],
                  ["--hires-scale", "nan"], ["--denoise", "nan"], ["--denoise", "3"],
                  ["--subseed-strength", "inf"], ["--clip-skip", "0"], ["--width", "abc"],
                  ["--sampler", "nope"], ["--scheduler", "nope"], ["--lora", "/etc/passwd:1"],
                  ["--lora", "x:nan"], ["--model", "/nonexistent"],
                  ["--model", str(tmp / "pickle.ckpt")], ["--output", "/proc/forbidden/x.png"],
                  ["--prompt-is-not-an-option"], ["--seed", str(2 ** 64 - 1), "--batch-size", "2"]):
        cases.append(base + extra)
    img = tmp / "img.png"
    from PIL import Image
    Image.new("RGB", (64, 64)).save(img)
    (tmp / "bomb.png").write_bytes(png_header(60000, 60000))
    cases += [["img2img", "x", "-q", "--steps", "1", "--init", str(tmp / "bomb.png")],
              ["img2img", "x", "-q", "--steps", "1", "--init", str(tmp / "random.ckpt")],
              ["inpaint", "x", "-q", "--steps", "1", "--init", str(img), "--mask",
               str(tmp / "bomb.png")],
              ["inpaint", "x", "-q", "--init", str(img), "--outpaint", "1,2"],
              ["pnginfo", str(tmp / "random.ckpt")], ["pnginfo", str(tmp / "bomb.png")]]
    for argv in cases:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(argv)
        except BaseException as e:  # noqa: BLE001 - what escapes main is what we count
            t.add("tracebacks", f"{argv}: {type(e).__name__}: {e}")
            continue
        lines = err.getvalue().strip().splitlines()
        if code == 0:
            t.add("accepted" if argv[0] != "info" or "missing" not in argv[1] else "other",
                  str(argv))
        elif "Traceback" in err.getvalue():
            t.add("tracebacks", str(argv))
        elif lines and "internal error" in lines[-1]:
            t.add("internal_errors", f"{argv}: {lines[-1]}")
        elif len(lines) == 1 and lines[0].startswith("sdloom: error:"):
            t.add("refused_cleanly")
        else:
            t.add("other", f"{argv}: {lines}")
    if (tmp / "PWNED").exists():
        t.add("other", "the pickle payload ran")
    return t


def png_header(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


# ---------------------------------------------------------------------- 2. HTTP
class ServerProc:
    def __init__(self, port: int, tmp: Path):
        self.port, self.tmp, self.restarts, self.proc = port, tmp, 0, None
        self.max_rss_mb = 0.0
        (tmp / "loras").mkdir(exist_ok=True)

    def start(self) -> None:
        cmd = [sys.executable, "-m", "sdloom.cli", "serve", "--port", str(self.port),
               "--device", "cpu", "--api-auth", f"{USER}:{PASSWORD}", "--lora-dir",
               str(self.tmp / "loras"), "--outdir", str(self.tmp / "srv-out")]
        for lim in LIMITS:
            cmd += ["--limit", lim]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        self.log = open(self.tmp / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("server exited: " +
                                       (self.tmp / "server.log").read_text()[-2000:])
                time.sleep(0.3)
        raise RuntimeError("server did not start")

    def check(self) -> None:
        """Record peak memory; restart (and count) a server that died."""
        if self.proc.poll() is not None:
            self.restarts += 1
            self.start()
            return
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.max_rss_mb = max(self.max_rss_mb, int(line.split()[1]) / 1024)
        except OSError:
            pass

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def judge(t: Tally, r, what: str, expect_ok: bool = False) -> None:
    if r is None:
        t.add("other", f"{what}: no response")
        return
    text = r.text
    if "Traceback" in text or 'File "' in text:
        t.add("tracebacks", what)
    elif r.status_code >= 500:
        t.add("5xx", f"{what}: {r.status_code} {text[:150]}")
    elif r.status_code < 400:
        t.add("accepted" if expect_ok or r.status_code < 300 else "other", what)
    else:
        try:
            ok = SHAPE <= set(r.json())
        except ValueError:
            ok = False
        t.add("refused_cleanly" if ok else "other", f"{what}: {r.status_code} {text[:150]}")


def raw_request(port: int, data: bytes) -> str:
    """Send bytes as they are (a lying Content-Length) and classify the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        reply = b""
        try:
            while b"\r\n\r\n" not in reply or len(reply) < 40:
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
        except OSError:
            pass
    status = reply.split(b" ", 2)[1] if reply.count(b" ") >= 2 else b"0"
    if b"Traceback" in reply:
        return "tracebacks"
    return {b"4": "refused_cleanly", b"5": "5xx"}.get(status[:1], "other")


def http_part(srv: ServerProc) -> Tally:
    import httpx
    t = Tally()
    base = f"http://127.0.0.1:{srv.port}"
    api = base + "/sdapi/v1"
    h = {"Authorization": AUTH}
    img = base64.b64encode(png_header(64, 64)).decode()
    small = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": 1}
    raw_bodies = ['{"prompt": "x", "cfg_scale": NaN}', '{"prompt": "x", "eta": Infinity}',
                  '{"prompt": "\\ud800"}', '{"prompt": "x", "steps": 1e999}', "[" * 50000,
                  "[1,2]", '"s"', "{", "", "null", '{"prompt": "x", "a": ' + "[" * 40 + "]" * 40
                  + "}", '{"override_settings": {"\\udfff": 1}}']
    fields = [{"seed": 2 ** 64}, {"seed": -2}, {"seed": 2 ** 64 - 1, "batch_size": 2},
              {"width": 0}, {"height": -8}, {"width": 10 ** 12}, {"steps": 0},
              {"steps": 10 ** 9}, {"batch_size": 10 ** 6}, {"n_iter": 10 ** 6},
              {"enable_hr": True, "hr_scale": -1}, {"enable_hr": True, "hr_scale": 1e300},
              {"denoising_strength": 9}, {"prompt": "x" * 70000}, {"prompt": "<lora:/etc/passwd:1>"},
              {"prompt": "<lora:../../x:1>"}, {"prompt": "<lora:x:->"}, {"prompt": "<lora:x:1e999>"},
              {"sampler_name": "nope"}, {"scheduler": "nope"}, {"hr_upscaler": "nope",
                                                                "enable_hr": True},
              {"override_settings": {"CLIP_stop_at_last_layers": 100}},
              {"override_settings": {"sd_model_checkpoint": "/etc/passwd"}},
              {"override_settings": {"samples_format": "exe"}}, {"styles": ["x"]},
              {"prompt": ["x"]}, {"all_prompts": 5}]
    img_cases = [{"init_images": ["%%%"]}, {"init_images": [base64.b64encode(
        png_header(100000, 100000)).decode()]}, {"init_images": [img[:40]]},
        {"init_images": [img], "mask": base64.b64encode(png_header(5000, 5000)).decode()},
        {"init_images": ["http://169.254.169.254/latest"]}, {"init_images": []},
        {"init_images": [img], "mask_blur": 10 ** 9}, {"init_images": [img], "resize_mode": 9}]
    with httpx.Client(timeout=60) as c:
        def go(method, url, what, expect_ok=False, **kw):
            try:
                r = c.request(method, url, **kw)
            except Exception as e:  # noqa: BLE001 - a dropped connection counts as "other"
                r = None
                what += f" ({type(e).__name__})"
            judge(t, r, what, expect_ok)
            srv.check()
        for raw in raw_bodies:
            go("POST", api + "/txt2img", f"raw {raw[:30]!r}", content=raw.encode(),
               headers={**h, "Content-Type": "application/json"})
        for f in fields:
            go("POST", api + "/txt2img", f"txt2img {str(f)[:60]}", json={**small, **f},
               headers=h)
        for f in img_cases:
            go("POST", api + "/img2img", f"img2img {str(f)[:60]}", json={**small, **f},
               headers=h)
        for body in ({"CLIP_stop_at_last_layers": 0}, {"CLIP_stop_at_last_layers": "x"},
                     {"sd_model_checkpoint": "../../etc/passwd"}, {"samples_format": None}):
            go("POST", api + "/options", f"options {body}", json=body, headers=h)
        go("POST", api + "/png-info", "png-info bomb", json={"image": base64.b64encode(
            png_header(60000, 60000)).decode()}, headers=h)
        go("POST", api + "/png-info", "png-info garbage", json={"image": "AAAA"}, headers=h)
        # size limits: a claimed huge body, and one streamed without a length
        t.add(raw_request(srv.port, b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Authorization: " + AUTH.encode() + b"\r\nContent-Type: "
                          b"application/json\r\nContent-Length: 1000000000000\r\n\r\n{}"),
              "Content-Length 10^12")
        srv.check()
        go("POST", api + "/txt2img", "3 MB body", content=b" " * 3_000_000,
           headers={**h, "Content-Type": "application/json"})
        go("POST", api + "/txt2img", "streamed 3 MB",
           content=(b" " * 100_000 for _ in range(30)),
           headers={**h, "Content-Type": "application/json"})
        # auth and hosts, on every kind of route
        for path in ("/", "/docs", "/redoc", "/openapi.json", "/sdapi/v1/options",
                     "/sdapi/v1/progress", "/nope"):
            go("GET", base + path, f"no auth {path}")
            go("GET", base + path, f"bad auth {path}", headers={"Authorization": "Basic " +
                                                               base64.b64encode(b"bench:x")
                                                               .decode()})
        for header in ("Basic !!!", "Basic " + base64.b64encode(b"\xff\xfe:\x00").decode(),
                       "Digest x", "Basic " + base64.b64encode("bench:pässwörd".encode(
                           "latin-1")).decode()):
            go("GET", api + "/options", f"auth header {header[:20]}",
               headers={"Authorization": header})
        go("GET", api + "/options", "Host evil.example", headers={**h, "Host": "evil.example"})
        # a good request still works afterwards
        go("POST", api + "/txt2img", "valid job", expect_ok=True, json=small, headers=h)
    return t


# ---------------------------------------------------------------------- 3. schemathesis
def fuzz_part(srv: ServerProc, examples: int, budget: float) -> Tally | str:
    try:
        import schemathesis
        from hypothesis import HealthCheck, given, settings
    except ImportError:
        return "schemathesis is not installed (pip install schemathesis): part skipped"
    import httpx
    t = Tally()
    base = f"http://127.0.0.1:{srv.port}"
    spec = httpx.get(base + "/openapi.json", headers={"Authorization": AUTH}).json()
    schema = schemathesis.openapi.from_dict(spec)
    end = time.time() + budget
    modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
    for mode, result in [(m, r) for m in modes for r in schema.get_all_operations()]:
        op = result.ok()
        if time.time() > end:
            break
        try:
            strategy = op.as_strategy(generation_mode=mode)
        except Exception:  # noqa: BLE001 - no negative form for an operation without input
            continue

        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def run(case):
            if time.time() > end:
                return
            try:
                r = case.call(base_url=base, headers={"Authorization": AUTH}, timeout=60)
            except Exception as e:  # noqa: BLE001 - a dropped connection counts
                t.add("other", f"{op.method} {op.path}: {type(e).__name__}")
                srv.check()
                return
            what = f"{op.method.upper()} {op.path}"

            class R:  # the judge's view of a schemathesis response
                status_code, text = r.status_code, r.text

                @staticmethod
                def json():
                    return json.loads(r.text)
            judge(t, R, what)
            srv.check()
        try:
            run()
        except Exception as e:  # noqa: BLE001 - e.g. hypothesis finds no negative case
            if type(e).__name__ not in ("Unsatisfiable", "FailedHealthCheck"):
                raise
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=7911)
    ap.add_argument("--examples", type=int, default=30, help="schemathesis cases per route")
    ap.add_argument("--budget", type=float, default=150, help="seconds for schemathesis")
    args = ap.parse_args()
    t0 = time.time()
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="sdloom-hostile-") as d:
        tmp = Path(d)
        cli = cli_part(tmp)
        out["cli"] = cli.c | {"examples_of_problems": cli.bad}
        srv = ServerProc(args.port, tmp)
        srv.start()
        try:
            http = http_part(srv)
            out["http"] = http.c | {"examples_of_problems": http.bad}
            fuzz = fuzz_part(srv, args.examples, args.budget)
            out["schemathesis"] = fuzz if isinstance(fuzz, str) else (
                fuzz.c | {"examples_of_problems": fuzz.bad})
            srv.check()
        finally:
            srv.stop()
    parts = [v for v in out.values() if isinstance(v, dict)]
    total = {k: sum(p[k] for p in parts) for k in cli.c}
    out["total"] = total | {"server_restarts": srv.restarts,
                            "max_rss_mb": round(srv.max_rss_mb, 1),
                            "seconds": round(time.time() - t0, 1)}
    print(json.dumps(out, indent=1, ensure_ascii=False))
    bad = total["5xx"] + total["tracebacks"] + total["internal_errors"] + srv.restarts
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
