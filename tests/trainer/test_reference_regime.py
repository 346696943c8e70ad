"""The regime the reference really runs in: the side effects of its `model.bfloat16()` call, each
behind its switch (and each switch changing what it says and nothing else), and its SWA clock."""

from pathlib import Path

import pytest
import torch

from jepatune.trainer.loop import Trainer
from jepatune.trainer.losses import LOSS_ORDER
from jepatune.trainer.model import CastedLinear, Rotary, apply_reference_bf16_cast, build_model

BF16_005 = 0.050048828125  # 0.05 in bf16
REG = LOSS_ORDER.index("reg")


def cast_model(config, **switches):
    torch.manual_seed(config.seed)
    model = build_model(config.replace(**switches))
    apply_reference_bf16_cast(model, config.replace(**switches))
    return model


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in model.named_parameters()}


def test_bf16_rope_keeps_few_distinct_positions_at_long_sequences(tiny):
    long = tiny.replace(train_seq_len=4096, train_batch_tokens=8192, val_batch_size=8192, val_tokens=8192)
    rope = cast_model(long).blocks[0].attn.rotary
    fixed = cast_model(long, bf16_rope=False).blocks[0].attn.rotary
    assert rope.inv_freq.dtype == torch.bfloat16 and fixed.inv_freq.dtype == torch.float32
    positions = torch.arange(4096, dtype=rope.inv_freq.dtype)
    assert len(torch.unique(positions)) < 800  # integers above 256 collapse in bf16's 8-bit mantissa
    assert torch.equal(positions[:257].float(), torch.arange(257.0))  # below that they are exact
    cos, _ = rope(4096, torch.device("cpu"), torch.float32)
    cos32, _ = fixed(4096, torch.device("cpu"), torch.float32)
    assert (cos[..., 1024:, :] - cos32[..., 1024:, :]).abs().max() > 1.0  # far off beyond position 1024


def test_each_cast_switch_changes_what_it_says_and_nothing_else(tiny):
    reference = cast_model(tiny)
    no_rope, no_round = cast_model(tiny, bf16_rope=False), cast_model(tiny, bf16_init_round=False)
    # bf16_rope: the tables only; every parameter as with the switch on
    assert all(torch.equal(a, b) for a, b in zip(params(reference).values(), params(no_rope).values(), strict=True))
    # bf16_init_round: the linear weights only, which are the unrounded ones rounded to bf16
    linear = {f"{n}.weight" for n, m in reference.named_modules() if isinstance(m, CastedLinear)}
    for name, value in params(reference).items():
        exact = params(no_round)[name]
        if name in linear:
            assert torch.equal(value, exact.to(torch.bfloat16).float()), name
        else:
            assert torch.equal(value, exact), name
    assert any(not torch.equal(params(reference)[n], params(no_round)[n]) for n in linear)
    rotaries = [m for m in no_round.modules() if isinstance(m, Rotary)]
    assert all(r.inv_freq.dtype == torch.bfloat16 for r in rotaries)  # untouched by the other switch
    assert reference.tok_emb.weight.dtype == torch.bfloat16  # the reference's one bf16 parameter, always


def first_average_step(config) -> int:
    """The trainer's step count when its weight average first exists."""
    run = Trainer(config)
    while run.state.swa is None:
        run.train_step(elapsed=0.0)
    return run.state.step


def test_swa_starts_with_the_first_step_that_ends_past_its_start(tiny):
    # SWA start 0.5 of 12 steps: the reference reads its clock after each step, so the step that
    # brings it to 6 / 12 (the sixth) starts the average.
    assert tiny.swa_start == 0.5 and tiny.iterations == 12
    assert first_average_step(tiny) == 6
    assert first_average_step(tiny.replace(swa_start_frac=0.75)) == 9


def test_bf16_loss_weights_round_the_curriculum_weights(tiny):
    bf16 = Trainer(tiny.replace(precision="bf16", sigreg_weight=0.05))
    bf16.train_step(elapsed=0.0)  # stage 1: (jepa_weight, sigreg_weight, 0)
    assert bf16.loss_weights.dtype == torch.bfloat16 and bf16.loss_weights[REG].item() == BF16_005
    fp32 = Trainer(tiny.replace(precision="bf16", sigreg_weight=0.05, bf16_loss_weights=False))
    fp32.train_step(elapsed=0.0)
    assert fp32.loss_weights.dtype == torch.float32 and fp32.loss_weights[REG].item() == pytest.approx(0.05, abs=1e-9)
    # the switch changes the weights, not the model it starts from
    assert all(torch.equal(a, b) for a, b in zip(params(Trainer(tiny.replace(precision="bf16")).model).values(),
                                                 params(Trainer(tiny.replace(
                                                     precision="bf16", bf16_loss_weights=False)).model).values(),
                                                 strict=True))
    # and under fp32 precision none of the cast's effects apply
    plain = Trainer(tiny.replace(precision="fp32"))
    assert plain.loss_weights.dtype == torch.float32 and plain.model.tok_emb.weight.dtype == torch.float32


def test_the_code_counted_against_the_cap_is_what_a_run_imports():
    import importlib.util
    import subprocess
    import sys

    from jepatune.trainer import loop
    from jepatune.trainer.final import RUN_MODULES

    out = subprocess.run([sys.executable, "-c", "import sys, jepatune.trainer.loop; print(' '.join(sorted("
                          "n for n in sys.modules if n == 'jepatune' or n.startswith('jepatune.'))))"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == sorted(RUN_MODULES) and "jepatune.corpora" not in out  # data building ships not
    assert loop.trainer_code_bytes() == sum(Path(importlib.util.find_spec(m).origin).stat().st_size for m in out)
    # Every module of trainer/ is the run's own code: data building lives outside it.
    trainer_modules = {f"jepatune.trainer.{p.stem}" for p in Path(loop.__file__).parent.glob("*.py")}
    assert trainer_modules - {"jepatune.trainer.__init__"} <= set(out)
