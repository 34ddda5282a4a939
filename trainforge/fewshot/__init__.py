"""Few-shot classification: prototypes on a pretrained encoder, episodic evaluation, and adding classes later."""

from .command import FewshotConfig, fewshot
from .encoders import register_encoder

__all__ = ["FewshotConfig", "fewshot", "register_encoder"]
