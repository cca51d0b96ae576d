"""Issue 23: sizes in files and flags bounded before memory is spent, outputs never written through a
planted symlink, the multiproc launcher's signals, and one-line refusals of bad values."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, load_script

from sentiment_discovery import safe_io
from sentiment_discovery.checkpoint import checkpoint_dict, load_checkpoint, save_checkpoint
from sentiment_discovery.encoder import Encoder
from sentiment_discovery.errors import CheckpointError, DataError
from sentiment_discovery.formats import openai_shard_shapes, read_openai
from sentiment_discovery.generation import GenerationError, check_generation_flags, generate
from sentiment_discovery.lazycache import lazy_cache_dir
from sentiment_discovery.model import ModelConfig, RNNModel, check_size_flags, training_memory
from sentiment_discovery.preprocess import encode
from sentiment_discovery.readers import read_records

main_script = load_script("main")
multiproc = load_script("multiproc")


def tiny_model() -> RNNModel:
    torch.manual_seed(0)
    return RNNModel(ModelConfig(emsize=4, nhid=8))


def one_line(message: str) -> bool:
    return len(message.strip().splitlines()) == 1 and "Traceback" not in message


# --------------------------------------------------------------------------------------------
# Item 4: every size a file declares is bounded before memory is spent
# --------------------------------------------------------------------------------------------

PEAK_SCRIPT = textwrap.dedent(
    """
    import resource, subprocess, sys
    code = "import sys; from sentiment_discovery.checkpoint import load_checkpoint, CheckpointError\\n"
    code += "try:\\n    load_checkpoint(sys.argv[1])\\nexcept CheckpointError as e:\\n    print('error:', e)"
    out = subprocess.run([sys.executable, "-c", code, sys.argv[1]], capture_output=True, text=True)
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # KiB on Linux
    print(out.stdout.strip() + out.stderr.strip()[-300:])
    """
)


def load_in_child(path: Path) -> tuple[int, str]:
    """Peak RSS (KiB) of a fresh process that loads ``path``, and what it printed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(path)], capture_output=True, text=True, env=env
    )
    peak, _, message = out.stdout.partition("\n")
    return int(peak), message.strip()


def stride0_checkpoint(path: Path, nhid: int) -> None:
    """A few-KB file whose tensors are stride-0 views claiming the shapes of an ``nhid``-unit model."""
    obj = checkpoint_dict(tiny_model())
    obj["config"] = dict(obj["config"], nhid=nhid, emsize=64)
    shapes = RNNModel.state_shapes(ModelConfig.from_dict(obj["config"]))
    obj["model"] = {k: torch.zeros(1).expand(s) for k, s in shapes.items()}
    torch.save(obj, path)


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss units and /proc are Linux's")
def test_crafted_files_are_refused_while_the_loader_stays_small(tmp_path):
    valid = tmp_path / "valid.pt"
    save_checkpoint(valid, tiny_model())
    baseline, message = load_in_child(valid)
    assert message == ""

    stride0 = tmp_path / "stride0.pt"
    stride0_checkpoint(stride0, nhid=1 << 16)  # 68.7 GB of weights if built
    assert stride0.stat().st_size < 10_000
    peak, message = load_in_child(stride0)
    assert "repeats or overlaps its elements" in message and one_line(message)
    assert peak < baseline + 50_000  # KiB

    # 100 MB of zeros deflated into a compressed zip entry: refused before anything is unpacked
    big = tmp_path / "big.pt"
    obj = checkpoint_dict(tiny_model())
    obj["extra"] = {"padding": torch.zeros(25_000_000)}
    torch.save(obj, big)
    packed = tmp_path / "packed.pt"
    with (
        zipfile.ZipFile(big) as src,
        zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as dst,
    ):
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    big.unlink()
    assert packed.stat().st_size < 2_000_000
    peak, message = load_in_child(packed)
    assert "compressed entries" in message and one_line(message)
    assert peak < baseline + 50_000


def test_stride0_training_state_and_classifier_are_refused(tmp_path):
    obj = checkpoint_dict(
        tiny_model(), classifier={"weight": torch.zeros(1).expand(8), "bias": torch.tensor(0.0)}
    )
    torch.save(obj, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"classifier\.weight .* repeats or overlaps"):
        load_checkpoint(tmp_path / "c.pt")


