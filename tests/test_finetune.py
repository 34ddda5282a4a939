"""Fine-tuning: sources of weights, frozen/LoRA/gradual strategies, the cached linear probe, --update and the CLI."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import trainforge
from trainforge import config as cfg
from trainforge import runs
from trainforge.data import DataBundle
from trainforge.errors import CheckpointError, ConfigError, ModelError
from trainforge.finetune import finetune, sources, strategies
from trainforge.models import Classifier, Preprocess, count_params, create_model, model_entry
from trainforge.models.pretrained import EfficientNetLite0
from trainforge.train.layout import choose_eval_precision

import mnist_made
from conftest import run_cli

GRACE_HOPPER = Path(__import__("matplotlib").get_data_path()) / "sample_data" / "grace_hopper.jpg"
MILITARY_UNIFORM = 652  # ImageNet class index


@pytest.fixture(scope="module")
def new_task(mnist_5_5) -> DataBundle:
    """Digits 5-9 (labelled 0-4), 200 training and 200 test images: the task fine-tuning moves a model to."""
    return mnist_made.subset(mnist_5_5[1], 200, 200)


@pytest.fixture(scope="module")
def mnist_cnn(tmp_path_factory, mnist_5_5) -> Path:
    """A narrow cnn trained on digits 0-4 (1,000 images, two epochs: about 97% of their test images): the task-A
    model that fine-tuning starts from."""
    out = tmp_path_factory.mktemp("src") / "cnn"
    trainforge.train({"model": "cnn", "width": 16, "epochs": 2, "batch_size": 32, "out": str(out),
                      "tensorboard": False}, data=mnist_5_5[0], progress=False)
    return out


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    return sources.load_source("efficientnet_lite0", data=None).net.eval()


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Plain float32 accuracy, independent of the evaluation code under test."""
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


def _photo(size: int) -> torch.Tensor:
    from torchvision.io import decode_image

    image = decode_image(str(GRACE_HOPPER)).float()[None]
    return torch.nn.functional.interpolate(image, size=(size, size), mode="bilinear", antialias=True)


def test_efficientnet_lite0_loads_offline_and_recognises_a_photo(lite0):
    from torchvision.io import decode_image

    # Through the registered input contract, as fine-tuned models see images: raw uint8 in, resized inside.
    entry = model_entry("efficientnet_lite0")
    model = Classifier(Preprocess(entry.mean, entry.std, entry.in_channels, entry.image_size), lite0).eval()
    with torch.no_grad():
        probs = model(decode_image(str(GRACE_HOPPER))[None]).softmax(1)[0]
    assert int(probs.argmax()) == MILITARY_UNIFORM
    assert float(probs[MILITARY_UNIFORM]) > 0.3


def test_linear_probe_leaves_the_backbone_untouched(mnist_cnn, new_task, tmp_path):
    before = trainforge.load(mnist_cnn).net.state_dict()
    out = finetune({"source": str(mnist_cnn), "strategy": "linear-probe", "cache_features": False},
                   {"epochs": 1, "batch_size": 32, "out": str(tmp_path / "probe"), "tensorboard": False},
                   data=new_task, progress=False)
    after = trainforge.load(tmp_path / "probe").net.state_dict()
    head = sources.head_name(trainforge.load(mnist_cnn).net)
    for key, value in before.items():
        if not key.startswith(head + "."):
            assert torch.equal(value, after[key]), key  # weights and BatchNorm running statistics alike
    assert after[f"{head}.weight"].shape == (len(new_task.classes), before[f"{head}.weight"].shape[1])
    assert out["trainable_params"] == after[f"{head}.weight"].numel() + after[f"{head}.bias"].numel()
    assert out["total_params"] == sum(p.numel() for p in trainforge.load(tmp_path / "probe").parameters())


def test_cached_linear_probe_assembles_the_model_it_measured(lite0, new_task, tmp_path):
    out = finetune({"source": "efficientnet_lite0", "strategy": "linear-probe"},
                   {"epochs": 2, "image_size": 32, "out": str(tmp_path / "cached"), "tensorboard": False},
                   data=new_task, progress=False)
    assert out["cached_features"] is True
    model = trainforge.load(tmp_path / "cached")
    assert model.info.model == "efficientnet_lite0" and model.info.image_size == 32
    acc = _accuracy(model, new_task.test.images, new_task.test.labels)
    assert acc == pytest.approx(out["test_acc"], abs=1e-6)
    assert acc > 0.4  # 5 classes: well above chance after 2 epochs on 200 images


def test_lora_trains_only_adapters_and_head():
    net = create_model("cnn", num_classes=10, in_channels=1, image_size=28, width=32)
    rank = 4
    wrapped = strategies.apply_lora(net, "7", rank=rank, alpha=8, dropout=0.0, targets=None)
    # conv k x k (cin -> cout): A is r x cin x k x k, B is cout x r; the head Linear(64, 10) trains whole.
    convs = [(1, 32), (32, 64), (64, 64)]
    expected = sum(rank * (cin * 9 + cout) for cin, cout in convs) + 64 * 10 + 10
    assert count_params(wrapped, trainable_only=True) == expected
    narrowed = strategies.apply_lora(create_model("cnn", num_classes=10, width=32), "7", rank, 8, 0.0,
                                     targets=r"4\.0")
    assert count_params(narrowed, trainable_only=True) == rank * (64 * 9 + 64) + 650  # the third conv only
    with pytest.raises(ConfigError, match="matches no"):
        strategies.apply_lora(create_model("cnn", num_classes=10), "7", rank, 8, 0.0, targets="nothing")


