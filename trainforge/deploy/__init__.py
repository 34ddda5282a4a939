"""Deployment libraries: the exported formats (ONNX, torch.export) and the HTTP app with dynamic batching that the
`export`, `serve` and `compress` verbs use.

Every exported or served model keeps the contract of `trainforge.load()`: raw uint8 images [N, C, H, W] in
(preprocessing inside the graph), logits out.
"""

from .formats import check_parity, export_onnx, onnx_session, read_onnx_info

__all__ = ["check_parity", "export_onnx", "onnx_session", "read_onnx_info"]
