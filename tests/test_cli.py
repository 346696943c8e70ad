"""The `jepatune` command: run in-process through `main()`, and once as a real process."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY

from jepatune.cli import main
from jepatune.trainer.config import TrainConfig, load_config
from jepatune.trainer.data import find_shards, write_shard

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "optuna", "pandas")


def _text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def tiny_sets(**extra) -> list[str]:
    """`--set key=value` for every TINY knob (and `extra`), as a user would type them."""
    args = []
    for key, value in {**TINY, **extra}.items():
        args += ["--set", f"{key}={_text(value)}"]
    return args


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) with its stdout and stderr captured (for module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def assert_one_error_line(capsys, code: int, *fragments: str) -> str:
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("jepatune: error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# --- a real process: --help and the import stay light ---------------------------------------


def _subprocess(*args: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)


def test_help_as_a_real_process():
    proc = _subprocess("-m", "jepatune", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: jepatune" in proc.stdout
    for command in ("train", "data", "demo"):
        assert command in proc.stdout


def test_import_and_help_load_no_heavy_modules():
    code = (
        "import jepatune.cli, sys\n"
        f"heavy = {HEAVY!r}\n"
        "def loaded(): return sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "print(loaded())\n"
        "for argv in (['--help'], ['train', '--help'], ['data', 'text', '--help']):\n"
        "    try:\n"
        "        jepatune.cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(loaded(), file=sys.stderr)\n"
    )
    proc = _subprocess("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "[]"  # importing the CLI
    assert proc.stderr.strip().splitlines()[-1] == "[]"  # after three --help screens


# --- train: one real (tiny) run, and a resume of it --------------------------------------------


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tmp" / "run"
    argv = ["train", "--data", str(demo_data), *tiny_sets(), "--set", "iterations=8", "--out", str(out)]
    code, stdout, stderr = run_main(argv)
    expected = TrainConfig(**{**TINY, "iterations": 8, "data_path": str(demo_data.resolve())})
    return dict(out=out, argv=argv, code=code, stdout=stdout, stderr=stderr, config=expected)


def test_train_completes_and_writes_every_output(trained):
    out = trained["out"]
    assert trained["code"] == 0, trained["stderr"]
    assert trained["stdout"].startswith("completed: 8 steps")
    assert str(out) in trained["stdout"]
    for name in ("metrics.jsonl", "summary.json", "config.toml", "final_model.pt", "final_model.int8.ptz",
                 "checkpoint.pt"):
        assert (out / name).is_file(), name
    assert (out / "final_model.int8.ptz").stat().st_size > 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_train_metrics_are_one_json_object_per_eval(trained):
    lines = (trained["out"] / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert all(isinstance(r, dict) and "step" in r and "val_bpb" in r for r in rows)
    evals = [r for r in rows if not r.get("final")]
    assert [r["step"] for r in evals] == [0, 4, 8]  # val_loss_every=4 over 8 iterations, and step 0
    assert all(math.isfinite(r["val_bpb"]) for r in evals)
    assert [r for r in rows if r.get("final")][-1]["status"] == "completed"


def test_train_summary(trained):
    s = json.loads((trained["out"] / "summary.json").read_text())
    assert s["status"] == "completed" and s["step"] == 8
    assert math.isfinite(s["val_bpb"]) and s["val_bpb"] > 0
    assert s["artifact_bytes"] > 0 and s["fits_cap"] is True
    assert s["config"]["iterations"] == 8 and s["config"]["model_dim"] == TINY["model_dim"]


def test_train_config_toml_loads_back_equal(trained):
    loaded = load_config(trained["out"] / "config.toml")
    assert loaded == trained["config"]
    assert dataclasses.asdict(loaded) == dataclasses.asdict(trained["config"])


def test_train_refuses_a_finished_run_folder(trained, capsys):
    summary = (trained["out"] / "summary.json").read_bytes()
    code = main(trained["argv"])
    assert_one_error_line(capsys, code, "already holds a finished run")
    assert (trained["out"] / "summary.json").read_bytes() == summary


def test_train_resume_continues_from_the_checkpoint(trained, tmp_path):
    assert trained["code"] == 0
    out = tmp_path / "run"
    shutil.copytree(trained["out"], out)
    (out / "summary.json").unlink()
    metrics_before = (out / "metrics.jsonl").read_text().splitlines()
    argv = [a if a != str(trained["out"]) else str(out) for a in trained["argv"]] + ["--resume"]
    code, stdout, stderr = run_main(argv)
    assert code == 0, stderr
    assert f"resumed from {out / 'checkpoint.pt'} at step 8" in stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "completed" and s["step"] == 8 and math.isfinite(s["val_bpb"])
    first = json.loads((trained["out"] / "summary.json").read_text())
    assert s["val_bpb"] == pytest.approx(first["val_bpb"], rel=1e-6)  # the same weights, restored
    added = (out / "metrics.jsonl").read_text().splitlines()[len(metrics_before):]
    assert [json.loads(line).get("final") for line in added] == [True]  # no eval repeated


# --- bad input: one line on stderr, exit status 2, nothing written -------------------------------


def _corrupt_data(tmp_path: Path, split: str) -> Path:
    data = tmp_path / "data"
    write_shard(data / "fineweb_train_000000.bin", np.arange(4096) % 256)
    write_shard(data / "fineweb_val_000000.bin", np.arange(4096) % 256)
    bad = data / f"fineweb_{split}_000001.bin"
    write_shard(bad, np.arange(100))
    bad.write_bytes(bad.read_bytes()[:-3])
    return data


def _case(tmp_path: Path, demo: Path, name: str) -> tuple[list[str], list[str]]:
    """argv (before --out) and the fragments the error line must contain."""
    data = ["--data", str(demo), *tiny_sets()]
    if name == "unknown-key":
        return [*data, "--set", "modl_dim=64"], ["modl_dim", "did you mean model_dim"]
    if name == "set-syntax":
        return [*data, "--set", "model_dim"], ["--set 'model_dim'", "key=value"]
    if name == "out-of-range":
        return [*data, "--set", "jepa_pure_frac=1.5"], ["jepa_pure_frac=1.5", "[0, 1]"]
    if name == "bad-type":
        return [*data, "--set", "model_dim=big"], ["model_dim='big'", "int"]
    if name == "missing-data":
        missing = tmp_path / "no-such-data"
        return ["--data", str(missing), *tiny_sets()], [str(missing), "does not exist"]
    if name == "data-without-shards":
        empty = tmp_path / "empty-data"
        empty.mkdir()
        return ["--data", str(empty), *tiny_sets()], [str(empty), "no fineweb_train_", "jepatune data"]
    if name in ("corrupt-train-shard", "corrupt-val-shard"):
        split = name.split("-")[1]
        folder = _corrupt_data(tmp_path, split)
        return ["--data", str(folder), *tiny_sets()], [f"fineweb_{split}_000001.bin", "truncated"]
    if name == "missing-config":
        missing = tmp_path / "nope.toml"
        return [*data, "--config", str(missing)], [str(missing), "does not exist"]
    if name == "invalid-toml":
        bad = tmp_path / "bad.toml"
        bad.write_text("model_dim = = 3\n")
        return [*data, "--config", str(bad)], [str(bad), "not valid TOML"]
    if name == "unknown-preset":
        return [*data, "--preset", "huge"], ["--preset 'huge'", "tiny"]
    if name == "resume-without-checkpoint":
        return [*data, "--resume"], ["--resume", "checkpoint.pt", "does not exist"]
    raise AssertionError(name)


BAD_TRAIN = ["unknown-key", "set-syntax", "out-of-range", "bad-type", "missing-data", "data-without-shards",
             "corrupt-train-shard", "corrupt-val-shard", "missing-config", "invalid-toml", "unknown-preset",
             "resume-without-checkpoint"]


@pytest.mark.parametrize("name", BAD_TRAIN)
def test_train_bad_input_is_one_line_and_writes_nothing(name, demo_data, tmp_path, capsys):
    argv, fragments = _case(tmp_path, demo_data, name)
    out = tmp_path / "out" / "run"
    code = main(["train", *argv, "--out", str(out)])
    assert_one_error_line(capsys, code, *fragments)
    assert not out.exists() and not out.parent.exists()


def test_train_out_is_a_regular_file(demo_data, tmp_path, capsys):
    out = tmp_path / "run"
    out.write_text("keep me")
    code = main(["train", "--data", str(demo_data), *tiny_sets(), "--out", str(out)])
    assert_one_error_line(capsys, code, str(out), "is a file")
    assert out.read_text() == "keep me"


# --- argparse's own errors -----------------------------------------------------------------------


@pytest.mark.parametrize("argv, fragment", [
    (["data", "text"], "files"),
    (["data", "fineweb"], "--train-shards"),
    (["data", "transpile", "sp"], "--tokenizer"),
    (["data", "demo", "--train-mb", "lots"], "--train-mb"),
    (["train", "--set"], "--set"),
], ids=["text-without-files", "fineweb-without-train-shards", "transpile-without-tokenizer", "bad-float",
        "set-without-value"])
def test_argparse_errors_exit_2(argv, fragment, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(out)] if argv[0] == "data" else argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and fragment in err
    assert not out.exists()


def test_no_command_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    assert "required" in capsys.readouterr().err


# --- data ----------------------------------------------------------------------------------------


def test_data_text_empty_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    out = tmp_path / "shards"
    code = main(["data", "text", str(empty), "--out", str(out)])
    assert_one_error_line(capsys, code, str(empty), "empty")
    assert not out.exists()


def test_data_text_not_utf8(tmp_path, capsys):
    good, bad = tmp_path / "good.txt", tmp_path / "latin1.txt"
    good.write_text("plain text\n" * 50, encoding="utf-8")
    bad.write_bytes("café crème\n".encode("latin-1") * 50)
    out = tmp_path / "shards"
    code = main(["data", "text", str(good), str(bad), "--out", str(out)])
    assert_one_error_line(capsys, code, str(bad), "UTF-8")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.txt", "latin1.txt"]  # no staging left


def test_data_text_builds_shards(tmp_path, capsys):
    text = tmp_path / "a.txt"
    text.write_text("hello byte shards\n" * 100, encoding="utf-8")
    out = tmp_path / "shards"
    assert main(["data", "text", str(text), "--out", str(out), "--val-frac", "0.1"]) == 0
    assert f"wrote byte shards to {out.resolve()}" in capsys.readouterr().out
    assert find_shards(out, "train") and find_shards(out, "val")


def test_data_demo(tmp_path, capsys):
    out = tmp_path / "tmp" / "d"
    code = main(["data", "demo", "--out", str(out), "--train-mb", "0.2", "--val-mb", "0.05"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"wrote byte shards to {out.resolve()}" in captured.out
    info = json.loads(captured.out.split(": ", 1)[1])
    assert info["train_bytes"] == 200_000 and info["val_bytes"] == 50_000
    assert find_shards(out, "train") and find_shards(out, "val")


def test_data_out_is_a_regular_file(tmp_path, capsys):
    out = tmp_path / "d"
    out.write_text("keep me")
    code = main(["data", "demo", "--out", str(out), "--train-mb", "0.2", "--val-mb", "0.05"])
    assert_one_error_line(capsys, code, str(out))
    assert out.read_text() == "keep me"


# --- --help-config ---------------------------------------------------------------------------------


def test_help_config_lists_every_knob(capsys):
    assert main(["train", "--help-config"]) == 0
    text = capsys.readouterr().out
    for name in ("model_dim", "jepa_pure_frac", "swa_start_frac", "regularizer", "eval_steps"):
        assert name in text
    listed = [line.split()[0] for line in text.splitlines() if line.strip()]
    assert listed == [f.name for f in dataclasses.fields(TrainConfig)]


# --- search and retrain: bad input stops before Ray starts ------------------------------------


@pytest.mark.parametrize("name", ["unknown-space", "no-data", "bad-set", "zero-samples", "resume-nothing",
                                  "bad-storage", "bad-space-file"])
def test_search_bad_input_is_one_line_and_writes_nothing(name, demo_data, tmp_path, capsys):
    out = tmp_path / "out"
    space_file = tmp_path / "space.toml"
    space_file.write_text("[params.jepa_pure_frac]\nlow = 0.5\nhigh = 0.1\n")
    base = ["search", "--data", str(demo_data), "--out", str(out)]
    argv, fragments = {
        "unknown-space": (base + ["--space", "curiculum"], ["curiculum"]),
        "no-data": (["search", "--out", str(out)], ["--data"]),
        "bad-set": (base + ["--set", "modl_dim=3"], ["model_dim"]),
        "zero-samples": (base + ["--samples", "0"], ["--samples"]),
        "resume-nothing": (["search", "--resume", "--out", str(out), "--name", "x"], ["not a jepatune sweep"]),
        "bad-storage": (base + ["--storage", "s3:/bucket"], ["--storage"]),
        "bad-space-file": (base + ["--space", str(space_file)], ["jepa_pure_frac"]),
    }[name]
    code = main(argv)
    assert_one_error_line(capsys, code, *fragments)
    assert not out.exists()


def test_retrain_of_a_folder_that_is_not_a_sweep(tmp_path, capsys):
    code = main(["retrain", str(tmp_path)])
    assert_one_error_line(capsys, code, "not a jepatune sweep")
