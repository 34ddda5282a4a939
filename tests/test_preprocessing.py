"""One preprocessing path: the shared decoder (trainforge.data.images), then the resize inside the model, give every
image the same answer through `load()`, `predict`, the ONNX file, `serve` and folder training."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import run_cli, start_server
from PIL import Image

from trainforge.data.folder import load_image_folder
from trainforge.data.images import IMAGE_SUFFIXES, ImageError, read_image
from trainforge.errors import DataError
from trainforge.models.registry import resize_images
from trainforge.predict import predict_files

RNG = np.random.default_rng(0)


def rgb(height: int, width: int) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_zoo(folder: Path) -> tuple[list[Path], dict[Path, str]]:
    """The images users have: (files every path accepts, {refused file: what its error says})."""
    folder.mkdir(parents=True, exist_ok=True)
    good = {
        "gray16.png": lambda p: Image.fromarray(RNG.integers(0, 65536, (30, 40)).astype(np.uint16)).save(p),
        "cmyk.jpg": lambda p: Image.fromarray(rgb(37, 53)).convert("CMYK").save(p),
        "palette.png": lambda p: Image.fromarray(rgb(37, 53)).convert("P").save(p),
        "rgba.png": lambda p: Image.fromarray(RNG.integers(0, 256, (20, 24, 4), dtype=np.uint8)).save(p),
        "anim.gif": lambda p: Image.fromarray(rgb(20, 20)).save(
            p, save_all=True, append_images=[Image.fromarray(rgb(20, 20)) for _ in range(2)]),
        "one.png": lambda p: Image.new("L", (1, 1), 200).save(p),
        "rgb.tif": lambda p: Image.fromarray(rgb(37, 53)).save(p),
        "rgb.webp": lambda p: Image.fromarray(rgb(37, 53)).save(p),
        "rgb.bmp": lambda p: Image.fromarray(rgb(28, 28)).save(p),
    }
    for name, write in good.items():
        write(folder / name)
    buffer = io.BytesIO()
    Image.fromarray(rgb(37, 53)).save(buffer, "PNG")
    (folder / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    Image.fromarray(RNG.random((10, 10)).astype(np.float32)).save(folder / "float.tif")
    Image.fromarray(rgb(16, 16)).save(folder / "icon.ico")
    bad = {folder / "truncated.png": "not a readable PNG image (image file is truncated)",
           folder / "float.tif": "floating-point or 32-bit pixels (TIFF mode F) are not supported",
           folder / "icon.ico": "ICO images are not supported; expected PNG, JPEG, BMP, WebP, 8-bit TIFF or GIF"}
    return [folder / name for name in good], bad


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> tuple[list[Path], dict[Path, str]]:
    return write_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def served(small_cnn_run):
    proc, base = start_server(small_cnn_run, "--backend", "onnxruntime")
    yield base
    proc.kill()
    proc.wait()


def serve_file(base: str, path: Path) -> httpx.Response:
    return httpx.post(base + "/predict", files={"file": (path.name, path.read_bytes())}, timeout=60)


@pytest.mark.parametrize("height,width", [(37, 53), (240, 320)])
def test_one_jpeg_gets_the_same_logits_on_every_path(small_cnn_run, served, tmp_path, height, width):
    """Small, and 8x the model's 28 px, which the decoder reads by draft at a quarter of its size on every path."""
    import trainforge
    from trainforge.deploy.formats import export_onnx

    jpeg = tmp_path / "class0" / "digit.jpg"
    jpeg.parent.mkdir()
    Image.fromarray(rgb(height, width)).save(jpeg, quality=90)  # RGB, non-square, not the model's 28x28
    model = trainforge.load(small_cnn_run)
    pixels = read_image(jpeg, model.info.in_channels, size=(28, 28))  # decoded once, by the shared decoder
    drafted = height >= 4 * 28
    assert pixels.shape[1:] == ((height // 4, width // 4) if drafted else (height, width))
    with torch.inference_mode():
        want = model(torch.from_numpy(pixels)[None])[0]
    log_probs = torch.log_softmax(want, 0)
    onnx_path = tmp_path / "model.onnx"
    export_onnx(model, onnx_path, torch.zeros(2, 1, 28, 28, dtype=torch.uint8), info=model.info)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {session.get_inputs()[0].name: pixels[None]})[0][0]
    assert np.abs(onnx_logits - want.numpy()).max() <= 1e-4
    # predict and serve answer probabilities: their logs are the logits less one constant (log-sum-exp).
    top = predict_files(small_cnn_run, [jpeg], top_k=10)[0]["top"]
    got = torch.tensor([np.log(t["confidence"]) for t in top])
    indices = [model.classes.index(t["label"]) for t in top]
    assert (got - log_probs[indices]).abs().max() <= 1e-4
    answer = serve_file(served, jpeg).json()["predictions"][0]
    assert answer["index"] == indices[0] and abs(np.log(answer["confidence"]) - log_probs[indices[0]]) <= 1e-4
    # A folder decodes the same pixels and resizes them by the model's resize, once, rounded to uint8.
    folder, _ = load_image_folder(tmp_path, image_size=28, channels=1, val_fraction=0)
    resized = resize_images(torch.from_numpy(pixels)[None].float(), (28, 28)).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(folder.images, resized)


def test_image_zoo_gets_one_answer_on_every_path_or_one_clear_line(small_cnn_run, served, zoo):
    good, bad = zoo
    predicted = predict_files(small_cnn_run, good)
    for path, answer in zip(good, predicted):
        response = serve_file(served, path)
        assert response.status_code == 200, (path.name, response.text)
        served_answer = response.json()["predictions"][0]
        assert served_answer["label"] == answer["label"], path.name
        assert abs(served_answer["confidence"] - answer["confidence"]) <= 1e-4, path.name
    for path, message in bad.items():
        with pytest.raises(DataError) as info:
            predict_files(small_cnn_run, [path])
        assert str(info.value) == f"{path}: " + str(info.value).split(": ", 1)[1] and message in str(info.value)
        response = serve_file(served, path)
        assert response.status_code in (415, 422) and response.json()["error"].startswith(f"{path.name}: ")
        assert message in response.json()["error"]
    refused = run_cli("predict", str(small_cnn_run), str(next(iter(bad))))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().endswith(bad[next(iter(bad))])


def test_image_zoo_in_folder_training(zoo, tmp_path):
    import trainforge

    good, bad = zoo
    root = tmp_path / "folder"
    for i, path in enumerate(good):
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"class{i % 2}" / path.name).write_bytes(path.read_bytes())
    train, _ = load_image_folder(root, image_size=28, channels=1, val_fraction=0)
    files = sorted((root / "class0").iterdir()) + sorted((root / "class1").iterdir())
    for image, path in zip(train.images, files):
        pixels = torch.from_numpy(read_image(path, 1))[None].float()
        want = resize_images(pixels, (28, 28)).round().clamp(0, 255).to(torch.uint8)[0]
        assert torch.equal(image, want), path.name
    # Trained on the zoo and evaluated on the same files (val/ is a copy of train/), a linear model learns the labels
    # of these nine images; predict, decoding the original files its own way, then gives each file its folder's class.
    labelled = tmp_path / "labelled"
    for split in ("train", "val"):
        shutil.copytree(root, labelled / split)
    run = trainforge.train({"data": str(labelled), "model": "linear", "image_size": 28, "epochs": 20,
                            "batch_size": 4, "out": str(tmp_path / "run"), "tensorboard": False}, progress=False)
    assert run.test_acc == 1.0
    assert [p["label"] for p in predict_files(tmp_path / "run", good)] == [f"class{i % 2}" for i in range(len(good))]
    # A file of another suffix (icon.ico) is no image of the folder; broken files of accepted suffixes are refused.
    for path, message in bad.items():
        if path.suffix not in IMAGE_SUFFIXES:
            continue
        (root / "class0" / path.name).write_bytes(path.read_bytes())
        with pytest.raises(DataError, match=f"^{root / 'class0' / path.name}: ") as info:
            load_image_folder(root, image_size=28, channels=1)
        assert message in str(info.value)
        (root / "class0" / path.name).unlink()