def test_a_legacy_format_checkpoint_still_loads(tmp_path):
    model = tiny_model()
    torch.save(checkpoint_dict(model), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    loaded = load_checkpoint(tmp_path / "legacy.pt").model
    assert torch.equal(loaded.encoder.weight, model.encoder.weight)


def test_storages_claiming_more_than_the_file_holds_are_refused(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(checkpoint_dict(tiny_model()), path)
    # rewrite data.pkl so that one storage claims 2**40 floats (the zip stays well-formed)
    with zipfile.ZipFile(path) as src:
        entries = {i.filename: src.read(i.filename) for i in src.infolist()}
    name = next(n for n in entries if n.endswith("data.pkl"))
    pickled = entries[name]
    marker = pickled.index(b"X\x03\x00\x00\x00cpu")  # the location string; numel follows it
    after = marker + len(b"X\x03\x00\x00\x00cpu")
    if pickled[after : after + 1] == b"q":  # BINPUT n
        after += 2
    assert pickled[after : after + 1] in (b"K", b"M", b"J")
    width = {b"K": 1, b"M": 2, b"J": 4}[pickled[after : after + 1]]
    entries[name] = (
        pickled[:after] + b"\x8a\x06" + (1 << 40).to_bytes(6, "little") + pickled[after + 1 + width :]
    )
    crafted = tmp_path / "crafted.pt"
    with zipfile.ZipFile(crafted, "w", zipfile.ZIP_STORED) as dst:
        for filename, data in entries.items():
            dst.writestr(filename, data)
    with pytest.raises(CheckpointError, match="claim .* bytes but the file holds"):
        load_checkpoint(crafted)


def test_an_openai_shard_header_is_checked_against_layout_and_size(tmp_path):
    H, E = 8, 4
    for i, shape in enumerate(openai_shard_shapes(H, E)):
        np.save(tmp_path / f"{i}.npy", np.zeros((H, H) if 2 <= i <= 5 else shape, np.float32))
    read_openai(tmp_path)  # the valid layout loads
    with open(tmp_path / "0.npy", "wb") as f:  # a header declaring 335 GiB, and 64 bytes of data
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (300000, 300000)}
        )
        f.write(bytes(64))
    with pytest.raises(
        CheckpointError, match=r"0\.npy \(embedding\): \(300000, 300000\) vs expected \(256, 4\)"
    ):
        read_openai(tmp_path)
    np.save(tmp_path / "0.npy", np.zeros((256, E), np.float32))
    with open(tmp_path / "1.npy", "r+b") as f:  # truncated data under a right header
        f.truncate(200)
    with pytest.raises(CheckpointError, match=r"1\.npy: 200 bytes where its header announces"):
        read_openai(tmp_path)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--nlayers", "100000"], "--nlayers 100000 is above the limit of 64"),
        (["--nhid", "100000"], "--nhid 100000 is above the limit of 65536"),
        (["--emsize", "100000000"], "--emsize 100000000 is above the limit of 65536"),
        (["--nhid", "65536"], "GiB to train; this machine has"),
        (["--batch_size", "100000000", "--seq_length", "100000000"], "--batch_size 100000000 x --seq_length"),
    ],
)
def test_size_flags_are_bounded_before_the_model_is_built(tmp_path, capsys, flags, message):
    data = tmp_path / "c.txt"
    data.write_text("a small corpus line\n" * 20)
    args = ["--data", str(data), "--save", str(tmp_path / "m.pt"), "--nhid", "8", "--emsize", "4", *flags]
    assert main_script.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and one_line(err)
    assert not (tmp_path / "m.pt").exists()


def test_the_memory_estimate_grows_with_the_model_and_batch():
    small, wide = ModelConfig(emsize=64, nhid=256), ModelConfig(emsize=64, nhid=512)
    assert training_memory(wide, 8, 64) > training_memory(small, 8, 64)
    assert training_memory(small, 16, 64) > training_memory(small, 8, 64)
    check_size_flags(small, 8, 64, memory=training_memory(small, 8, 64))
    with pytest.raises(ValueError, match="needs at least"):
        check_size_flags(small, 8, 64, memory=training_memory(small, 8, 64) - 1)


# --------------------------------------------------------------------------------------------
# Item 5: outputs never follow a symlink; names within NAME_MAX
# --------------------------------------------------------------------------------------------


def plant_link(link: Path, target: Path) -> None:
    target.write_text("precious")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


