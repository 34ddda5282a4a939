"""What `auto` deploys and measures: candidates' batch-1 latency for --max-latency-ms, the fp32 ONNX export with its
parity check, int8 kept or not, and the deployed model's latency and throughput on each device present."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..choose import Candidate
from ..data import DataBundle, ImageSet
from ..train.budget import Clock

if TYPE_CHECKING:
    import torch

# int8 is kept when it loses at most this much held-out accuracy (0.5 points) ...
INT8_MAX_LOSS = 0.005
# ... and agrees with the fp32 model on at least this share of the held-out images: answers flip both ways, so an
# int8 model that flips more is another classifier whose equal accuracy here is luck of this held-out part.
INT8_MIN_AGREEMENT = 0.98
# Static int8 calibrates on this many training images, as `compress` does by default.
CALIBRATION_IMAGES = 512
# Batch-1 calls timed for a latency (p50/p99); fewer for a candidate's architecture, timed before its trial.
LATENCY_CALLS = 200
CANDIDATE_LATENCY_CALLS = 50
# Batches whose throughput is measured, smallest first, while the stage's time lasts.
THROUGHPUT_BATCHES = (1, 4, 16, 64, 256)


def architecture_key(candidate: Candidate, bundle: DataBundle) -> tuple[str, int, int]:
    """What a candidate deploys as: its architecture, input side and channels (the pretrained strategies and
    prototypes all deploy EfficientNet-Lite0's RGB network at their side, LoRA merged into it)."""
    channels = 3 if candidate.pretrained else bundle.in_channels
    return candidate.model, candidate.image_size or bundle.image_size, channels


def architecture_latency(key: tuple[str, int, int], bundle: DataBundle) -> float:
    """Batch-1 p50 milliseconds of the untrained architecture `key` exported to ONNX and run by ONNX Runtime on the
    CPU, fed the data's own images: weights do not change the time, so it is measured before any trial."""
    from ..compress.measure import latency
    from ..deploy.formats import export_onnx, onnx_predictor, onnx_session
    from ..models import build_classifier

    name, side, channels = key
    mean, std = _stats(bundle, channels)
    model = build_classifier(name, len(bundle.classes), channels, side, mean, std)
    sample = training_images(bundle, 2)
    with tempfile.TemporaryDirectory(prefix="trainforge-auto-") as tmp:
        path = Path(tmp) / "candidate.onnx"
        export_onnx(model, path, sample)
        return latency(onnx_predictor(onnx_session(path)), sample.numpy(), CANDIDATE_LATENCY_CALLS)[0]


def training_images(bundle: DataBundle, n: int) -> "torch.Tensor":
    """The first `n` training images of `bundle`, also where they are gathered from the decoded cache batch by batch
    (never the held-out part: it is not looked at before the winner is trained)."""
    from ..data.loaders import CachedRows

    if isinstance(bundle.stream, CachedRows):
        return bundle.stream.images.index_select(0, bundle.stream.rows[:n])
    if bundle.stream is not None:
        from ..data.folder import decode_files

        files = bundle.stream.files[:n]
        return decode_files(files, bundle.stream.size, bundle.stream.channels, bundle.classes).images
    return bundle.train.images[:n]


def _stats(bundle: DataBundle, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    reps = channels // len(bundle.mean)
    return tuple(bundle.mean) * reps, tuple(bundle.std) * reps


def within_latency(candidates: list[Candidate], latency_ms: dict[str, float], max_ms: float
                   ) -> tuple[list[Candidate], list[dict[str, Any]]]:
    """The candidates whose measured batch-1 latency (by name) is at most `max_ms`, and a record of those dropped."""
    kept = [c for c in candidates if latency_ms[c.name] <= max_ms]
    dropped = [{"candidate": c.name, "latency_ms": round(latency_ms[c.name], 3),
                "why": f"{latency_ms[c.name]:.2f} ms per image at batch 1 > --max-latency-ms {max_ms:g}"}
               for c in candidates if latency_ms[c.name] > max_ms]
    return kept, dropped


def keep_int8(fp32_acc: float, int8_acc: float, agreement: float) -> tuple[bool, str]:
    """Whether the int8 model replaces the fp32 one, judged on the held-out part, and why in one clause."""
    loss = fp32_acc - int8_acc
    said = (f"held-out accuracy {int8_acc:.4f} vs fp32 {fp32_acc:.4f} ({100 * loss:+.2f} points lost), agreement "
            f"with fp32 {agreement:.2%}")
    if loss > INT8_MAX_LOSS:
        return False, f"{said}: loses more than {100 * INT8_MAX_LOSS:g} points"
    if agreement < INT8_MIN_AGREEMENT:
        return False, f"{said}: agrees with fp32 on fewer than {INT8_MIN_AGREEMENT:.0%} of the images"
    return True, said


# The report's figures (matplotlib's import and drawing), not timed beforehand: about 3 s on a 2-core machine.
REPORT_FIGURES_S = 3.0
# Margin on the measured estimate: the machine's speed varies while a run goes on.
ESTIMATE_MARGIN = 1.25


def deployment_seconds(run_dir: Path, scratch: Path, images: "torch.Tensor", heldout: int, validation: int,
                       clock: Clock) -> dict[str, float]:
    """Seconds the deployment stage and the report will take for the model of `run_dir` (the winner's trial, the
    same network the final training makes), timed on `clock`: one fp32 export with its parity check on `images`,
    ONNX Runtime's per-image time in batches and at batch 1, scaled to what the stages do with them (the
    calibration's and the report's passes over the validation and held-out parts, the int8 calibration images,
    the time int8 needs left to be tried, the latency calls on each device)."""
    from ..deploy.formats import onnx_predictor, onnx_session
    from ..export import export_run

    path = scratch / ".deploy-estimate.onnx"
    started = clock.now()
    export_run(run_dir, path, images=images.numpy())
    export_s = clock.now() - started
    started = clock.now()
    predictions(path, images.numpy())
    per_image = (clock.now() - started) / max(len(images), 1)
    predict, one = onnx_predictor(onnx_session(path)), np.ascontiguousarray(images[:1].numpy())
    started = clock.now()
    for _ in range(5):
        predict(one)
    per_call = (clock.now() - started) / 5
    path.unlink(missing_ok=True)
    passes = per_image * (validation + 3 * heldout + CALIBRATION_IMAGES)  # torch and ONNX Runtime alike
    # The fp32 export, then int8 only with twice its time left (pipeline.SKIP_RULES): three exports' worth.
    deploy = 3 * export_s + passes + len(providers()) * (LATENCY_CALLS + 50) * per_call
    return {"deploy": ESTIMATE_MARGIN * deploy,
            "report": ESTIMATE_MARGIN * 2 * heldout * per_image + REPORT_FIGURES_S}


def export_fp32(run_dir: Path, out: Path, heldout: ImageSet) -> dict[str, Any]:
    """The run's model as ONNX at `out`, parity-checked on the held-out images (export's own check)."""
    from ..export import export_run

    return export_run(run_dir, out, images=heldout.images.numpy())


def predictions(path: Path, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
    """Top-1 answers of the ONNX model at `path` on uint8 `images`."""
    from ..deploy.formats import onnx_predictor, onnx_session

    predict = onnx_predictor(onnx_session(path))
    return np.concatenate([predict(np.ascontiguousarray(images[i:i + batch_size])).argmax(1)
                           for i in range(0, len(images), batch_size)])


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray, heldout: ImageSet, fp32_answers: np.ndarray
                  ) -> dict[str, Any]:
    """The static int8 model of `fp32` (as `compress --quantize int8` makes it), its held-out accuracy and its
    agreement with fp32's answers, and whether it is kept (keep_int8); an int8 model not kept is removed."""
    from ..compress.quantize import quantize_onnx_static
    from ..deploy.formats import INFO_KEY

    quantize_onnx_static(fp32, out, calibration[:CALIBRATION_IMAGES])
    _copy_model_info(fp32, out, INFO_KEY)
    labels = heldout.labels.numpy()
    answers = predictions(out, heldout.images.numpy())
    fp32_acc, int8_acc = float((fp32_answers == labels).mean()), float((answers == labels).mean())
    agreement = float((fp32_answers == answers).mean())
    kept, why = keep_int8(fp32_acc, int8_acc, agreement)
    if not kept:
        out.unlink()
    return {"fp32_acc": fp32_acc, "int8_acc": int8_acc, "agreement": agreement, "kept": kept, "why": why,
            "calibration_images": min(len(calibration), CALIBRATION_IMAGES)}


def _copy_model_info(source: Path, target: Path, key: str) -> None:
    """The ModelInfo `export_onnx` stored in `source`'s metadata, stored in `target` too (quantization drops it, and
    `serve` reads the classes from it)."""
    import onnx

    from .. import runs

    info = next(e.value for e in onnx.load(str(source), load_external_data=False).metadata_props if e.key == key)
    proto = onnx.load(str(target))
    if not any(e.key == key for e in proto.metadata_props):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, info
        with runs.atomic_open(target) as handle:
            handle.write(proto.SerializeToString())


@dataclasses.dataclass
class Speed:
    """The deployed model's speed on one device."""

    device: str
    latency_ms_p50: float
    latency_ms_p99: float
    throughput: float  # images per second at best_batch
    best_batch: int
    by_batch: dict[int, float]


def providers() -> dict[str, list[str]]:
    """ONNX Runtime's execution providers per device that can run here: the CPU always, CUDA where this onnxruntime
    has its provider and a GPU is present."""
    import onnxruntime as ort
    import torch

    found = {"cpu": ["CPUExecutionProvider"]}
    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        found["cuda"] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return found


def cuda_note() -> str | None:
    """Why CUDA is not measured although a GPU is present, or None."""
    import torch

    if torch.cuda.is_available() and "cuda" not in providers():
        return ("a CUDA GPU is present but this onnxruntime has no CUDA execution provider (onnxruntime-gpu): "
                "not measured")
    return None


def measure_speed(path: Path, sample: np.ndarray, clock: Clock, deadline: float) -> list[Speed]:
    """Batch-1 latency and best-batch throughput of the ONNX model at `path` on each device present; throughput
    tries THROUGHPUT_BATCHES in turn while `clock` is before `deadline` (at least the first two)."""
    from ..compress.measure import latency, throughput
    from ..deploy.formats import onnx_predictor, onnx_session

    speeds = []
    for device, chosen in providers().items():
        predict = onnx_predictor(onnx_session(path, providers=chosen))
        p50, p99 = latency(predict, sample, LATENCY_CALLS)
        rates = _rates(lambda batch: throughput(predict, sample, batch, repeats=3), clock, deadline)
        best = max(rates, key=rates.get)
        speeds.append(Speed(device, p50, p99, rates[best], best, rates))
    return speeds


def _rates(rate: Callable[[int], float], clock: Clock, deadline: float) -> dict[int, float]:
    rates: dict[int, float] = {}
    for batch in THROUGHPUT_BATCHES:
        if len(rates) >= 2 and clock.now() >= deadline:
            break
        rates[batch] = rate(batch)
        if len(rates) >= 2 and rates[batch] < 0.9 * max(rates.values()):
            break  # past the best batch: larger ones only cost time
    return rates