def test_pixel_cap_is_checked_from_the_header(tmp_path):
    big = tmp_path / "big.png"
    Image.new("L", (9000, 8000)).save(big)  # 72 Mpixel in a file of a few tens of KB
    with pytest.raises(ImageError, match=r"big.png: image of 9000x8000 = 72,000,000 pixels exceeds the limit") as info:
        read_image(big, 1)
    assert info.value.kind == "too_large"
    (tmp_path / "cls").mkdir()
    big.rename(tmp_path / "cls" / "big.png")
    Image.new("L", (4, 4)).save(tmp_path / "cls" / "small.png")
    with pytest.raises(DataError, match="big.png: image of 9000x8000"):
        load_image_folder(tmp_path, image_size=4, channels=1, val_fraction=0)


def test_predict_takes_folders_recursively_and_caps_their_files(small_cnn_run, zoo, tmp_path):
    good, _ = zoo
    nested = tmp_path / "photos" / "deeper"
    nested.mkdir(parents=True)
    for path in good[:3]:
        (nested / path.name).write_bytes(path.read_bytes())
    results = predict_files(small_cnn_run, [tmp_path / "photos"])
    assert [Path(r["file"]).name for r in results] == sorted(p.name for p in good[:3])
    with pytest.raises(DataError, match="more than 2 files to classify; pass --max-files"):
        predict_files(small_cnn_run, [tmp_path / "photos"], max_files=2)
