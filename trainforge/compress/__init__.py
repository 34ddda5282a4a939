"""Compression of a run's model: structured and unstructured pruning, knowledge distillation, int8/fp16/bf16
quantization, and a report of what each variant costs in accuracy and buys in size and speed on each runtime."""

from .command import Options, compress_run

__all__ = ["Options", "compress_run"]
