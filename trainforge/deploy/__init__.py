"""Deployment: export a run's model (ONNX, torch.export) and serve it over HTTP with dynamic batching.

Every exported or served model keeps the contract of `trainforge.load()`: raw uint8 images [N, C, H, W] in
(preprocessing inside the graph), logits out.
"""

from .export import check_parity, export_onnx, export_run, onnx_session, read_onnx_info

__all__ = ["check_parity", "export_onnx", "export_run", "onnx_session", "read_onnx_info"]
