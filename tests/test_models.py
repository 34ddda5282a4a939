import pytest
import torch

from trainforge.errors import ModelError
from trainforge.models import Preprocess, build_classifier, create_model, list_models, register_model

import mnist_made


@pytest.mark.parametrize("name", ["linear", "mlp", "cnn", "resnet18", "vgg16", "vgg16_bn"])
def test_registered_models_map_images_to_logits(name):
    net = create_model(name, num_classes=7, in_channels=1, image_size=28)
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 7)


@pytest.mark.parametrize("name", ["cnn", "resnet18", "vgg16"])
def test_conv_models_take_rgb_and_other_sizes(name):
    net = create_model(name, num_classes=4, in_channels=3, image_size=32)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_vgg_on_tiny_inputs_keeps_a_spatial_map():
    # 28 px allows four halvings; a fifth max-pool would fail on a 1x1 map.
    net = create_model("vgg16", num_classes=10, in_channels=1, image_size=28)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net.features) == 4


def test_linear_has_the_reference_shape():
    net = create_model("linear")
    assert sum(p.numel() for p in net.parameters()) == 784 * 10 + 10


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ModelError, match="registered models: .*cnn"):
        create_model("nope")


def test_width_only_for_models_that_take_it():
    assert create_model("mlp", width=32)[1].out_features == 32
    with pytest.raises(ModelError, match="takes no width"):
        create_model("linear", width=3)


def test_user_models_plug_in():
    @register_model("tiny_test_model", default_recipe="reference")
    def tiny(num_classes, in_channels, image_size):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_channels * image_size ** 2, num_classes))

    assert "tiny_test_model" in list_models()
    assert create_model("tiny_test_model", num_classes=3)(torch.randn(1, 1, 28, 28)).shape == (1, 3)


def test_preprocess_normalizes_adapts_channels_and_resizes():
    pre = Preprocess((0.5,), (0.25,), in_channels=1, image_size=28)
    x = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    assert torch.allclose(pre(x), torch.full((2, 1, 28, 28), 2.0))
    rgb = torch.zeros(1, 3, 56, 56, dtype=torch.uint8)
    assert pre(rgb).shape == (1, 1, 28, 28)
    pre3 = Preprocess((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), in_channels=3, image_size=32)
    assert pre3(torch.zeros(1, 1, 28, 28, dtype=torch.uint8)).shape == (1, 3, 32, 32)


def test_classifier_takes_raw_uint8():
    model = build_classifier("cnn", 10, 1, 28, (0.1307,), (0.3081,))
    assert model(torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)).shape == (4, 10)


@pytest.mark.parametrize("onednn", [True, False])
def test_linear_training_forward_folds_the_normalization_into_the_same_function(onednn, monkeypatch):
    from trainforge.models import small

    if onednn and not small._onednn_linear_works():
        pytest.skip("this PyTorch build has no working oneDNN linear operator")
    monkeypatch.setattr(small, "_onednn_linear_works", lambda: onednn)
    torch.manual_seed(0)
    model = build_classifier("linear", 10, 1, 28, (0.1307,), (0.3081,))
    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (64,))

    def logits_and_grads(training):
        model.train(training)
        model.zero_grad()
        logits = model(images)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    folded_logits, folded_grads = logits_and_grads(True)
    plain_logits, plain_grads = logits_and_grads(False)
    assert model._normalizing_head() is None  # eval mode outside inference mode: exported and traced as modules
    with torch.inference_mode():  # evaluation folds too
        assert model._normalizing_head() is model.net[1]
        inference_logits = model(images)
    assert model.net[1].weight.grad is not None
    torch.testing.assert_close(folded_logits, plain_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inference_logits, plain_logits, rtol=1e-5, atol=1e-5)
    for folded, plain in zip(folded_grads, plain_grads):
        torch.testing.assert_close(folded, plain, rtol=1e-4, atol=1e-6)


def test_fashion_cnn_evaluates_each_image_with_its_mirror_image_wherever_it_goes(tmp_path, mnist):
    """The test-time flip is part of the model: evaluation in training, `load()` and an ONNX export all average the
    two views, and training sees one. (On MNIST, which ships: the flip is the model's, whatever the images.)"""
    import trainforge
    from trainforge.export import export_run

    bundle = mnist_made.subset(mnist, 512, 500)
    out = tmp_path / "run"
    result = trainforge.train({"data": "mnist", "model": "fashion_cnn", "epochs": 1, "out": str(out),
                               "tensorboard": False}, data=bundle, progress=False)
    model = trainforge.load(out)
    images = bundle.test.images
    with torch.inference_mode():
        logits = model(images)
        torch.testing.assert_close(logits, model(images.flip(-1)), atol=1e-5, rtol=0)
        acc = (logits.argmax(1) == bundle.test.labels).float().mean().item()
    assert acc == pytest.approx(result.test_acc, abs=1e-6)
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(images[:8]), model(images[:8].flip(-1)), atol=1e-5)
    exported = export_run(out, tmp_path / "model.onnx", format="onnx", check_images=200)
    assert exported["parity"]["max_abs_diff"] <= 1e-4
