"""Serve a model over HTTP (FastAPI + uvicorn) with dynamic batching of concurrent requests.

SOURCE is a run directory or an ONNX file written by `trainforge export`. A .pt2 torch.export program is refused:
loading one unpickles Python objects, so a crafted file could run code on the server.

Endpoints:
  POST /predict   images (PNG, JPEG, BMP, WebP, 8-bit TIFF, GIF) as multipart/form-data (one or more files) or as
                  the raw body (Content-Type image/png, image/jpeg, ...), or JSON {"inputs": [image, ...]} where
                  each image is a HxW (or CxHxW) nested list of 0-255 values of the model's input size;
                  answers {"predictions": [{"label", "index", "confidence"}, ...]} in input order
  GET  /health    {"status": "ok", backend, model, classes, input shape, batching settings, limits}
  GET  /metrics   Prometheus text: requests and errors by status, refusals by reason, images, batch sizes,
                  latency histograms

Concurrent requests are grouped into one model call of up to --max-batch images, waiting at most --max-wait-ms
for a batch to fill while further requests are being received (requests that arrive while the model runs form the
next batch). Uploaded images are decoded by the same decoder as `predict` and training folders, in a pool of worker
threads off the event loop, and resized to the model's input inside the model, as everywhere else.

Hostile or broken clients: a body must arrive within --body-timeout seconds (408) and hold at most --max-body-bytes
(413) and --max-images images (413); the images' sizes are read from their headers and the request refused (413)
before any pixel is decoded when together they exceed --max-pixels. Other formats are answered 415, corrupt images
422, always as JSON {"error": ...}; a failure inside the server is answered 500 with a generic message (the details
go to the server log on stderr). The server keeps serving; Ctrl-C / SIGTERM stops accepting connections and
finishes the requests in flight before exiting.

--backend auto (the default) serves a run directory with the faster of ONNX Runtime and PyTorch: the model is
exported to ONNX in memory and both are timed on a full batch (--max-batch images) at start-up (on CPUs ONNX Runtime
usually wins by several times for the small models here); a model that does not export to ONNX is an error naming
why, and --backend torch serves it without. An .onnx file runs on ONNX Runtime, untimed: it holds no PyTorch model.
The line printed at start and /health name the backend in use.

Examples:
  trainforge serve runs/x                                   # http://127.0.0.1:8000
  trainforge serve model.onnx --port 9000 --max-batch 128 --max-wait-ms 2
  curl -F file=@digit.png http://127.0.0.1:8000/predict
  curl -H 'Content-Type: application/json' -d '{"inputs": [[[0, 0, ...], ...]]}' http://127.0.0.1:8000/predict
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from . import runs
from .data.images import MAX_IMAGE_PIXELS
from .errors import ConfigError, DeployError

if TYPE_CHECKING:
    from .deploy.app import Limits, Predictor

BACKENDS = ("auto", "onnxruntime", "torch")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="RUN_DIR_OR_ONNX", help="run directory or .onnx file")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--max-batch", type=int, default=64, help="most images per model call (default: 64)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="longest wait for a batch to fill, in milliseconds (default: 5)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="runtime of the model; auto: for a run directory, the faster of the two, timed on a "
                             "full batch at start-up; for an .onnx file, onnxruntime (default: auto)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads of the runtime (default: the runtime's own choice)")
    parser.add_argument("--max-body-bytes", type=int, default=8 << 20,
                        help="largest accepted request body (default: 8 MiB)")
    parser.add_argument("--max-images", type=int, default=256, help="most images in one request (default: 256)")
    parser.add_argument("--max-pixels", type=int, default=MAX_IMAGE_PIXELS,
                        help=f"most decoded pixels (width x height, summed over its images) of one request; "
                             f"checked from the image headers before decoding (default: {MAX_IMAGE_PIXELS:,})")
    parser.add_argument("--body-timeout", type=float, default=30.0,
                        help="seconds a client may take to send a request body (default: 30)")


# --- loading the model -------------------------------------------------------------------------------------------

def load_predictor(source: str | os.PathLike, backend: str = "auto", threads: int | None = None,
                   probe_batch: int = 64) -> Predictor:
    """The model at `source` (run directory or .onnx) on the asked runtime; 'auto' times the candidates on a
    batch of `probe_batch` images and keeps the faster."""
    from .deploy.app import Predictor
    from .deploy.formats import export_onnx, onnx_predictor, onnx_session, read_onnx_info, torch_predictor

    if backend not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    source = Path(source)
    if source.is_dir():
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        model = runs.load(source)
        candidates: dict[str, Callable[[], Callable[[np.ndarray], np.ndarray]]] = {
            "torch": lambda: torch_predictor(model)}
        example = torch.zeros(2, model.info.in_channels, model.info.image_size, model.info.image_size,
                              dtype=torch.uint8)

        def via_onnx() -> Callable[[np.ndarray], np.ndarray]:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.onnx"
                export_onnx(model, path, example, info=model.info)
                return onnx_predictor(onnx_session(path.read_bytes(), threads, spin=False))
        candidates["onnxruntime"] = via_onnx
        info, any_size = model.info, True
    elif source.suffix == ".onnx" and source.is_file():
        if backend == "torch":
            raise DeployError(f"{source}: an ONNX file runs on --backend onnxruntime, not torch")
        session = onnx_session(source, threads, spin=False)
        info = read_onnx_info(source) or _info_from_session(session, source)
        candidates = {"onnxruntime": lambda: onnx_predictor(session)}
        # A graph exported with fixed height and width takes the model's input size only.
        any_size = not all(isinstance(d, int) for d in session.get_inputs()[0].shape[2:])
    elif source.suffix == ".pt2":
        raise DeployError(f"{source}: .pt2 programs are not served: loading one unpickles Python objects, which a "
                          f"crafted file can use to run code; serve the run directory or an ONNX export of it "
                          f"(trainforge export RUN_DIR --format onnx)")
    else:
        raise DeployError(f"{source}: expected a run directory or an .onnx file")

    names = list(candidates) if backend == "auto" else [backend]
    built = {name: candidates[name]() for name in names}
    if len(built) == 1:
        name = names[0]
        return Predictor(name, built[name], info, any_size)
    probe = np.random.default_rng(0).integers(0, 256, (probe_batch, info.in_channels, info.image_size,
                                                       info.image_size), dtype=np.uint8)
    fastest = fastest_backend({name: _median_seconds(fn, probe) for name, fn in built.items()})
    return Predictor(fastest, built[fastest], info, any_size)


def fastest_backend(seconds: dict[str, float]) -> str:
    """The backend of the smallest median seconds per probe batch."""
    return min(seconds, key=seconds.get)


def _median_seconds(fn: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, repeats: int = 7) -> float:
    fn(batch)  # warm-up: first calls allocate and plan
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _info_from_session(session: Any, source: Path) -> runs.ModelInfo:
    # An ONNX file from elsewhere: take the input contract from its static shape, name classes by index.
    shape = session.get_inputs()[0].shape
    out = session.get_outputs()[0].shape
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]) or shape[2] != shape[3] or \
            not isinstance(out[-1], int) or session.get_inputs()[0].type != "tensor(uint8)":
        raise DeployError(f"{source}: expected a uint8 input [N, C, S, S] with fixed C, S and a fixed number of "
                          f"logits, got input {session.get_inputs()[0].type} {shape}, output {out}")
    return runs.ModelInfo(model="onnx", num_classes=out[-1], classes=[str(i) for i in range(out[-1])],
                          in_channels=shape[1], image_size=shape[2], mean=[0.0] * shape[1], std=[1.0] * shape[1])


# --- the verb ------------------------------------------------------------------------------------------------------

def serve(source: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 64,
          max_wait_ms: float = 5.0, backend: str = "auto", threads: int | None = None, limits: Limits | None = None,
          announce: Callable[[str], None] | None = None) -> None:
    """Serves `source` until SIGINT/SIGTERM, then stops accepting connections and finishes the requests in flight.

    The process then ends as the signal asks (uvicorn re-raises it once the server has shut down). Port 0 picks a
    free port; `announce` receives the address actually listened on.
    """
    import uvicorn

    from .deploy.app import Limits, create_app

    limits = limits or Limits()
    if max_batch < 1:
        raise ConfigError(f"--max-batch must be >= 1, got {max_batch}")
    if not 0 <= max_wait_ms <= 10_000:
        raise ConfigError(f"--max-wait-ms must be between 0 and 10000, got {max_wait_ms}")
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {port}")
    for name, value in (("--max-body-bytes", limits.max_body_bytes), ("--max-images", limits.max_images),
                        ("--max-pixels", limits.max_pixels)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if not 0 < limits.body_timeout_s <= 3600:
        raise ConfigError(f"--body-timeout must be between 0 and 3600 seconds, got {limits.body_timeout_s}")
    predictor = load_predictor(source, backend, threads, probe_batch=max_batch)
    app = create_app(predictor, max_batch, max_wait_ms, limits)
    # Binding here, not inside uvicorn, turns "address in use" into a one-line error and makes port 0 usable.
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise DeployError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=30,
                            limit_concurrency=4096)
    if announce is not None:
        announce(f"serving {source} ({predictor.info.model}, backend {predictor.backend}, max batch {max_batch}, "
                 f"max wait {max_wait_ms:g} ms) on http://{host}:{port}")
    uvicorn.Server(config).run(sockets=[sock])


def run(args: argparse.Namespace) -> None:
    from .deploy.app import Limits

    limits = Limits(args.max_body_bytes, args.max_images, args.max_pixels, args.body_timeout)
    quiet = args.json or args.quiet
    serve(args.source, args.host, args.port, args.max_batch, args.max_wait_ms, args.backend, args.threads, limits,
          announce=None if quiet else lambda line: print(line, file=sys.stderr, flush=True))
