"""Outputs stay whole under SIGKILL: the tables of a real sweep folder, a checkpoint and an artifact
are rewritten in a loop by a process killed at random moments and mid-write; after every kill each
output present reads back complete, and a cut write leaves only a hidden temporary file that no
reader takes for a result. A retrain run again trains only what it has not finished."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pytest

from jepatune.analysis import schema
from jepatune.analysis.tables import load_tables, write_tables
from jepatune.experiment.layout import TABLES_DIR, append_jsonl, read_jsonl

# Pays the imports once, then forks one writer per line read: the writer rewrites its outputs until it
from jepatune.experiment.settings import SweepSettings
from jepatune.search.sweep import run_sweep

# is killed; its pid goes out first, then a line once it is reaped (so no write comes after that line).
WRITERS = r"""
import os, sys
import torch
from jepatune.analysis.tables import write_tables
from jepatune.experiment.layout import DECISIONS_NAME  # write_tables imports it: pay it here
from jepatune.trainer.checkpoint import save_checkpoint
from jepatune.trainer.config import PRESETS, TrainConfig
from jepatune.trainer.export import write_artifact
from jepatune.trainer.model import build_model

mode, folder = sys.argv[1], sys.argv[2]
state = build_model(TrainConfig(**PRESETS["demo"])).state_dict()


def write_forever():
    while True:
        if mode == "tables":
            write_tables(folder)
        else:
            save_checkpoint(os.path.join(folder, "checkpoint.pt"), {"step": 7, "model": state})
            write_artifact(state, os.path.join(folder, "final_model.int8.ptz"))


for _ in sys.stdin:
    pid = os.fork()
    if pid == 0:
        write_forever()
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


