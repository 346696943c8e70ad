"""The ByteJEPA model: a byte-level U-net GPT with a JEPA predictor head.

State-dict names and shapes are the reference's, so its checkpoints load with
strict=True. At the defaults the model has 17,190,984 parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jepatune.trainer import losses
from jepatune.trainer.config import TrainConfig

# Parameters that stay fp32 under bf16, go to Adam rather than Muon, and stay fp32 in
# the int8 artifact. Matched as substrings of the state-dict name, like the reference.
CONTROL_TENSOR_PATTERNS = ("attn_scale", "attn_scales", "mlp_scale", "mlp_scales", "resid_mix",
                           "resid_mixes", "q_gain", "skip_weight", "skip_weights")


def is_control(name: str) -> bool:
    return any(p in name for p in CONTROL_TENSOR_PATTERNS)


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """Weights stay fp32 (for the optimiser); they are cast to the activation dtype at matmul time."""

    def __init__(self, fan_in: int, fan_out: int, zero_init: bool = False):
        super().__init__(fan_in, fan_out, bias=False)
        self.zero_init = zero_init

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class Rotary(nn.Module):
    """RoPE tables, cached per sequence length and device."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple[int, torch.device, Tensor, Tensor] | None = None

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if self._cache is None or self._cache[0] != seq_len or self._cache[1] != device:
            # Positions in the frequencies' dtype, as the reference: fp32, or bf16 after its cast.
            t = torch.arange(seq_len, device=device, dtype=self.inv_freq.dtype)
            freqs = torch.outer(t, self.inv_freq.to(device))
            self._cache = (seq_len, device, freqs.cos()[None, None], freqs.sin()[None, None])  # (1, 1, T, hd/2)
        return self._cache[2].to(dtype), self._cache[3].to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Split-half RoPE: (x1, x2) -> (x1 cos + x2 sin, -x1 sin + x2 cos)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, c: TrainConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        kv_dim = c.num_kv_heads * c.head_dim
        self.c_q = CastedLinear(c.model_dim, c.model_dim)
        self.c_k = CastedLinear(c.model_dim, kv_dim)
        self.c_v = CastedLinear(c.model_dim, kv_dim)
        self.proj = CastedLinear(c.model_dim, c.model_dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((c.num_heads,), c.qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(c.head_dim, c.rope_base)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q = self.c_q(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.c_k(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.c_v(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rms_norm(q), rms_norm(k)
        cos, sin = self.rotary(T, x.device, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    """relu(x)^2 MLP."""

    def __init__(self, c: TrainConfig):
        super().__init__()
        self.fc = CastedLinear(c.model_dim, c.mlp_mult * c.model_dim)
        self.proj = CastedLinear(c.mlp_mult * c.model_dim, c.model_dim, zero_init=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(torch.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, c: TrainConfig):
        super().__init__()
        self.attn = CausalSelfAttention(c)
        self.mlp = MLP(c)
        self.attn_scale = nn.Parameter(torch.ones(c.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(c.model_dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(c.model_dim), torch.zeros(c.model_dim))))

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x))
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x))


class Predictor(nn.Module):
    """The JEPA head: predicts the next position's hidden state from the current one."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = CastedLinear(dim, dim)
        self.proj = CastedLinear(dim, dim, zero_init=True)

    def forward(self, h: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(rms_norm(h))))


class GPT(nn.Module):
    def __init__(self, c: TrainConfig):
        super().__init__()
        self.logit_softcap = c.logit_softcap
        self.regularizer, self.varcov_cov_weight, self.lejepa_points = (
            c.regularizer, c.varcov_cov_weight, c.lejepa_points)
        self.num_encoders = c.num_layers // 2
        self.num_decoders = c.num_layers - self.num_encoders
        self.tok_emb = nn.Embedding(c.vocab_size, c.model_dim)
        self.skip_weights = nn.Parameter(torch.ones(min(self.num_encoders, self.num_decoders), c.model_dim))
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.lm_head = None if c.tie_embeddings else CastedLinear(c.model_dim, c.vocab_size, zero_init=True)
        self.predictor = Predictor(c.model_dim)
        if c.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=c.tied_embed_init_std)
        for m in self.modules():
            if isinstance(m, CastedLinear) and m.zero_init:
                nn.init.zeros_(m.weight)

    def hidden(self, input_ids: Tensor) -> Tensor:
        """Final hidden states (B, T, D), after the final RMS norm."""
        x = x0 = rms_norm(self.tok_emb(input_ids))
        skips = []
        for block in self.blocks[: self.num_encoders]:
            x = block(x, x0)
            skips.append(x)
        for i, block in enumerate(self.blocks[self.num_encoders:]):
            if i < len(self.skip_weights):
                x = x + self.skip_weights[i].to(x.dtype) * skips.pop()
            x = block(x, x0)
        return rms_norm(x)

    def cross_entropy(self, h: Tensor, target_ids: Tensor) -> Tensor:
        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h, weight.to(h.dtype))
        logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), target_ids.reshape(-1))

    def regularization(self, h: Tensor, sigreg_dirs: Tensor | None, sigreg_rows: Tensor | None) -> Tensor:
        if self.regularizer == "varcov":
            return losses.varcov(h, self.varcov_cov_weight)
        if self.regularizer == "lejepa":
            assert sigreg_dirs is not None, "lejepa needs its random directions"
            return losses.lejepa_sigreg(h, sigreg_dirs, sigreg_rows, self.lejepa_points)
        return h.new_zeros((), dtype=torch.float32)

    def forward(self, input_ids: Tensor, target_ids: Tensor, weights: Tensor | None = None, stage: int = 3,
                sigreg_dirs: Tensor | None = None, sigreg_rows: Tensor | None = None):
        """Plain CE when `weights` is None (evaluation). In training, `weights` holds the loss
        weights in LOSS_ORDER (jepa, reg, ce) and `stage` says which losses to compute (1 = no CE,
        3 = CE only); returns (total loss, the detached losses stacked in LOSS_ORDER)."""
        h = self.hidden(input_ids)
        if weights is None:
            return self.cross_entropy(h, target_ids)
        zero = h.new_zeros((), dtype=torch.float32)
        if stage == 3:
            jepa = reg = zero
        else:
            jepa = losses.jepa_loss(self.predictor(h[:, :-1]), h[:, 1:])
            reg = self.regularization(h, sigreg_dirs, sigreg_rows)
        # CE after the other two, as the reference: backward sums the gradients reaching `h` in the
        # reverse of the order the branches were built, and another order differs in the last bits.
        ce = self.cross_entropy(h, target_ids) if stage >= 2 else zero
        parts = losses.Losses(jepa, reg, ce)
        return losses.weighted_sum(weights, parts), torch.stack([p.detach() for p in parts])


def build_model(config: TrainConfig) -> GPT:
    """The model on CPU in fp32, initialised from `config.seed`'s current torch RNG state."""
    return GPT(config)


def apply_reference_bf16_cast(model: GPT, config: TrainConfig) -> None:
    """What the reference's `model.bfloat16()` (then its linear weights back to fp32, its control
    tensors too) leaves behind, for a bf16 run: the embedding in bf16 (its only bf16 parameter),
    and, each behind its switch, RoPE's inverse frequencies in bf16 (`bf16_rope`: the positions
    follow, so long sequences share positions) and every linear weight rounded to bf16 once
    (`bf16_init_round`). The loss weights (`bf16_loss_weights`) are the trainer's."""
    model.tok_emb.to(torch.bfloat16)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Rotary) and config.bf16_rope:
                m.inv_freq = m.inv_freq.to(torch.bfloat16)
                m._cache = None
            if isinstance(m, CastedLinear) and config.bf16_init_round:
                m.weight.copy_(m.weight.to(torch.bfloat16).float())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
