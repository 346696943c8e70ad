import os

import pytest
import torch

from jepatune.errors import ExportError
from jepatune.trainer.checkpoint import load_checkpoint, save_checkpoint


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/jepatune-checkpoint-marker"


def test_round_trip(tmp_path):
    state = {"step": 3, "model": {"w": torch.ones(2)}, "config": {"eval_steps": (1, 2)}}
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    assert load_checkpoint(tmp_path)["step"] == 3  # a folder means its checkpoint.pt
    back = load_checkpoint(tmp_path / "checkpoint.pt")
    assert back["step"] == 3 and torch.equal(back["model"]["w"], torch.ones(2))
    assert back["config"]["eval_steps"] == (1, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left


def test_refuses_code_missing_and_foreign_files(tmp_path):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    evil = tmp_path / "evil.pt"
    torch.save({"format": "jepatune-checkpoint-v1", "x": RunsCode()}, evil)
    with pytest.raises(ExportError, match="refuses"):
        load_checkpoint(evil)
    assert not os.path.exists(MARKER)
    with pytest.raises(ExportError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"step": 1}, tmp_path / "plain.pt")
    with pytest.raises(ExportError, match="not a jepatune checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ExportError, match="not a readable"):
        load_checkpoint(tmp_path / "cut.pt")
