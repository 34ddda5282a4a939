"""`trainforge report`: one self-contained HTML report of a run or a comparison of runs (command.py), from the
analysis of each run (analysis.py) and its figures (plots.py), rendered as one page (page.py)."""

from .command import write_report

__all__ = ["write_report"]
