"""Hostile or broken input: crafted checkpoints (checked before anything is allocated), quadratic-time
text, bad flags, and the messages that tell the user what is wrong, in one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, load_script
from hypothesis import given, settings
from hypothesis import strategies as st
from unidecode import unidecode

from sentiment_discovery.batching import lm_splits
from sentiment_discovery.checkpoint import CheckpointError, checkpoint_dict, load_checkpoint, save_checkpoint
from sentiment_discovery.errors import DataError
from sentiment_discovery.model import ModelConfig, RNNModel
from sentiment_discovery.preprocess import encode, nvidia_preprocess, strip_tags, transliterate
from sentiment_discovery.readers import read_records, read_text_lines

main_script = load_script("main")
transfer_script = load_script("transfer")
classifier_script = load_script("classifier")


def tiny_model(nhid: int = 8) -> RNNModel:
    torch.manual_seed(0)
    return RNNModel(ModelConfig(emsize=4, nhid=nhid))


def one_line(message: str) -> bool:
    return len(message.strip().splitlines()) == 1 and "Traceback" not in message


# --------------------------------------------------------------------------------------------
# Crafted checkpoints
# --------------------------------------------------------------------------------------------


def valid_state() -> dict:
    """The training state of ``tiny_model`` as a run writes it (a real optimizer and schedule)."""
    from sentiment_discovery.train import linear_decay

    optimizer = torch.optim.Adam(tiny_model().parameters())
    state = {"step": 3, "total_steps": 9, "epoch": 0, "batch": 3, "rows": 2, "batches_per_epoch": 9,
             "bytes_seen": 10, "best_val_bpc": 8.0, "optimizer": optimizer.state_dict(),
             "scheduler": linear_decay(optimizer, 9).state_dict(), "hidden": None,
             "rng": {"torch": torch.get_rng_state()}}  # fmt: skip
    return state


def crafted(change) -> dict:
    obj = checkpoint_dict(tiny_model(), classifier={"weight": torch.ones(8), "bias": torch.tensor(0.5)})
    change(obj)
    return obj


def set_config(key, value):
    return lambda obj: obj["config"].__setitem__(key, value)


CRAFTED = {
    "no model key": (lambda obj: obj.pop("model"), "without its 'model' weights"),
    "config None": (lambda obj: obj.__setitem__("config", None), "config is NoneType"),
    "string nhid": (set_config("nhid", "8"), "config nhid = '8' is not a int"),
    "bool nlayers": (set_config("nlayers", True), "config nlayers = True is not a int"),
    "huge nhid": (set_config("nhid", 200_000), "config nhid = 200000 is outside 1 .. 65536"),
    "nhid unlike the tensors": (set_config("nhid", 8000), "wrong shapes"),
    "unknown model": (set_config("model", "Transformer"), "config model = 'Transformer' is not one of mLSTM"),
    "string classifier": (lambda obj: obj.__setitem__("classifier", "abc"), "classifier is str"),
    "classifier without weight": (lambda obj: obj["classifier"].pop("weight"), "classifier lacks weight"),
    "classifier weight size": (
        lambda obj: obj["classifier"].__setitem__("weight", torch.ones(3)),
        "classifier weight has 3 values, expected 8",
    ),
    "classifier neurons out of range": (
        lambda obj: obj["classifier"].__setitem__("neurons", torch.tensor([0, 8])),
        "classifier neurons has indices outside 0 .. 7",
    ),
    "classifier pooling unknown": (
        lambda obj: obj["classifier"].__setitem__("pooling", "avg"),
        "classifier pooling must be one of last, mean, max",
    ),
    "classifier pooling list, weights of one": (
        lambda obj: obj["classifier"].__setitem__("pooling", "mean,max"),
        "classifier weight has 8 values, expected 16",
    ),
    "partial train_state": (
        lambda obj: obj.__setitem__("train_state", {"step": 3}),
        "train_state lacks total_steps",
    ),
    "train_state step text": (
        lambda obj: obj.__setitem__("train_state", {**valid_state(), "step": "3"}),
        "train_state step = '3' is not a count",
    ),
    "weights not tensors": (
        lambda obj: obj["model"].__setitem__("decoder.bias", [0.0] * 256),
        "model weights that are not tensors: decoder.bias (list)",
    ),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_checkpoints_are_one_line_errors_naming_the_file(tmp_path, case):
    change, message = CRAFTED[case]
    path = tmp_path / "crafted.pt"
    torch.save(crafted(change), path)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)
    text = str(excinfo.value)
    assert text.startswith(f"{path}: ") and message in text and one_line(text)


def test_a_valid_train_state_and_classifier_load(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save(crafted(lambda obj: obj.__setitem__("train_state", valid_state())), path)
    ckpt = load_checkpoint(path)
    assert ckpt.train_state["step"] == 3
    assert ckpt.classifier["neurons"].tolist()[:1] == [0]  # absent neurons: filled in by |weight|
    two_poolings = {"weight": torch.ones(16), "bias": torch.tensor(0.5), "pooling": "mean,max"}
    torch.save(crafted(lambda obj: obj.__setitem__("classifier", two_poolings)), path)
    assert load_checkpoint(path).classifier["weight"].shape == (16,)


def test_config_is_checked_before_the_model_is_allocated(tmp_path):
    """nhid=8000 in a small file: building it first would take 1.6 GB; the check needs none of that."""
    path = tmp_path / "big.pt"
    torch.save(crafted(set_config("nhid", 8000)), path)
    script = (
        "import re, sys\n"
        "from sentiment_discovery.checkpoint import CheckpointError, load_checkpoint\n"
        "try:\n"
        f"    load_checkpoint({str(path)!r})\n"
        "except CheckpointError as e:\n"
        "    print('refused', 'wrong shapes' in str(e))\n"
        # VmHWM: this process's own peak (ru_maxrss would carry over the forking pytest's size)
        "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    refused, peak_mb = result.stdout.split("\n")[:2]
    assert refused == "refused True", result.stderr[-2000:]
    assert int(peak_mb) < 1000  # the model of that config alone would take 1600 MB


def test_random_bytes_are_not_a_checkpoint_and_empty_path_is_not_a_folder(tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()[1:])
    with pytest.raises(CheckpointError, match=r"random\.pt: not a checkpoint \(neither"):
        load_checkpoint(path)
    # a pickle stream cut short is corrupt, not code
    path.write_bytes(b"\x80\x04\x95" + bytes(range(3, 250)))
    with pytest.raises(CheckpointError, match="cannot read it as a checkpoint") as excinfo:
        load_checkpoint(path)
    assert "can run code" not in str(excinfo.value)
    with pytest.raises(CheckpointError, match="empty checkpoint path"):
        load_checkpoint("")


def test_safetensors_with_a_crafted_classifier_is_an_error(tmp_path):
    import safetensors.torch

    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny_model())
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    metadata["classifier"] = json.dumps("abc")
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="classifier is str"):
        load_checkpoint(path)


def test_scripts_report_a_crafted_checkpoint_in_one_line(tmp_path, capsys):
    path = tmp_path / "crafted.pt"
    torch.save(crafted(lambda obj: obj.__setitem__("config", None)), path)
    data = tmp_path / "d.csv"
    data.write_text("sentence,label\na,1\nb,0\n")
    args = ["--load_model", str(path), "--data", str(data), "--valid", str(data), "--test", ""]
    assert transfer_script.main(args) == 2
    assert one_line(capsys.readouterr().err)
    save = ["--save", str(tmp_path / "lm.pt")]
    assert main_script.main(["--load", str(path), "--data", str(data), *save]) == 2
    err = capsys.readouterr().err
    assert one_line(err) and "config is NoneType" in err


# --------------------------------------------------------------------------------------------
# Preprocessing in linear time, with the same output as before
# --------------------------------------------------------------------------------------------

OLD_TAG = re.compile(r"<.*?>", re.DOTALL)  # the regex strip_tags replaces
REVIEWS = [
    "I <b>loved</b> it<br /><br />The end.",
    "a < b and c > d",
    "<<nested>> tags <a href='x>y'>link</a>",
    "unclosed <tag and more text",
    "multi\nline <i\n>tag</i>",
    "<>empty<>",
    ">only closing> and < opening",
    "3 < 4 < 5",
    "caf\u00e9 &amp; <span>na\u00efve</span> &lt;b&gt;",
    "",
]


def test_strip_tags_gives_what_the_regex_gave():
    for text in REVIEWS:
        assert strip_tags(text) == OLD_TAG.sub(" ", text), text


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="<>ab \n&;", max_size=60))
def test_strip_tags_matches_the_regex_on_any_text(text):
    assert strip_tags(text) == OLD_TAG.sub(" ", text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_transliterate_equals_unidecode(text):
    assert transliterate(text) == unidecode(text)


def test_a_long_line_of_unclosed_tags_is_linear():
    """5 MB of '<': the regex took about a day (quadratic); this finishes at once."""
    line = "<" * 5_000_000
    assert nvidia_preprocess(line) == "\n " + line + " "
    assert bytes(encode("x " + line[:1000] + "> y")) == b"\n x y "  # closed by its '>': one tag


# --------------------------------------------------------------------------------------------
# Flags: one-line errors before anything runs
# --------------------------------------------------------------------------------------------

BAD_MAIN_FLAGS = [
    (["--nhid", "0"], "argument --nhid: 0 must be at least 1"),
    (["--nhid", "-5"], "argument --nhid: -5 must be at least 1"),
    (["--nlayers", "0"], "argument --nlayers"),
    (["--emsize", "0"], "argument --emsize"),
    (["--epochs", "0"], "argument --epochs"),
    (["--log_interval", "0"], "argument --log-interval: 0 must be at least 1"),
    (["--clip", "nan"], "argument --clip: nan must be a finite number"),
    (["--train_iters", "-3"], "argument --train_iters: -3 must be at least 0"),
    (["--lr", "0"], "argument --lr: 0 must be greater than 0"),
    (["--dropout", "1"], "argument --dropout"),
    (["--batch_size", "0"], "argument --batch_size"),
]


@pytest.mark.parametrize("flags, message", BAD_MAIN_FLAGS)
def test_main_refuses_bad_values_in_one_line(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as excinfo:
        main_script.main(["--data", str(tmp_path / "d.csv"), "--save", str(tmp_path / "x.pt"), *flags])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and one_line(err)


def test_main_refuses_an_optimizer_that_cannot_train_here(tmp_path, capsys):
    data = tmp_path / "d.csv"
    data.write_text("sentence\n" + "a text\n" * 20)
    args = ["--data", str(data), "--save", str(tmp_path / "x.pt"), "--nhid", "8"]
    assert main_script.main([*args, "--optim", "LBFGS"]) == 2
    err = capsys.readouterr().err
    assert "--optim 'LBFGS' (it cannot train on one batch per step)" in err and "Adam" in err
    assert "LBFGS, " not in err.split("choose one of")[1]  # not listed as a valid choice any more
    assert not (tmp_path / "x.pt").exists()


def labelled(tmp_path, name: str, labels: list[int]):
    path = tmp_path / name
    path.write_text("sentence,label\n" + "".join(f"text {i} here,{y}\n" for i, y in enumerate(labels)))
    return str(path)


def test_transfer_refuses_bad_settings_and_single_class_labels(tmp_path, capsys):
    model = tmp_path / "lm.pt"
    save_checkpoint(model, tiny_model())
    both = labelled(tmp_path, "both.csv", [0, 1, 0, 1])
    ones = labelled(tmp_path, "ones.csv", [1, 1, 1, 1])
    common = ["--load_model", str(model), "--test", "", "--save_results", str(tmp_path / "out")]
    assert transfer_script.main([*common, "--data", both, "--valid", both, "--log2_C", "2000", "2001"]) == 2
    assert "exponents must lie in -50 .. 50" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        transfer_script.main([*common, "--data", both, "--valid", both, "--neurons", "0"])
    assert "argument --neurons: 0 must be at least 1" in capsys.readouterr().err
    for data, valid, split in ((ones, both, "train"), (both, ones, "val")):
        assert transfer_script.main([*common, "--data", data, "--valid", valid]) == 2
        out, err = capsys.readouterr()
        assert f"{split} split: {ones}: every label is 1" in err and one_line(err)
        assert "featurizing" not in out  # reported before any featurization


def test_classifier_names_the_npy_file_it_writes(tmp_path, capsys):
    model = tmp_path / "clf.pt"
    classifier = {"weight": torch.ones(8), "bias": torch.tensor(0.0)}
    save_checkpoint(model, tiny_model(), classifier=classifier)
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit):
        classifier_script.main(["--load_model", str(model), "--text", "good", "--neurons", "0"])
    assert "argument --neurons: 0 must be at least 1 or -1" in capsys.readouterr().err
    save_probs = str(tmp_path / "out" / "noext")
    assert (
        classifier_script.main(["--load_model", str(model), "--text", "good", "--save_probs", save_probs])
        == 0
    )
    out = capsys.readouterr().out
    assert f"probabilities saved to {tmp_path / 'out' / 'noext.npy'}\n" in out
    assert np.load(tmp_path / "out" / "noext.npy").shape == (1,)


# --------------------------------------------------------------------------------------------
# Data files: BOM, invalid UTF-8, empty paths
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bom.json", "bom.jsonl", "bom.csv"])
def test_a_utf8_bom_is_accepted_in_json_as_in_csv(tmp_path, name):
    path = tmp_path / name
    body = {
        ".json": '[{"sentence": "caf\u00e9", "label": 1}, {"sentence": "b", "label": 0}]',
        ".jsonl": '{"sentence": "caf\u00e9", "label": 1}\n{"sentence": "b", "label": 0}\n',
        ".csv": "sentence,label\ncaf\u00e9,1\nb,0\n",
    }[path.suffix]
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    records = read_records(path, need_labels=True)
    assert records.texts == ["caf\u00e9", "b"] and records.labels.tolist() == [1, 0]


@pytest.mark.parametrize("name", ["bad.csv", "bad.jsonl", "bad.json"])
def test_invalid_utf8_is_replaced_with_a_one_line_warning(tmp_path, capsys, name):
    path = tmp_path / name
    bad = b"good \xff\xfe movie \xc3"
    body = {
        ".csv": b"sentence\n" + bad + b"\nfine\n",
        ".jsonl": b'{"sentence": "' + bad + b'"}\n{"sentence": "fine"}\n',
        ".json": b'[{"sentence": "' + bad + b'"}, {"sentence": "fine"}]',
    }[path.suffix]
    path.write_bytes(body)
    records = read_records(path)
    assert records.texts[0] == "good \ufffd\ufffd movie \ufffd"
    err = capsys.readouterr().err
    assert err == f"warning: {path}: 3 invalid UTF-8 byte(s) replaced by U+FFFD\n"
    read_records(path)  # the count is per read, not cumulative
    assert "3 invalid" in capsys.readouterr().err


def test_invalid_utf8_in_a_text_corpus_is_warned_once_read_through(tmp_path, capsys):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"good \xff movie\n\nbad \xc3\n")
    lines = read_text_lines(path)
    assert next(lines) == "good \ufffd movie"
    assert capsys.readouterr().err == ""  # not before the file is read through
    assert list(lines) == ["bad \ufffd"]
    assert capsys.readouterr().err == f"warning: {path}: 2 invalid UTF-8 byte(s) replaced by U+FFFD\n"


def test_an_empty_path_is_not_the_current_folder(tmp_path):
    with pytest.raises(DataError, match="an empty file path was given"):
        read_records("")
    with pytest.raises(DataError, match="an empty file path was given"):
        lm_splits("")
    with pytest.raises(DataError, match="an empty file path was given"):
        lm_splits("", lazy=True)


def test_a_delimiter_of_several_characters_is_taken_literally(tmp_path):
    """pandas reads such a delimiter as a regex: '||' (it matches everywhere) made a column per character."""
    path = tmp_path / "pipes.csv"
    path.write_text("sentence||label\nwhat a|film||1\n" + "x" * 5000 + "||0\n")
    records = read_records(path, delim="||", need_labels=True)
    assert records.texts == ["what a|film", "x" * 5000] and records.labels.tolist() == [1, 0]
