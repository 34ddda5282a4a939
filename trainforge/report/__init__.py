"""`trainforge report`: one self-contained HTML report of a run or a comparison of runs (command.py), from the
analysis of each run (analysis.py: `heldout_analysis` of any model on held-out images, shared with `auto`), its
statistics (stats.py) and its figures (plots.py), rendered as one page (page.py)."""

from .analysis import HeldoutAnalysis, heldout_analysis, model_logits
from .command import write_report

__all__ = ["HeldoutAnalysis", "heldout_analysis", "model_logits", "write_report"]
