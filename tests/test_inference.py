"""Inference on real run directories made here without Flower: a LeNet-5 trained on the real
``digits`` data set, and a tiny text model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import RunConfig
from common.data import DataSpec, load_partition, load_raw_cached, load_test_set
from common.data.features import image_features
from common.evaluation import evaluate
from common.models import build_model
from common.ops.inference import (
    InferenceError,
    Prediction,
    RunDirError,
    evaluate_run,
    load_run,
    predict,
    prepare_image,
    read_text_inputs,
)
from tests.conftest import shared_data

DIGITS = tuple(str(d) for d in range(10))


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    """Plain minibatch SGD (lr 0.1, batch 32), seeded."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), 32):
            idx = order[start : start + 32]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def _write_run(run_dir: Path, config: RunConfig, model, classes, rounds) -> Path:
    run_dir.mkdir(parents=True)
    torch.save(model.state_dict(), run_dir / "model.pt")
    metrics = {
        "config": config.to_mapping(),
        "summary": {"classes": list(classes)},
        "rounds": rounds,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """LeNet-5 trained centrally on all of digits' training data, saved as a run would be."""
    torch.manual_seed(0)
    model = build_model("lenet5", 10)
    train = load_partition(DataSpec("digits", "", 42), 0, 1).train
    _train(model, *train.tensors, epochs=5)
    accuracy = evaluate(model, load_test_set(DataSpec("digits", "", 42))).accuracy
    assert accuracy > 0.9
    return _write_run(
        tmp_path_factory.mktemp("runs") / "digits-run",
        RunConfig(),
        model,
        DIGITS,
        [{"round": 1, "test_accuracy": accuracy}],
    )


HAM = [
    "are we still meeting for lunch today",
    "i will call you when i get home",
    "sorry i am running late see you soon",
    "can you pick up some milk on the way",
    "happy birthday hope you have a great day",
    "ok see you at the station at six",
    "did you finish the homework for tomorrow",
    "thanks for dinner last night it was lovely",
]
SPAM = [
    "WINNER you have won a free prize call now to claim",
    "URGENT claim your cash reward text WIN to 80082",
    "free entry to win a brand new phone reply YES now",
    "congratulations you won a guaranteed prize call 0800 now",
    "cash prize waiting claim now by texting CLAIM",
    "you have been selected for a free holiday call now",
    "win a free ringtone text TONE to 87121 now",
    "exclusive offer claim your free voucher today text STOP to opt out",
]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> Path:
    from common.data.features import text_features

    config = RunConfig(dataset="sms_spam", model="text-linear", text_features=256, dp=False)
    torch.manual_seed(0)
    model = build_model("text-linear", 2, num_features=256)
    x = text_features(HAM + SPAM, 256)
    y = torch.tensor([0] * len(HAM) + [1] * len(SPAM))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return _write_run(
        tmp_path_factory.mktemp("runs") / "text-run", config, model, ("ham", "spam"), []
    )


# --- load_run ------------------------------------------------------------------------------


def test_load_run(digits_run):
    run = load_run(str(digits_run))
    assert run.kind == "image" and run.classes == DIGITS and run.config == RunConfig()
    assert not run.model.training
    saved = torch.load(digits_run / "model.pt", weights_only=True)
    for key, value in run.model.state_dict().items():
        assert torch.equal(value, saved[key])


def test_load_run_errors_name_the_path(digits_run, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(RunDirError, match="nope") as err:
        load_run(missing)
    assert "\n" not in str(err.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunDirError, match=r"metrics\.json not found") as err:
        load_run(empty)
    assert str(empty / "metrics.json") in str(err.value)

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(digits_run / "metrics.json", unfinished / "metrics.json")
    with pytest.raises(RunDirError, match=r"model\.pt not found") as err:
        load_run(unfinished)
    assert str(unfinished / "model.pt") in str(err.value)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.json").write_text("{not json")
    with pytest.raises(RunDirError, match="cannot be read") as err:
        load_run(broken)
    assert str(broken / "metrics.json") in str(err.value) and "\n" not in str(err.value)

    wrong_model = tmp_path / "wrong-model"
    wrong_model.mkdir()
    shutil.copy(digits_run / "metrics.json", wrong_model / "metrics.json")
    torch.save(
        build_model("text-linear", 10, num_features=16).state_dict(), wrong_model / "model.pt"
    )
    with pytest.raises(RunDirError, match="cannot be loaded as a lenet5") as err:
        load_run(wrong_model)
    assert "\n" not in str(err.value)


# --- evaluate_run --------------------------------------------------------------------------


def test_evaluate_run_matches_the_recorded_accuracy(digits_run):
    recorded = json.loads((digits_run / "metrics.json").read_text())["rounds"][-1]
    result = evaluate_run(digits_run)
    assert result["accuracy"] == pytest.approx(recorded["test_accuracy"], abs=1e-9)
    assert result["dataset"] == "digits"
    assert result["num_examples"] == 360
    reference = evaluate(load_run(digits_run).model, load_test_set(DataSpec("digits", "", 42)))
    assert result["loss"] == pytest.approx(reference.loss, rel=1e-9)
    assert result["accuracy"] > 0.9 and result["f1_macro"] > 0.85
    assert 0.9 < result["roc_auc"] <= 1.0
    assert [r["class"] for r in result["per_class"]] == list(DIGITS)
    assert np.trace(np.array(result["confusion_matrix"])) == round(result["accuracy"] * 360)
    json.dumps(result)
    # the same with the data set named explicitly
    assert evaluate_run(digits_run, "digits", "")["accuracy"] == result["accuracy"]


def test_evaluate_run_refuses_a_dataset_with_other_classes(text_run):
    with pytest.raises(InferenceError, match="does not match"):
        evaluate_run(text_run, dataset="digits")


def test_evaluate_text_run_on_real_sms_spam(text_run):
    root = shared_data("sms_spam", "SMSSpamCollection")
    result = evaluate_run(text_run, data_dir=str(root))
    raw = load_raw_cached(DataSpec("sms_spam", str(root), 42))
    assert result["num_examples"] == len(raw.test_y)
    assert result["classes"] == ["ham", "spam"]
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["roc_auc"] <= 1.0


# --- prepare_image -------------------------------------------------------------------------


def _bar_image(width: int, height: int, light_background: bool) -> Image.Image:
    """A horizontal bar (the 'ink') across the middle of a ``width×height`` image."""
    a = np.zeros((height, width), dtype=np.uint8)
    a[height // 3 : 2 * height // 3, width // 10 : 9 * width // 10] = 255
    return Image.fromarray(255 - a if light_background else a)


def test_prepare_image_scales_the_ink_into_a_centred_20x20_box():
    out = prepare_image(_bar_image(300, 180, light_background=False))
    assert out.dtype == torch.uint8 and out.shape == (28, 28)
    rows, cols = np.nonzero(out.numpy() > 64)
    assert cols.min() == 4 and cols.max() == 23  # 240 px wide ink → 20 columns, centred
    assert rows.max() - rows.min() + 1 == 5  # 60 px tall → 60 × 20/240 = 5 rows
    assert abs((rows.min() + rows.max()) / 2 - 13.5) <= 1
    assert out[0, 0] == 0 and out[27, 27] == 0  # black background, like MNIST


def test_prepare_image_inverts_light_backgrounds_and_flattens_transparency():
    dark = prepare_image(_bar_image(120, 160, light_background=False))
    light = _bar_image(120, 160, light_background=True)
    assert torch.equal(prepare_image(light.convert("RGB")), dark)
    # black ink on a transparent (black, alpha 0) background
    ink = np.array(_bar_image(120, 160, light_background=False))
    rgba = np.zeros((160, 120, 4), dtype=np.uint8)
    rgba[..., 3] = ink
    assert torch.equal(prepare_image(Image.fromarray(rgba, "RGBA")), dark)


# --- predict: images -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def digit_files(digits_run, tmp_path_factory):
    """Test-split digits the model classifies correctly, as 84×84 PNGs (white on black) and
    inverted RGB JPEGs (black on white): [(png, jpeg, label)], most confident first."""
    model = load_run(digits_run).model
    raw = load_raw_cached(DataSpec("digits", "", 42))
    with torch.no_grad():
        probs = torch.softmax(model(image_features(raw.test_x)), dim=1)
    confidence, predicted = probs.max(dim=1)
    correct = np.nonzero(predicted.numpy() == raw.test_y)[0]
    chosen = correct[np.argsort(-confidence.numpy()[correct], kind="stable")][:40]
    folder = tmp_path_factory.mktemp("images")
    files = []
    for i in chosen:
        big = Image.fromarray(raw.test_x[i].numpy()).resize((84, 84), Image.Resampling.BICUBIC)
        png, jpeg = folder / f"test{i}.png", folder / f"test{i}-inverted.jpg"
        big.save(png)
        Image.fromarray(255 - np.array(big)).convert("RGB").save(jpeg, quality=95)
        files.append((png, jpeg, str(raw.test_y[i])))
    return files


def test_predict_png_and_inverted_jpeg_of_a_known_digit(digits_run, digit_files):
    png, jpeg, label = digit_files[0]
    preds = predict(digits_run, [str(png), str(jpeg)])
    assert [p.input for p in preds] == [str(png), str(jpeg)]
    for p in preds:
        assert p.error is None
        assert p.label == label
        assert 0.5 < p.probability <= 1.0
        assert p.probabilities is not None
        assert sum(p.probabilities.values()) == pytest.approx(1.0)
        assert p.probability == max(p.probabilities.values()) == p.probabilities[label]


def test_predict_is_mnist_like_on_many_digits(digits_run, digit_files):
    """The preprocessing keeps digits recognisable: nearly all images the model gets right
    in the data set's own form it also gets right from a resized PNG or inverted JPEG."""
    paths = [str(f) for png, jpeg, _ in digit_files for f in (png, jpeg)]
    labels = [label for _, _, label in digit_files for _ in range(2)]
    preds = predict(digits_run, paths)
    right = sum(p.label == label for p, label in zip(preds, labels, strict=True))
    assert right >= 0.9 * len(paths)


def test_bad_image_files_are_reported_and_the_others_still_classified(
    digits_run, digit_files, tmp_path, caplog
):
    png, jpeg, label = digit_files[0]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(np.random.default_rng(0).bytes(2048))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png.read_bytes()[:100])
    missing = tmp_path / "missing.png"
    inputs = [str(corrupt), str(png), str(missing), str(truncated), str(jpeg), str(tmp_path)]
    with caplog.at_level("WARNING", logger="fedvault.inference"):
        preds = predict(digits_run, inputs)
    assert [p.input for p in preds] == inputs
    for i in (0, 2, 3, 5):
        p = preds[i]
        assert p.label is None and p.probability is None
        assert p.error is not None and inputs[i] in p.error and "\n" not in p.error
    assert "no such file" in preds[2].error
    for i in (1, 4):
        assert preds[i].error is None and preds[i].label == label
    assert sum(r.levelname == "WARNING" for r in caplog.records) == 4


def test_predict_nothing_and_a_missing_run(digits_run, tmp_path):
    assert predict(digits_run, []) == []
    with pytest.raises(RunDirError):
        predict(tmp_path / "no-such-run", ["x.png"])


# --- predict: text -------------------------------------------------------------------------


def test_predict_text(text_run):
    texts = [
        "claim your free prize now, call to win cash",
        "see you at lunch tomorrow, thanks",
        "   ",
    ]
    preds = predict(text_run, texts)
    assert [p.input for p in preds] == texts
    for p in preds[:2]:
        assert isinstance(p, Prediction) and p.error is None
        assert p.label in ("ham", "spam")
        assert 0.0 <= p.probability <= 1.0
        assert set(p.probabilities) == {"ham", "spam"}
        assert sum(p.probabilities.values()) == pytest.approx(1.0)
        assert p.probability == p.probabilities[p.label] >= 0.5
    assert [p.label for p in preds[:2]] == ["spam", "ham"]
    assert preds[2].error is not None and preds[2].label is None
    json.dumps([p.to_json() for p in preds])


def test_read_text_inputs_expands_files_into_lines(tmp_path):
    messages = tmp_path / "messages.txt"
    messages.write_text("first message\n\n  second message  \n\r\nthird\n", encoding="utf-8")
    texts, failures = read_text_inputs([str(messages)], ["hello there"])
    assert texts == ["first message", "second message", "third", "hello there"]
    assert failures == []


def test_bad_text_files_are_reported_and_the_others_still_classified(tmp_path):
    """Before: a mistyped path was classified as a text (`spam 0.6504 nonexistent.txt`,
    exit 0), an empty file printed nothing, one non-UTF-8 file aborted the whole batch."""
    good = tmp_path / "good.txt"
    good.write_text("see you at lunch\n", encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    binary = tmp_path / "binary.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    missing = str(tmp_path / "nonexistent.txt")
    texts, failures = read_text_inputs([missing, str(empty), str(binary), str(good)])
    assert texts == ["see you at lunch"]
    reasons = {f.input: f.error for f in failures}
    assert "no such file" in reasons[missing] and "--text" in reasons[missing]
    assert "no text in the file" in reasons[str(empty)]
    assert "not a UTF-8 text file" in reasons[str(binary)]
    assert all(f.label is None for f in failures)


def test_fedvault_predict_on_texts_reports_bad_files_and_classifies_the_rest(text_run, capsys):
    from common.ops.cli import main

    missing = "nonexistent.txt"
    code = main(["predict", str(text_run), missing, "--text", "claim your free prize now"])
    out, err = capsys.readouterr()
    assert code == 1  # one input failed
    assert "no such file" in err and missing in err
    assert out.strip().split("\t")[0] == "spam" and missing not in out
