import argparse
import gc
import importlib.metadata
import json
import os
import re
import signal
import time

import numpy as np
import pytest
import torch
from torchvision.io import encode_jpeg, write_png

from conftest import run_cli, run_main
from trainforge import cli
from trainforge.data.sources import EMBEDDED_ROOT


def last_json(stdout: str):
    return json.loads(stdout.strip().splitlines()[-1])


def test_train_eval_predict_through_the_cli(tmp_path, mnist):
    run = tmp_path / "run"
    trained = run_cli("train", "--epochs", "1", "--subset", "3000", "--batch-size", "100", "--out", str(run), "--json")
    assert trained.returncode == 0, trained.stderr
    summary = last_json(trained.stdout)
    for key in ("test_acc", "train_seconds", "epochs", "samples_per_second", "device", "precision", "world_size",
                "run_dir"):
        assert key in summary
    assert summary["test_acc"] > 0.8 and summary["world_size"] == 1 and summary["run_dir"] == str(run)

    evaluated = run_cli("eval", str(run), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert abs(last_json(evaluated.stdout)["test_acc"] - summary["test_acc"]) < 1e-6

    png, jpg, npy = tmp_path / "seven.png", tmp_path / "two.jpg", tmp_path / "one.npy"
    write_png(mnist.test.images[0], str(png))  # test image 0 is a 7
    jpg.write_bytes(encode_jpeg(mnist.test.images[1].expand(3, -1, -1).contiguous(), quality=95).numpy().tobytes())
    np.save(npy, mnist.test.images[2, 0].numpy().astype(np.float32) / 255.0)  # a 1, as floats in 0-1
    labels = [int(mnist.test.labels[i]) for i in range(3)]
    predicted = run_cli("predict", str(run), str(png), str(jpg), str(npy), "--json")
    assert predicted.returncode == 0, predicted.stderr
    answers = last_json(predicted.stdout)
    assert [a["file"] for a in answers] == [str(png), str(jpg), str(npy)]
    assert [int(a["label"]) for a in answers] == labels
    assert all(0 < a["confidence"] <= 1 for a in answers)


def test_human_output_and_progress_go_to_the_right_streams(tmp_path):
    # 1,000 images in batches of 100: the bar counts 10 steps. A wide console keeps rich from dropping columns.
    result = run_cli("train", "--epochs", "1", "--subset", "1000", "--batch-size", "100", "--out", str(tmp_path / "r"),
                     "--no-tensorboard", env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    accuracy = re.fullmatch(r"test accuracy (0\.\d{4}) after 1 epochs .*", result.stdout.strip()).group(1)
    # The bar's last frame: label, bar, steps done of all, samples/s, the epoch's line and the time left.
    bars = [line for line in result.stderr.splitlines() if line.startswith("train ")]
    assert len(bars) == 1, result.stderr
    assert re.fullmatch(rf"train ━+ 10/10 [\d,]+ samples/s epoch 1 loss \d+\.\d{{4}} test acc {accuracy} .*0:00:00",
                        bars[0]), bars[0]
    assert len(result.stdout.strip().splitlines()) == 1  # stdout holds the result line only


def test_user_mistakes_are_one_line_errors(tmp_path, capsys):
    # In this process: a separate interpreter per case only repeats the import of torch (other tests run the CLI).
    cases = [
        (["train", "--lr", "-1"], "field 'lr' must be > 0"),
        (["train", "--data", "no-such-thing"], "neither a built-in data set"),
        (["train", "--model", "nope"], "unknown model 'nope'"),
        (["train", "--config", str(tmp_path / "missing.yaml")], "cannot read config file"),
        (["train", "--resume", str(tmp_path / "nowhere")], "no such run directory"),
        (["eval", str(tmp_path)], "not a finished run directory"),
        (["predict", str(tmp_path), "x.png"], "not a finished run directory"),
    ]
    for args, message in cases:
        status, stderr = cli.main(args), capsys.readouterr().err
        assert status == 2, (args, stderr)
        assert message in stderr, (args, stderr)
        assert "Traceback" not in stderr
        assert len(stderr.strip().splitlines()) == 1, stderr


def test_an_error_raised_while_unwinding_from_ctrl_c_is_reported_as_the_interrupt():
    def run_failing_on_interrupt(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises KeyboardInterrupt here
        except KeyboardInterrupt:
            raise UnboundLocalError("as Optuna's trial bookkeeping did") from None
        raise AssertionError("SIGINT was not delivered")

    def run_failing(args):
        raise UnboundLocalError("a bug, not an interrupt")

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            cli._run_noting_interrupts(run_failing_on_interrupt, argparse.Namespace())
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(UnboundLocalError, match="a bug"):
            cli._run_noting_interrupts(run_failing, argparse.Namespace())
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_command_exits_with_its_status_and_the_collector_frozen(monkeypatch, capsys):
    # Frozen: the interpreter's last collection, 0.5-0.7 s of every command, has nothing to walk.
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr("sys.argv", ["trainforge", "models"])
    entry = importlib.metadata.entry_points(group="console_scripts", name="trainforge")
    assert [e.value for e in entry] == ["trainforge.cli:console"]
    try:
        with pytest.raises(SystemExit) as exited:
            cli.console()
        assert exited.value.code == 0 and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    assert "cnn" in capsys.readouterr().out


def test_bad_command_lines_are_one_line_errors_with_status_2(capsys):
    # argparse's own error() prints the usage block first; the CLI's parser (every verb's too) prints one line.
    cases = [
        (["train", "--epochs", "many"], "trainforge train: error: argument --epochs: expected a number, got 'many'"),
        (["train", "--optimizer", "lion"], "trainforge train: error: argument --optimizer: invalid choice: 'lion'"),
        (["eval"], "trainforge eval: error: the following arguments are required: RUN_DIR"),
        (["serve", "runs/x", "--port", "eighty"], "trainforge serve: error: argument --port: invalid int value"),
        (["export", "runs/x", "--out"], "trainforge export: error: argument --out: expected one argument"),
        (["tune", "--trails", "3"], "trainforge tune: error: unrecognized arguments: --trails 3"),
        (["hw", "--measure", "--bogus"], "trainforge hw: error: unrecognized arguments: --bogus"),
        (["trian"], "trainforge: error: argument VERB: invalid choice: 'trian'"),
        ([], "trainforge: error: the following arguments are required: VERB"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exited:
            cli.main(args)
        stderr = capsys.readouterr().err
        assert exited.value.code == 2, (args, stderr)
        assert stderr.startswith(message) and stderr.count("\n") == 1, (args, stderr)
        assert "--help" in stderr and "usage:" not in stderr, (args, stderr)
    result = run_cli("train", "--epochs", "many")  # the same in a process of its own, as a user sees it
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "trainforge train: error: argument --epochs: expected a number, got 'many'; see trainforge train --help"]


def test_predict_names_unreadable_images(trained_run, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    result = run_main(capsys, "predict", str(trained_run), str(bad))
    assert result.returncode == 2 and f"{bad}: not an image in a supported format" in result.stderr
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((2, 2, 2, 2)))
    result = run_main(capsys, "predict", str(trained_run), str(wrong))
    assert result.returncode == 2 and "expected an image array" in result.stderr


def test_help_explains_every_verb(capsys):
    result = run_main(capsys, "--help")
    assert result.returncode == 0
    for verb, (_, help_text) in cli.VERBS.items():
        assert verb in result.stdout and help_text[:30] in " ".join(result.stdout.split()), verb
    train_help = run_main(capsys, "train", "--help").stdout
    assert "--recipe" in train_help and "--target-acc" in train_help and "Examples" in train_help


def test_models_lists_the_registry(capsys):
    result = run_main(capsys, "models", "--json")
    names = [m["name"] for m in last_json(result.stdout)["models"]]
    assert {"linear", "mlp", "cnn", "resnet18", "vgg16"} <= set(names)


def test_large_image_inputs_are_resized_by_the_model(trained_run, tmp_path, capsys):
    big = tmp_path / "big.png"
    write_png(torch.zeros(1, 56, 56, dtype=torch.uint8), str(big))
    result = run_main(capsys, "predict", str(trained_run), str(big), "--json", "--top-k", "3")
    assert result.returncode == 0, result.stderr
    assert len(last_json(result.stdout)[0]["top"]) == 3


def test_datasets_reports_where_each_set_is_read_from(tmp_path, capsys, monkeypatch):
    # No explicit root and an empty home: MNIST comes from the package, verified; Fashion-MNIST from the system
    # data sets if this machine has them, else it is reported missing with the apt package to install.
    monkeypatch.setenv("TRAINFORGE_DATA", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    result = run_main(capsys, "datasets", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in last_json(result.stdout)["datasets"]}
    assert rows["mnist"]["source"] == "embedded" and rows["mnist"]["verified"] is True
    fashion = rows["fashion-mnist"]
    assert fashion["source"] in (None, "system")
    assert fashion["verified"] is True or "apt-get install dataset-fashion-mnist" in fashion["problem"]
    explicit = run_main(capsys, "datasets", "--json", "--no-verify", "--data-dir", str(tmp_path / "none"))
    rows = last_json(explicit.stdout)["datasets"]
    assert [row["available"] for row in rows] == [False, False] and str(tmp_path / "none") in rows[0]["problem"]
    # An explicit root with MNIST, and MNIST's files under Fashion-MNIST's name: found there, and refused by
    # Fashion-MNIST's checksums.
    root = tmp_path / "root"
    for name in ("mnist", "fashion-mnist"):
        (root / name).mkdir(parents=True)
        for file in (EMBEDDED_ROOT / "mnist").iterdir():
            (root / name / file.name).symlink_to(file)
    result = run_main(capsys, "datasets", "--json", "--data-dir", str(root))
    mnist, fashion = last_json(result.stdout)["datasets"]
    assert (mnist["name"], mnist["source"], mnist["verified"]) == ("mnist", "explicit", True)
    assert (fashion["name"], fashion["source"], fashion["folder"]) == ("fashion-mnist", "explicit",
                                                                       str(root / "fashion-mnist"))
    assert fashion["verified"] is False and "checksum mismatch" in fashion["problem"]


def _verb_invocations(tmp_path, trained_run, small_cnn_run, image, auto_out) -> dict:
    """One real, quick command line per verb (without the verb), each meant to exit 0 with a JSON result."""
    return {
        "auto": ["--resume", str(auto_out)],  # the finished run of tests/test_auto.py: its record, no new work
        "train": ["--model", "linear", "--subset", "500", "--epochs", "1", "--out", str(tmp_path / "t"),
                  "--no-tensorboard"],
        "eval": [str(trained_run)],
        "predict": [str(trained_run), str(image)],
        "models": [],
        "datasets": [],
        "fewshot": ["--from", str(small_cnn_run), "--data", "mnist", "--shots", "2", "--out", str(tmp_path / "fs")],
        "finetune": ["--from", str(small_cnn_run), "--data", "mnist", "--subset", "200", "--epochs", "1",
                     "--strategy", "linear-probe", "--out", str(tmp_path / "f"), "--no-tensorboard"],
        "export": [str(small_cnn_run), "--out", str(tmp_path / "m.onnx"), "--check-images", "50"],
        "compress": [str(small_cnn_run), "--quantize", "int8", "--out", str(tmp_path / "c"), "--test-images", "100",
                     "--latency-calls", "2", "--repeats", "1", "--runtimes", "onnxruntime",
                     "--calibration-images", "16"],
        "tune": ["--trials", "1", "--model", "linear", "--subset", "500", "--max-epochs", "1",
                 "--out", str(tmp_path / "tune")],
        "report": [str(trained_run), "--out", str(tmp_path / "r.html")],
        "hw": [],
        "bench": ["--model", "linear", "--device", "cpu", "--steps", "2", "--warmup", "0"],
        "lr-find": ["--model", "linear", "--subset", "1000", "--batch-size", "128", "--steps", "10",
                    "--out", str(tmp_path / "lr.png")],
    }


def test_every_verb_has_help_and_runs(tmp_path, trained_run, small_cnn_run, mnist, capsys, monkeypatch, auto_run):
    """Every verb of cli.VERBS, whoever added it: its --help, and one real invocation (serve: a live server)."""
    from conftest import start_server

    image = tmp_path / "seven.png"
    write_png(mnist.test.images[0], str(image))
    invocations = _verb_invocations(tmp_path, trained_run, small_cnn_run, image, auto_run[1])
    monkeypatch.setenv("TRAINFORGE_CACHE", str(tmp_path / "cache"))  # bench measures this machine into it
    for verb in cli.VERBS:
        with pytest.raises(SystemExit) as exited:
            cli.main([verb, "--help"])
        assert exited.value.code == 0 and f"usage: trainforge {verb}" in capsys.readouterr().out, verb
        if verb == "serve":
            proc, base = start_server(small_cnn_run)
            try:
                import httpx

                assert httpx.get(base + "/health", timeout=10).status_code == 200
            finally:
                proc.terminate()
                proc.communicate(timeout=60)
            continue
        assert verb in invocations, f"add a real invocation of `trainforge {verb}` to _verb_invocations"
        status = cli.main([verb, *invocations[verb], "--json"])
        out, err = capsys.readouterr()
        assert status == 0, (verb, err[-2000:])
        assert last_json(out) is not None, verb