def test_lora_on_lite0_is_small_and_merges_exactly(lite0):
    import copy

    net = copy.deepcopy(lite0)
    strategies.replace_head(net, "_fc", 10)
    wrapped = strategies.apply_lora(net, "_fc", rank=8, alpha=16, dropout=0.0, targets=None)
    trainable, total = count_params(wrapped, True), count_params(wrapped)
    assert trainable < 0.10 * total
    torch.manual_seed(0)
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:  # B starts at zero; give the adapters a real effect
            nn.init.normal_(p, std=0.02)
    x = _photo(96) / 255
    wrapped.eval()
    with torch.no_grad():
        unmerged = wrapped(x)
        merged_net = strategies.merge_lora(wrapped).eval()
        merged = merged_net(x)
    assert isinstance(merged_net, EfficientNetLite0)
    assert torch.allclose(unmerged, merged, atol=1e-4 * unmerged.abs().max().item())
    plain = create_model("efficientnet_lite0", num_classes=10, in_channels=3, image_size=96)
    plain.load_state_dict(merged_net.state_dict())  # a plain architecture: no adapter keys remain


def test_gradual_unfreezer_opens_blocks_from_the_top():
    net = create_model("cnn", num_classes=10)
    units = strategies.gradual_units(net, "7")
    assert [type(u).__name__ for u in units] == ["Sequential"] * 3
    model = nn.Sequential(net)
    unfreezer = strategies.GradualUnfreezer(units, stages=3, steps_per_stage=2)
    unfreezer.attach(model)
    model.train()
    seen = []
    for _ in range(8):
        model(torch.zeros(1, 1, 28, 28))
        seen.append([any(p.requires_grad for p in u.parameters()) for u in units])
    assert seen[0] == seen[1] == [False, False, False]
    assert seen[2] == seen[3] == [False, False, True]
    assert seen[4] == [False, True, True]
    assert seen[7] == [True, True, True]


def test_gradual_finetune_ends_with_everything_trained(mnist_cnn, new_task, tmp_path):
    out = finetune({"source": str(mnist_cnn), "strategy": "gradual", "unfreeze_stages": 1, "unfreeze_every": 1},
                   {"epochs": 2, "batch_size": 50, "out": str(tmp_path / "gradual"), "tensorboard": False},
                   data=new_task, progress=False)
    assert out["trainable_params"] == out["total_params"]
    before, after = trainforge.load(mnist_cnn).net, trainforge.load(tmp_path / "gradual").net
    assert not torch.equal(before[0][0].weight, after[0][0].weight)  # the first conv trained in epoch 2


def test_mismatched_weights_fail_with_the_keys(tmp_path, new_task):
    wide = tmp_path / "wide.safetensors"
    default_width = create_model("cnn", num_classes=10)[0][0].out_channels
    runs.save_weights(wide, create_model("cnn", num_classes=10, width=2 * default_width).state_dict())
    with pytest.raises(CheckpointError, match=r"wide.safetensors.*shape mismatches.*0\.0\.weight"):
        sources.load_source(str(wide), new_task, model="cnn")
    other = tmp_path / "mlp.pth"
    torch.save(create_model("mlp", num_classes=10).state_dict(), other)
    with pytest.raises(CheckpointError, match=r"missing keys: 0\.0\.weight.*unexpected keys: 1\."):
        sources.load_source(str(other), new_task, model="cnn")
    with pytest.raises(ConfigError, match="needs --model"):
        sources.load_source(str(wide), new_task)
    pickled = tmp_path / "code.pth"
    torch.save({"weights": create_model("linear", 10)}, pickled)  # a whole module: unpickling would run code
    with pytest.raises(CheckpointError, match="refused to load"):
        sources.load_source(str(pickled), new_task, model="linear")
    fitting = tmp_path / "cnn.safetensors"
    runs.save_weights(fitting, create_model("cnn", num_classes=7).state_dict())
    source = sources.load_source(str(fitting), new_task, model="cnn")
    assert source.net[7].out_features == 7 and source.kind == "file"


def test_torchvision_source_offline_uses_the_hub_cache_or_says_where(tmp_path, monkeypatch, new_task):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    url, cached = sources.torchvision_weights_file("mobilenet_v3_small")
    with pytest.raises(ModelError, match=f"could not be downloaded.*put that file at {cached}"):
        sources.load_source("mobilenet_v3_small", new_task)
    reference = create_model("tv_mobilenet_v3_small", num_classes=1000, in_channels=3, image_size=224)
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference.state_dict(), cached)
    source = sources.load_source("mobilenet_v3_small", new_task)
    assert source.arch == "tv_mobilenet_v3_small" and source.image_size == 224 and source.in_channels == 3
    assert torch.equal(source.net.features[0][0].weight, reference.features[0][0].weight)
    with pytest.raises(ModelError, match="not a run directory"):
        sources.load_source("no_such_model", new_task)


