"""Fine-tuning pretrained models: sources of weights, strategies (full, linear probe, LoRA, gradual unfreezing) and
updating a model on a new task without forgetting the old one."""

from .command import FinetuneConfig, finetune

__all__ = ["FinetuneConfig", "finetune"]
