"""The `jepatune` command: run in-process through `main()`, and once as a real process. Its answers
to bad input are in tests/test_bad_input.py."""

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

import pytest
from conftest import TINY, tiny_sets

from jepatune.cli import main
from jepatune.trainer.config import TrainConfig, load_config
from jepatune.trainer.data import find_shards

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "optuna", "pandas")


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) with its stdout and stderr captured (for module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


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


# --- data ----------------------------------------------------------------------------------------


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


# --- --help-config ---------------------------------------------------------------------------------


def test_help_config_lists_every_knob(capsys):
    assert main(["train", "--help-config"]) == 0
    text = capsys.readouterr().out
    for name in ("model_dim", "jepa_pure_frac", "swa_start_frac", "regularizer", "eval_steps"):
        assert name in text
    listed = [line.split()[0] for line in text.splitlines() if line.strip()]
    assert listed == [f.name for f in dataclasses.fields(TrainConfig)]
