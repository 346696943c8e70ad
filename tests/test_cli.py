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
    """One uninterrupted run of 8 steps (evaluations at 0, 4, 8), and a copy of the checkpoint its
    evaluation at step 4 wrote (the trainer overwrites OUT/checkpoint.pt at each one)."""
    from jepatune.trainer import loop

    root = tmp_path_factory.mktemp("cli")
    out, mid = root / "tmp" / "run", root / "checkpoint-step4.pt"
    argv = ["train", "--data", str(demo_data), *tiny_sets(), "--set", "iterations=8", "--out", str(out)]

    def save_and_keep_step_4(path, state):
        saved = save_checkpoint(path, state)
        if state["step"] == 4:
            shutil.copy(saved, mid)
        return saved

    save_checkpoint = loop.save_checkpoint
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "save_checkpoint", save_and_keep_step_4)
        code, stdout, stderr = run_main(argv)
    expected = TrainConfig(**{**TINY, "iterations": 8, "data_path": str(demo_data.resolve())})
    return dict(out=out, mid=mid, argv=argv, code=code, stdout=stdout, stderr=stderr, config=expected)


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


def _measured(row: dict) -> dict:
    """A metrics row without what measures the machine (times, memory) or names a path."""
    return {k: v for k, v in row.items()
            if not k.startswith("time_") and k not in ("elapsed_s", "peak_mem_mib", "checkpoint")}


def test_train_resume_mid_run_continues_as_the_uninterrupted_run(trained, tmp_path):
    """OUT as the run left it when killed after its step-4 evaluation, resumed with --resume: steps 5..8
    are trained again from the checkpoint and end where the uninterrupted run ended."""
    assert trained["code"] == 0 and trained["mid"].is_file()
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(trained["out"] / "config.toml", out)
    shutil.copy(trained["mid"], out / "checkpoint.pt")
    full = [json.loads(line) for line in (trained["out"] / "metrics.jsonl").read_text().splitlines()]
    before = [row for row in full if row["step"] <= 4 and not row.get("final")]
    (out / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in before))
    argv = [a if a != str(trained["out"]) else str(out) for a in trained["argv"]] + ["--resume"]
    code, stdout, stderr = run_main(argv)
    assert code == 0, stderr
    assert f"resumed from {out / 'checkpoint.pt'} at step 4" in stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], bool(r.get("final"))) for r in rows] == [(0, False), (4, False), (8, False), (8, True)]
    # The same losses, curriculum, LR and scores at step 8 and in the summary as without the interruption.
    assert [_measured(r) for r in rows] == [_measured(r) for r in full]
    s, first = (json.loads((d / "summary.json").read_text()) for d in (out, trained["out"]))
    assert s["status"] == "completed" and s["step"] == 8 and s["val_bpb"] == first["val_bpb"]
    assert (out / "final_model.int8.ptz").read_bytes() == (trained["out"] / "final_model.int8.ptz").read_bytes()


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


# --- settings: one source for the options, the TOML file and the defaults -------------------

def test_search_options_are_the_settings_fields_with_their_defaults():
    from jepatune.cli import build_parser
    from jepatune.experiment.settings import SweepSettings

    search = build_parser()._subparsers._group_actions[0].choices["search"]
    options = {a.dest: a for a in search._actions}
    for f in dataclasses.fields(SweepSettings):
        assert f.name in options, f.name
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if default not in (None, "", (), {}):
            assert f"(default: {default})" in options[f.name].help, f.name


def test_search_config_file_then_options(tmp_path):
    from jepatune.cli import _sweep_settings, build_parser

    config = tmp_path / "sweep.toml"
    config.write_text('samples = 64\ntrial_steps = 300\nfidelity = "probe"\n[overrides]\nmodel_dim = 64\n'
                      'num_layers = 2\n')
    args = build_parser().parse_args(["search", "--config", str(config), "--data", str(tmp_path), "--samples", "8",
                                      "--set", "num_layers=3", "--no-pruning"])
    settings = _sweep_settings(args)
    assert (settings.samples, settings.trial_steps, settings.fidelity, settings.scheduler) == (8, 300, "probe", "none")
    assert settings.overrides == {"model_dim": 64, "num_layers": "3"}  # the file's table, then --set on top
    assert settings.data == str(tmp_path.resolve()) and settings.name == "sweep"  # the rest: the defaults


@pytest.mark.parametrize("text, expected", [
    ("sampels = 8\n", ["unknown setting 'sampels'", "did you mean samples?"]),
    ('samples = "many"\n', ["samples='many'", "expected int"]),
    ("overrides = 3\n", ["overrides must be a table"]),
])
def test_search_config_file_errors_are_one_line(tmp_path, text, expected):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    code, out, err = run_main(["search", "--config", str(config), "--data", str(tmp_path)])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert all(e in err for e in expected), err
    assert not (tmp_path / "runs").exists() and not Path("runs/sweep/sweep.json").exists()


def test_ablate_names_a_set_of_variants_variants_and_a_model_preset_preset(tmp_path):
    code, _, err = run_main(["ablate", "--data", str(tmp_path), "--preset", "swa", "--out", str(tmp_path)])
    assert code == 2 and "--preset 'swa' is unknown (a set of variants: give --variants swa)" in err, err
    code, _, err = run_main(["ablate", "--data", str(tmp_path), "--variants", "nope", "--out", str(tmp_path)])
    assert code == 2 and "--variants 'nope' is unknown; choose one of jepa-vs-ce, regularizer, swa" in err, err
