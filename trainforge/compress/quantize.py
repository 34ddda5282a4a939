"""Quantization: int8 with ONNX Runtime (static QDQ calibrated on training images, and dynamic), and fp16/bf16
copies of a PyTorch model that still take raw uint8 images and return float32 logits."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import runs
from ..errors import DeployError
from ..models import tempered


def quantize_onnx_static(fp32_path: Path, out_path: Path, calibration: np.ndarray, batch_size: int = 64) -> None:
    """int8 QDQ model of `fp32_path` (per-channel weights, activations calibrated on `calibration` images)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, name: str):
            self.batches = iter([{name: np.ascontiguousarray(calibration[i:i + batch_size])}
                                 for i in range(0, len(calibration), batch_size)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    import onnx

    name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference and graph folding first, as ONNX Runtime recommends, so that every conv gets quantized.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantized = Path(tmp) / "quantized.onnx"
        quantize_static(str(prepared), str(quantized), Reader(name), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        # fp32 biases cost the same arithmetic in ONNX Runtime's fused QLinearConv path and keep
                        # three per-channel tensors per layer (int32 bias, scale, zero point) out of the file.
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                                       "QuantizeBias": False})
        _write_stripped(quantized, out_path)


def quantize_onnx_dynamic(fp32_path: Path, out_path: Path) -> None:
    """int8-weight model of `fp32_path` whose activations are quantized on the fly, per batch."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantized = Path(tmp) / "quantized.onnx"
        quantize_dynamic(str(prepared), str(quantized), weight_type=QuantType.QInt8)
        _write_stripped(quantized, out_path)


def _write_stripped(source: Path, out_path: Path) -> None:
    """`source` without what deployment ignores, written to `out_path` atomically (the quantizers write their
    output non-atomically, so into a temporary folder)."""
    import onnx

    from ..deploy.formats import strip_for_deployment

    proto = onnx.load(str(source))
    strip_for_deployment(proto)
    with runs.atomic_open(out_path) as handle:
        handle.write(proto.SerializeToString())


class ReducedPrecision(nn.Module):
    """A classifier whose network runs in fp16/bf16: uint8 images in, float32 logits out, preprocessing in fp32."""

    def __init__(self, classifier: nn.Module, dtype: torch.dtype):
        super().__init__()
        if not hasattr(classifier, "preprocess") or not hasattr(classifier, "net"):
            raise DeployError("fp16/bf16 conversion needs a trainforge classifier (preprocess + net)")
        self.preprocess = copy.deepcopy(classifier.preprocess)
        self.net = copy.deepcopy(classifier.net).to(dtype)
        self.dtype = dtype
        self.temperature = classifier.temperature

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return tempered(self.net(self.preprocess(images).to(self.dtype)).float(), self.temperature)


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
