"""Few-shot classification: prototypes on EfficientNet-Lite0 and on a run's penultimate layer, the registered
architecture through load/ONNX/eval/report/serve, episodes, --adapt, --add and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import trainforge
from trainforge.data import DataBundle
from trainforge.errors import ConfigError, DataError
from trainforge.fewshot import encoders, fewshot, prototypes
from trainforge.models import model_entry
from trainforge.models.fewshot import FewShotNet

from conftest import run_cli

# The pool: test images per class the classifier is measured on (embedded once).
POOL = 30


@pytest.fixture(scope="module")
def lite0_run(tmp_path_factory, mnist):
    """5-shot prototypes on EfficientNet-Lite0 features of MNIST at 32 px (its native 224 would cost 50x more)."""
    out = tmp_path_factory.mktemp("fewshot") / "lite0"
    summary = fewshot({"source": "efficientnet_lite0", "shots": [5], "pool": POOL, "image_size": 32,
                       "out": str(out)}, data=mnist, progress=False)
    return out, summary


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory, mnist, small_cnn_run):
    """5-shot prototypes on the penultimate layer of a narrow cnn trained on MNIST."""
    out = tmp_path_factory.mktemp("fewshot") / "cnn"
    summary = fewshot({"source": str(small_cnn_run), "shots": [5], "pool": POOL, "out": str(out)}, data=mnist,
                      progress=False)
    return out, summary


def _pool(bundle: DataBundle) -> tuple[torch.Tensor, torch.Tensor]:
    from trainforge.data import balanced_subset

    idx = balanced_subset(bundle.test.labels, POOL * len(bundle.classes), 0)
    return bundle.test.images[idx], bundle.test.labels[idx]


def test_five_shot_lite0_prototypes_classify_held_out_images_and_onnx_agrees(lite0_run, mnist, tmp_path):
    from trainforge.deploy.formats import onnx_predictor, onnx_session
    from trainforge.export import export_run

    run_dir, summary = lite0_run
    model = trainforge.load(run_dir)
    assert model.info.model == "fewshot_efficientnet_lite0" and model.info.image_size == 32
    assert isinstance(model.net, FewShotNet) and model.net.head.linear.weight.shape == (10, 1280)
    images, labels = _pool(mnist)
    with torch.inference_mode():
        top1 = model(images).argmax(1)
    accuracy = (top1 == labels).double().mean().item()
    # The figure measured here: 0.523 on the 300 held-out images (157 right; chance: 0.10).
    assert accuracy > 0.4
    assert summary["test_samples"] == len(labels)
    assert accuracy == pytest.approx(summary["test_acc"], abs=1.5 / len(labels))  # cached features vs the model
    exported = export_run(run_dir, tmp_path / "fewshot.onnx", check_images=50)
    assert exported["parity"]["top1_agreement"] == 1.0
    onnx_top1 = onnx_predictor(onnx_session(tmp_path / "fewshot.onnx"))(images.numpy()).argmax(1)
    assert np.array_equal(onnx_top1, top1.numpy())


def test_prototype_rows_are_class_means_of_the_centred_unit_features(cnn_run, mnist, small_cnn_run):
    run_dir, summary = cnn_run
    model = trainforge.load(run_dir)
    encoder = encoders.load_encoder(str(small_cnn_run), mnist)
    support = prototypes.per_class_sample(mnist.train.labels, 5, 0, mnist.classes, "mnist")
    classifier = encoders.prototype_classifier(encoder, 10)
    features = encoders.embed(classifier, mnist.train.images[support], torch.device("cpu"), "32", 64)
    head = model.net.head
    assert torch.allclose(head.mean, features.mean(0), atol=1e-5)
    z = torch.nn.functional.normalize(features - head.mean, dim=1)
    means = prototypes.class_means(z, mnist.train.labels[support], 10)
    assert torch.allclose(head.linear.weight, means, atol=1e-5)
    assert torch.allclose(head.linear.bias, -0.5 * means.pow(2).sum(1), atol=1e-5)
    assert summary["encoder"] == "cnn" and summary["features"] == 16 and summary["adapt"] is None


def test_episodes_are_seeded_disjoint_and_batched_like_one_at_a_time(cnn_run, mnist):
    model = trainforge.load(cnn_run[0])
    images, labels = _pool(mnist)
    features = encoders.embed(model, images, torch.device("cpu"), "32", 300)
    drawn = prototypes.sample_episodes(labels, 5, 3, 4, 20, seed=7, classes=mnist.classes)
    again = prototypes.sample_episodes(labels, 5, 3, 4, 20, seed=7, classes=mnist.classes)
    assert all(torch.equal(a.support, b.support) and torch.equal(a.query, b.query) for a, b in zip(drawn, again))
    for e in drawn:
        assert not set(e.support.tolist()) & set(e.query.tolist())
        assert torch.equal(labels[e.support], e.classes.repeat_interleave(3))
        assert torch.equal(labels[e.query], e.classes.repeat_interleave(4))
    for norm in prototypes.NORMS:
        one_by_one = []
        for e in drawn:
            support = features[e.support]
            mean = support.mean(0)
            means = prototypes.class_means(prototypes.normalize(support, norm, mean), e.support_labels, 5)
            predicted = torch.cdist(prototypes.normalize(features[e.query], norm, mean), means).argmin(1)
            one_by_one.append((predicted == e.query_labels).double().mean().item())
        assert prototypes.episode_accuracies(features, drawn, norm, chunk=6) == pytest.approx(one_by_one)
    with pytest.raises(DataError, match="need 46: raise --pool or lower --queries"):
        prototypes.sample_episodes(labels, 5, 1, 45, 1, seed=0, classes=mnist.classes)


def test_add_keeps_old_prototypes_and_mean_bit_identical(small_cnn_run, mnist_5_5, tmp_path):
    old_task, new_task = mnist_5_5
    run_dir = tmp_path / "digits-0-4"
    before = fewshot({"source": str(small_cnn_run), "shots": [5], "pool": POOL, "out": str(run_dir)}, data=old_task,
                     progress=False)
    out = fewshot({"source": str(run_dir), "add": True, "shots": [5], "pool": POOL, "out": str(tmp_path / "added")},
                  data=new_task, old_data=old_task, progress=False)
    old, new = trainforge.load(run_dir), trainforge.load(tmp_path / "added")
    assert new.classes == old.classes + new_task.classes == [str(d) for d in range(10)]
    assert torch.equal(new.net.head.linear.weight[:5], old.net.head.linear.weight)
    assert torch.equal(new.net.head.linear.bias[:5], old.net.head.linear.bias)
    assert torch.equal(new.net.head.mean, old.net.head.mean)
    assert all(torch.equal(v, new.net.encoder.state_dict()[k]) for k, v in old.net.encoder.state_dict().items())
    assert out["added_classes"] == 5 and out["old_test_samples"] == POOL * 5
    assert out["old_acc_before"] == pytest.approx(before["test_acc"], abs=1.5 / (POOL * 5))
    images, labels = _pool(old_task)
    with torch.inference_mode():
        assert out["old_acc_after"] == pytest.approx((new(images).argmax(1) == labels).double().mean().item(),
                                                     abs=1.5 / len(labels))
    assert new.info.extra["fewshot"]["data"] == ["mnist-0-4", "mnist-5-9"]
    with pytest.raises(ConfigError, match="--add extends a run made by `trainforge fewshot`"):
        fewshot({"source": "efficientnet_lite0", "add": True, "out": str(tmp_path / "x")}, data=new_task)


def test_adapt_fits_the_rows_and_lora_merges_into_the_same_architecture(cnn_run, small_cnn_run, mnist_5_5,
                                                                       tmp_path):
    from trainforge.serve import load_predictor

    new_task = mnist_5_5[1]
    base = trainforge.load(cnn_run[0])
    head = fewshot({"source": str(small_cnn_run), "shots": [5], "pool": POOL, "adapt": True,
                    "out": str(tmp_path / "head")}, data=new_task, progress=False)
    adapted = trainforge.load(tmp_path / "head")
    assert head["adapt"]["loss_after"] < head["adapt"]["loss_before"]
    assert all(torch.equal(v, adapted.net.encoder.state_dict()[k]) for k, v in base.net.encoder.state_dict().items())
    lora = fewshot({"source": str(small_cnn_run), "shots": [5], "pool": POOL, "adapt": True, "adapt_steps": 5,
                    "lora_rank": 2, "out": str(tmp_path / "lora")}, data=new_task, progress=False)
    merged = trainforge.load(tmp_path / "lora")  # strict loading: the adapters are gone, merged into the weights
    assert not torch.equal(merged.net.encoder[0][0].weight, base.net.encoder[0][0].weight)
    assert torch.equal(merged.net.head.mean, adapted.net.head.mean)  # the centring mean stays frozen
    assert lora["adapt"]["lora_rank"] == 2
    images, _ = _pool(new_task)
    served = load_predictor(tmp_path / "lora", backend="torch")  # what `serve RUN_DIR` runs
    with torch.inference_mode():
        assert np.array_equal(served.predict(images[:64].numpy()).argmax(1), merged(images[:64]).argmax(1).numpy())


def test_cli_fewshot_json_with_episodes_then_eval_and_report(small_cnn_run, mnist, tmp_path, capsys):
    from trainforge.cli import main
    from trainforge.eval import evaluate_run
    from trainforge.report import write_report

    out = tmp_path / "cli"
    done = run_cli("fewshot", "--from", str(small_cnn_run), "--data", "mnist", "--shots", "1", "5",
                   "--episodes", "50", "--ways", "5", "--pool", "20", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["run_dir"] == str(out) and summary["shots"] == 5
    assert [(e["shots"], e["ways"], e["episodes"]) for e in summary["episodes"]] == [(1, 5, 50), (5, 5, 50)]
    for e in summary["episodes"]:
        assert 0.2 < e["simpleshot"]["mean"] <= 1 and 0 < e["simpleshot"]["ci95"] < 0.1  # 5-way: chance is 0.2
    assert summary["episodes"][1]["simpleshot"]["mean"] > summary["episodes"][0]["simpleshot"]["mean"]
    evaluated = evaluate_run(out)
    assert evaluated["test_samples"] == len(mnist.test.labels)
    assert evaluated["test_acc"] == pytest.approx(summary["test_acc"], abs=0.06)  # 200 pooled images vs 10,000
    report = write_report([out], tmp_path / "report.html", batch_size=5000, worst=4)
    assert "Few-shot accuracy against shots per class" in (tmp_path / "report.html").read_text()
    assert report["runs"][0]["accuracy"] == pytest.approx(evaluated["test_acc"])
    for args, message in ((["--shots", "2.5"], "--shots expects whole numbers"),
                          (["--shots", "1", "5"], "several --shots values (1, 5) are measured by episodes"),
                          (["--image-size", "64"], "takes its own resolution, 28 px"),
                          (["--lora-rank", "4"], "--lora-rank applies to --adapt"),
                          (["--episodes", "5", "--pool", "20", "--shots", "10"], "need at least 25 images per class")):
        assert main(["fewshot", "--from", str(small_cnn_run), *args, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("trainforge fewshot: error: ") and message in err and err.count("\n") == 1


def test_every_architecture_has_a_few_shot_twin():
    import subprocess
    import sys

    from conftest import REPO

    entry = model_entry("fewshot_efficientnet_lite0")
    assert (entry.image_size, entry.in_channels, entry.mean) == (224, 3, model_entry("efficientnet_lite0").mean)
    assert model_entry("fewshot_cnn").default_recipe == "cnn"
    # Also when the family is imported before the registry has loaded the others (as the verb imports it).
    code = ("import trainforge.fewshot.encoders; from trainforge.models import list_models as m; "
            "print(sorted(n[8:] for n in m() if n.startswith('fewshot_')) == sorted(n for n in m() "
            "if not n.startswith('fewshot_')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.stdout.strip() == "True", done.stderr
