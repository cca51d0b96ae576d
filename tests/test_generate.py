"""generate.py and sentiment_discovery.generation: sampling, warm-up, neuron overwrite, heatmaps."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import matplotlib
import matplotlib.image
import numpy as np
import pytest
import torch
from conftest import ROOT, load_script

from sentiment_discovery import generation as gen
from sentiment_discovery import plots
from sentiment_discovery.checkpoint import save_checkpoint
from sentiment_discovery.featurize import featurize
from sentiment_discovery.formats import DEFAULT_MODEL, first_existing_model, resolve_model_path
from sentiment_discovery.model import ModelConfig, RNNModel
from sentiment_discovery.preprocess import encode

H = 24
TEXT = "25 August 2003 League of Extraordinary Gentlemen: Sean Connery is one of the all time greats"


def tiny_model(kind: str = "mLSTM", nlayers: int = 1, seed: int = 0) -> RNNModel:
    torch.manual_seed(seed)
    model = RNNModel(ModelConfig(model=kind, emsize=8, nhid=H, nlayers=nlayers))
    with torch.no_grad():  # larger recurrent weights: cell values spread over more of -1..1
        for name, p in model.rnn.named_parameters():
            if "original0" in name:
                p.mul_(3.0)
    return model.eval()


def classifier(
    neurons: list[int], n_features: int = H, all_layers: bool = False, state: str = "cell"
) -> dict:
    weight = torch.zeros(n_features)
    weight[neurons[0]] = -1.5
    for f in neurons[1:]:
        weight[f] = 0.5
    return {
        "weight": weight,
        "bias": torch.tensor(0.2),
        "neurons": torch.tensor(neurons, dtype=torch.long),
        "pooling": "last",
        "state": state,
        "all_layers": all_layers,
        "mean": None,
        "scale": None,
        "C": 1.0,
    }


def states(model: RNNModel, tokens, layer: int, unit: int, state: str = "cell") -> np.ndarray:
    """The neuron after every byte, from one forward_states pass over the whole sequence."""
    x = torch.as_tensor(np.asarray(tokens, dtype=np.int64)).unsqueeze(1)
    with torch.no_grad():
        hs, cs, _ = model.forward_states(x)
    return (cs if state == "cell" else hs)[layer][:, 0, unit].numpy()


# ---------------------------------------------------------------------------------------------
# neuron selection
# ---------------------------------------------------------------------------------------------


def test_select_neuron_from_classifier_and_flag():
    model = tiny_model(nlayers=2)
    top = gen.select_neuron(model, classifier([7, 3]), None)
    assert (top.layer, top.unit, top.state, top.sign) == (1, 7, "cell", -1)
    chosen = gen.select_neuron(model, classifier([7, 3]), 3)
    assert (chosen.unit, chosen.sign) == (3, 1)
    every = gen.select_neuron(
        model, classifier([H + 5, 2], n_features=2 * H, all_layers=True, state="hidden"), -1
    )
    assert (every.feature, every.layer, every.unit, every.state) == (H + 5, 1, 5, "hidden")
    assert gen.select_neuron(model, None, None) is None
    bare = gen.select_neuron(model, None, 4)
    assert (bare.layer, bare.unit, bare.sign) == (1, 4, None)
    with pytest.raises(gen.GenerationError, match="out of range"):
        gen.select_neuron(model, None, H)


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------


def test_same_seed_same_text_and_length_counts_the_text_not_the_prefix():
    model = tiny_model()
    a = gen.generate(model, "The film", gen_length=60, seed=11)
    b = gen.generate(model, "The film", gen_length=60, seed=11)
    c = gen.generate(model, "The film", gen_length=60, seed=12)
    assert np.array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    # --gen_length counts the text written out, warm-up text included, not the "\n " before it
    assert len(a.text_bytes) == 60 and len(a.tokens) == 62 and a.n_warmup == len("\n The film")
    assert a.seed == 11 and gen.generate(model, "x", gen_length=5, seed=-1).seed >= 0


def test_warmup_drops_the_pad_space_unless_the_text_ends_with_whitespace():
    assert gen.warmup_tokens("I lov", "nvidia").tobytes() == b"\n I lov"
    assert gen.warmup_tokens("Sean Connery is ", "nvidia").tobytes() == b"\n Sean Connery is "
    assert gen.warmup_tokens("", "openai").tobytes() == b"\n "
    model = tiny_model()
    result = gen.generate(model, "I lov", gen_length=20, seed=0)
    assert result.tokens[: result.n_warmup].tobytes() == b"\n I lov"
    short = gen.generate(model, "a long warm-up text", gen_length=5, seed=0)
    assert short.tokens.tobytes() == b"\n a long warm-up text" and short.generated_text == ""


@pytest.mark.parametrize("temperature", [0.0, 1e-7])
def test_low_temperature_is_the_argmax_continuation(temperature):
    model = tiny_model()
    result = gen.generate(model, "It was", gen_length=40, temperature=temperature, seed=3)
    # Independent greedy loop: the warm-up in one call, then one byte at a time.
    prefix = torch.as_tensor(np.frombuffer(b"\n It was", dtype=np.uint8).astype(np.int64)).unsqueeze(1)
    with torch.no_grad():
        logits, hidden = model(prefix)
        expected = list(prefix[:, 0].tolist())
        while len(expected) < 42:  # 40 and the "\n " prefix
            expected.append(int(logits[-1, 0].argmax()))
            logits, hidden = model(torch.tensor([[expected[-1]]]), hidden)
    assert result.tokens.tolist() == expected


def test_only_byte_logits_are_sampled():
    # A decoder with extra ids (as in 257-id releases) favouring them must still yield bytes only.
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(emsize=8, nhid=H, ntoken=300)).eval()
    with torch.no_grad():
        model.decoder.bias[256:] = 50.0
        first_logits, _ = model(torch.tensor([[10], [32]]))
    greedy = gen.generate(model, "", gen_length=3, temperature=0.0, seed=0)
    assert greedy.tokens[2] == int(first_logits[-1, 0, :256].argmax())
    sampled = gen.generate(model, "", gen_length=40, temperature=1.0, seed=0)
    assert len(sampled.tokens) == 42


def test_invalid_utf8_output_never_raises(tmp_path):
    model = tiny_model()
    with torch.no_grad():  # nearly uniform over all 256 bytes: most high bytes form invalid UTF-8
        model.decoder.weight.zero_()
        model.decoder.bias.zero_()
    result = gen.generate(model, "", gen_length=400, seed=1, neuron=gen.select_neuron(model, None, 0))
    assert "\ufffd" in result.text
    assert (result.tokens >= 0x80).sum() > 50
    plots.plot_heatmap(result.tokens, result.values, tmp_path / "h.png")
    gen.write_values(tmp_path / "h.json", result)
    assert len(json.loads((tmp_path / "h.json").read_text(encoding="utf-8"))["values"]) == 402


def test_char_cells_group_utf8_and_replace_invalid_bytes():
    tokens = np.frombuffer(b"a\xc3\xa9\xff\xe2\x82b\xf0\x9f\x98\x80\xe2", dtype=np.uint8)
    assert plots.char_cells(tokens) == [
        (0, "a"),
        (2, "\u00e9"),
        (3, "\ufffd"),
        (4, "\ufffd"),
        (5, "\ufffd"),
        (6, "b"),
        (10, "\U0001f600"),
        (11, "\ufffd"),
    ]


# ---------------------------------------------------------------------------------------------
# neuron values and overwrite
# ---------------------------------------------------------------------------------------------


def test_analysed_values_equal_the_featurizer_at_each_prefix():
    model = tiny_model(nlayers=2)
    neuron = gen.select_neuron(model, classifier([H + 9, 1], n_features=2 * H, all_layers=True), None)
    assert neuron.layer == 1 and neuron.unit == 9
    result = gen.generate(model, TEXT, gen_length=-1, neuron=neuron)
    tokens = encode(TEXT, "nvidia")
    assert result.tokens.tobytes() == tokens.tobytes() and result.n_warmup == len(tokens)
    np.testing.assert_allclose(result.values, states(model, tokens, 1, 9), atol=1e-5)
    # featurize(prefix before a space) ends on the pad space, i.e. on that space of the full text.
    cuts = [i for i, ch in enumerate(TEXT) if ch == " "] + [len(TEXT)]
    features = featurize(model, [TEXT[:k] for k in cuts], all_layers=True, device="cpu")
    np.testing.assert_allclose(result.values[[k + 2 for k in cuts]], features[:, H + 9], atol=1e-5)


@pytest.mark.parametrize("kind", ["mLSTM", "LSTM", "GRU"])
def test_generated_values_follow_the_state_and_overwrite_forces_it(kind):
    model = tiny_model(kind)
    neuron = gen.select_neuron(model, None, 5)
    free = gen.generate(model, "Good", gen_length=50, seed=4, neuron=neuron)
    np.testing.assert_allclose(free.values, states(model, free.tokens, 0, 5), atol=1e-5)

    seen = []  # the state each step reads
    forward = model.forward

    def spy(tokens, hidden=None, reset=None):
        seen.append(None if hidden is None else hidden[0 if kind == "GRU" else 1][0, 0, 5].item())
        return forward(tokens, hidden, reset)

    model.forward = spy
    forced = gen.generate(
        model, "Good", gen_length=50, seed=4, neuron=neuron, overwrite=0.75, overwrite_mode="cell"
    )
    n = forced.n_warmup
    # Warm-up untouched; from the step after the first generated byte on, every step reads 0.75.
    np.testing.assert_allclose(forced.values[:n], free.values[:n], atol=1e-6)
    assert all(v != pytest.approx(0.75) for v in seen[1 : n + 1])
    assert seen[n + 1 :] == pytest.approx([0.75] * (52 - n - 1))
    np.testing.assert_allclose(forced.values[n:], 0.75)  # the recorded values are the forced ones
    assert not np.allclose(forced.values[n + 1 :], free.values[n + 1 :])


def test_overwrite_without_neuron_is_refused():
    with pytest.raises(gen.GenerationError, match="--neuron"):
        gen.generate(tiny_model(), "x", gen_length=10, overwrite=1.0)


# ---------------------------------------------------------------------------------------------
# heatmap
# ---------------------------------------------------------------------------------------------


def test_layout_wraps_at_spaces_and_breaks_on_newlines():
    chars = list("\nshort line\n" + "word " * 30)
    lines = plots.layout_lines(chars, 32)
    assert [i for line in lines for i in line] == list(range(len(chars)))
    assert ["".join(chars[i] for i in line) for line in lines[:2]] == ["\n", "short line\n"]
    assert all(len(line) <= 32 for line in lines)
    assert all(chars[line[-1]] == " " for line in lines[2:-1])  # word wrap: no word is split
    long_word = plots.layout_lines(list("y" * 70), 32)
    assert [len(line) for line in long_word] == [32, 32, 6]
    short_then_long = plots.layout_lines(list("the " + "y" * 70), 32)  # no line of just "the "
    assert [len(line) for line in short_then_long] == [32, 32, 10]


def test_heatmap_png_size_and_cell_colours(tmp_path):
    tokens = np.frombuffer(b"\n" + b"x" * 10 + b"\n" + b"y" * 130, dtype=np.uint8)
    values = np.linspace(-1.5, 3.0, len(tokens)).astype(np.float32)
    colormap = matplotlib.colormaps["RdYlGn"]
    for negate, value_range in ((False, None), (True, None), (False, 1.0)):
        path = tmp_path / f"heat{negate}{value_range}.png"
        layout = plots.plot_heatmap(
            tokens, values, path, negate=negate, width=64, title="t", value_range=value_range
        )
        image = matplotlib.image.imread(path)
        rows = 5  # "\n" | "x"*10 "\n" | "y"*64 | "y"*64 | "y"*2
        assert image.shape[:2] == (
            plots.HEADER_PX + rows * plots.CELL_H_PX + plots.COLORBAR_PX + plots.MARGIN_PX,
            2 * plots.MARGIN_PX + 64 * plots.CELL_W_PX,
        )
        assert layout.size_px == (image.shape[1], image.shape[0])
        # centred on 0, scaled to the largest |value| shown (3.0) or to --heatmap_range
        R = 3.0 if value_range is None else value_range
        for row, line in enumerate(layout.lines):
            for col, cell in enumerate(line):
                index = layout.cells[cell][0]
                x, y = layout.cell_origin_px(row, col)
                shown = -values[index] if negate else values[index]
                expected = colormap((np.clip(shown / R, -1, 1) + 1) / 2)[:3]
                np.testing.assert_allclose(image[y + 1, x + 1, :3], expected, atol=2 / 255)
        # the colour bar under the text runs from -R (red) to +R (green)
        bar_y = plots.HEADER_PX + rows * plots.CELL_H_PX + 15
        left, right = plots.MARGIN_PX + 12 + 3, plots.MARGIN_PX + 12 + plots.COLORBAR_W_PX - 3
        np.testing.assert_allclose(image[bar_y, left, :3], colormap(0.0)[:3], atol=0.05)
        np.testing.assert_allclose(image[bar_y, right, :3], colormap(1.0)[:3], atol=0.05)
    # The first generated byte is marked by a black bar on the left edge of its cell.
    layout = plots.plot_heatmap(tokens, values, tmp_path / "bar.png", width=64, generated_from=20)
    image = matplotlib.image.imread(tmp_path / "bar.png")
    x, y = layout.cell_origin_px(2, 8)  # byte 20: row "y"*64 starts at byte 12
    assert layout.cells[layout.lines[2][8]][0] == 20
    np.testing.assert_allclose(image[y + 1, x, :3], 0.0, atol=2 / 255)
    assert image[y + 1, x + 1, :3].max() > 0.2


def test_heatmap_text_colour_contrasts_with_its_background():
    background, ink = plots.heatmap_colours(np.array([-2.0, -0.2, 0.0, 0.3, 2.0]), 2.0)
    assert ink[:, 0].tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]  # white on dark red and dark green, else black
    assert background[2].min() > 0.7  # 0 is the light middle of the scale


def test_heatmap_html_is_self_contained_with_values_on_hover(tmp_path):
    tokens = np.frombuffer("ab <é>\n\xff".encode("utf-8", "surrogateescape") + b"\xff", dtype=np.uint8)
    values = np.linspace(-1, 2, len(tokens))
    plots.write_heatmap_html(tokens, values, tmp_path / "h.html", title="t <x>", generated_from=3)
    page = (tmp_path / "h.html").read_text(encoding="utf-8")
    assert "<script" not in page and "http" not in page and "<link" not in page
    span = r'<span( class="g")? style="background:#[0-9a-f]{6};color:#[0-9a-f]{6}" title="([^"]*)"'
    titles = re.findall(span, page)
    cells = plots.char_cells(tokens)
    assert len(titles) == len(cells)
    for (generated, title), (index, _) in zip(titles, cells):
        assert title.endswith(f"{values[index]:+.4f}")
        assert bool(generated) == (index >= 3)
    assert "t &lt;x&gt;" in page and "&lt;" in page  # escaped, never markup


def test_script_heatmap_html_flag_and_html_path(tmp_path, capsys):
    save_checkpoint(tmp_path / "clf.pt", tiny_model(), classifier=classifier([7, 3]))
    script = load_script("generate")
    common = ["--load_model", str(tmp_path / "clf.pt"), "--gen_length", "-1", "--text", "fine", "--cpu"]
    assert script.main([*common, "--heatmap", "--heatmap_html", "--save", str(tmp_path / "a.txt")]) == 0
    assert (tmp_path / "a.png").exists() and (tmp_path / "a.html").exists()
    assert script.main([*common, "--heatmap_path", str(tmp_path / "only.html"), "--heatmap_html",
                        "--save", str(tmp_path / "b.txt")]) == 0  # fmt: skip
    assert (tmp_path / "only.html").exists() and not (tmp_path / "only.png").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # a flag error: one line, exit 2
        script.main([*common, "--heatmap", "--heatmap_range", "0", "--save", str(tmp_path / "c.txt")])
    assert exit_.value.code == 2
    assert "--heatmap_range" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the script
# ---------------------------------------------------------------------------------------------


def test_script_analysis_writes_heatmap_and_values(tmp_path, capsys):
    model = tiny_model()
    save_checkpoint(tmp_path / "clf.pt", model, classifier=classifier([7, 3]))
    code = load_script("generate").main(
        [
            "--load_model",
            str(tmp_path / "clf.pt"),
            "--gen_length",
            "-1",
            "--visualize",
            "--text",
            TEXT,
            "--save",
            str(tmp_path / "out" / "analysed.txt"),
            "--cpu",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "unit 7" in out and "polarity -1" in out and "P(positive)" in out
    record = json.loads((tmp_path / "out" / "analysed.json").read_text(encoding="utf-8"))
    tokens = encode(TEXT, "nvidia")
    assert [row["byte"] for row in record["values"]] == tokens.tolist()
    np.testing.assert_allclose(
        [row["value"] for row in record["values"]], states(model, tokens, 0, 7), atol=1e-5
    )
    # padding is listed but not the text: the heatmap holds the text's characters alone
    assert [row["text"] for row in record["values"]] == [False, False] + [True] * len(TEXT) + [False]
    image = matplotlib.image.imread(tmp_path / "out" / "analysed.png")
    cells = plots.char_cells(TEXT.encode())
    expected = plots.HeatmapLayout(plots.layout_lines(list(TEXT), 64), cells, 64).size_px
    assert image.shape[0] == expected[1] and image.shape[1] >= expected[0]  # wider only for a long title
    assert (tmp_path / "out" / "analysed.txt").read_bytes() == TEXT.encode()


def test_script_without_classifier_or_neuron_gives_a_clear_error(tmp_path, capsys):
    save_checkpoint(tmp_path / "lm.pt", tiny_model())
    script = load_script("generate")
    assert (
        script.main(["--load_model", str(tmp_path / "lm.pt"), "--heatmap", "--save", str(tmp_path / "g.txt")])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: --heatmap needs a neuron") and "--neuron" in err
    assert script.main(["--load_model", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err


def test_default_model_prefers_the_users_own_then_the_shipped_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    candidates = ("lang_model_transfer/classifier.pt", "lang_model.pt")
    assert first_existing_model(*candidates) == "default"
    assert resolve_model_path("default") == resolve_model_path(None) == DEFAULT_MODEL
    (tmp_path / "lang_model.pt").write_bytes(b"")
    assert first_existing_model(*candidates) == "lang_model.pt"
    (tmp_path / "lang_model_transfer").mkdir()
    (tmp_path / "lang_model_transfer" / "classifier.pt").write_bytes(b"")
    assert first_existing_model(*candidates) == "lang_model_transfer/classifier.pt"


def test_script_one_dash_spellings_generate_with_overwrite(tmp_path):
    save_checkpoint(tmp_path / "clf.pt", tiny_model(), classifier=classifier([7, 3]))
    cmd = [
        sys.executable,
        str(ROOT / "generate.py"),
        "-load_model",
        "clf.pt",
        "-text",
        "Sean Connery is",
        "-overwrite",
        "-1",
        "-negate",
        "-gen_length",
        "80",
        "-seed",
        "5",
        "-heatmap",
        "-save",
        "g.txt",
        "-cpu",
        "-log-interval",
        "10",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "seed 5" in run.stdout and "generated 60/" in run.stdout
    record = json.loads((tmp_path / "g.json").read_text(encoding="utf-8"))
    # -negate declares polarity -1 (as the weight's sign would): negative sentiment is a raw +1
    assert record["overwrite_written"] == 1.0 and record["polarity"] == -1
    assert len(record["values"]) == 82 and (tmp_path / "g.png").exists()  # "\n " + 80
    text = (tmp_path / "g.txt").read_bytes()
    assert text.startswith(b"Sean Connery is") and len(text) == 80  # -gen_length 80: 80 bytes saved


# ---------------------------------------------------------------------------------------------
# polarity, overwrite modes, the saved text
# ---------------------------------------------------------------------------------------------


def run_generate_script(tmp_path, capsys, *args) -> tuple[str, dict]:
    code = load_script("generate").main(
        ["--load_model", str(tmp_path / "clf.pt"), "--save", str(tmp_path / "g.txt"), "--cpu", "--heatmap",
         "--seed", "2", *args]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    return out, json.loads((tmp_path / "g.json").read_text(encoding="utf-8"))


def test_overwrite_plus_one_forces_positive_sentiment_whatever_the_weight_sign(tmp_path, capsys):
    model = tiny_model()
    save_checkpoint(tmp_path / "clf.pt", model, classifier=classifier([7, 3]))  # weights: 7 -1.5, 3 +0.5
    text = ["--text", "It was", "--gen_length", "40", "--overwrite_mode", "cell"]
    out, record = run_generate_script(tmp_path, capsys, *text, "--overwrite", "1")
    # neuron 7 reads negative: +1 (positive sentiment) is written as -1
    assert "classifier weight -1.5000" in out and "polarity -1" in out
    assert "--overwrite +1 (positive sentiment): writing -1" in out
    assert record["overwrite_written"] == -1.0 and record["polarity"] == -1
    generated = [row["value"] for row in record["values"] if row["generated"]]
    assert generated == pytest.approx([-1.0] * len(generated)) and len(generated) == 40 - len("It was")

    out, record = run_generate_script(tmp_path, capsys, *text, "--overwrite", "1", "--neuron", "3")
    assert "polarity +1" in out and record["overwrite_written"] == 1.0
    # --negate overrides the weight's sign
    out, record = run_generate_script(tmp_path, capsys, *text, "--overwrite", "1", "--neuron", "3", "-negate")
    assert "polarity -1 (--negate, against" in out and record["overwrite_written"] == -1.0


def test_heatmap_is_green_where_sentiment_is_positive(tmp_path, capsys):
    model = tiny_model()
    save_checkpoint(tmp_path / "clf.pt", model, classifier=classifier([7, 3]))
    forced = ["--overwrite", "1", "--overwrite-mode", "cell", "--heatmap_range", "1"]
    run_generate_script(tmp_path, capsys, "--text", "It was", "--gen_length", "30", *forced)
    image = matplotlib.image.imread(tmp_path / "g.png")
    cells = plots.char_cells(np.frombuffer((tmp_path / "g.txt").read_bytes(), dtype=np.uint8))
    layout = plots.HeatmapLayout(plots.layout_lines([ch for _, ch in cells], 64), cells, 64)
    # the last cell is the last generated byte, forced to +1 sentiment (a raw -1 for this neuron)
    x, y = layout.cell_origin_px(len(layout.lines) - 1, len(layout.lines[-1]) - 1)
    green = matplotlib.colormaps["RdYlGn"](1.0)[:3]
    np.testing.assert_allclose(image[y + 1, x + 1, :3], green, atol=2 / 255)


@pytest.mark.parametrize("kind", ["mLSTM", "GRU"])
def test_hidden_mode_writes_h_at_every_step_including_warm_up(kind):
    model = tiny_model(kind)
    neuron = gen.select_neuron(model, None, 5)
    seen = []  # (h, c) of the unit as each step reads them
    forward = model.forward

    def spy(tokens, hidden=None, reset=None):
        seen.append(None if hidden is None else (hidden[0][0, 0, 5].item(), hidden[1][0, 0, 5].item()))
        return forward(tokens, hidden, reset)

    model.forward = spy
    forced = gen.generate(
        model, "Good film", gen_length=40, seed=4, neuron=neuron, overwrite=0.75, overwrite_mode="hidden"
    )
    assert seen[0] is None and len(seen) == 42
    assert [h for h, _ in seen[1:]] == pytest.approx([0.75] * 41)  # warm-up steps included
    if kind == "mLSTM":  # the cell goes on unforced
        assert all(c != pytest.approx(0.75) for _, c in seen[1:])
    free = gen.generate(model, "Good film", gen_length=40, seed=4, neuron=neuron)
    assert not np.allclose(forced.values[: forced.n_warmup], free.values[: free.n_warmup])
    with pytest.raises(gen.GenerationError, match="--overwrite_mode hidden"):
        gen.generate(model, "x", gen_length=-1, neuron=neuron, overwrite=1.0, overwrite_mode="cell")
    analysed = gen.generate(model, "Good", gen_length=-1, neuron=neuron, overwrite=1.0)  # hidden: the default
    assert analysed.text == "Good" and len(analysed.tokens) == len("\n Good ")


def test_saved_text_is_the_text_as_generated_byte_for_byte(tmp_path, capsys):
    model = tiny_model()
    with torch.no_grad():  # nearly uniform over all 256 bytes: most high bytes form invalid UTF-8
        model.decoder.weight.zero_()
        model.decoder.bias.zero_()
    save_checkpoint(tmp_path / "clf.pt", model, classifier=classifier([7, 3]))
    out, record = run_generate_script(tmp_path, capsys, "--text", "Hello there", "--gen_length", "300")
    data = (tmp_path / "g.txt").read_bytes()
    tokens = bytes(row["byte"] for row in record["values"])
    assert tokens.startswith(b"\n Hello there") and len(tokens) == 302
    assert data == tokens[2:]  # no preprocessing prefix, every generated byte as it was sampled
    invalid = len(data) - len(data.decode("utf-8", errors="ignore").encode())
    assert invalid > 20 and f"(300 bytes; {invalid} of them not valid UTF-8" in out


def test_layout_moves_a_word_that_fits_a_row_instead_of_splitting_it():
    chars = list("a " + "y" * 31 + " bb")
    rows = ["".join(chars[i] for i in row) for row in plots.layout_lines(chars, 32)]
    assert rows == ["a ", "y" * 31 + " ", "bb"]
    assert [len(row) for row in plots.layout_lines(list("a " + "y" * 30), 32)] == [32]  # fits exactly


def test_analysis_uses_the_per_byte_values_of_the_encoder():
    from sentiment_discovery.encoder import Encoder

    model = tiny_model(nlayers=2)
    clf = classifier([H + 9, 1], n_features=2 * H, all_layers=True)
    neuron = gen.select_neuron(model, clf, None)
    result = gen.generate(model, TEXT, gen_length=-1, neuron=neuron)
    (values,) = Encoder(model, clf, device="cpu").cell_transform(TEXT, units=[H + 9])
    np.testing.assert_allclose(result.values, values.values[:, 0], atol=1e-6)
    assert result.text == TEXT and result.text_slice == values.text_slice


def test_a_neuron_of_concatenated_poolings_is_its_unit_in_any_block():
    model = tiny_model(nlayers=2)
    clf = {**classifier([H + 5, 3], n_features=2 * H), "pooling": "mean,last"}  # block 2, unit 5
    picked = gen.select_neuron(model, clf)
    assert (picked.feature, picked.layer, picked.unit) == (H + 5, 1, 5)
    with pytest.raises(gen.GenerationError, match="out of range"):
        gen.select_neuron(model, clf, neuron=2 * H)


def test_gen_length_1000_saves_1000_bytes_and_help_shows_the_prefix_escaped(tmp_path):
    save_checkpoint(tmp_path / "lm.pt", tiny_model())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "generate.py"), "--load_model", "lm.pt", "--gen_length", "1000",
           "--text", "The film was", "--cpu"]  # fmt: skip
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    text = (tmp_path / "generated.txt").read_bytes()  # the default --save
    assert len(text) == 1000 and text.startswith(b"The film was") and "(1000 bytes" in run.stdout

    help_text = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--help"], env=env,
                               capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    assert 'preprocessing\'s "\\n " prefix' in help_text  # a backslash-n, not a line break
    assert "so 1000 saves 1,000" in " ".join(help_text.split())
    main_help = subprocess.run([sys.executable, str(ROOT / "main.py"), "--help"], env=env,
                               capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    # --save_dtype: what halves (the weights) and what does not (the optimizer state of the resumable --save)
    assert "optimizer state, which stays float32" in " ".join(main_help.split())
