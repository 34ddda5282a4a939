"""The exported model formats, ONNX and torch.export programs (.pt2): write them, read them back, run them and
compare them with the PyTorch model; used by `export`, `compress` and `serve`.

Both keep the contract of `trainforge.load()`: raw uint8 images [N, C, H, W] in, logits out, a dynamic batch axis.
Both take images of any height and width (the resize to the model's input is in the graph), except ONNX graphs from
the TorchScript fallback exporter, which take the model's input size only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .. import runs
from ..errors import DeployError

FORMATS = ("onnx", "pt2")
# ONNX metadata key holding the run's ModelInfo as JSON, so that `serve model.onnx` knows classes and input shape.
INFO_KEY = "trainforge.model_info"
PT2_INFO_FILE = "model.json"
INPUT_NAME, OUTPUT_NAME = "images", "logits"


def _dynamic_axes() -> Any:
    # Example inputs have batch 2: torch.export specializes sizes 0 and 1, which would freeze the batch axis. Height
    # and width are free too: the graph resizes any image to the model's input, as `load()` does.
    side = {"min": 1, "max": 1 << 16}
    return {0: torch.export.Dim("batch", min=1, max=1 << 20), 2: torch.export.Dim("height", **side),
            3: torch.export.Dim("width", **side)}


def export_onnx(model: nn.Module, path: str | os.PathLike, example: torch.Tensor, opset: int | None = None,
                info: runs.ModelInfo | None = None) -> dict[str, Any]:
    """Writes `model` as one self-contained ONNX file with a dynamic batch axis; returns exporter and opset used.

    The dynamo exporter (torch.export + onnxscript) is tried first; where it cannot handle a model on this torch,
    the TorchScript exporter is the fallback. `info` is stored in the file's metadata.
    """
    import onnx

    path = Path(path)
    model = model.eval()
    # A copy: a slice of a data set would carry its whole storage into the saved sample inputs.
    example = example[:2].clone() if len(example) >= 2 else example.repeat(2, 1, 1, 1)
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "model.onnx"
        errors = []
        for exporter in ("dynamo", "torchscript"):
            try:
                _run_exporter(exporter, model, example, target, opset)
                break
            except Exception as exc:  # each exporter fails with its own exception types
                errors.append(f"{exporter} exporter: {str(exc).strip().splitlines()[0][:300] if str(exc) else exc!r}")
        else:
            raise DeployError(f"cannot export the model to ONNX ({'; '.join(errors)})")
        proto = onnx.load(str(target))
    strip_for_deployment(proto)
    if info is not None:
        entry = proto.metadata_props.add()
        entry.key, entry.value = INFO_KEY, json.dumps(dataclasses.asdict(info))
    proto.producer_name = "trainforge"
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    with runs.atomic_open(path) as handle:
        handle.write(proto.SerializeToString())
    return {"exporter": exporter, "opset": opset_used}


def strip_for_deployment(proto: Any) -> None:
    """Drops what ONNX Runtime ignores or recomputes from an ONNX ModelProto: node annotations and the shapes of
    intermediate tensors.

    The dynamo exporter annotates every node with its Python origin (module paths, stack traces): useful when
    debugging the exporter, dead weight in a deployed file (about a kilobyte per node, a tenth of a small net).
    """
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del proto.graph.value_info[:]


def _run_exporter(exporter: str, model: nn.Module, example: torch.Tensor, target: Path, opset: int | None) -> None:
    # The exporters narrate on stdout/stderr; --json promises that stdout carries only the result.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        kwargs: dict[str, Any] = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME]}
        if opset is not None:
            kwargs["opset_version"] = opset
        if exporter == "dynamo":
            torch.onnx.export(model, (example,), str(target), dynamo=True, external_data=False, verbose=False,
                              dynamic_shapes=(_dynamic_axes(),), **kwargs)
        else:
            torch.onnx.export(model, (example,), str(target), dynamo=False,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, **kwargs)


def onnx_session(model: str | os.PathLike | bytes, threads: int | None = None, providers: list[str] | None = None,
                 spin: bool = True) -> Any:
    """An ONNX Runtime session with full graph optimization; `threads` fixes the intra-op thread count.

    `spin=False` stops idle worker threads from busy-waiting for the next call: a server that runs the model between
    HTTP requests needs those cores for the requests.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped exceptions for unreadable models
        where = "model bytes" if isinstance(model, bytes) else str(model)
        raise DeployError(f"{where}: ONNX Runtime cannot load the model "
                          f"({str(exc).strip().splitlines()[0][:300] if str(exc) else exc!r})") from None


