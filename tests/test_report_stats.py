"""The report's statistics (trainforge/report/stats.py), the held-out analysis built on them, and a fitted temperature
carried by a run's model through load() and the ONNX export."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from trainforge import runs
from trainforge.report import stats
from trainforge.report.analysis import analyze_logits, heldout_analysis


@pytest.mark.parametrize("successes, n, interval", [
    (8, 10, (0.490, 0.943)),    # Wilson (1927) / Newcombe (1998) worked values
    (0, 10, (0.0, 0.278)),
    (10, 10, (0.722, 1.0)),
    (81, 263, (0.255, 0.366)),  # Newcombe (1998), table I
    (0, 0, (0.0, 1.0)),
])
def test_wilson_interval_gives_the_published_values(successes, n, interval):
    low, high = stats.wilson_interval(successes, n)
    assert (round(low, 3), round(high, 3)) == interval


def test_per_class_metrics_read_rows_as_true_classes_and_columns_as_predictions():
    confusion = torch.tensor([[8, 2, 0],    # true a: 8 right, 2 called b
                              [1, 6, 3],    # true b
                              [0, 0, 0]])   # no image of c, but 3 predicted as c
    a, b, c = stats.per_class_metrics(confusion, ["a", "b", "c"])
    assert (a["class"], a["recall"], a["recall_n"], a["precision"], a["precision_n"]) == ("a", 0.8, 10, 8 / 9, 9)
    assert a["recall_interval"] == stats.wilson_interval(8, 10)
    assert a["precision_interval"] == stats.wilson_interval(8, 9)
    assert (b["recall"], b["precision"], b["precision_n"]) == (0.6, 0.75, 8)
    assert c["recall"] is None and c["recall_n"] == 0 and c["recall_interval"] == (0.0, 1.0)
    assert (c["precision"], c["precision_n"]) == (0.0, 3)
    assert stats.uncertain_classes(torch.tensor([[30, 0], [1, 28]]), ["a", "b"]) == ["b"]


def test_expected_calibration_error_of_calibrated_and_overconfident_probabilities():
    calibrated = torch.tensor([[0.8, 0.2]] * 10)  # 80% sure, right 8 times in 10
    labels = torch.tensor([0] * 8 + [1] * 2)
    assert stats.expected_calibration_error(calibrated, labels) == pytest.approx(0.0, abs=1e-6)
    overconfident = torch.tensor([[0.99, 0.01]] * 10)  # 99% sure, right half the time
    assert stats.expected_calibration_error(overconfident, torch.tensor([0, 1] * 5)) == pytest.approx(0.49)
    # Bins are apart and weigh by their images: 10 images at 0.8 but right 6 times (gap 0.2), 5 at 0.6 but always
    # right (gap 0.4); in one bin the two would cancel.
    mixed = torch.cat([calibrated, torch.tensor([[0.4, 0.6]] * 5)])
    mixed_labels = torch.tensor([0] * 6 + [1] * 4 + [1] * 5)
    assert stats.expected_calibration_error(mixed, mixed_labels) == pytest.approx((10 * 0.2 + 5 * 0.4) / 15)


def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(20000, 5, generator=generator)
    labels = torch.multinomial((logits / 2.5).softmax(1), 1, generator=generator).flatten()
    fitted = stats.fit_temperature(logits, labels)
    assert fitted == pytest.approx(2.5, rel=0.05)
    assert stats.fit_temperature(logits, labels) == fitted  # deterministic
    assert stats.nll(logits, labels, fitted) < min(stats.nll(logits, labels, fitted * f) for f in (0.9, 1.1))
    # Softening calibrated the probabilities: the error after is a fraction of the error before.
    before = stats.expected_calibration_error(logits.softmax(1), labels)
    assert stats.expected_calibration_error((logits / fitted).softmax(1), labels) < before / 5
    with pytest.raises(ValueError, match="at least one image"):
        stats.fit_temperature(logits[:0], labels[:0])


def test_analyze_logits_counts_confusion_per_class_figures_and_the_worst_image():
    logits = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, 4.0]])
    labels = torch.tensor([0, 0, 1, 1])
    images = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1)
    h = analyze_logits(logits, labels, images, ["a", "b"])
    assert h.confusion.tolist() == [[1, 1], [0, 2]] and h.accuracy == 0.75
    assert [(r["recall"], r["precision"]) for r in h.per_class] == [(0.5, 1.0), (1.0, 2 / 3)]
    assert h.uncertain == ["a", "b"]
    assert h.worst_images.flatten().tolist() == [1] and (h.worst_true, h.worst_predicted) == (["a"], ["b"])
    assert h.worst_confidence == pytest.approx([1 / (1 + math.e ** -1)])
    assert h.summary()["confusion"] == [[1, 1], [0, 2]] and json.dumps(h.summary())


def test_a_temperature_divides_the_logits_of_load_and_of_the_onnx_export(small_cnn_run, tmp_path, mnist):
    import trainforge
    from trainforge.deploy.formats import onnx_predictor, onnx_session
    from trainforge.errors import ConfigError
    from trainforge.export import export_run

    run = tmp_path / "calibrated"
    shutil.copytree(small_cnn_run, run)
    images, labels = mnist.test.images[:200], mnist.test.labels[:200]
    with torch.inference_mode():
        plain = trainforge.load(small_cnn_run)(images)
    assert runs.apply_temperature(run, 2.0).temperature == 2.0
    assert json.loads((run / runs.MODEL_INFO).read_text())["temperature"] == 2.0
    model = trainforge.load(run)
    with torch.inference_mode():
        calibrated = model(images)
    torch.testing.assert_close(calibrated.softmax(1), (plain / 2).softmax(1))
    # The report's evaluation sees the same model: softer probabilities, the same answers.
    h, h_plain = (heldout_analysis(m, images, labels) for m in (model, trainforge.load(small_cnn_run)))
    assert h.accuracy == h_plain.accuracy and h.ece != h_plain.ece
    out = tmp_path / "model.onnx"
    export_run(run, out, check_images=200)  # its parity check compares with the tempered model
    np.testing.assert_allclose(onnx_predictor(onnx_session(out))(images.numpy()), (plain / 2).numpy(), atol=1e-4)
    runs.apply_temperature(run, 0.01)  # 100x sharper logits: the parity bound holds on the network's own
    assert export_run(run, out, check_images=200)["parity"]["top1_agreement"] == 1.0
    runs.apply_temperature(run, 1.0)
    with torch.inference_mode():
        torch.testing.assert_close(trainforge.load(run)(images), plain)
    with pytest.raises(ConfigError, match="temperature must be a finite number > 0, got 0"):
        runs.apply_temperature(run, 0)
