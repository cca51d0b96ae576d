"""The shared argument normaliser: every dash/underscore spelling of a long flag means the same flag."""

from __future__ import annotations

import pytest
from conftest import load_script

from sentiment_discovery.cli import normalize_argv


def parse(script: str, argv: list[str]):
    parser = load_script(script).build_parser()
    return parser.parse_args(normalize_argv(argv, parser))


def test_dashed_spellings_parse_to_the_same_namespace_as_underscores():
    underscored = [
        "--save_results", "out", "--text_key", "review", "--loose_json", "--no_test_eval",
        "--write_results", "w.csv", "--label_key", "stars", "--log2_C", "-3", "1",
    ]  # fmt: skip
    dashed = [
        "--save-results", "out", "--text-key", "review", "--loose-json", "--no-test-eval",
        "--write-results=w.csv", "-label-key", "stars", "--log2-C", "-3", "1",
    ]  # fmt: skip
    expected = parse("transfer", underscored)
    assert parse("transfer", dashed) == expected
    assert (expected.save_results, expected.text_key, expected.loose_json) == ("out", "review", True)
    assert expected.log2_C == [-3, 1]  # negative values are values, not flags

    # main.py: the original's --log-interval has the underscore spelling too, and the new flags dashes
    main_args = parse("main", ["--log_interval", "7", "--keep-checkpoints", "3", "--save-iters", "5"])
    assert (main_args.log_interval, main_args.keep_checkpoints, main_args.save_iters) == (7, 3, 5)
    assert parse("main", ["-log-interval", "7"]).log_interval == 7
    gen = parse("generate", ["--overwrite-mode", "hidden", "--gen-length", "-1", "--overwrite", "-1"])
    assert (gen.overwrite_mode, gen.gen_length, gen.overwrite) == ("hidden", -1, -1)
    assert parse("classifier", ["--save-probs", "p.npy"]).save_probs == "p.npy"


def test_unknown_flags_are_still_refused():
    with pytest.raises(SystemExit):
        parse("transfer", ["--no-such-flag"])