def read_onnx_info(path: str | os.PathLike) -> runs.ModelInfo | None:
    """The ModelInfo stored in an ONNX file by `export_onnx`, or None for ONNX files from elsewhere."""
    import onnx

    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf decode errors have no common base class
        raise DeployError(f"{path}: not a readable ONNX file ({str(exc).splitlines()[0][:200] if str(exc) else exc!r})"
                          ) from None
    for entry in proto.metadata_props:
        if entry.key == INFO_KEY:
            try:
                values = json.loads(entry.value)
            except json.JSONDecodeError as exc:
                raise DeployError(f"{path}: malformed {INFO_KEY} metadata ({exc})") from None
            return runs.ModelInfo.from_values(values, f"{path} ({INFO_KEY} metadata)")
    return None


def onnx_predictor(session: Any) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 images [N, C, H, W] -> float32 logits through an ONNX Runtime session."""
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: images})[0]


def torch_predictor(model: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 images [N, C, H, W] -> float32 logits through a PyTorch module, without autograd."""
    def predict(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(images)).float().numpy()
    return predict


def check_parity(reference: Callable[[np.ndarray], np.ndarray], candidate: Callable[[np.ndarray], np.ndarray],
                 images: np.ndarray, batch_size: int = 250) -> dict[str, Any]:
    """Compares two predictors on the same uint8 images: max |logit difference| (NaN where either side's logits
    are not finite) and top-1 agreement (0-1)."""
    max_diff, agree = 0.0, 0
    for start in range(0, len(images), batch_size):
        batch = np.ascontiguousarray(images[start:start + batch_size])
        want, got = reference(batch), candidate(batch)
        if want.shape != got.shape:
            raise DeployError(f"the exported model returns logits of shape {got.shape}, expected {want.shape}")
        max_diff = float(np.maximum(max_diff, np.abs(want - got).max()))  # np.maximum keeps a NaN; max() drops it
        agree += int((want.argmax(1) == got.argmax(1)).sum())
    return {"images": len(images), "max_abs_diff": max_diff, "top1_agreement": agree / max(1, len(images))}


def export_program(model: nn.Module, path: str | os.PathLike, example: torch.Tensor,
                   info: runs.ModelInfo | None = None) -> dict[str, Any]:
    """Writes `model` as a torch.export program (.pt2) with a dynamic batch axis and `info` as an extra file."""
    # A copy: a slice of a data set would carry its whole storage into the saved sample inputs.
    example = example[:2].clone() if len(example) >= 2 else example.repeat(2, 1, 1, 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(model.eval(), (example,), dynamic_shapes=(_dynamic_axes(),))
    except Exception as exc:  # torch.export raises many unrelated types for untraceable models
        raise DeployError(f"torch.export cannot capture the model ({str(exc).strip().splitlines()[0][:300]})"
                          ) from None
    extra = {PT2_INFO_FILE: json.dumps(dataclasses.asdict(info))} if info is not None else {}
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files=extra)
    with runs.atomic_open(path) as handle:
        handle.write(buffer.getvalue())
    return {"exporter": "torch.export"}


def load_program(path: str | os.PathLike) -> tuple[nn.Module, runs.ModelInfo | None]:
    """A module from a .pt2 file written by `export_program`, and the ModelInfo stored with it."""
    extra = {PT2_INFO_FILE: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as exc:  # corrupt archives fail in zipfile, json or torch deserialization
        raise DeployError(f"{path}: not a readable torch.export program ({str(exc).splitlines()[0][:200]})") from None
    info = runs.ModelInfo(**json.loads(extra[PT2_INFO_FILE])) if extra[PT2_INFO_FILE] else None
    return program.module(), info
