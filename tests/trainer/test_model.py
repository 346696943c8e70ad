import math

import pytest
import torch

from jepatune.trainer.config import TrainConfig
from jepatune.trainer.losses import Losses
from jepatune.trainer.model import build_model, count_parameters

# The reference's state dict at its defaults (bytejepa.md): name -> shape, for one block.
BLOCK_SHAPES = {
    "attn_scale": (512,), "mlp_scale": (512,), "resid_mix": (2, 512), "attn.q_gain": (8,),
    "attn.c_q.weight": (512, 512), "attn.c_k.weight": (256, 512), "attn.c_v.weight": (256, 512),
    "attn.proj.weight": (512, 512), "mlp.fc.weight": (1024, 512), "mlp.proj.weight": (512, 1024),
}


def reference_shapes(num_layers=9):
    shapes = {"tok_emb.weight": (256, 512), "skip_weights": (4, 512),
              "predictor.fc.weight": (512, 512), "predictor.proj.weight": (512, 512)}
    for i in range(num_layers):
        shapes.update({f"blocks.{i}.{k}": v for k, v in BLOCK_SHAPES.items()})
    return shapes


def test_state_dict_names_shapes_and_parameter_count():
    model = build_model(TrainConfig())
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == reference_shapes()
    assert count_parameters(model) == 17_190_984


def test_a_reference_state_dict_loads_strictly():
    # A state dict made only from the reference's names and shapes, as its checkpoints are.
    sd = {k: torch.randn(s) for k, s in reference_shapes().items()}
    build_model(TrainConfig()).load_state_dict(sd, strict=True)


def test_untied_embeddings_add_a_zero_initialised_head():
    model = build_model(TrainConfig(tie_embeddings=False))
    assert tuple(model.lm_head.weight.shape) == (256, 512)
    assert model.lm_head.weight.abs().sum() == 0


def test_init_follows_the_reference():
    torch.manual_seed(0)
    model = build_model(TrainConfig())
    assert model.tok_emb.weight.std().item() == pytest.approx(0.005, rel=0.05)
    for i in range(9):
        assert model.blocks[i].attn.proj.weight.abs().sum() == 0
        assert model.blocks[i].mlp.proj.weight.abs().sum() == 0
    assert model.predictor.proj.weight.abs().sum() == 0
    assert torch.equal(model.blocks[0].resid_mix[1], torch.zeros(512))
    assert torch.equal(model.skip_weights, torch.ones(4, 512))


def test_losses_at_init():
    torch.manual_seed(0)
    c = TrainConfig(num_layers=4, model_dim=128, num_heads=4, num_kv_heads=2)
    model = build_model(c)
    x = torch.randint(0, 256, (4, 64))
    y = torch.randint(0, 256, (4, 64))
    ce = model(x, y).item()
    assert ce == pytest.approx(math.log(256), abs=0.05)  # near-uniform logits at init
    # weights and losses in their one order, (jepa, reg, ce)
    total, parts = model(x, y, torch.tensor([1.0, 1.0, 1.0]), stage=2)
    assert Losses(*parts).ce.item() == pytest.approx(ce)
    assert Losses(*parts).jepa.item() == pytest.approx(1.0, abs=0.02)  # zero-init predictor vs unit-RMS targets
    assert total.item() == pytest.approx(parts.sum().item(), rel=1e-5)
    # stage 1 skips CE, stage 3 skips the JEPA path
    _, p1 = model(x, y, torch.tensor([1.0, 0.05, 0.0]), stage=1)
    _, p3 = model(x, y, torch.tensor([0.0, 0.0, 1.0]), stage=3)
    p1, p3 = Losses(*p1), Losses(*p3)
    assert p1.ce == 0 and p1.jepa > 0 and p3.jepa == 0 and p3.reg == 0 and p3.ce == pytest.approx(ce)


def test_jepa_target_gets_no_gradient():
    torch.manual_seed(0)
    model = build_model(TrainConfig(num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1))
    torch.nn.init.normal_(model.predictor.proj.weight, std=0.1)
    h = model.hidden(torch.randint(0, 256, (2, 16)))
    from jepatune.trainer.losses import jepa_loss

    target = h[:, 1:]
    loss = jepa_loss(model.predictor(h[:, :-1].detach()), target)
    loss.backward()
    assert model.tok_emb.weight.grad is None  # only the predictor side got gradient
