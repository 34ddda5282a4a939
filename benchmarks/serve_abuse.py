"""Hostile clients against `trainforge serve`: does an honest client still get answers?

The attack of issue #16: 4 concurrent clients each POST /predict, again and again, a ~1 MB multipart body holding
256 PNGs of 2048x2048 pixels (a few KB each, about 1 Gpixel to decode per request). Meanwhile an honest client
polls GET /health and POSTs one 28x28 digit every 200 ms. Everything runs on 127.0.0.1 against a server started
here (on a small linear model trained first), and stops by itself: attacks for --seconds, then waits at most
--timeout for the answers still owed, then kills the server.

Pass: honest worst latency < 1 s for both endpoints, zero honest failures, every abusive request answered 4xx
within 1 s. --repo runs the server from another checkout (e.g. an older commit unpacked with `git archive`), to
measure before and after a change with the same script.

Usage:
  python benchmarks/serve_abuse.py [--seconds 8] [--repo PATH] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ATTACKERS, IMAGES_PER_BODY, SIDE = 4, 256, 2048
HONEST_PERIOD_S = 0.2


def png(array) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def attack_body() -> tuple[bytes, str]:
    """The multipart body of one abusive request and its Content-Type."""
    import numpy as np

    image = png(np.zeros((SIDE, SIDE), dtype=np.uint8))
    boundary = "trainforge-abuse"
    parts = [(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{i}.png"\r\n'
              f"Content-Type: image/png\r\n\r\n").encode() + image + b"\r\n" for i in range(IMAGES_PER_BODY)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def cli(repo: Path, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    return subprocess.Popen([sys.executable, "-m", "trainforge", *args], cwd=repo, env=env, **kwargs)


def start_server(repo: Path, run_dir: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = cli(repo, "serve", str(run_dir), "--port", str(port), "--quiet", stdout=subprocess.DEVNULL,
               stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            httpx.get(base + "/health", timeout=1.0)
            return proc, base
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


async def attacker(client, body: bytes, content_type: str, until: float, results: list) -> None:
    while time.monotonic() < until:
        start = time.monotonic()
        try:
            response = await client.post("/predict", content=body, headers={"content-type": content_type})
            results.append((response.status_code, time.monotonic() - start))
        except Exception as exc:  # a timeout or a dropped connection is a result too
            results.append((type(exc).__name__, time.monotonic() - start))


async def honest(client, digit: bytes, until: float, results: dict) -> None:
    while time.monotonic() < until:
        tick = time.monotonic()
        for endpoint, call in (("health", lambda: client.get("/health")),
                               ("predict", lambda: client.post("/predict", files={"file": ("d.png", digit)}))):
            start = time.monotonic()
            try:
                ok = (await call()).status_code == 200
            except Exception:  # counted as a failure
                ok = False
            results[endpoint].append((ok, time.monotonic() - start))
        await asyncio.sleep(max(0.0, HONEST_PERIOD_S - (time.monotonic() - tick)))


async def measure(base: str, seconds: float, timeout: float) -> dict:
    import httpx
    import numpy as np

    body, content_type = attack_body()
    digit = png(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    abuse: list = []
    fair: dict = {"health": [], "predict": []}
    until = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=ATTACKERS + 2)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as bad, \
            httpx.AsyncClient(base_url=base, timeout=timeout) as good:
        await asyncio.gather(honest(good, digit, until, fair),
                             *(attacker(bad, body, content_type, until, abuse) for _ in range(ATTACKERS)))
    summary = {"attack_body_bytes": len(body), "seconds": seconds, "abusive_requests": len(abuse),
               "abusive_statuses": sorted({str(s) for s, _ in abuse}),
               "abusive_worst_s": round(max((t for _, t in abuse), default=0.0), 3)}
    for endpoint, calls in fair.items():
        summary[f"honest_{endpoint}_requests"] = len(calls)
        summary[f"honest_{endpoint}_failures"] = sum(not ok for ok, _ in calls)
        summary[f"honest_{endpoint}_worst_s"] = round(max((t for _, t in calls), default=0.0), 3)
    summary["passed"] = (all(summary[f"honest_{e}_worst_s"] < 1 and not summary[f"honest_{e}_failures"]
                             for e in fair) and summary["abusive_worst_s"] < 1
                         and all(isinstance(s, int) and 400 <= s < 500 for s, _ in abuse))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="how long the attack lasts (default: 8)")
    parser.add_argument("--timeout", type=float, default=45.0, help="client timeout per request (default: 45)")
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose trainforge serves (default: this)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        trained = cli(args.repo, "train", "--model", "linear", "--epochs", "1", "--out", str(run_dir), "--quiet",
                      "--no-tensorboard", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if trained.wait() != 0:
            raise SystemExit(f"training the model failed: {trained.stderr.read().decode()[-500:]}")
        server, base = start_server(args.repo, run_dir)
        try:
            summary = asyncio.run(measure(base, args.seconds, args.timeout))
        finally:
            server.kill()
            server.wait()
    summary["repo"] = str(args.repo)
    print(json.dumps(summary) if args.json else "\n".join(f"{k}: {v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
