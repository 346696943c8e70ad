"""`jepatune demo`, the README's main command, end to end at its smoke-test size."""

import re

import pandas as pd

from jepatune.analysis.finalists import conclusion
from jepatune.cli import SMOKE_SWEEP, main
from jepatune.trainer.config import load_config


def test_the_demo_ends_with_its_answer_in_words(tmp_path, capsys, local_ray):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--smoke-test"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    folder = out / "sweep"
    tables = {name: pd.read_parquet(folder / "tables" / f"{name}.parquet")
              for name in ("trials", "final", "finalists")}
    assert len(tables["trials"]) == SMOKE_SWEEP["samples"]
    finalists = tables["finalists"]
    # the finalists and the reference, each with every retrain seed
    assert set(finalists["recipe"]) >= {"reference"} and finalists["finalist"].sum() == SMOKE_SWEEP["finalists"]
    assert (finalists["n"] == SMOKE_SWEEP["final_seeds"]).all()
    assert (tables["final"]["steps"] == SMOKE_SWEEP["final_steps"]).all()
    winner = finalists[finalists["winner"]].iloc[0]
    assert winner["mean"] == finalists["mean"].min()
    # The last line is the answer, in words, and it is the report's first statement too.
    sentence = conclusion(finalists)
    assert printed[-1] == sentence
    best = r"finalist-\d \(trial \w+, best.toml\) has the best retrain mean"
    assert re.match(rf"(Use finalist-\d|{best}|Keep the reference)", sentence) and "95% CI" in sentence
    assert ("not significant" in sentence) != ("significant: the interval excludes 0" in sentence)
    report = (folder / "report.md").read_text()
    assert sentence in "\n".join(report.splitlines()[:8])
    # best.toml is the winner's recipe, at the retrain budget
    best = load_config(folder / "best.toml")
    row = tables["trials"].set_index("trial_id").loc[winner["trial_id"]]
    assert best.jepa_pure_frac == row["jepa_pure_frac"] and best.iterations == SMOKE_SWEEP["final_steps"]
