"""The HTTP application of `trainforge serve`: request decoding and limits, dynamic batching, Prometheus metrics.

Kept apart from the verb module so that FastAPI is imported only when a server is actually built. The event loop
only moves bytes: bodies are read under a timeout, then parsed and decoded in a bounded pool of worker threads, with
every image's size read from its header and the request's pixel budget checked before any pixel is decoded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .. import runs
from ..data.images import MAX_IMAGE_PIXELS, ImageError, decode, open_image
from .batching import DynamicBatcher

log = logging.getLogger("trainforge.serve")
IMAGE_TYPES = ("image/png", "image/jpeg", "image/bmp", "image/webp", "image/tiff", "image/gif")
# Threads that parse and decode request bodies: enough to use the cores, few enough that decoding cannot crowd out
# the event loop and the model.
DECODE_WORKERS = max(1, min(4, os.cpu_count() or 1))
# What an image the shared decoder refuses is answered: (HTTP status, reason counted in /metrics).
_IMAGE_ERRORS = {"unsupported": (415, "unsupported_format"), "too_large": (413, "image_too_large"),
                 "unreadable": (422, "unreadable_image")}


@dataclasses.dataclass
class Limits:
    """What one request may carry, and how long its body may take to arrive; anything beyond is answered 4xx."""

    max_body_bytes: int = 8 << 20
    max_images: int = 256
    max_pixels: int = MAX_IMAGE_PIXELS
    body_timeout_s: float = 30.0


@dataclasses.dataclass
class Predictor:
    """A model behind one runtime: uint8 images [N, C, H, W] -> float32 logits [N, K]; `any_size`: it resizes images
    of any height and width itself (else it takes the model's input size only)."""

    backend: str
    predict: Callable[[np.ndarray], np.ndarray]
    info: runs.ModelInfo
    any_size: bool = True


class BadRequest(Exception):
    """A request the server refuses, with the HTTP status, the message the client gets and the reason /metrics
    counts it under."""

    def __init__(self, status: int, message: str, reason: str = "bad_input"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason


# --- decoding requests ---------------------------------------------------------------------------------------------

def decode_images(files: list[tuple[str, bytes]], channels: int, limits: Limits,
                  size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Each (name, bytes) image as uint8 [channels, H, W], decoded by the shared decoder (for pixels resized to
    `size`, as training's) once every header has been read and the request's pixels counted; BadRequest
    (413/415/422) naming the first image refused."""
    opened = []
    try:
        with _refused_images():
            total = 0
            for name, data in files:
                opened.append(open_image(data, name, min(limits.max_pixels, MAX_IMAGE_PIXELS)))
                total += opened[-1].width * opened[-1].height
                if total > limits.max_pixels:
                    raise BadRequest(413, f"the request's images hold more than {limits.max_pixels:,} pixels in all "
                                          f"(the first {len(opened)} of {len(files)} hold {total:,})", "pixel_budget")
            return [decode(image, channels, name, size) for image, (name, _) in zip(opened, files)]
    finally:
        for image in opened:
            image.close()


@contextlib.contextmanager
def _refused_images():
    try:
        yield
    except ImageError as exc:
        status, reason = _IMAGE_ERRORS[exc.kind]
        raise BadRequest(status, str(exc), reason) from None


def decode_json(body: bytes, info: runs.ModelInfo, limits: Limits) -> np.ndarray:
    """The images of a JSON {"inputs": [...]} body as uint8 [N, C, S, S]; BadRequest (400/413/422) otherwise."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest(400, f"body is not valid JSON ({exc})", "malformed") from None
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise BadRequest(422, 'expected a JSON object {"inputs": [image, ...]}')
    inputs = payload["inputs"]
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest(422, '"inputs" must be a non-empty list of images')
    if len(inputs) > limits.max_images:
        raise BadRequest(413, f'"inputs" holds {len(inputs)} images; at most {limits.max_images} per request',
                         "too_many_images")
    try:
        array = np.asarray(inputs, dtype=np.float64)
    except (ValueError, TypeError):
        raise BadRequest(422, '"inputs" must be a list of equally shaped images of numbers (HxW or CxHxW)') from None
    c, s = info.in_channels, info.image_size
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4 or array.shape[1:] != (c, s, s):
        raise BadRequest(422, f'each image in "inputs" must be {s}x{s}' + (f" or {c}x{s}x{s}" if c == 1 else
                                                                          f" as {c}x{s}x{s}")
                         + f"; got inputs of shape {list(np.shape(inputs))}")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise BadRequest(422, '"inputs" values must be pixel values between 0 and 255')
    return np.rint(array).astype(np.uint8)


# --- the application -----------------------------------------------------------------------------------------------

class Metrics:
    """Prometheus series of one server, in a registry of its own (so that tests can run several)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("trainforge_requests", "HTTP requests to /predict, by status code", ["status"],
                                registry=self.registry)
        self.errors = Counter("trainforge_errors", "requests to /predict answered with an error, by status code",
                              ["status"], registry=self.registry)
        self.in_flight = Gauge("trainforge_requests_in_flight", "requests to /predict being answered",
                               registry=self.registry)
        self.rejected = Counter("trainforge_rejected", "requests to /predict refused or failed, by reason",
                                ["reason"], registry=self.registry)
        self.images = Counter("trainforge_images", "images classified", registry=self.registry)
        self.batch_size = Histogram("trainforge_batch_size", "images per model call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=self.registry)
        self.batch_seconds = Histogram("trainforge_batch_seconds", "seconds per model call", registry=self.registry,
                                       buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0))
        self.latency = Histogram("trainforge_request_seconds", "seconds from request to response of /predict",
                                 registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0))

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.images.inc(size)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def create_app(predictor: Predictor, max_batch: int = 64, max_wait_ms: float = 5.0, limits: Limits | None = None
               ) -> Any:
    """The FastAPI application serving `predictor` with dynamic batching (started and stopped with the app)."""
    limits = limits or Limits()
    info = predictor.info
    metrics = Metrics()
    batcher = DynamicBatcher(predictor.predict, max_batch, max_wait_ms, metrics.on_batch)
    decoders = concurrent.futures.ThreadPoolExecutor(DECODE_WORKERS, thread_name_prefix="trainforge-decode")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()
        decoders.shutdown(wait=True)

    app = FastAPI(title="trainforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics = metrics
    health_answer = _health(predictor, max_batch, max_wait_ms, limits)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return health_answer

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def predict(request: Request) -> JSONResponse:
        start = time.perf_counter()
        metrics.in_flight.inc()
        batcher.expect()
        try:
            try:
                groups = await _read_images(request, predictor, limits, decoders)
            except BaseException:
                batcher.withdraw()
                raise
            logits = await _classify(batcher, groups)
            status, content = 200, {"predictions": _predictions(logits, info.classes)}
        except BadRequest as exc:
            status, content = exc.status, {"error": exc.message}
            metrics.rejected.labels(exc.reason).inc()
        except Exception:  # a failure answers 500 for this request (details in the server log); the server keeps on
            log.exception("POST /predict failed")
            status, content = 500, {"error": "internal error while answering the request; see the server log"}
            metrics.rejected.labels("internal_error").inc()
        finally:
            metrics.in_flight.dec()
        metrics.requests.labels(str(status)).inc()
        if status >= 400:
            metrics.errors.labels(str(status)).inc()
        metrics.latency.observe(time.perf_counter() - start)
        return JSONResponse(content, status_code=status)

    # A plain Starlette route: FastAPI's dependency resolution per request, which this endpoint does not use (it
    # reads the raw request), took a fifth of the event loop's time under load.
    app.add_route("/predict", predict, methods=["POST"])
    return app


def _health(predictor: Predictor, max_batch: int, max_wait_ms: float, limits: Limits) -> dict[str, Any]:
    info = predictor.info
    height, width = ("H", "W") if predictor.any_size else (info.image_size, info.image_size)
    return {"status": "ok", "backend": predictor.backend, "model": info.model, "classes": info.classes,
            "input": {"dtype": "uint8", "shape": ["N", info.in_channels, height, width], "model_size": info.image_size},
            "max_batch": max_batch, "max_wait_ms": max_wait_ms, "limits": dataclasses.asdict(limits)}


# Images of one shape, as one array [n, C, H, W], and the positions in the request they came from.
Group = tuple[list[int], np.ndarray]


async def _classify(batcher: DynamicBatcher, groups: list[Group]) -> np.ndarray:
    # Each shape is its own submission: only images of one shape can share a model call.
    outputs = await asyncio.gather(*(batcher.submit(images, expected=k == 0) for k, (_, images) in enumerate(groups)))
    logits = np.empty((sum(len(index) for index, _ in groups), outputs[0].shape[1]), dtype=np.float32)
    for (index, _), out in zip(groups, outputs):
        logits[index] = out
    return logits


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest(400, f"invalid Content-Length {declared!r}", "malformed")
        if int(declared) > limit:
            raise BadRequest(413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes",
                             "body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"request body exceeds the limit of {limit} bytes", "body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_images(request: Request, predictor: Predictor, limits: Limits,
                       decoders: concurrent.futures.Executor) -> list[Group]:
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";")[0].strip().lower()
    if kind not in ("multipart/form-data", "application/json", *IMAGE_TYPES):
        raise BadRequest(415, f"unsupported Content-Type {kind or '(none)'!r}; send multipart/form-data, "
                              f"application/json or an image ({', '.join(IMAGE_TYPES)})", "unsupported_media_type")
    if kind == "multipart/form-data" and not request.headers.get("content-length", "").isdigit():
        raise BadRequest(411, "multipart uploads need a Content-Length header", "malformed")
    try:
        body = await asyncio.wait_for(_read_body(request, limits.max_body_bytes), limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise BadRequest(408, f"the request body did not arrive within {limits.body_timeout_s:g} s",
                         "body_timeout") from None
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(decoders, decode_body, body, content_type, predictor, limits)


def decode_body(body: bytes, content_type: str, predictor: Predictor, limits: Limits) -> list[Group]:
    """The images of a /predict body (multipart, JSON or one raw image), grouped by shape; BadRequest otherwise."""
    info = predictor.info
    kind = content_type.split(";")[0].strip().lower()
    if kind == "application/json":
        images = decode_json(body, info, limits)
        return [(list(range(len(images))), images)]
    if kind == "multipart/form-data":
        files = parse_multipart(body, content_type, limits.max_images)
        if not files:
            raise BadRequest(422, "the multipart body holds no file; send the image as a file field")
    else:
        files = [("body", body)]
    # A model that takes any size resizes inside itself, so a large JPEG may be decoded by draft as training's was;
    # one that takes its own size only refuses others, and reports their size as sent.
    size = (info.image_size, info.image_size) if predictor.any_size else None
    arrays = decode_images(files, info.in_channels, limits, size)
    shapes: dict[tuple[int, ...], list[int]] = {}
    for i, array in enumerate(arrays):
        if not predictor.any_size and array.shape[1:] != (info.image_size, info.image_size):
            raise BadRequest(422, f"{files[i][0]}: image of {array.shape[2]}x{array.shape[1]} pixels; this model "
                                  f"takes {info.image_size}x{info.image_size} images only")
        shapes.setdefault(array.shape, []).append(i)
    return [(index, np.stack([arrays[i] for i in index])) for index in shapes.values()]


def parse_multipart(body: bytes, content_type: str, max_parts: int) -> list[tuple[str, bytes]]:
    """The files of a multipart/form-data body as (filename, bytes); fields without a filename are skipped.

    The body is already in memory (and within the size limit), so python-multipart's parser runs over it once with
    callbacks that keep the parts as bytes: Starlette's form parser (a spooled temporary file and an UploadFile per
    part) took a fifth of the server's time per request under load.
    """
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest(400, "malformed multipart body (no boundary in its Content-Type)", "malformed")
    collector = _MultipartFiles(max_parts)
    parser = MultipartParser(boundary, collector.callbacks())
    try:
        parser.write(body)
        parser.finalize()
    except BadRequest:
        raise
    except Exception as exc:  # python-multipart raises several types (and ValueError) for malformed bodies
        raise BadRequest(400, f"malformed multipart body ({str(exc)[:200]})", "malformed") from None
    if not collector.finished:
        raise BadRequest(400, "malformed multipart body (it ends before its closing boundary)", "malformed")
    return collector.files


class _MultipartFiles:
    """python-multipart parser callbacks that collect the file parts of a body."""

    def __init__(self, max_parts: int):
        self.max_parts = max_parts
        self.files: list[tuple[str, bytes]] = []
        self.part: dict[str, Any] = {}
        self.parts = 0
        self.finished = False

    def callbacks(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ("on_part_begin", "on_header_field", "on_header_value",
                                                       "on_header_end", "on_part_data", "on_part_end", "on_end")}

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.max_parts:
            raise BadRequest(413, f"the multipart body holds more than {self.max_parts} parts", "too_many_images")
        self.part.update(field=b"", value=b"", headers={}, data=[])

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.part["field"] += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.part["value"] += data[start:end]

    def on_header_end(self) -> None:
        self.part["headers"][self.part["field"].lower()] = self.part["value"]
        self.part["field"] = self.part["value"] = b""

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.part["data"].append(data[start:end])

    def on_part_end(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, disposition = parse_options_header(self.part["headers"].get(b"content-disposition"))
        if b"filename" in disposition:
            name = disposition[b"filename"].decode("utf-8", "replace") or "file"
            self.files.append((name, b"".join(self.part["data"])))

    def on_end(self) -> None:
        self.finished = True


def _predictions(logits: np.ndarray, classes: list[str]) -> list[dict[str, Any]]:
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    best = probs.argmax(axis=1)
    return [{"label": classes[i] if i < len(classes) else str(i), "index": int(i), "confidence": float(p[i])}
            for i, p in zip(best, probs)]
