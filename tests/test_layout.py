import json

import pytest
import torch

import trainforge
from trainforge import config as cfg
from trainforge.data import DataBundle, ImageSet, balanced_subset
from trainforge.errors import ConfigError
from trainforge.finetune import strategies
from trainforge.models import Preprocess, create_model
from trainforge.train import layout


@pytest.mark.parametrize("name,size", [("cnn", 28), ("efficientnet_lite0", 64)])
def test_logits_agree_in_either_layout(name, size):
    torch.manual_seed(0)
    net = create_model(name, num_classes=10, in_channels=3, image_size=size).eval()
    x = torch.randn(8, 3, size, size)
    with torch.inference_mode():
        contiguous = layout.apply_layout(net, "contiguous")(x)
        assert not net.get_submodule(_first_conv(net)).weight.is_contiguous(memory_format=torch.channels_last)
        channels_last = layout.apply_layout(net, "channels-last")(x.contiguous(memory_format=torch.channels_last))
        assert net.get_submodule(_first_conv(net)).weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(channels_last, contiguous, rtol=0, atol=1e-4)


def _first_conv(net: torch.nn.Module) -> str:
    return next(n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d))


def test_auto_choices_follow_the_measured_rules(monkeypatch):
    cpu = torch.device("cpu")
    cnn, linear = create_model("cnn"), create_model("linear")
    lite0 = create_model("efficientnet_lite0", num_classes=10, in_channels=3, image_size=64)
    assert layout.choose_layout("auto", cnn, cpu) == "channels-last"
    assert layout.choose_layout("auto", linear, cpu) == "contiguous"
    assert layout.choose_layout("contiguous", cnn, cpu) == "contiguous"
    assert layout.choose_layout("auto", cnn, cpu, sharded=True) == "contiguous"  # FSDP shards contiguous tensors
    with pytest.raises(ConfigError, match="--layout channels-last: FSDP"):
        layout.choose_layout("channels-last", cnn, cpu, sharded=True)
    monkeypatch.setattr(layout, "cpu_has_native_bf16", lambda: True)
    assert layout.choose_precision("auto", cnn, cpu) == "bf16"
    assert layout.choose_precision(None, cnn, cpu) == "bf16"
    assert layout.choose_precision("auto", lite0, cpu) == "32"  # depthwise convolutions: bf16 training is slower
    assert layout.choose_precision("32", cnn, cpu) == "32"
    assert layout.choose_eval_precision("auto", "32", cpu) == "bf16"
    assert layout.choose_eval_precision(None, "32", cpu) == "32"
    monkeypatch.setattr(layout, "cpu_has_native_bf16", lambda: False)
    assert layout.choose_precision("auto", cnn, cpu) == "32"
    assert layout.choose_eval_precision("auto", "32", cpu) == "32"


def test_forced_bf16_channels_last_cnn_learns_as_well_as_fp32(mnist, small_cnn_run, tmp_path):
    """bf16 on any CPU (emulated where it is not native), the fixture's fp32 run repeated: only accuracy is checked."""
    result = trainforge.train({"model": "cnn", "width": 8, "epochs": 2, "batch_size": 32, "precision": "bf16",
                               "layout": "channels-last", "out": str(tmp_path / "run"), "tensorboard": False},
                              data=_small(mnist, 2000, 1000), progress=False)
    fp32 = json.loads((small_cnn_run / "summary.json").read_text())
    assert result.precision == "bf16" and fp32["precision"] == "32"
    assert result.test_acc > 0.5 and abs(result.test_acc - fp32["test_acc"]) < 0.1  # chance is 0.1


def test_run_records_its_choices_and_a_rerun_takes_them(mnist, tmp_path, monkeypatch):
    data = _small(mnist, 256, 200)
    monkeypatch.setattr(layout, "cpu_has_native_bf16", lambda: True)
    first = trainforge.train({"model": "cnn", "width": 8, "epochs": 1, "batch_size": 64, "precision": "auto",
                              "out": str(tmp_path / "a"), "tensorboard": False}, data=data, progress=False)
    saved = cfg.load_file(cfg.TrainConfig, tmp_path / "a" / "config.yaml")
    assert (saved.precision, saved.eval_precision, saved.layout) == ("bf16", "bf16", "channels-last")
    assert first.precision == "bf16"
    # On a machine whose own rule would choose otherwise, the recorded choices still hold.
    monkeypatch.setattr(layout, "cpu_has_native_bf16", lambda: False)
    again = trainforge.train({**cfg.to_dict(saved), "out": str(tmp_path / "b")}, data=data, progress=False)
    resaved = cfg.load_file(cfg.TrainConfig, tmp_path / "b" / "config.yaml")
    assert again.precision == "bf16" and (resaved.layout, resaved.eval_precision) == ("channels-last", "bf16")


def test_frozen_backbone_gets_no_gradient_work():
    net = create_model("cnn", width=8)
    head = net[-1]
    strategies.freeze_backbone(net, head)
    model = strategies.FinetuneClassifier(Preprocess((0.5,), (0.25,), 1, 28), net)
    seen = []
    head.register_forward_pre_hook(lambda module, args: seen.append(args[0].requires_grad))
    model(torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)).sum().backward()
    assert seen == [False]  # no autograd graph reaches into the backbone
    assert all(p.grad is None for n, p in net.named_parameters() if not n.startswith(f"{len(net) - 1}."))


def _small(mnist: DataBundle, n_train: int, n_test: int) -> DataBundle:
    idx = balanced_subset(mnist.train.labels, n_train, 0)
    return DataBundle("mnist", ImageSet(mnist.train.images[idx], mnist.train.labels[idx], mnist.classes),
                      ImageSet(mnist.test.images[:n_test], mnist.test.labels[:n_test], mnist.classes),
                      mnist.mean, mnist.std)