class Writers:
    """The forking writer process above; `kill_one` starts a writer and SIGKILLs it."""

    def __init__(self, mode: str, folder: Path):
        self.folder = folder
        self.proc = subprocess.Popen([sys.executable, "-c", WRITERS, mode, str(folder)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def __enter__(self) -> Writers:
        return self

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait()

    def temp_files(self) -> set[Path]:
        return set(self.folder.rglob(".tmp-*"))

    def kill_one(self, delay: float | None) -> bool:
        """Kill a writer after `delay` seconds, or (None) as soon as a new temporary file shows, that
        is mid-write. Returns whether the kill left a cut write behind."""
        before = self.temp_files()
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        pid = int(self.proc.stdout.readline())
        if delay is not None:
            time.sleep(delay)
        else:
            deadline = time.monotonic() + 60
            while not self.temp_files() - before:
                assert time.monotonic() < deadline, "the writer wrote nothing in 60 s"
                time.sleep(0.0005)
        os.kill(pid, signal.SIGKILL)
        assert self.proc.stdout.readline().strip() == "reaped"
        return bool(self.temp_files() - before)


def _kill_repeatedly(writers: Writers, check: Callable[[], None], kills: int, seed: int) -> int:
    """Half the kills at random moments, half mid-write; `check` after each. Returns the cut writes."""
    rng = random.Random(seed)
    cut = 0
    for i in range(kills):
        cut += writers.kill_one(rng.uniform(0.0, 1.0) if i % 2 else None)
        check()
    return cut


def _only_hidden_temp_files(folder: Path, results: set[str]) -> None:
    names = {p.name for p in folder.iterdir()}
    assert names - results <= {n for n in names if n.startswith(".tmp-")}, names


@pytest.fixture(scope="module")
def swept(tmp_path_factory, demo_data, sweep_knobs, local_ray) -> Path:
    out = tmp_path_factory.mktemp("reliability")
    settings = SweepSettings(data=str(demo_data), out=str(out), samples=3, trial_steps=8, grace_steps=4,
                             concurrency=2, overrides=sweep_knobs, final_seeds=1)
    run_sweep(settings)
    return settings.folder


@pytest.mark.slow
def test_tables_killed_mid_write_stay_whole(swept):
    tables = swept / TABLES_DIR
    expected = {name: pd.read_parquet(path) for name, path in write_tables(swept).items()}
    results = {f"{name}.parquet" for name in schema.TABLES}

    def check() -> None:
        for name, frame in expected.items():  # the folder does not change: every rewrite is the same table
            assert pd.read_parquet(tables / f"{name}.parquet").equals(frame), name
        _only_hidden_temp_files(tables, results)
        # A folder reader (pyarrow, pandas, DuckDB, Polars) skips hidden files: the temp is no result.
        assert {Path(f).name for f in ds.dataset(tables, format="parquet").files} == results

    with Writers("tables", swept) as writers:
        cut = _kill_repeatedly(writers, check, kills=8, seed=1)
    print(f"tables: 8 kills, {cut} of them mid-write")
    assert cut >= 1, "no kill landed mid-write"
    assert {name: len(frame) for name, frame in load_tables(swept).items()} == {
        name: len(frame) for name, frame in expected.items()}


@pytest.mark.slow
def test_checkpoint_and_artifact_killed_mid_write_stay_whole(tmp_path):
    from jepatune.trainer.checkpoint import load_checkpoint
    from jepatune.trainer.export import read_artifact

    shapes: dict = {}

    def check() -> None:
        _only_hidden_temp_files(tmp_path, {"checkpoint.pt", "final_model.int8.ptz"})
        if (tmp_path / "checkpoint.pt").exists():
            state = load_checkpoint(tmp_path / "checkpoint.pt")
            assert state["step"] == 7
            shapes.setdefault("model", {k: v.shape for k, v in state["model"].items()})
        if (tmp_path / "final_model.int8.ptz").exists():
            artifact = read_artifact(tmp_path / "final_model.int8.ptz")
            assert {k: v.shape for k, v in artifact.items()} == shapes.get("model", {k: v.shape for k, v in
                                                                                   artifact.items()})

    with Writers("artifact", tmp_path) as writers:
        cut = _kill_repeatedly(writers, check, kills=8, seed=2)
    print(f"checkpoint and artifact: 8 kills, {cut} of them mid-write")
    assert cut >= 1, "no kill landed mid-write"
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "final_model.int8.ptz").exists()


def test_retrain_skips_a_finished_run_and_trains_a_new_budget(tiny, tmp_path, local_ray):
    from jepatune.experiment.layout import FINAL_DIR, RUNS_NAME
    from jepatune.experiment.store import Store
    from jepatune.search.retrain import retrain

    runs = tmp_path / FINAL_DIR / RUNS_NAME
    seeds = [tiny.seed + 1]
    first = retrain(Store(tmp_path), {"recipe": tiny.replace(iterations=4)}, seeds, 1, 0, log=lambda _: None)
    lines = runs.read_text()
    store = Store(tmp_path)
    again = retrain(store, {"recipe": tiny.replace(iterations=4)}, seeds, 1, 0, log=pytest.fail)  # nothing to train
    assert runs.read_text() == lines and again.equals(first) and len(first) == 1
    longer = retrain(Store(tmp_path), {"recipe": tiny.replace(iterations=6)}, seeds, 1, 0, log=lambda _: None)
    assert list(longer["steps"]) == [6] and len(read_jsonl(runs)) == 2  # both kept, only the new one returned
    metrics = (tmp_path / FINAL_DIR / f"recipe-seed{seeds[0]}" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["step"] for m in metrics] == [0, 4, 6, 6]  # the folder holds the new run alone


def test_a_retrain_row_after_a_cut_line_stays_readable(tmp_path):
    runs = tmp_path / "runs.jsonl"
    runs.write_text(json.dumps({"recipe": "best", "seed": 0}) + "\n" + '{"recipe": "best", "se')  # cut mid-line
    append_jsonl(runs, {"recipe": "best", "seed": 1})
    append_jsonl(runs, {"recipe": "reference", "seed": 0})
    assert read_jsonl(runs) == [{"recipe": "best", "seed": 0}, {"recipe": "best", "seed": 1},
                                {"recipe": "reference", "seed": 0}]
