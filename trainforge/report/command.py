"""Write one self-contained HTML report of a run, or comparing several runs (plots embedded as PNG).

The report holds the loss and accuracy curves and the training throughput of each epoch (from metrics.jsonl), and
for the run's model on its evaluation set the per-class precision and recall with 95% (Wilson) intervals, the
expected calibration error, the confusion matrix, the per-class accuracy and the most confidently misclassified images
(the figures are marked uncertain when a class has fewer than 30 images there), and a summary of this machine's
hardware. The evaluation set is the test set, or the held-out validation part for runs trained with --holdout (such
as tune trials). The report needs no network and no other file to open.

Examples:
  trainforge report runs/x                        # writes runs/x/report.html
  trainforge report runs/a runs/b --out cmp.html  # one report comparing two runs
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import runs
from ..errors import ConfigError
from .analysis import WORST_IMAGES, analyze_run, build_figures, hardware_summary
from .page import Section, render_html


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="directories of finished runs")
    parser.add_argument("--out", metavar="FILE.html",
                        help="report file (default: RUN_DIR/report.html for one run, report.html for several)")
    parser.add_argument("--data-dir", metavar="DIR", help="root of the built-in data sets (default: each run's own)")
    parser.add_argument("--device", default="auto", help="device that evaluates the models: auto, cpu, cuda, cuda:N "
                                                         "or mps (default: auto)")
    parser.add_argument("--batch-size", type=int, default=2000, metavar="N", help="evaluation batch size (default: 2000)")
    parser.add_argument("--worst", type=int, default=WORST_IMAGES, metavar="N",
                        help=f"misclassified images shown per run (default: {WORST_IMAGES})")


def run(args: argparse.Namespace) -> dict[str, Any]:
    result = write_report(args.run_dirs, args.out, data_dir=args.data_dir, device=args.device,
                          batch_size=args.batch_size, worst=args.worst)
    if not (args.json or args.quiet):
        accuracies = ", ".join(f"{r['label']} {r['split']} accuracy {r['accuracy']:.4f}, ECE {r['ece']:.4f}"
                               for r in result["runs"])
        print(f"report with {result['images']} plots written to {result['out']} ({accuracies})")
    return result


def write_report(run_dirs: list[str | Path], out: str | Path | None = None, *, data_dir: str | None = None,
                 device: str = "auto", batch_size: int = 2000, worst: int = WORST_IMAGES,
                 sections: list[Section] = (), evaluation: Any = None) -> dict[str, Any]:
    """Analyses each run, writes the HTML report (atomically) and returns where it is and what it shows;
    `sections`: tables added after the runs' (see page.render_html); `evaluation`: the images to evaluate one run
    on, instead of those its config names (see analysis.analyze_run)."""
    from ..train.device import resolve_device

    if not run_dirs:
        raise ConfigError("report needs at least one RUN_DIR")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if worst < 0:
        raise ConfigError(f"--worst must be >= 0, got {worst}")
    for run_dir in run_dirs:
        runs.read_model_info(run_dir)  # a missing or unfinished run is named before anything else
    out_path = Path(out) if out else (Path(run_dirs[0]) / "report.html" if len(run_dirs) == 1
                                      else Path("report.html"))
    if out_path.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"--out {out_path}: expected a file name ending in .html")
    if not out_path.parent.is_dir():
        raise ConfigError(f"--out {out_path}: directory {out_path.parent} does not exist")
    dev = resolve_device(device)
    labels = _labels([Path(d) for d in run_dirs])
    analyses = [analyze_run(d, label, data_dir=data_dir, device=dev, batch_size=batch_size, worst=worst,
                            evaluation=evaluation)
                for d, label in zip(run_dirs, labels)]
    figures = build_figures(analyses)
    page = render_html(analyses, figures, hardware_summary(), sections)
    runs.write_text(out_path, page)
    return {"out": str(out_path), "images": len(figures),
            "runs": [{"label": a.label, "run_dir": a.run_dir, "split": a.split, "accuracy": a.heldout.accuracy,
                      "ece": a.heldout.ece, "temperature": a.temperature,
                      "per_class_accuracy": dict(zip(a.heldout.classes, a.heldout.per_class_accuracy.tolist())),
                      "per_class": a.heldout.per_class, "uncertain_classes": a.heldout.uncertain}
                     for a in analyses]}


def _labels(paths: list[Path]) -> list[str]:
    """Short names for the runs: their directory names, or their paths where names repeat."""
    names = [p.name or str(p) for p in paths]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names)]
