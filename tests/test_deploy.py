"""Export (ONNX / torch.export parity) and serving (a real server process, a real HTTP client)."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import run_cli, start_server, wait_for


@pytest.fixture(scope="module")
def onnx_file(small_cnn_run, tmp_path_factory) -> Path:
    """The run exported through the CLI, as a user would; the export checks its own parity."""
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    result = run_cli("export", str(small_cnn_run), "--format", "onnx", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["parity"]["images"] == 1000
    assert summary["parity"]["max_abs_diff"] <= 1e-4
    assert summary["parity"]["top1_agreement"] >= 0.999
    assert summary["size_bytes"] == out.stat().st_size
    return out


def test_onnx_export_keeps_load_contract_with_dynamic_batch_and_size(small_cnn_run, onnx_file, mnist):
    import trainforge
    from trainforge.deploy import read_onnx_info

    model = trainforge.load(small_cnn_run)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.type == "tensor(uint8)" and inp.shape[1] == 1
    assert not any(isinstance(d, int) for d in (inp.shape[0], *inp.shape[2:]))
    for n, size in ((1, 28), (7, 28), (300, 28), (3, 45)):  # batch sizes and an image size other than the example's
        images = mnist.test.images[-n:]
        images = torch.nn.functional.interpolate(images.float(), size=size).to(torch.uint8) if size != 28 else images
        got = session.run(None, {inp.name: images.numpy()})[0]
        with torch.inference_mode():
            want = model(images).numpy()
        assert got.shape == (n, 10)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    info = read_onnx_info(onnx_file)
    assert info.classes == model.classes and info.model == "cnn" and info.image_size == 28


def test_pt2_export_roundtrip(small_cnn_run, tmp_path, mnist):
    import trainforge
    from trainforge.deploy.formats import load_program
    from trainforge.export import export_run

    out = tmp_path / "model.pt2"
    result = export_run(small_cnn_run, out, format="pt2", check_images=200)
    assert result["parity"]["max_abs_diff"] <= 1e-4 and result["parity"]["top1_agreement"] >= 0.999
    module, info = load_program(out)
    images = mnist.test.images[:5]
    larger = torch.nn.functional.interpolate(images.float(), size=(37, 53)).to(torch.uint8)
    with torch.inference_mode():
        for batch in (images, larger):
            torch.testing.assert_close(module(batch), trainforge.load(small_cnn_run)(batch), atol=1e-4, rtol=0)
    assert info.classes == [str(i) for i in range(10)]


def test_serve_refuses_pt2_programs(tmp_path):
    from trainforge.serve import load_predictor
    from trainforge.errors import DeployError

    program = tmp_path / "model.pt2"
    program.write_bytes(b"PK\x03\x04 not even looked at")
    with pytest.raises(DeployError, match="model.pt2: .pt2 programs are not served"):
        load_predictor(program)


def test_export_that_disagrees_is_an_error_and_leaves_no_file(small_cnn_run, tmp_path, monkeypatch):
    from trainforge import export
    from trainforge.errors import DeployError

    # A candidate that is off by a constant on one logit stands in for a broken exporter.
    def skewed(session):
        name = session.get_inputs()[0].name
        return lambda images: session.run(None, {name: images})[0] + np.eye(10, dtype=np.float32)[3] * 5.0
    monkeypatch.setattr(export, "onnx_predictor", skewed)
    out = tmp_path / "bad.onnx"
    with pytest.raises(DeployError, match="disagrees"):
        export.export_run(small_cnn_run, out, check_images=100)
    assert not out.exists()


def test_export_that_fails_to_load_or_run_leaves_no_file(small_cnn_run, tmp_path, monkeypatch):
    from trainforge import export
    from trainforge.errors import DeployError

    def unloadable(*args, **kwargs):  # as ONNX Runtime fails on a graph it cannot read
        raise RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : injected")

    def failing_run(session):
        def predict(images):
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : injected")
        return predict

    for name, target, fault, message in (
            ("unloadable.onnx", ort, ("InferenceSession", unloadable), "ONNX Runtime cannot load the model"),
            ("failing.onnx", export, ("onnx_predictor", failing_run), "loads but fails to run in onnxruntime")):
        out = tmp_path / name
        with monkeypatch.context() as patched:
            patched.setattr(target, *fault)
            with pytest.raises(DeployError, match=f"{message} .*injected.*; file removed"):
                export.export_run(small_cnn_run, out, check_images=100)
        assert not out.exists() and not list(tmp_path.iterdir()), name


def test_export_of_a_model_with_nan_logits_fails_and_leaves_no_file(small_cnn_run, tmp_path, monkeypatch):
    import trainforge
    from trainforge import export
    from trainforge.errors import DeployError

    # NaN in one logit on both sides: the top-1 answers still agree, only the NaN difference can fail the check.
    model = trainforge.load(small_cnn_run)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias[3] = float("nan")
    monkeypatch.setattr(export.runs, "load", lambda run_dir: model)
    out = tmp_path / "nan.onnx"
    with pytest.raises(DeployError, match=r"difference\| nan \(logits that are not finite\).*agreement 100\.00%"):
        export.export_run(small_cnn_run, out, check_images=100)
    assert not out.exists()


def test_export_errors_name_the_problem(small_cnn_run, tmp_path):
    from trainforge.errors import CheckpointError, ConfigError
    from trainforge.export import export_run

    result = run_cli("export", str(small_cnn_run), "--out", str(tmp_path / "m.onnx"), "--opset", "3")
    assert result.returncode == 2 and "--opset" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(CheckpointError, match="nope"):
        export_run(tmp_path / "nope", tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="does not exist"):
        export_run(small_cnn_run, tmp_path / "missing" / "m.onnx")
    with pytest.raises(ConfigError, match="--format"):
        export_run(small_cnn_run, tmp_path / "m.tflite", format="tflite")


def test_serve_backend_choices(small_cnn_run, onnx_file, monkeypatch):
    """--backend auto: a run directory is timed on both runtimes and served on the faster (the choice on given
    timings: the test below); an ONNX file runs on ONNX Runtime, untimed, since it holds no PyTorch model."""
    from trainforge import serve
    from trainforge.errors import DeployError

    timings = []

    def choosing(name):
        def fastest_backend(seconds):
            timings.append(seconds)
            return name
        return fastest_backend

    monkeypatch.setattr(serve, "fastest_backend", choosing("torch"))
    onnx_pred = serve.load_predictor(onnx_file, "auto")
    assert onnx_pred.backend == "onnxruntime" and timings == []
    assert serve.load_predictor(small_cnn_run, "torch").backend == "torch" and timings == []
    images = np.random.default_rng(0).integers(0, 256, (4, 1, 28, 28), dtype=np.uint8)
    for name in ("torch", "onnxruntime"):
        monkeypatch.setattr(serve, "fastest_backend", choosing(name))
        auto_pred = serve.load_predictor(small_cnn_run, "auto", probe_batch=8)
        assert auto_pred.backend == name
        np.testing.assert_allclose(auto_pred.predict(images), onnx_pred.predict(images), atol=1e-4, rtol=0)
    assert [sorted(t) for t in timings] == [["onnxruntime", "torch"]] * 2
    assert all(s > 0 for t in timings for s in t.values())
    with pytest.raises(DeployError, match="onnxruntime"):
        serve.load_predictor(onnx_file, "torch")
    with pytest.raises(DeployError, match="expected a run directory"):
        serve.load_predictor(onnx_file.with_suffix(".txt"), "auto")


def test_auto_backend_keeps_the_fastest_on_given_timings():
    from trainforge.serve import fastest_backend

    assert fastest_backend({"torch": 0.004, "onnxruntime": 0.001}) == "onnxruntime"
    assert fastest_backend({"torch": 0.001, "onnxruntime": 0.004}) == "torch"
    assert fastest_backend({"onnxruntime": 0.5}) == "onnxruntime"


# --- a real server process ---------------------------------------------------------------------------------------

MAX_PIXELS = 1_000_000
MAX_BODY = 200_000


@pytest.fixture(scope="module")
def server(onnx_file):
    proc, base = start_server(onnx_file, "--max-batch", "32", "--max-wait-ms", "200", "--max-body-bytes",
                              str(MAX_BODY), "--max-images", "16", "--max-pixels", str(MAX_PIXELS),
                              "--body-timeout", "1.5")
    yield proc, base
    proc.kill()
    proc.wait()


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def expected_labels(run_dir: Path, images: torch.Tensor) -> list[str]:
    import trainforge

    model = trainforge.load(run_dir)
    with torch.inference_mode():
        return [model.classes[i] for i in model(images).argmax(1).tolist()]


def test_health_and_valid_requests(server, small_cnn_run, mnist):
    _, base = server
    health = httpx.get(base + "/health").json()
    assert health["status"] == "ok" and health["backend"] == "onnxruntime"
    assert health["input"]["shape"] == ["N", 1, "H", "W"] and health["input"]["model_size"] == 28
    assert health["max_batch"] == 32 and health["limits"]["max_pixels"] == MAX_PIXELS

    images = mnist.test.images[:3]
    want = expected_labels(small_cnn_run, images)
    files = [("file", (f"{i}.png", png_bytes(images[i, 0].numpy()), "image/png")) for i in range(3)]
    response = httpx.post(base + "/predict", files=files)
    assert response.status_code == 200, response.text
    assert [p["label"] for p in response.json()["predictions"]] == want
    response = httpx.post(base + "/predict", json={"inputs": images[:, 0].tolist()})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["label"] for p in predictions] == want and all(0 < p["confidence"] <= 1 for p in predictions)
    response = httpx.post(base + "/predict", content=png_bytes(images[0, 0].numpy()),
                          headers={"content-type": "image/png"})
    assert response.status_code == 200 and response.json()["predictions"][0]["label"] == want[0]
    # An image of another size is resized inside the model, as by `trainforge predict`.
    big = np.kron(images[0, 0].numpy(), np.ones((2, 2), dtype=np.uint8))
    response = httpx.post(base + "/predict", files={"file": ("big.png", png_bytes(big), "image/png")})
    assert response.status_code == 200


@pytest.mark.parametrize("kwargs, status, message", [
    (dict(files={"file": ("x.png", b"\x89PNG\r\n\x1a\n-not-really", "image/png")}), 422, "x.png: not a readable"),
    (dict(content=b"GIF89a" + bytes(100), headers={"content-type": "image/png"}), 422, "body: not a readable"),
    (dict(content=b"BM" + bytes(100), headers={"content-type": "image/png"}), 422, "body: not a readable"),
    (dict(content=b"II*\x00" + bytes(100), headers={"content-type": "image/tiff"}), 422, "body: not a readable"),
    (dict(content=b"hello", headers={"content-type": "image/png"}), 415, "not an image in a supported format"),
    (dict(json={"inputs": [np.zeros((27, 28), int).tolist()]}), 422, "28x28"),
    (dict(json={"inputs": [[[1, 2], [3]]]}), 422, "equally shaped"),
    (dict(json={"inputs": [np.full((28, 28), 300).tolist()]}), 422, "between 0 and 255"),
    (dict(json={"images": []}), 422, "inputs"),
    (dict(json={"inputs": np.zeros((17, 28, 28), int).tolist()}), 413, "at most 16"),
    (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "JSON"),
    (dict(content=b"x" * (MAX_BODY + 1), headers={"content-type": "image/png"}), 413, "exceeds"),
    (dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "Content-Type"),
    (dict(files={"note": (None, "text only")}), 422, "no file"),
    (dict(content=b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\nabc',
          headers={"content-type": "multipart/form-data; boundary=xyz"}), 400, "closing boundary"),
    (dict(content=b"--xyz\r\n", headers={"content-type": "multipart/form-data"}), 400, "no boundary"),
    (dict(files=[("file", (f"{i}.png", b"x", "image/png")) for i in range(17)]), 413, "more than 16 parts"),
])
def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(server, kwargs, status, message):
    _, base = server
    response = httpx.post(base + "/predict", **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert httpx.get(base + "/health").status_code == 200


def test_serve_on_a_taken_port_is_a_one_line_error(server, onnx_file):
    _, base = server
    result = run_cli("serve", str(onnx_file), "--port", base.rsplit(":", 1)[1], timeout=120)
    assert result.returncode == 2 and "cannot listen on 127.0.0.1" in result.stderr
    assert "Traceback" not in result.stderr


def test_oversize_image_dimensions_are_refused_before_decoding(server):
    from PIL import Image

    _, base = server
    buffer = io.BytesIO()
    Image.new("L", (3000, 400)).save(buffer, "PNG")  # a tiny file of 1.2 Mpixel, over the server's --max-pixels
    response = httpx.post(base + "/predict", files={"file": ("wide.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 413 and "3000x400" in response.json()["error"]


def rejected(base: str, reason: str) -> float:
    prefix = f'trainforge_rejected_total{{reason="{reason}"}} '
    return sum(float(line.split(" ")[1]) for line in httpx.get(base + "/metrics").text.splitlines()
               if line.startswith(prefix))


def test_pixel_budget_of_a_request_is_checked_from_headers(server):
    _, base = server
    before = rejected(base, "pixel_budget")
    image = png_bytes(np.zeros((800, 800), dtype=np.uint8))  # 640,000 pixels each: two exceed the budget
    files = [("file", (f"{i}.png", image, "image/png")) for i in range(2)]
    response = httpx.post(base + "/predict", files=files)
    assert response.status_code == 413 and f"more than {MAX_PIXELS:,} pixels in all" in response.json()["error"]
    assert rejected(base, "pixel_budget") == before + 1
    assert httpx.post(base + "/predict", files=files[:1]).status_code == 200


def test_a_slow_body_is_answered_408_and_counted(server):
    _, base = server
    port = int(base.rsplit(":", 1)[1])
    before = rejected(base, "body_timeout")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
                     b"\x89PNG")  # and then nothing: the server's --body-timeout is 1.5 s
        reply = b""
        while not reply.endswith(b"}") and (chunk := sock.recv(65536)):  # headers and body may come apart
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 1.5 s" in reply
    assert rejected(base, "body_timeout") == before + 1


def in_process_app(predict: Any, max_batch: int = 4, max_wait_ms: float = 1) -> Any:
    from trainforge.deploy.app import Predictor, create_app
    from trainforge.runs import ModelInfo

    info = ModelInfo(model="linear", num_classes=2, classes=["a", "b"], in_channels=1, image_size=4, mean=[0.5],
                     std=[0.25])
    return create_app(Predictor("torch", predict, info), max_batch=max_batch, max_wait_ms=max_wait_ms)


async def _ask(app, *requests):
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return [await request(client) for request in requests]


def test_internal_errors_answer_a_generic_500_and_log_the_details(caplog):
    def broken(images):
        raise RuntimeError("secret detail /srv/models/x")

    app = in_process_app(broken)
    post = lambda c: c.post("/predict", content=png_bytes(np.zeros((4, 4), np.uint8)),  # noqa: E731
                            headers={"content-type": "image/png"})
    response, metrics = asyncio.run(_ask(app, post, lambda c: c.get("/metrics")))
    assert response.status_code == 500 and "secret" not in response.text and "server log" in response.json()["error"]
    assert 'trainforge_rejected_total{reason="internal_error"} 1.0' in metrics.text
    assert "secret detail" in caplog.text


def test_images_decode_off_the_event_loop(monkeypatch):
    import threading

    from trainforge.deploy import app as app_module

    entered, release = threading.Event(), threading.Event()
    decode = app_module.decode

    def slow_decode(*args):
        entered.set()
        release.wait(10)  # a decoder that blocks the event loop would stall /health until this times out
        return decode(*args)

    monkeypatch.setattr(app_module, "decode", slow_decode)
    app = in_process_app(lambda images: np.zeros((len(images), 2), np.float32))

    async def scenario(client):
        pending = asyncio.create_task(client.post("/predict", content=png_bytes(np.zeros((4, 4), np.uint8)),
                                                  headers={"content-type": "image/png"}))
        await asyncio.to_thread(entered.wait, 10)
        health = await client.get("/health")
        answered_while_decoding = not release.is_set()
        release.set()
        return health.status_code, answered_while_decoding, (await pending).status_code

    assert asyncio.run(_ask(app, scenario)) == [(200, True, 200)]


def batch_counts(base: str) -> tuple[float, float]:
    """(model calls, model calls of exactly one image) from the server's Prometheus text."""
    lines = httpx.get(base + "/metrics").text.splitlines()
    value = {line.split(" ")[0]: float(line.split(" ")[1]) for line in lines if line.startswith("trainforge_batch")}
    return value["trainforge_batch_size_count"], value['trainforge_batch_size_bucket{le="1.0"}']


