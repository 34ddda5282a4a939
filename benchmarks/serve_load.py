"""Load test of `trainforge serve`: dynamic batching against one request per model call, same load, same run.

Starts the server (`python -m trainforge serve`) on 127.0.0.1, sends a bounded load (by default 400 untimed warm-up
requests, then 4,000 from 32 concurrent clients; 10% of them malformed: corrupt PNGs and wrong-shape JSON), stops
it, and repeats with --max-batch 1, for each --backend asked for. Prints throughput, p50/p99 latency, status counts,
the mean batch and the CPU time per request of server and client (they share the machine), and the batching ratio.

Acceptance (issue 8): zero 5xx, every malformed request answered 4xx, batched throughput >= 3x the --max-batch 1
throughput at 32 clients.

Usage:
  python benchmarks/serve_load.py                       # trains a small cnn on 2,000 MNIST images first
  python benchmarks/serve_load.py --backend onnxruntime torch   # both runtimes, each batched and unbatched
  python benchmarks/serve_load.py --source runs/x --requests 8000 --clients 64
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1.0) as response:
                return json.load(response)
        except OSError:
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
    """Sends `requests` from `clients` concurrent keep-alive connections; counts statuses and latencies.

    The client is aiohttp: it shares this machine's cores with the server, and httpx spent 3.5 ms of CPU per request
    here (three times the server's own), so the benchmark measured its client. aiohttp spends about 0.25 ms.
    """
    import aiohttp

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    malformed_not_4xx = 0
    transport_errors = 0
    queue = list(reversed(requests))

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal malformed_not_4xx, transport_errors
        while queue:
            req = queue.pop()
            start = time.perf_counter()
            try:
                async with http.post("/predict", **_post_arguments(req)) as response:
                    await response.read()
                    status = response.status
            except aiohttp.ClientError:
                transport_errors += 1
                continue
            latencies.append(time.perf_counter() - start)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if req["kind"] == "bad" and not 400 <= status < 500:
                malformed_not_4xx += 1

    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", connector=connector, timeout=timeout) as http:
        cpu_start = _cpu_seconds()
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - start
        client_cpu = _cpu_seconds() - cpu_start
        async with http.get("/metrics") as response:
            metrics = await response.text()
    lat = np.array(latencies) * 1000
    return {"requests": len(requests), "seconds": seconds, "throughput": len(latencies) / seconds,
            "latency_ms_p50": float(np.percentile(lat, 50)), "latency_ms_p99": float(np.percentile(lat, 99)),
            "statuses": statuses, "server_errors": sum(v for k, v in statuses.items() if k.startswith("5")),
            "malformed_not_4xx": malformed_not_4xx, "transport_errors": transport_errors,
            "mean_batch": _mean_batch(metrics), "client_cpu_ms_per_request": 1000 * client_cpu / len(requests)}


def _post_arguments(req: dict) -> dict:
    import aiohttp

    if "json" in req:
        return {"json": req["json"]}
    if "files" in req:
        form = aiohttp.FormData()
        for field, (filename, data, content_type) in req["files"].items():
            form.add_field(field, data, filename=filename, content_type=content_type)
        return {"data": form}
    return {"data": req["content"], "headers": {"content-type": req["type"]}}


def _cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) of this process, or of process `pid` (Linux /proc; NaN elsewhere)."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _mean_batch(metrics: str) -> float:
    values = {}
    for line in metrics.splitlines():
        for name in ("trainforge_batch_size_sum", "trainforge_batch_size_count"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    return values.get("trainforge_batch_size_sum", 0.0) / max(1.0, values.get("trainforge_batch_size_count", 0.0))


def measure(source: str, requests: list[dict], clients: int, server_args: list[str], warmup: int) -> dict:
    port = free_port()
    proc = start_server(source, port, server_args)
    try:
        health = wait_ready(proc, port)
        # Not timed: the first requests also pay one-time costs (lazy imports, the runtime's first calls).
        warm = asyncio.run(drive(port, requests[:warmup], clients)) if warmup else None
        server_cpu = _cpu_seconds(proc.pid)
        result = asyncio.run(drive(port, requests, clients))
        result["server_cpu_ms_per_request"] = 1000 * (_cpu_seconds(proc.pid) - server_cpu) / len(requests)
        result["backend"] = health["backend"]
        if warm is not None:
            for key in ("server_errors", "malformed_not_4xx", "transport_errors"):
                result[key] += warm[key]
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
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--warmup", type=int, default=400, help="requests sent first and not timed")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--malformed", type=float, default=0.1, help="fraction of malformed requests")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--backend", nargs="+", default=["auto"],
                        help="serve's --backend, one or more (each measured batched and unbatched)")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from trainforge.data import load_data

    bundle = load_data("mnist")
    report: dict = {"clients": args.clients, "requests": args.requests, "backends": {}}
    with tempfile.TemporaryDirectory() as tmp:
        source = args.source
        if source is None:
            import trainforge

            source = str(Path(tmp) / "cnn")
            print("training a small cnn (2,000 images, 1 epoch) to serve ...", file=sys.stderr)
            trainforge.train({"model": "cnn", "subset": 2000, "epochs": 1, "out": source, "tensorboard": False},
                             data=load_data("mnist", subset=2000), progress=False)
        requests = make_requests(bundle.test.images[:1000].numpy(), args.requests, args.malformed, seed=0)
        for backend in args.backend:
            results = {}
            for name, max_batch in (("batched", args.max_batch), ("unbatched", 1)):
                print(f"{backend} {name}: --max-batch {max_batch}, {args.requests} requests from {args.clients} "
                      f"clients ...", file=sys.stderr)
                server_args = ["--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms),
                               "--backend", backend]
                results[name] = measure(source, requests, args.clients, server_args, args.warmup)
            results["ratio"] = results["batched"]["throughput"] / results["unbatched"]["throughput"]
            report["backends"][results["batched"]["backend"]] = results
    ok = True
    for backend, results in report["backends"].items():
        for name in ("batched", "unbatched"):
            r = results[name]
            print(f"{backend:>12} {name:>9}: {r['throughput']:7.1f} req/s  p50 {r['latency_ms_p50']:6.2f} ms  p99 "
                  f"{r['latency_ms_p99']:6.2f} ms  mean batch {r['mean_batch']:5.1f}  CPU ms/request: server "
                  f"{r['server_cpu_ms_per_request']:.2f}, client {r['client_cpu_ms_per_request']:.2f}  statuses "
                  f"{r['statuses']}  5xx {r['server_errors']}  malformed not 4xx {r['malformed_not_4xx']}  "
                  f"transport errors {r['transport_errors']}")
            ok = ok and r["server_errors"] == 0 and r["malformed_not_4xx"] == 0 and r["transport_errors"] == 0
        print(f"{backend:>12} batching ratio {results['ratio']:.2f}x (acceptance >= 3x)")
    print(f"zero 5xx and every malformed request 4xx: {ok}")
    report["errors_ok"] = ok
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