def _old_logit_drift(model: nn.Module, source: nn.Module, images: torch.Tensor) -> float:
    """How far the old classes' outputs (softmax over them alone) moved from the source model's: KL divergence."""
    with torch.no_grad():
        teacher = F.log_softmax(source(images), 1)
        student = F.log_softmax(model(images)[:, :teacher.shape[1]], 1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean").item()


def test_update_measures_forgetting_that_replay_and_distillation_reduce(mnist_cnn, mnist_5_5, tmp_path):
    """Digits 0-4, then 5-9: with neither mitigation the old task is forgotten; replay keeps most of it, and
    distillation keeps the old classes' outputs close to the source model's."""
    old, new = mnist_5_5
    source = trainforge.load(mnist_cnn)

    def update(name: str, replay: int, distill: float) -> tuple[dict, Classifier]:
        out = finetune({"source": str(mnist_cnn), "update": True, "replay": replay, "distill": distill},
                       {"epochs": 1, "batch_size": 32, "out": str(tmp_path / name), "tensorboard": False},
                       data=new, old_data=old, progress=False)
        return out, trainforge.load(tmp_path / name)

    plain, plain_model = update("plain", 0, 0.0)
    # The joint head: task A's classes first (their rows kept, then trained), then task B's.
    assert plain_model.classes == old.classes + new.classes and plain_model.net[7].out_features == 10
    assert not torch.equal(plain_model.net[7].weight[:5], source.net[7].weight)
    # Measured on each task's own test images, the new task's labels offset past the old classes (in the run's
    # precision, bf16 on a CPU with native bf16: within a few images of float32).
    expected = {"old_task_acc_before": _accuracy(source, old.test.images, old.test.labels),
                "old_task_acc": _accuracy(plain_model, old.test.images, old.test.labels),
                "new_task_acc": _accuracy(plain_model, new.test.images, new.test.labels + len(old.classes))}
    assert {k: plain[k] for k in expected} == pytest.approx(expected, abs=0.01)
    assert plain["old_task_acc_before"] > 0.9 and plain["new_task_acc"] > 0.5  # chance: 0.1
    plain_drop = plain["old_task_acc_before"] - plain["old_task_acc"]
    assert plain_drop > 0.6, plain  # forgotten: the new classes take every image

    replayed, _ = update("replay", 500, 0.0)
    assert replayed["old_task_acc_before"] == plain["old_task_acc_before"]
    assert replayed["old_task_acc_before"] - replayed["old_task_acc"] < plain_drop / 3, (replayed, plain)

    distilled, distilled_model = update("distill", 0, 5.0)
    drift = {name: _old_logit_drift(m, source, old.test.images)
             for name, m in (("plain", plain_model), ("distill", distilled_model))}
    assert drift["distill"] < drift["plain"] / 2, drift
    assert distilled["old_task_acc"] > plain["old_task_acc"] + 0.05, (distilled, plain)
    with pytest.raises(ConfigError, match="needs a run directory"):
        finetune({"source": "efficientnet_lite0", "update": True}, {"out": str(tmp_path / "x")}, data=new)


def test_cli_finetune_then_eval_and_predict(mnist_cnn, mnist_png_folder, tmp_path, capsys):
    from trainforge.cli import main

    # A small image folder (train/ and val/), so that the subprocesses spend their time on the verbs, not on data.
    folder = mnist_png_folder
    out = tmp_path / "cli"
    done = run_cli("finetune", "--from", str(mnist_cnn), "--data", str(folder), "--strategy", "lora",
                   "--lora-rank", "4", "--epochs", "1", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["strategy"] == "lora" and summary["trainable_params"] < summary["total_params"]
    assert summary["run_dir"] == str(out)
    evaluated = run_cli("eval", str(out), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    evaluation = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert evaluation["test_acc"] == pytest.approx(summary["test_acc"])
    # LoRA caches no features, so it evaluates in the fastest precision; `eval` takes the one the run recorded.
    recorded = cfg.load_file(cfg.TrainConfig, out / "config.yaml").eval_precision
    assert recorded == choose_eval_precision("auto", summary["precision"], torch.device("cpu"))
    assert evaluation["precision"] == recorded
    image = next((folder / "val").glob("*/*.png"))
    predicted = run_cli("predict", str(out), str(image), "--json")
    assert predicted.returncode == 0, predicted.stderr
    # The CLI's answer is the saved model's own: the merged LoRA weights were the ones written.
    from trainforge.predict import read_image

    model = trainforge.load(out)
    with torch.inference_mode():
        expected = model.classes[int(model(read_image(image, model.info.in_channels)[None]).argmax())]
    assert json.loads(predicted.stdout.strip().splitlines()[-1])[0]["label"] == expected
    capsys.readouterr()
    assert main(["finetune", "--from", "no_such_model", "--data", str(folder)]) == 2
    assert capsys.readouterr().err.strip().startswith("trainforge finetune: error: --from no_such_model")
