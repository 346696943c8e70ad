"""Every kind of bad input a user can give, through the real command line: `jepatune.cli.main` in
process must end with exit status 2 and exactly one line on stderr that names the problem and the
fix, and must leave no new file behind (inputs are made before the call; nothing may be added).

Each case returns the argv (with OUT standing for the output folder) and the fragments the line
must hold: what is wrong, then how to fix it."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, tiny_sets

from jepatune.cli import main
from jepatune.trainer.data import write_shard

Case = tuple[list[str], list[str]]


def _shards(folder: Path, train: np.ndarray | None = None, val: np.ndarray | None = None) -> Path:
    write_shard(folder / "fineweb_train_000000.bin", np.arange(4096) % 256 if train is None else train)
    write_shard(folder / "fineweb_val_000000.bin", np.arange(4096) % 256 if val is None else val)
    return folder


def _train(data: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), *tiny_sets(), *extra, "--out", "OUT"]


def _search(demo: Path, *extra: str) -> list[str]:
    return ["search", "--data", str(demo), "--out", "OUT", *extra]


def _space(tmp: Path, demo: Path, text: str, *fragments: str) -> Case:
    """A sweep over the space file `text`: the error names the file and `fragments`."""
    path = tmp / "space.toml"
    path.write_text(text)
    return _search(demo, "--space", str(path)), [str(path), *fragments]


# --- data --------------------------------------------------------------------------------------

def data_missing_folder(tmp: Path, demo: Path) -> Case:
    missing = tmp / "no-such-data"
    return _train(missing), [str(missing), "does not exist", "jepatune data"]


def data_without_shards(tmp: Path, demo: Path) -> Case:
    (empty := tmp / "empty-data").mkdir()
    return _train(empty), [str(empty), "no fineweb_train_", "jepatune data"]


def data_wrong_magic(tmp: Path, demo: Path) -> Case:
    data = _shards(tmp / "data")
    shard = data / "fineweb_train_000000.bin"
    shard.write_bytes(np.array([12345], "<i4").tobytes() + shard.read_bytes()[4:])
    return _train(data), [str(shard), "magic 12345", "rebuild"]


def data_truncated_train_shard(tmp: Path, demo: Path) -> Case:
    data = _shards(tmp / "data")
    shard = data / "fineweb_train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    return _train(data), [str(shard), "truncated", "rebuild"]


def data_truncated_val_shard(tmp: Path, demo: Path) -> Case:
    data = _shards(tmp / "data")
    shard = data / "fineweb_val_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-1])
    return _train(data), [str(shard), "truncated", "rebuild"]


def data_tokenized_train_shard(tmp: Path, demo: Path) -> Case:
    # SentencePiece-1024 ids where bytes are expected: the embedding has rows for 0..255 only.
    data = _shards(tmp / "data", train=np.arange(4096) % 1024)
    return _train(data), [str(data / "fineweb_train_000000.bin"), "token id 1023 >= vocab_size 256",
                          "jepatune data transpile"]


def data_val_shorter_than_a_sequence(tmp: Path, demo: Path) -> Case:
    data = _shards(tmp / "data", val=np.arange(20))
    return _train(data), ["val split has 20 tokens", f"train_seq_len={TINY['train_seq_len']}", "use a shorter"]


def data_text_empty_file(tmp: Path, demo: Path) -> Case:
    (empty := tmp / "empty.txt").write_bytes(b"")
    return ["data", "text", str(empty), "--out", "OUT"], [str(empty), "empty", "leave it out"]


def data_text_not_utf8(tmp: Path, demo: Path) -> Case:
    (good := tmp / "good.txt").write_text("plain text\n" * 50, encoding="utf-8")
    (bad := tmp / "latin1.txt").write_bytes("café crème\n".encode("latin-1") * 50)
    return ["data", "text", str(good), str(bad), "--out", "OUT"], [str(bad), "not valid UTF-8", "convert it to UTF-8"]


def data_text_without_files(tmp: Path, demo: Path) -> Case:
    return ["data", "text", "--out", "OUT"], ["required: files", "jepatune data text --help"]


def data_text_missing_file(tmp: Path, demo: Path) -> Case:
    missing = tmp / "missing.txt"
    return ["data", "text", str(missing), "--out", "OUT"], [str(missing), "no such", "check the path"]


# --- config ------------------------------------------------------------------------------------

def config_unknown_key(tmp: Path, demo: Path) -> Case:
    return _train(demo, "--set", "modl_dim=64"), ["modl_dim", "did you mean model_dim"]


def config_wrong_type(tmp: Path, demo: Path) -> Case:
    return _train(demo, "--set", "model_dim=big"), ["model_dim='big'", "expected int"]


def config_out_of_range(tmp: Path, demo: Path) -> Case:
    return _train(demo, "--set", "jepa_pure_frac=1.5"), ["jepa_pure_frac=1.5", "must be a fraction in [0, 1]"]


def config_inconsistent_fractions(tmp: Path, demo: Path) -> Case:
    return _train(demo, "--set", "jepa_pure_frac=0.7", "--set", "ce_pure_frac=0.5"), ["jepa_pure_frac=0.7",
                                                                                      "must not exceed ce_pure_frac"]


def config_heads_not_dividing_width(tmp: Path, demo: Path) -> Case:
    return _train(demo, "--set", "num_heads=3"), ["model_dim", "divisible by num_heads=3"]


def config_unknown_key_in_a_sweep(tmp: Path, demo: Path) -> Case:
    return _search(demo, "--set", "modl_dim=3"), ["modl_dim", "did you mean model_dim"]


def config_bad_swa_choices_in_a_sweep(tmp: Path, demo: Path) -> Case:
    return _search(demo, "--final-swa-choices", "0.5,late"), ["--final-swa-choices='0.5,late'", "fractions in [0, 1]"]


def config_swa_choice_out_of_range(tmp: Path, demo: Path) -> Case:
    return _train(demo, "--set", "swa_start_choices=0.5,1.2"), ["swa_start_choices=(0.5, 1.2)",
                                                               "must be fractions in [0, 1]"]


def config_file_missing(tmp: Path, demo: Path) -> Case:
    missing = tmp / "nope.toml"
    return _train(demo, "--config", str(missing)), [str(missing), "does not exist", "check the path"]


def config_file_invalid_toml(tmp: Path, demo: Path) -> Case:
    (bad := tmp / "bad.toml").write_text("model_dim = = 3\n")
    return _train(demo, "--config", str(bad)), [str(bad), "not valid TOML", "line 1", "correct it"]


def config_unknown_preset(tmp: Path, demo: Path) -> Case:
    return _train(demo, "--preset", "huge"), ["--preset 'huge'", "choose one of", "tiny"]


# --- spaces ------------------------------------------------------------------------------------

def space_unknown_name(tmp: Path, demo: Path) -> Case:
    return _search(demo, "--space", "curiculum"), ["curiculum", "did you mean 'curriculum'"]


def space_empty_range(tmp: Path, demo: Path) -> Case:
    return _space(tmp, demo, "[params.sigreg_weight]\nlow = 0.1\nhigh = 0.1\n", "params.sigreg_weight",
                  "empty range", "widen it")


def space_low_above_high(tmp: Path, demo: Path) -> Case:
    return _space(tmp, demo, "[params.jepa_pure_frac]\nlow = 0.5\nhigh = 0.1\n", "params.jepa_pure_frac", "swap")


def space_log_range_touching_0(tmp: Path, demo: Path) -> Case:
    return _space(tmp, demo, "[params.sigreg_weight]\nlow = 0.0\nhigh = 1.0\nlog = true\n", "sigreg_weight",
                  "log range", "raise low")


def space_unknown_parameter(tmp: Path, demo: Path) -> Case:
    return _space(tmp, demo, "[params.jepa_pure_fra]\nlow = 0.0\nhigh = 0.5\n", "'jepa_pure_fra'",
                  "did you mean 'jepa_pure_frac'")


def space_impossible_constraint(tmp: Path, demo: Path) -> Case:
    return _space(tmp, demo, "[params.jepa_pure_frac]\nlow = 0.6\nhigh = 0.9\n[fixed]\nce_pure_frac = 0.5\n",
                  "no feasible point", "jepa_pure_frac", "widen the ranges")


# --- command line ------------------------------------------------------------------------------

def cli_no_command(tmp: Path, demo: Path) -> Case:
    return [], ["required: command", "jepatune --help"]


def cli_missing_required_option(tmp: Path, demo: Path) -> Case:
    return ["data", "fineweb", "--out", "OUT"], ["--train-shards", "jepatune data fineweb --help"]


def cli_missing_data(tmp: Path, demo: Path) -> Case:
    return ["search", "--out", "OUT"], ["--data is required", "jepatune data demo"]


def cli_not_a_number(tmp: Path, demo: Path) -> Case:
    return ["data", "demo", "--train-mb", "lots", "--out", "OUT"], ["--train-mb", "'lots'", "--help"]


def cli_transpile_without_tokenizer(tmp: Path, demo: Path) -> Case:
    return ["data", "transpile", "sp", "--out", "OUT"], ["--tokenizer", "jepatune data transpile --help"]


def cli_bad_set_syntax(tmp: Path, demo: Path) -> Case:
    return _train(demo, "--set", "model_dim"), ["--set 'model_dim'", "key=value"]


def cli_set_without_value(tmp: Path, demo: Path) -> Case:
    return ["train", "--set"], ["--set", "expected one argument", "jepatune train --help"]


def cli_zero_samples(tmp: Path, demo: Path) -> Case:
    return _search(demo, "--samples", "0"), ["--samples=0", "must be at least 1"]


def cli_resume_not_an_experiment(tmp: Path, demo: Path) -> Case:
    (tmp / "out" / "x").mkdir(parents=True)
    return ["search", "--resume", "--out", "OUT", "--name", "x"], ["not a jepatune sweep",
                                                                   "give the folder `search` made"]


def cli_retrain_not_a_sweep(tmp: Path, demo: Path) -> Case:
    (tmp / "out").mkdir()
    return ["retrain", "OUT"], ["not a jepatune sweep", "give the folder `search` made"]


def cli_train_resume_without_checkpoint(tmp: Path, demo: Path) -> Case:
    return _train(demo, "--resume"), ["checkpoint.pt", "does not exist", "run without --resume"]


def _interrupted_run(tmp: Path, demo: Path) -> Path:
    """OUT as a run killed after its step-4 evaluation leaves it: config.toml, metrics.jsonl, checkpoint.pt."""
    from jepatune.atomic import atomic_write_text
    from jepatune.trainer.config import TrainConfig
    from jepatune.trainer.loop import train

    out = tmp / "out"
    config = TrainConfig(data_path=str(demo.resolve()), **{**TINY, "iterations": 4})
    train(config, out_dir=out, checkpoint_dir=out, on_start=lambda: atomic_write_text(out / "config.toml",
                                                                                     config.to_toml()))
    for name in ("summary.json", "final_model.pt", "final_model.int8.ptz"):
        (out / name).unlink()
    return out


def cli_train_resume_another_recipe(tmp: Path, demo: Path) -> Case:
    out = _interrupted_run(tmp, demo)
    return _train(demo, "--set", "iterations=4", "--set", "model_dim=64", "--resume"), [
        f"cannot resume from {out / 'checkpoint.pt'}", "model_dim=32 there but 64 here", "resume with the config"]


def cli_train_resume_not_a_checkpoint(tmp: Path, demo: Path) -> Case:
    out = _interrupted_run(tmp, demo)
    (out / "checkpoint.pt").write_bytes(b"step 4, or so\n")
    return _train(demo, "--set", "iterations=4", "--resume"), [
        str(out / "checkpoint.pt"), "not a readable torch file", "give a checkpoint.pt that jepatune wrote"]


# --- storage and output folders ----------------------------------------------------------------

def storage_malformed_uri(tmp: Path, demo: Path) -> Case:
    return _search(demo, "--storage", "s3:/bucket"), ["--storage 's3:/bucket'", "s3://bucket/path"]


def storage_uri_without_bucket(tmp: Path, demo: Path) -> Case:
    return _search(demo, "--storage", "gs://"), ["--storage 'gs://'", "gs://bucket/path"]


def storage_below_a_file(tmp: Path, demo: Path) -> Case:
    (file := tmp / "file.txt").write_text("not a folder")
    storage = file / "ray"
    return _search(demo, "--storage", str(storage)), [str(file), "not a writable folder",
                                                                        "choose a shared folder"]


def out_below_a_file(tmp: Path, demo: Path) -> Case:
    (file := tmp / "file.txt").write_text("not a folder")
    return ["data", "demo", "--out", str(file / "shards")], [str(file), "not a writable folder",
                                                             "choose another folder"]


def out_is_a_file(tmp: Path, demo: Path) -> Case:
    (file := tmp / "run").write_text("keep me")
    return _train(demo)[:-1] + [str(file)], [str(file), "is a file", "give a folder"]


def out_of_data_is_a_file(tmp: Path, demo: Path) -> Case:
    (file := tmp / "shards").write_text("keep me")
    return ["data", "demo", "--train-mb", "0.2", "--out", str(file)], [str(file), "is a file", "give a folder"]


def out_holds_a_finished_run(tmp: Path, demo: Path) -> Case:
    (tmp / "out").mkdir()
    (tmp / "out" / "summary.json").write_text("{}")
    return _train(demo), ["already holds a finished run", "choose a new folder"]


def out_name_too_long(tmp: Path, demo: Path) -> Case:
    # Below a folder that does not exist yet: a check that only looked the path up would create it first.
    long = tmp / "new" / ("n" * 300) / "run"
    return _train(demo)[:-1] + [str(long)], [str(long), "is 300 bytes, more than the 255", "choose another folder"]


def out_path_too_long(tmp: Path, demo: Path) -> Case:
    long = tmp.joinpath(*["p" * 200] * 25)
    return _train(demo)[:-1] + [str(long)], ["the path is", "more than the 4095 allowed", "choose another folder"]


def out_unwritable(tmp: Path, demo: Path) -> Case:
    return _train(demo)[:-1] + [str(tmp / "locked" / "run")], [str(tmp / "locked"), "not a writable folder",
                                                               "choose another folder"]


CASES: dict[str, Callable[[Path, Path], Case]] = {
    name.replace("_", "-"): fn for name, fn in globals().items()
    if callable(fn) and name.split("_")[0] in ("data", "config", "space", "cli", "storage", "out")
}


@pytest.fixture
def locked(tmp_path) -> Iterator[Path]:
    """A folder this process cannot write in: read-only mode bits, or for root (whom mode bits do not
    stop) the immutable attribute."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() == 0:
        made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    else:
        folder.chmod(0o500)
        made = True
    if not made or os.access(folder, os.W_OK):
        pytest.skip("cannot make a folder unwritable here")
    yield folder
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o700)


def _files(root: Path) -> dict[str, tuple]:
    """Every path under `root` with its mtime, and a file's bytes too: nothing created, touched or changed."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in root.rglob("*")}


def test_the_catalogue_covers_every_kind():
    kinds = {name.split("-")[0] for name in CASES}
    assert kinds == {"data", "config", "space", "cli", "storage", "out"} and len(CASES) >= 25


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, tmp_path, demo_data, capsys, request):
    if name == "out-unwritable":
        request.getfixturevalue("locked")
    argv, fragments = CASES[name](tmp_path, demo_data)
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    before = _files(tmp_path)
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2 and len(lines) == 1, captured
    assert lines[0].startswith("jepatune: error: ") and captured.out == "", captured
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert _files(tmp_path) == before  # nothing created, nothing touched