@pytest.mark.parametrize(
    "write",
    [
        lambda p: safe_io.write_text(p, "x"),
        lambda p: save_checkpoint(p, tiny_model()),
        lambda p: save_checkpoint(p.with_suffix(".safetensors"), tiny_model()),
        lambda p: safe_io.save_npy(p, np.zeros(3)),
    ],
)
def test_a_symlink_at_the_destination_is_refused_and_its_target_kept(tmp_path, write):
    target = tmp_path / "precious.txt"
    for link in (tmp_path / "out" / "m.pt", tmp_path / "out" / "m.safetensors"):
        plant_link(link, target)
    with pytest.raises(safe_io.OutputError, match="is a symlink") as info:
        write(tmp_path / "out" / "m.pt")
    assert one_line(str(info.value))
    assert target.read_text() == "precious"
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_a_run_refuses_a_planted_plot_link(tmp_path, capsys):
    data = tmp_path / "c.txt"
    data.write_text("a small corpus line\n" * 20)
    target = tmp_path / "precious.txt"
    plant_link(tmp_path / "run" / "m.bpc.png", target)
    args = ["--data", str(data), "--save", str(tmp_path / "run" / "m.pt"), "--nhid", "8", "--emsize", "4",
            "--train_iters", "1", "--batch_size", "2", "--seq_length", "8"]  # fmt: skip
    assert main_script.main(args) == 2
    assert "m.bpc.png: is a symlink" in capsys.readouterr().err
    assert target.read_text() == "precious"


@pytest.mark.parametrize(
    "error",
    [RuntimeError("basic_ios::clear: iostream error"), OSError(errno.ENOSPC, "No space left on device")],
)
def test_a_failed_write_is_one_line_naming_the_path_and_leaves_no_temp_file(tmp_path, monkeypatch, error):
    def full(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise error

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(safe_io, "_disk_full", lambda folder: False)
    with pytest.raises(OSError) as info:
        save_checkpoint(tmp_path / "m.pt", tiny_model())
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'm.pt'}: writing it failed") and one_line(message)
    assert ("iostream error" in message) or ("no space left" in message)
    assert os.listdir(tmp_path) == []


def test_lock_temp_and_cache_names_fit_name_max_for_any_legal_save(tmp_path):
    from sentiment_discovery.runfiles import SaveLock

    save = tmp_path / ("x" * 252 + ".pt")  # 255 bytes: the longest legal name
    lock = SaveLock(save)
    assert len(lock.path.name.encode()) <= safe_io.NAME_MAX
    prefix, suffix = safe_io.temp_affixes(save)
    assert len(prefix) + 8 + len(suffix) <= safe_io.NAME_MAX
    save_checkpoint(save, tiny_model())  # the temporary file beside it fits too
    assert save.exists()
    other = tmp_path / ("x" * 251 + "y.pt")  # distinct long names stay distinct
    assert SaveLock(other).path != lock.path
    data = tmp_path / ("d" * 250 + ".csv")
    data.write_text("label,sentence\n1,fine\n")
    assert (
        len(lazy_cache_dir(data, "sentence", ",", False, "nvidia").parent.name.encode()) <= safe_io.NAME_MAX
    )


# --------------------------------------------------------------------------------------------
# Item 8: the multiproc launcher forwards signals, waits for its workers, exits with their status
# --------------------------------------------------------------------------------------------

