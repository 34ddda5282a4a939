"""Load test of `trainforge serve`: dynamic batching against one request per model call, same load, same run.

Starts the server (`python -m trainforge serve`) on 127.0.0.1, sends a bounded load (by default 2,000 requests
from 32 concurrent clients, 10% of them malformed: corrupt PNGs and wrong-shape JSON), stops it, and repeats with
--max-batch 1. Prints throughput, p50/p99 latency and status counts for both, and the batching ratio.

Acceptance (issue 8): zero 5xx, every malformed request answered 4xx, batched throughput >= 3x the --max-batch 1
throughput at 32 clients.

Usage:
  python benchmarks/serve_load.py                       # trains a small cnn on 2,000 MNIST images first
  python benchmarks/serve_load.py --source runs/x --requests 4000 --clients 64
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(source: str, port: int, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "trainforge", "serve", source, "--port", str(port), "--quiet", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(proc: subprocess.Popen, port: int, timeout: float = 120.0) -> dict:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).json()
        except httpx.TransportError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"server not ready after {timeout:.0f} s")


def make_requests(images: np.ndarray, count: int, malformed_fraction: float, seed: int) -> list[dict]:
    """`count` request descriptions: valid PNG uploads and JSON bodies, and a share of malformed ones."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    bad_every = round(1 / malformed_fraction) if malformed_fraction > 0 else 0
    requests = []
    for i in range(count):
        image = images[i % len(images), 0]
        if bad_every and i % bad_every == bad_every - 1:
            if (i // bad_every) % 2:
                requests.append({"kind": "bad", "content": rng.bytes(300), "type": "image/png"})
            else:
                requests.append({"kind": "bad", "json": {"inputs": [image[:20].tolist()]}})
        elif i % 2:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, "PNG")
            requests.append({"kind": "good", "files": {"file": ("digit.png", buffer.getvalue(), "image/png")}})
        else:
            requests.append({"kind": "good", "json": {"inputs": [image.tolist()]}})
    return requests


async def drive(port: int, requests: list[dict], clients: int) -> dict:
    import httpx

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    malformed_not_4xx = 0
    transport_errors = 0
    queue = list(reversed(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal malformed_not_4xx, transport_errors
        while queue:
            req = queue.pop()
            kwargs = {k: v for k, v in req.items() if k in ("json", "files", "content")}
            if "type" in req:
                kwargs["headers"] = {"content-type": req["type"]}
            start = time.perf_counter()
            try:
                response = await http.post("/predict", **kwargs)
            except httpx.TransportError:
                transport_errors += 1
                continue
            latencies.append(time.perf_counter() - start)
            statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
            if req["kind"] == "bad" and not 400 <= response.status_code < 500:
                malformed_not_4xx += 1

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=60.0) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - start
        metrics = (await http.get("/metrics")).text
    lat = np.array(latencies) * 1000
    return {"requests": len(requests), "seconds": seconds, "throughput": len(latencies) / seconds,
            "latency_ms_p50": float(np.percentile(lat, 50)), "latency_ms_p99": float(np.percentile(lat, 99)),
            "statuses": statuses, "server_errors": sum(v for k, v in statuses.items() if k.startswith("5")),
            "malformed_not_4xx": malformed_not_4xx, "transport_errors": transport_errors,
            "mean_batch": _mean_batch(metrics)}


def _mean_batch(metrics: str) -> float:
    values = {}
    for line in metrics.splitlines():
        for name in ("trainforge_batch_size_sum", "trainforge_batch_size_count"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    return values.get("trainforge_batch_size_sum", 0.0) / max(1.0, values.get("trainforge_batch_size_count", 0.0))


def measure(source: str, requests: list[dict], clients: int, server_args: list[str]) -> dict:
    port = free_port()
    proc = start_server(source, port, server_args)
    try:
        health = wait_ready(proc, port)
        result = asyncio.run(drive(port, requests, clients))
        result["backend"] = health["backend"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    result["server_exit"] = proc.returncode
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help="run directory or .onnx file (default: train a small cnn first)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--malformed", type=float, default=0.1, help="fraction of malformed requests")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from trainforge.data import load_data

    bundle = load_data("mnist")
    with tempfile.TemporaryDirectory() as tmp:
        source = args.source
        if source is None:
            import trainforge

            source = str(Path(tmp) / "cnn")
            print("training a small cnn (2,000 images, 1 epoch) to serve ...", file=sys.stderr)
            trainforge.train({"model": "cnn", "subset": 2000, "epochs": 1, "out": source, "tensorboard": False},
                             data=load_data("mnist", subset=2000), progress=False)
        requests = make_requests(bundle.test.images[:1000].numpy(), args.requests, args.malformed, seed=0)
        common = ["--max-wait-ms", str(args.max_wait_ms), "--backend", args.backend]
        results = {}
        for name, max_batch in (("batched", args.max_batch), ("unbatched", 1)):
            print(f"{name}: --max-batch {max_batch}, {args.requests} requests from {args.clients} clients ...",
                  file=sys.stderr)
            results[name] = measure(source, requests, args.clients, ["--max-batch", str(max_batch), *common])
    ratio = results["batched"]["throughput"] / results["unbatched"]["throughput"]
    for name, r in results.items():
        print(f"{name:>9}: {r['throughput']:8.1f} req/s  p50 {r['latency_ms_p50']:7.2f} ms  p99 "
              f"{r['latency_ms_p99']:7.2f} ms  mean batch {r['mean_batch']:5.1f}  backend {r['backend']}  "
              f"statuses {r['statuses']}  5xx {r['server_errors']}  malformed not 4xx {r['malformed_not_4xx']}  "
              f"transport errors {r['transport_errors']}")
    ok = all(r["server_errors"] == 0 and r["malformed_not_4xx"] == 0 and r["transport_errors"] == 0
             for r in results.values())
    print(f"batching ratio {ratio:.2f}x (acceptance >= 3x); zero 5xx and every malformed request 4xx: {ok}")
    print(json.dumps({"results": results, "ratio": ratio, "errors_ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