async def _concurrent(base: str, n: int, images: np.ndarray) -> list:
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        return await asyncio.gather(*(client.post("/predict", json={"inputs": [images[i % len(images)].tolist()]})
                                      for i in range(n)))


def test_concurrent_requests_each_get_their_own_answer(server, small_cnn_run, mnist):
    # However the server batches them (the in-process test below pins that down), each answer is its own image's.
    _, base = server
    calls_before, _ = batch_counts(base)
    images = mnist.test.images[:8, 0].numpy()
    responses = asyncio.run(_concurrent(base, 24, images))
    assert all(r.status_code == 200 for r in responses)
    want = expected_labels(small_cnn_run, mnist.test.images[:8])
    assert [r.json()["predictions"][0]["label"] for r in responses] == [want[i % 8] for i in range(24)]
    assert 1 <= batch_counts(base)[0] - calls_before <= 24
    assert httpx.post(base + "/predict", json={"images": []}).status_code == 422  # counted whatever ran before
    metrics = httpx.get(base + "/metrics").text
    assert 'trainforge_requests_total{status="200"}' in metrics and "trainforge_request_seconds_bucket" in metrics
    assert 'trainforge_errors_total{status="422"}' in metrics


def test_requests_that_arrive_while_the_model_runs_share_the_next_batch():
    import threading

    # The model holds its first batch until all 24 requests have been received, so the rest cannot miss the next one.
    entered, release, sizes = threading.Event(), threading.Event(), []

    def gated(images):
        sizes.append(len(images))
        entered.set()
        if not release.wait(60):
            raise RuntimeError("the test never released the model")
        return np.zeros((len(images), 2), np.float32)

    # A window far longer than the test: a batch closes when no received request is left to join it, not by time.
    app = in_process_app(gated, max_batch=32, max_wait_ms=60_000)
    body = png_bytes(np.zeros((4, 4), np.uint8))

    async def scenario(client):
        posts = [asyncio.create_task(client.post("/predict", content=body, headers={"content-type": "image/png"}))
                 for _ in range(24)]
        assert await asyncio.to_thread(entered.wait, 60), "the first batch never reached the model"
        deadline = time.monotonic() + 60
        while "trainforge_requests_in_flight 24.0" not in (await client.get("/metrics")).text:
            assert time.monotonic() < deadline, "the 24 requests were never all in flight"
            await asyncio.sleep(0.01)
        release.set()
        return [r.status_code for r in await asyncio.gather(*posts)]

    (statuses,) = asyncio.run(_ask(app, scenario))
    assert statuses == [200] * 24
    # The first batch (one request, or more if they came before it closed), then every other request in one more.
    assert sum(sizes) == 24 and len(sizes) <= 2, sizes


def test_graceful_shutdown_finishes_in_flight_requests(onnx_file, mnist):
    proc, base = start_server(onnx_file)
    port = int(base.rsplit(":", 1)[1])
    body = json.dumps({"inputs": [mnist.test.images[0, 0].tolist()]}).encode()
    try:
        # A request whose body is only half sent is in flight: the server has started answering it. Its socket
        # gives up after 60 s, so a reply that never comes fails the test instead of hanging it.
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:100])
        wait_for(lambda: "trainforge_requests_in_flight 1.0" in httpx.get(base + "/metrics").text,
                 "the half-sent request to be in flight")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: not accepts_connections(port), "the server to stop accepting connections")
        sock.sendall(body[100:])
        reply = b""
        try:
            while b"}" not in reply.rpartition(b"\r\n\r\n")[2]:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        except TimeoutError:
            pytest.fail(f"no whole reply to the in-flight request within 60 s; got {reply[:200]!r}")
        sock.close()
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        assert json.loads(reply.partition(b"\r\n\r\n")[2])["predictions"][0]["label"] in [str(i) for i in range(10)]
        # uvicorn re-raises the signal once the server has shut down gracefully.
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()


def accepts_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