FAKE_WORKER = textwrap.dedent(
    """
    import signal, sys, time
    from pathlib import Path
    rank = sys.argv[sys.argv.index("--rank") + 1]
    save = Path(sys.argv[sys.argv.index("--save") + 1])
    def stop(signum, frame):
        time.sleep(0.5)  # a checkpoint takes a while: the launcher must wait for it
        save.with_name(f"saved{rank}").write_text(signal.Signals(signum).name)
        print(f"rank {rank}: saved on {signal.Signals(signum).name}")
        sys.exit(128 + signum)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print(f"rank {rank} started")
    Path(str(save) + f".ready{rank}").write_text("")
    while True:
        time.sleep(0.1)
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_multiproc_forwards_a_signal_and_waits_for_the_workers(tmp_path, signum):
    worker = tmp_path / "worker.py"
    worker.write_text(FAKE_WORKER)
    save = tmp_path / "out" / "job.pt"
    save.parent.mkdir()
    launcher = subprocess.Popen(
        [sys.executable, str(ROOT / "multiproc.py"), "--nproc", "2", str(worker), "--save", str(save)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not all(Path(f"{save}.ready{r}").exists() for r in (0, 1)) and time.monotonic() < deadline:
        time.sleep(0.1)
    launcher.send_signal(signum)
    out, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 128 + signum
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    name = signal.Signals(signum).name
    assert all((save.parent / f"saved{r}").read_text() == name for r in (0, 1))  # each saved, once
    log = (tmp_path / "distributed_logs" / "job" / "1.log").read_text()
    assert "rank 1 started" in log and f"rank 1: saved on {name}" in log
    assert f"rank 1 exited with status {128 + signum}" in log
    assert f"{name} forwarded to the 2 workers" in err


# --------------------------------------------------------------------------------------------
# Items 9 and 10: one line for each bad value
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"temperature": float("nan")}, "--temperature nan"),
        ({"temperature": -1.0}, "--temperature -1"),
        ({"overwrite": float("nan")}, "--overwrite nan"),
        ({"overwrite": float("inf")}, "--overwrite inf"),
        ({"gen_length": -5}, "--gen_length -5"),
        ({"log_interval": -3}, "--log-interval -3"),
    ],
)
def test_generation_settings_are_checked(kwargs, flag):
    with pytest.raises(GenerationError, match=flag):
        check_generation_flags(**kwargs)
    with pytest.raises(GenerationError, match=flag):
        generate(tiny_model(), "hi", **{"gen_length": 8, **kwargs}, device="cpu")


def test_generate_script_refuses_a_nan_temperature_in_one_line(tmp_path, capsys):
    generate_script = load_script("generate")
    save_checkpoint(tmp_path / "m.pt", tiny_model())
    args = [
        "--load_model",
        str(tmp_path / "m.pt"),
        "--cpu",
        "--temperature",
        "nan",
        "--save",
        str(tmp_path / "g.txt"),
    ]
    assert generate_script.main(args) == 2
    err = capsys.readouterr().err
    assert "--temperature nan" in err and one_line(err)


def bad(obj_change, tmp_path) -> str:
    obj = checkpoint_dict(tiny_model(), classifier={"weight": torch.ones(8), "bias": torch.tensor(0.5)})
    obj_change(obj)
    torch.save(obj, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "bad.pt")
    assert one_line(str(info.value)) and str(tmp_path / "bad.pt") in str(info.value)
    return str(info.value)


def test_nan_weights_and_classifiers_and_zero_scales_are_refused_at_load(tmp_path):
    assert "weights hold NaN" in bad(lambda o: o["model"]["decoder.bias"].fill_(float("nan")), tmp_path)
    assert "classifier weight holds NaN" in bad(
        lambda o: o["classifier"]["weight"].fill_(float("nan")), tmp_path
    )
    assert "classifier bias holds NaN" in bad(
        lambda o: o["classifier"].update(bias=torch.tensor(float("inf"))), tmp_path
    )
    assert "scale has values <= 0" in bad(lambda o: o["classifier"].update(scale=torch.zeros(8)), tmp_path)


def resumable_state(model: RNNModel) -> dict:
    from sentiment_discovery.train import linear_decay

    optimizer = torch.optim.Adam(model.parameters())
    model(torch.zeros(3, 2, dtype=torch.long))[0].sum().backward()
    optimizer.step()
    return {"step": 3, "total_steps": 9, "epoch": 0, "batch": 3, "rows": 2, "batches_per_epoch": 9,
            "bytes_seen": 10, "best_val_bpc": 8.0, "optimizer": optimizer.state_dict(),
            "scheduler": linear_decay(optimizer, 9).state_dict(),
            "hidden": [torch.zeros(1, 2, 8), torch.zeros(1, 2, 8)],
            "rng": {"torch": torch.get_rng_state()}}  # fmt: skip


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s["scheduler"].pop("lr_lambdas"), "scheduler is not the linear decay's"),
        (lambda s: s.update(hidden=[torch.zeros(1, 3, 8), torch.zeros(1, 3, 8)]), "hidden has shapes"),
        (
            lambda s: s.update(rng={"torch": torch.zeros(5, dtype=torch.uint8)}),
            "rng lacks the torch generator",
        ),
        (
            lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(7)),
            r"optimizer state 0\.exp_avg has shape",
        ),
        (lambda s: s["optimizer"]["param_groups"][0].update(params=[0]), "does not list the model's"),
        (
            lambda s: s["optimizer"]["param_groups"][0].update(lr=float("nan")),
            "without a finite learning rate",
        ),
        (lambda s: s.update(best_val_bpc=float("nan")), "best_val_bpc"),
    ],
)
def test_a_hostile_train_state_is_one_line(tmp_path, change, message):
    model = tiny_model()
    state = resumable_state(model)
    torch.save(checkpoint_dict(model, train_state=state), tmp_path / "ok.pt")
    assert load_checkpoint(tmp_path / "ok.pt").train_state is not None
    change(state)
    torch.save(checkpoint_dict(model, train_state=state), tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(tmp_path / "bad.pt")
    assert one_line(str(info.value))


def test_encoder_api_refuses_what_is_not_text_and_bad_neuron_counts():
    encoder = Encoder(tiny_model(), {"weight": torch.ones(8), "bias": torch.tensor(0.0)}, device="cpu")
    for call in (encoder.transform, encoder.predict_proba, encoder.cell_transform):
        with pytest.raises(TypeError, match="item 0 is int"):
            call([1, 2])
    with pytest.raises(TypeError, match="got bytes"):
        encoder.transform(b"text")
    with pytest.raises(ValueError, match="neurons must be -1"):
        encoder.predict_proba(["good"], neurons=-5)
    assert encoder.predict_proba(["good"], neurons=0).shape == (1,)


@pytest.mark.parametrize("delim, message", [("", "--delim is empty"), ("\\t", "taken literally, backslash")])
def test_empty_and_escaped_delimiters_are_explained(tmp_path, delim, message):
    path = tmp_path / "d.csv"
    path.write_text("label\tsentence\n1\tfine\n")
    with pytest.raises(DataError, match=message):
        read_records(path, text_key="sentence", delim=delim)
    assert read_records(path, text_key="sentence", delim="\t").texts == ["fine"]


def test_featurizing_one_long_text_reports_progress_within_it(monkeypatch):
    import sentiment_discovery.featurize as featurize_module

    updates = []

    class Bar:
        def __init__(self, total, enabled, **kwargs):
            self.total, self.enabled = total, enabled

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            updates.append(n)

    monkeypatch.setattr(featurize_module, "progress_bar", Bar)
    text = "a fairly long text " * 200
    Encoder(tiny_model(), device="cpu").transform(text, progress=True)
    assert len(updates) > 10  # chunk by chunk within the one text
    assert sum(updates) == len(encode(text, "nvidia"))  # every byte of the preprocessed text


def test_results_json_is_written_whole(tmp_path):
    safe_io.write_text(tmp_path / "r" / "results.json", json.dumps({"a": 1}))
    assert json.loads((tmp_path / "r" / "results.json").read_text()) == {"a": 1}


# --------------------------------------------------------------------------------------------
# Item 1: --save (and transfer.py's classifier.pt) is a new path or a checkpoint of this suite
# --------------------------------------------------------------------------------------------

TRAIN_FLAGS = ["--nhid", "8", "--emsize", "4", "--batch_size", "2", "--seq_length", "8", "--num_shards", "4",
               "--split", "6,1,1", "--log_interval", "1", "--seed", "1", "--cpu"]  # fmt: skip


def small_corpus(tmp_path) -> Path:
    path = tmp_path / "c.csv"
    path.write_text("sentence\n" + "".join(f"line {i} is {'good ' * (i % 3)}or bad\n" for i in range(24)))
    return path


@pytest.mark.parametrize("victim", ["data", "text", "torch_file"])
def test_save_onto_a_file_that_is_not_our_checkpoint_is_refused_before_training(tmp_path, capsys, victim):
    data = small_corpus(tmp_path)
    target = {"data": data, "text": tmp_path / "notes.pt", "torch_file": tmp_path / "other.pt"}[victim]
    if victim == "text":
        target.write_text("my notes")
    if victim == "torch_file":  # a torch file, but someone else's: by content, not by name
        torch.save({"weights": torch.zeros(3)}, target)
    before = target.read_bytes()
    args = ["--data", str(data), "--save", str(target), "--train_iters", "1", *TRAIN_FLAGS]
    assert main_script.main(args) == 2
    captured = capsys.readouterr()
    assert "is not a checkpoint of this suite; refusing to overwrite it" in captured.err
    assert one_line(captured.err) and "model:" not in captured.out  # before building or reading anything
    assert target.read_bytes() == before


def test_save_onto_our_own_checkpoint_is_allowed(tmp_path):
    save = tmp_path / "m.pt"
    save_checkpoint(save, tiny_model())  # ours, though no run of this --save wrote it
    data = small_corpus(tmp_path)
    args = ["--data", str(data), "--save", str(save), "--train_iters", "1", *TRAIN_FLAGS]
    assert main_script.main(args) == 0
    assert load_checkpoint(save).train_state["step"] == 1


def test_transfer_refuses_a_foreign_classifier_pt_and_checks_outputs_before_featurizing(
    tmp_path, capsys, monkeypatch
):
    import sentiment_discovery.feature_cache as transfer_module  # where transfer.py featurizes

    def never(*args, **kwargs):
        raise AssertionError("featurized before checking the outputs")

    monkeypatch.setattr(transfer_module, "featurize", never)
    lm = tmp_path / "lm.pt"
    save_checkpoint(lm, tiny_model())
    sst = ROOT / "tests" / "fixtures" / "binary_sst"
    out = tmp_path / "out"
    out.mkdir()
    (out / "classifier.pt").write_text("not a checkpoint")
    base = ["--load_model", str(lm), "--data", str(sst / "train.csv"), "--valid", str(sst / "val.csv"),
            "--test", str(sst / "test.csv")]  # fmt: skip
    transfer = load_script("transfer")
    assert transfer.main([*base, "--save_results", str(out)]) == 2
    err = capsys.readouterr().err
    assert "classifier.pt: exists and is not a checkpoint of this suite" in err and one_line(err)
    assert (out / "classifier.pt").read_text() == "not a checkpoint"
    (out / "classifier.pt").unlink()
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    results = ["--save_results", str(out), "--write_results", str(blocked)]
    assert transfer.main([*base, *results]) == 2
    err = capsys.readouterr().err
    assert f"--write_results {blocked}: is a directory" in err and one_line(err)


def test_classifier_checks_its_outputs_before_featurizing(tmp_path, capsys, monkeypatch):
    import sentiment_discovery.featurize as featurize_module
    from sentiment_discovery.readout import Readout

    monkeypatch.setattr(featurize_module, "featurize", lambda *a, **k: pytest.fail("featurized first"))
    monkeypatch.setattr("sentiment_discovery.encoder.featurize", lambda *a, **k: pytest.fail("featurized"))
    clf = tmp_path / "clf.pt"
    save_checkpoint(clf, tiny_model(), classifier=Readout(torch.ones(8), torch.tensor(0.0)))
    (tmp_path / "probs.npy").mkdir()
    classifier = load_script("classifier")
    args = ["--load_model", str(clf), "--text", "fine", "--save_probs", str(tmp_path / "probs.npy")]
    assert classifier.main(args) == 2
    err = capsys.readouterr().err
    assert "--save_probs" in err and "is a directory" in err and one_line(err)


# --------------------------------------------------------------------------------------------
# Item 2: a new run moves the previous checkpoint aside; a stop in the final evaluation resumes
# --------------------------------------------------------------------------------------------


def test_a_new_run_moves_the_previous_checkpoint_aside(tmp_path, capsys):
    data = small_corpus(tmp_path)
    save = tmp_path / "m.pt"
    first = ["--data", str(data), "--save", str(save), "--train_iters", "3", "--save_iters", "1"]
    assert main_script.main([*first, *TRAIN_FLAGS]) == 0
    (tmp_path / "m.bpc.png").write_bytes(b"first plot")
    previous = save.read_bytes()
    assert main_script.main([*first, *TRAIN_FLAGS, "--lr", "1"]) == 0  # a new run
    out = capsys.readouterr().out
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("m.2") and p.suffix == ".pt"]
    assert len(moved) == 1 and moved[0].read_bytes() == previous, out
    assert f"{save} is another run's: moved it aside to {moved[0]}" in out
    assert [p.read_bytes() for p in tmp_path.glob("m.bpc.2*.png")] == [b"first plot"]
    assert save.read_bytes() != previous


def interrupted_end_runs(tmp_path, monkeypatch, split_name: str):
    """A one-epoch run (val and test splits: validated once, at its last step) sent SIGTERM while it
    evaluates ``split_name`` after its last step, then resumed from its checkpoint; and the same run
    uninterrupted. Returns both results and the final checkpoint."""
    from sentiment_discovery import train as train_module
    from sentiment_discovery.batching import LMSplits, TBPTTBatches, shard_starts
    from sentiment_discovery.cli import Interrupted
    from sentiment_discovery.readers import encode_corpus
    from sentiment_discovery.train import Trainer, TrainOptions

    corpus = encode_corpus([f"text {i}: " + "good " * (i % 3) + "bad " * (i % 2) for i in range(12)])

    def trainer(name, state=None, model=None):
        def stream(rows, steps):
            return TBPTTBatches(corpus, shard_starts(12, 4), rows, steps, -1)

        splits = LMSplits(stream(2, 12), stream(1, 40), stream(1, 50))
        options = TrainOptions(lr=3e-3, epochs=1, log_interval=2, save=str(tmp_path / name), progress=False)
        return Trainer((model or tiny_model()).train(), splits, options, torch.device("cpu"), state)

    straight = trainer("straight.pt").run()
    cut = trainer("cut.pt")
    real_evaluate = train_module.evaluate

    def evaluate_with_a_signal(model, split, *args, **kwargs):
        if split is getattr(cut.splits, split_name):
            assert cut.step == cut.total_steps
            os.kill(os.getpid(), signal.SIGTERM)  # the run's own handler: it stops at its next check
        return real_evaluate(model, split, *args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", evaluate_with_a_signal)
    with pytest.raises(Interrupted, match="during the final evaluation"):
        cut.run()
    monkeypatch.setattr(train_module, "evaluate", real_evaluate)
    checkpoint = load_checkpoint(tmp_path / "cut.pt")
    state = checkpoint.train_state
    assert state["step"] == state["total_steps"] and state["finished"] is False
    assert state["val_pending"] is (split_name == "val")
    resumed = trainer("cut.pt", state, checkpoint.model)
    assert resumed.resumed
    return straight, resumed.run(), load_checkpoint(tmp_path / "cut.pt")


@pytest.mark.parametrize("split_name", ["test", "val"])
def test_a_stop_during_the_final_evaluation_resumes_to_the_same_end(tmp_path, monkeypatch, split_name):
    from sentiment_discovery.runfiles import MetricsLog
    from sentiment_discovery.train import run_finished

    straight, resumed, final = interrupted_end_runs(tmp_path, monkeypatch, split_name)
    assert resumed["test_bpc"] == pytest.approx(straight["test_bpc"], rel=1e-6)
    assert resumed["best_val_bpc"] == pytest.approx(straight["best_val_bpc"], rel=1e-6)
    rows = {name: MetricsLog.read(tmp_path / f"{name}.metrics.jsonl") for name in ("straight", "cut")}
    assert len(rows["cut"]) == len(rows["straight"]) > 5
    for a, b in zip(rows["cut"], rows["straight"]):
        for key in ("step", "train_bpc", "val_bpc", "test_bpc"):
            assert a[key] == (None if b[key] is None else pytest.approx(b[key], rel=1e-6)), (b["step"], key)
    assert (tmp_path / "cut.best.pt").exists() and (tmp_path / "cut.bpc.png").exists()
    assert final.train_state["finished"] is True and run_finished(final.train_state)  # --load: a new run


# --------------------------------------------------------------------------------------------
# Item 3: one lock per output stem; names within NAME_MAX
# --------------------------------------------------------------------------------------------


def test_saves_sharing_a_stem_share_the_lock(tmp_path, capsys):
    from sentiment_discovery.runfiles import SaveLock

    first = SaveLock(tmp_path / "m.pt")
    first.acquire()
    try:
        data = small_corpus(tmp_path)
        args = ["--data", str(data), "--save", str(tmp_path / "m.pth"), "--train_iters", "1", *TRAIN_FLAGS]
        assert main_script.main(args) == 2  # m.pth writes m.best.pt, m.metrics.jsonl, m.bpc.png too
        err = capsys.readouterr().err
        assert f"another run (pid {os.getpid()}) is writing to it" in err and one_line(err)
        assert not (tmp_path / "m.pth").exists()
        assert SaveLock(tmp_path / "n.pt").path != first.path
    finally:
        first.release()


def test_a_save_whose_outputs_would_pass_name_max_is_refused_in_one_line(tmp_path, capsys):
    data = small_corpus(tmp_path)
    save = tmp_path / ("x" * 248 + ".pt")  # 251 bytes: legal, but x...x.metrics.jsonl would not be
    args = ["--data", str(data), "--save", str(save), "--train_iters", "1", *TRAIN_FLAGS]
    assert main_script.main(args) == 2
    err = capsys.readouterr().err
    assert "255-byte limit on a name; use a shorter name" in err and one_line(err)
    assert "File name too long" not in err


# --------------------------------------------------------------------------------------------
# Item 6: generate.py writes one file per output
# --------------------------------------------------------------------------------------------


def test_generate_text_saved_as_json_is_not_replaced_by_the_heatmap_values(tmp_path, capsys):
    from sentiment_discovery.readout import Readout

    clf = tmp_path / "clf.pt"
    save_checkpoint(clf, tiny_model(), classifier=Readout(torch.arange(8.0), torch.tensor(0.0)))
    script = load_script("generate")
    common = ["--load_model", str(clf), "--gen_length", "-1", "--text", "fine words", "--cpu", "--heatmap"]
    assert script.main([*common, "--save", str(tmp_path / "x.json")]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "x.json").read_bytes() == b"fine words"  # the text, as --save says
    values = json.loads((tmp_path / "x.values.json").read_text())
    assert "values" in values and f"per-byte values to {tmp_path / 'x.values.json'}" in out
    assert (tmp_path / "x.png").exists()
    assert script.main([*common, "--save", str(tmp_path / "y.png")]) == 2  # the heatmap would replace it
    err = capsys.readouterr().err
    assert "is also --save: give the heatmap its own file" in err and one_line(err)
    assert not (tmp_path / "y.png").exists()


# --------------------------------------------------------------------------------------------
# Item 7: interrupted --lazy builds clean up; workers end quietly; SIGINT is an interruption
# --------------------------------------------------------------------------------------------

SLOW_BUILD = textwrap.dedent(
    """
    import sys, time
    import sentiment_discovery.lazycache as lc
    from sentiment_discovery.cli import Interrupted

    real = lc._encode_unit

    def slow(*args, **kwargs):  # every unit takes a while: the signal lands mid-build
        time.sleep(0.3)
        return real(*args, **kwargs)

    lc._encode_unit, lc.LAZY_CHUNK_ROWS = slow, 5
    try:
        lc.lazy_corpus(sys.argv[1], workers=int(sys.argv[2]), text_key="sentence")
    except Interrupted as e:
        print("interrupted:", e, file=sys.stderr)
        sys.exit(e.exit_code)
    print("built")
    """
)


def start_slow_build(tmp_path, workers: int) -> tuple[subprocess.Popen, Path, Path]:
    data = tmp_path / "big.csv"
    data.write_text("sentence\n" + "".join(f"row {i} of the corpus\n" for i in range(400)))
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", SLOW_BUILD, str(data), str(workers)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    lazy = tmp_path / "cache" / "sentiment-discovery" / "lazy"
    deadline = time.monotonic() + 60
    while not list(lazy.glob("*/.*")) and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # a few units in
    assert child.poll() is None and list(lazy.glob("*/.*")), "the build never started"
    return child, data, lazy


@pytest.mark.parametrize("signum, workers", [(signal.SIGTERM, 2), (signal.SIGINT, 2), (signal.SIGINT, 1)])
def test_a_signal_during_a_lazy_build_removes_its_folder_quietly(tmp_path, signum, workers):
    child, data, lazy = start_slow_build(tmp_path, workers)
    child.send_signal(signum)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 128 + signum, err
    assert f"interrupted: {signal.Signals(signum).name} while caching {data}" in err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "could not parse" not in err
    assert list(lazy.glob("*/*")) == [] and list(lazy.glob("*/.*")) == []


def test_a_killed_lazy_build_is_removed_at_the_next_start(tmp_path, monkeypatch):
    from sentiment_discovery.lazycache import lazy_corpus

    child, data, lazy = start_slow_build(tmp_path, 1)
    child.kill()
    child.communicate(timeout=60)
    (left,) = lazy.glob("*/.*")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    corpus = lazy_corpus(data, text_key="sentence")
    assert len(corpus.starts) == 401 and not left.exists()
    assert list(lazy.glob("*/.*")) == []
