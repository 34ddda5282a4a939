"""The HTTP application of `trainforge serve`: request decoding and limits, dynamic batching, Prometheus metrics.

Kept apart from the verb module so that FastAPI is imported only when a server is actually built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import time
from typing import Any, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .. import runs
from .batching import DynamicBatcher


@dataclasses.dataclass
class Limits:
    """What one request may carry; anything beyond is answered 413 or 422."""

    max_body_bytes: int = 8 << 20
    max_images: int = 256
    max_side: int = 2048


@dataclasses.dataclass
class Predictor:
    """A model behind one runtime: uint8 images [N, C, H, W] -> float32 logits [N, K]."""

    backend: str
    predict: Callable[[np.ndarray], np.ndarray]
    info: runs.ModelInfo


class BadRequest(Exception):
    """A request the server refuses, with the HTTP status and the message the client gets."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# --- decoding requests ---------------------------------------------------------------------------------------------

def decode_image(data: bytes, info: runs.ModelInfo, limits: Limits, name: str = "image") -> np.ndarray:
    """A PNG/JPEG as uint8 [C, S, S] in the model's channels and size; BadRequest (422) when it is not one."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in ("PNG", "JPEG"):
            raise BadRequest(422, f"{name}: expected a PNG or JPEG image, got {image.format or 'unknown'} data")
        width, height = image.size
        # The header gives the size before any pixel is decoded, so a decompression bomb is refused cheaply.
        if max(width, height) > limits.max_side or min(width, height) < 1:
            raise BadRequest(422, f"{name}: image of {width}x{height} pixels; each side must be 1-{limits.max_side}")
        image = image.convert("L" if info.in_channels == 1 else "RGB")
        if image.size != (info.image_size, info.image_size):
            image = image.resize((info.image_size, info.image_size), Image.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
    except BadRequest:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadRequest(422, f"{name}: not a readable PNG/JPEG image ({str(exc).splitlines()[0][:120]})") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def decode_json(body: bytes, info: runs.ModelInfo, limits: Limits) -> np.ndarray:
    """The images of a JSON {"inputs": [...]} body as uint8 [N, C, S, S]; BadRequest (400/413/422) otherwise."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest(400, f"body is not valid JSON ({exc})") from None
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise BadRequest(422, 'expected a JSON object {"inputs": [image, ...]}')
    inputs = payload["inputs"]
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest(422, '"inputs" must be a non-empty list of images')
    if len(inputs) > limits.max_images:
        raise BadRequest(413, f'"inputs" holds {len(inputs)} images; at most {limits.max_images} per request')
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

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="trainforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics = metrics

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "backend": predictor.backend, "model": info.model, "classes": info.classes,
                "input": {"dtype": "uint8", "shape": ["N", info.in_channels, info.image_size, info.image_size]},
                "max_batch": max_batch, "max_wait_ms": max_wait_ms, "limits": dataclasses.asdict(limits)}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def predict(request: Request) -> JSONResponse:
        start = time.perf_counter()
        metrics.in_flight.inc()
        batcher.expect()
        try:
            try:
                images = await _read_images(request, info, limits)
            except BaseException:
                batcher.withdraw()
                raise
            logits = await batcher.submit(images, expected=True)
            status, content = 200, {"predictions": _predictions(logits, info.classes)}
        except BadRequest as exc:
            status, content = exc.status, {"error": exc.message}
        except Exception as exc:  # a model failure answers 500 for this request; the server keeps serving
            status, content = 500, {"error": f"inference failed: {type(exc).__name__}: {exc}"}
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


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest(400, f"invalid Content-Length {declared!r}")
        if int(declared) > limit:
            raise BadRequest(413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_images(request: Request, info: runs.ModelInfo, limits: Limits) -> np.ndarray:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        return await _read_multipart(request, info, limits)
    body = await _read_body(request, limits.max_body_bytes)
    if kind == "application/json":
        return decode_json(body, info, limits)
    if kind in ("image/png", "image/jpeg"):
        return decode_image(body, info, limits, "body")[None]
    raise BadRequest(415, f"unsupported Content-Type {kind or '(none)'!r}; send multipart/form-data, image/png, "
                          f"image/jpeg or application/json")


async def _read_multipart(request: Request, info: runs.ModelInfo, limits: Limits) -> np.ndarray:
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit():
        raise BadRequest(411, "multipart uploads need a Content-Length header")
    body = await _read_body(request, limits.max_body_bytes)
    files = parse_multipart(body, request.headers.get("content-type", ""), limits.max_images)
    if not files:
        raise BadRequest(422, "the multipart body holds no file; send the image as a file field")
    return np.stack([decode_image(data, info, limits, name) for name, data in files])


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
        raise BadRequest(400, "malformed multipart body (no boundary in its Content-Type)")
    collector = _MultipartFiles(max_parts)
    parser = MultipartParser(boundary, collector.callbacks())
    try:
        parser.write(body)
        parser.finalize()
    except BadRequest:
        raise
    except Exception as exc:  # python-multipart raises several types (and ValueError) for malformed bodies
        raise BadRequest(400, f"malformed multipart body ({str(exc)[:200]})") from None
    if not collector.finished:
        raise BadRequest(400, "malformed multipart body (it ends before its closing boundary)")
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
            raise BadRequest(413, f"the multipart body holds more than {self.max_parts} parts")
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
