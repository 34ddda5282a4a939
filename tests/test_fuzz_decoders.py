"""Fuzz tests of what `serve` decodes from clients: JSON inputs, multipart bodies and image files. Whatever the bytes,
a decoder returns well-formed images or refuses with a BadRequest (a 4xx status and a message); it never raises
anything else. In-process, 1,000 cases each."""

from __future__ import annotations

import io
import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from trainforge.deploy.app import BadRequest, Limits, Predictor, decode_body, decode_json, parse_multipart
from trainforge.runs import ModelInfo

INFO = ModelInfo(model="linear", num_classes=3, classes=["a", "b", "c"], in_channels=1, image_size=4, mean=[0.5],
                 std=[0.25])
LIMITS = Limits(max_body_bytes=1 << 16, max_images=8, max_pixels=4096)
PREDICTOR = Predictor("torch", lambda images: np.zeros((len(images), 3), np.float32), INFO)
FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BOUNDARY = "fuzzboundary"


def assert_refusal(exc: BadRequest) -> None:
    assert 400 <= exc.status < 500 and exc.message and exc.reason


json_values = st.recursive(st.none() | st.booleans() | st.integers(-300, 300) | st.floats() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=3),
                           max_leaves=12)
pixel_rows = st.lists(st.lists(st.integers(-2, 260) | st.floats(-1, 300), min_size=4, max_size=4), min_size=4,
                      max_size=4)


@FUZZ
@given(st.one_of(json_values.map(lambda v: json.dumps(v).encode()),
                 st.lists(pixel_rows, min_size=1, max_size=3).map(lambda rows: json.dumps({"inputs": rows}).encode()),
                 st.binary(max_size=200)))
def test_json_inputs_decode_or_are_refused(body: bytes) -> None:
    try:
        images = decode_json(body, INFO, LIMITS)
    except BadRequest as exc:
        assert_refusal(exc)
        return
    assert images.dtype == np.uint8 and images.shape[1:] == (1, 4, 4) and 1 <= len(images) <= LIMITS.max_images


def multipart(parts: list[tuple[str, bytes]], tail: bytes) -> bytes:
    body = b"".join(f"--{BOUNDARY}\r\n{headers}\r\n\r\n".encode("utf-8", "replace") + data + b"\r\n"
                    for headers, data in parts)
    return body + tail


part_headers = st.one_of(
    st.builds(lambda name: f'Content-Disposition: form-data; name="file"; filename="{name}"',
              st.text(max_size=8).filter(lambda t: '"' not in t and "\r" not in t and "\n" not in t)),
    st.just('Content-Disposition: form-data; name="note"'),
    st.text(max_size=40))


@FUZZ
@given(st.lists(st.tuples(part_headers, st.binary(max_size=40)), max_size=10),
       st.sampled_from([f"--{BOUNDARY}--\r\n".encode(), b"", f"--{BOUNDARY}".encode(), b"garbage"]),
       st.binary(max_size=3), st.integers(0, 400))
def test_multipart_bodies_parse_or_are_refused(parts, tail: bytes, noise: bytes, where: int) -> None:
    body = multipart(parts, tail)
    body = body[:where] + noise + body[where:]  # bytes slipped in anywhere
    try:
        files = parse_multipart(body, f"multipart/form-data; boundary={BOUNDARY}", LIMITS.max_images)
    except BadRequest as exc:
        assert_refusal(exc)
        return
    assert len(files) <= LIMITS.max_images
    assert all(isinstance(name, str) and isinstance(data, bytes) for name, data in files)


def encoded(format: str, mode: str, size: tuple[int, int]) -> bytes:
    image = Image.fromarray(np.random.default_rng(size[0]).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.convert(mode).save(buffer, format)
    return buffer.getvalue()


SEEDS = [encoded(f, m, s) for f, m in (("PNG", "L"), ("PNG", "RGBA"), ("PNG", "P"), ("JPEG", "RGB"), ("GIF", "P"),
                                       ("BMP", "RGB"), ("TIFF", "RGB"), ("WEBP", "RGB"))
         for s in ((4, 4), (9, 5))]


@st.composite
def damaged_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut] if draw(st.booleans()) else data)


@FUZZ
@given(st.one_of(damaged_images(), st.binary(max_size=64)),
       st.sampled_from(["image/png", "image/jpeg", "image/gif"]))
def test_image_bodies_decode_or_are_refused(body: bytes, content_type: str) -> None:
    try:
        groups = decode_body(body, content_type, PREDICTOR, LIMITS)
    except BadRequest as exc:
        assert_refusal(exc)
        assert exc.status in (413, 415, 422)
        return
    (index, images), = groups
    assert index == [0] and images.dtype == np.uint8 and images.shape[:2] == (1, 1)
    assert images.shape[2] * images.shape[3] <= LIMITS.max_pixels
