import base64
import json
import re
import struct
from html.parser import HTMLParser

import pytest

import trainforge
from conftest import run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Images(HTMLParser):
    """Collects the src of every <img> and the text of the page."""

    def __init__(self):
        super().__init__()
        self.sources, self.text = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


def embedded_pngs(path):
    """The decoded PNG images of an HTML file (each checked to be a real PNG with a sensible size) and its text."""
    parser = Images()
    parser.feed(path.read_text(encoding="utf-8"))
    pngs = []
    for src in parser.sources:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix), src[:40]
        data = base64.b64decode(src[len(prefix):], validate=True)
        assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
        width, height = struct.unpack(">II", data[16:24])
        assert 100 <= width <= 3000 and 100 <= height <= 3000
        pngs.append(data)
    return pngs, " ".join(parser.text)


def test_report_of_one_run_through_the_cli(trained_run, tmp_path):
    out = tmp_path / "one.html"
    result = run_cli("report", str(trained_run), "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    pngs, text = embedded_pngs(out)
    # loss, accuracy, throughput, per-class accuracy, confusion matrix, worst-classified images
    assert len(pngs) == summary["images"] == 6
    run = summary["runs"][0]
    trained = json.loads((trained_run / "summary.json").read_text())
    # The report re-evaluates the saved model on the test set: it must agree with what training measured.
    assert run["split"] == "test" and abs(run["accuracy"] - trained["test_acc"]) < 1e-6
    assert len(run["per_class_accuracy"]) == 10 and min(run["per_class_accuracy"].values()) > 0.5
    for words in ("Loss per epoch", "Confusion matrix", "Most confidently misclassified", "torch", "CPU",
                  "Per-class precision and recall (95% Wilson intervals)", "expected calibration error"):
        assert words in text
    # One row per class, each figure with its interval and count; 10,000 test images, so no class is uncertain.
    rows = re.findall(r"(\d) (\d\.\d\d) \((\d\.\d\d)–(\d\.\d\d)\), n = (\d+) (\d\.\d\d) \((\d\.\d\d)–(\d\.\d\d)\), "
                      r"n = (\d+)", text)
    assert [r[0] for r in rows] == [str(d) for d in range(10)]
    assert all(float(r[2]) <= float(r[1]) <= float(r[3]) and float(r[6]) <= float(r[5]) <= float(r[7]) for r in rows)
    assert sum(int(r[8]) for r in rows) == 10000 and "uncertain" not in text
    recall = {c["class"]: (c["recall"], c["recall_n"]) for c in run["per_class"]}
    assert {c: round(a, 6) for c, a in run["per_class_accuracy"].items()} == \
        {c: round(r, 6) for c, (r, _) in recall.items()}
    assert 0 < run["ece"] < 0.2 and run["temperature"] == 1.0 and run["uncertain_classes"] == []


def test_report_comparing_runs_evaluates_each_on_its_own_split(trained_run, tmp_path):
    from trainforge.report import write_report

    holdout = tmp_path / "holdout"
    trained = trainforge.train({"model": "linear", "epochs": 2, "subset": 2000, "holdout": True, "out": str(holdout),
                                "tensorboard": False}, progress=False)
    out = tmp_path / "compare.html"
    summary = write_report([trained_run, holdout], out, worst=4)
    pngs, text = embedded_pngs(out)
    # three shared curves and one per-class plot, then a confusion matrix and a worst-images grid per run
    assert len(pngs) == summary["images"] == 8
    first, second = summary["runs"]
    assert first["split"] == "test" and second["split"] == "validation"
    assert abs(second["accuracy"] - trained.test_acc) < 1e-6  # the held-out 10% of the 2,000, not the test set
    assert "validation set, 200 images" in text and "test set, 10000 images" in text
    # 20 validation images per class: the held-out run's figures are marked uncertain, the other's are not.
    assert text.count("These figures are uncertain") == 1 and "10 of 10 classes have fewer than 30" in text
    assert second["uncertain_classes"] == [str(d) for d in range(10)] and first["uncertain_classes"] == []


def test_report_errors_name_the_problem(tmp_path, trained_run):
    from trainforge.errors import CheckpointError, ConfigError
    from trainforge.report import write_report

    with pytest.raises(CheckpointError, match="nope: not a run directory"):
        write_report([trained_run, tmp_path / "nope"], tmp_path / "r.html")
    with pytest.raises(ConfigError, match="ending in .html"):
        write_report([trained_run], tmp_path / "report.txt")
    assert not list(tmp_path.glob("*.htm*"))
