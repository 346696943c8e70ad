"""jepatune's default run against golden data from the reference itself (tests/data/reference_golden.json,
made by `python bench/reference_golden.py`: the seed's own main() on CPU at a tiny shape, its clock
fixed to one second per step), in fp32 and in bf16 autocast.

Everything is equal, in fp32 and in bf16: every step's train loss to the bit (measured as the golden
data measures the reference's: the mean, in float64, of the loss each micro-batch's forward
returns), the step the weight average starts at, the final val_bpb after the int8+zlib round trip
(to the 8 decimals the reference prints), and the artifact's bytes (its sha256). That holds only
with the same init, the same bf16 cast and its side effects, the same forward, the same optimisers,
and the same order of every floating-point sum, the order in which backward adds up the gradients
of the three losses included.
"""

import hashlib
import json
from pathlib import Path

import pytest

from jepatune.corpora import build_demo
from jepatune.trainer.config import TrainConfig
from jepatune.trainer.export import ARTIFACT_NAME
from jepatune.trainer.loop import Trainer, train
from jepatune.trainer.model import GPT

GOLDEN = json.loads((Path(__file__).parents[1] / "data" / "reference_golden.json").read_text())


@pytest.fixture(scope="module")
def golden_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("golden") / "data"
    build_demo(data, **GOLDEN["corpus"])
    return data


def run(data, precision: str, monkeypatch, out_dir: Path):
    """(each step's train loss, the trainer's step when its average first exists, the final summary)."""
    micro, swa_from = [], []
    step, forward = Trainer.train_step, GPT.forward

    def recorded_forward(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            micro.append(float(out[0].detach().float()))
        return out

    def recorded_step(self, elapsed, branch=None):
        step(self, elapsed, branch)
        if self.state.swa is not None and not swa_from:
            swa_from.append(self.state.step)

    monkeypatch.setattr(GPT, "forward", recorded_forward)
    monkeypatch.setattr(Trainer, "train_step", recorded_step)
    config = TrainConfig(data_path=str(data), precision=precision, **GOLDEN["jepatune_knobs"])
    result = train(config, out_dir=out_dir)
    accum = config.grad_accum_steps
    losses = [sum(micro[i:i + accum]) / accum for i in range(0, len(micro), accum)]
    return losses, swa_from[0], result.summary


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_default_run_is_the_reference_s_to_the_bit(precision, golden_data, monkeypatch, tmp_path):
    ref = GOLDEN["runs"][precision]
    losses, swa_from, summary = run(golden_data, precision, monkeypatch, tmp_path)
    assert len(losses) == len(ref["train_loss"]) == GOLDEN["jepatune_knobs"]["iterations"]
    assert losses == ref["train_loss"]
    assert f"swa_started: step:{swa_from} " in ref["swa_started"] + " "  # the average starts where the reference's does
    assert round(summary["val_bpb"], 8) == ref["val_bpb"]  # the reference prints it with 8 decimals
    artifact = (tmp_path / ARTIFACT_NAME).read_bytes()
    assert hashlib.sha256(artifact).hexdigest() == ref["artifact_sha256"]
