"""Parameter count and artifact size of a `TrainConfig`, by arithmetic on its shapes.

The search must rule out shapes that cannot fit the 16 MB cap before training them, and
must do it without torch: these functions mirror the state dict of
`jepatune.trainer.model.GPT` and the rules of `jepatune.trainer.export` (tests check both).
"""

from __future__ import annotations

from jepatune.trainer.config import TrainConfig

# export.py imports torch, so its constants are duplicated here (a test keeps them equal).
SIZE_CAP_BYTES = 16_000_000
KEEP_FLOAT_MAX_NUMEL = 65_536
CONTROL_TENSOR_PATTERNS = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight")
DEFAULT_CODE_BYTES = 110_000  # about the trainer's source; the search passes the real number

# torch.save's zip + pickle framing around the payload, as an upper bound fitted on models
# from 1x32 to 16x64 and 9x512 (tests/spaces check it): a fixed part, one zip entry per
# storage (headers, 64-byte alignment, pickle record), the tensor names in the pickle and
# the central directory, and the dtype/qmeta records of each quantised tensor.
FRAMING_FIXED = 700
FRAMING_PER_STORAGE = 260
FRAMING_PER_NAME_CHAR = 3
FRAMING_PER_QUANTIZED = 60

# zlib on trained int8 weights: the reference's 15,080,959 bytes are 0.869 of its
# uncompressed payload plus framing. A shape is only ruled out when it cannot fit even at
# a slightly better ratio, so a borderline shape gets trained and measured for real.
BEST_ZLIB_RATIO = 0.85


def tensor_shapes(config: TrainConfig, *, predictor: bool = True) -> dict[str, tuple[int, ...]]:
    """State-dict names and shapes of the model `config` builds (predictor optional)."""
    d, L, hd = config.model_dim, config.num_layers, config.head_dim
    kv, hidden = config.num_kv_heads * hd, config.mlp_mult * d
    shapes: dict[str, tuple[int, ...]] = {
        "tok_emb.weight": (config.vocab_size, d),
        "skip_weights": (min(L // 2, L - L // 2), d),
    }
    for i in range(L):
        p = f"blocks.{i}."
        shapes.update({
            p + "attn_scale": (d,), p + "mlp_scale": (d,), p + "resid_mix": (2, d),
            p + "attn.c_q.weight": (d, d), p + "attn.c_k.weight": (kv, d), p + "attn.c_v.weight": (kv, d),
            p + "attn.proj.weight": (d, d), p + "attn.q_gain": (config.num_heads,),
            p + "mlp.fc.weight": (hidden, d), p + "mlp.proj.weight": (d, hidden),
        })  # fmt: skip
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    if predictor:
        shapes["predictor.fc.weight"] = (d, d)
        shapes["predictor.proj.weight"] = (d, d)
    return shapes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def count_parameters(config: TrainConfig) -> int:
    """Parameters of the model (the predictor included, as `build_model` has it)."""
    return sum(_numel(s) for s in tensor_shapes(config).values())


def _stored(name: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """(payload bytes, number of storages) of one float tensor in the artifact."""
    n = _numel(shape)
    if n <= KEEP_FLOAT_MAX_NUMEL:
        control = any(p in name for p in CONTROL_TENSOR_PATTERNS)
        return n * (4 if control else 2), 1
    if len(shape) == 2:
        return n + 2 * shape[0], 2  # int8 values + one fp16 scale per row
    return n + 4, 2  # int8 values + one fp32 scale


def quantized_payload_bytes(config: TrainConfig) -> int:
    """Exact tensor bytes of the artifact before framing and zlib (honours save_predictor)."""
    shapes = tensor_shapes(config, predictor=config.save_predictor)
    return sum(_stored(name, shape)[0] for name, shape in shapes.items())


def estimate_artifact_bytes(config: TrainConfig) -> int:
    """Upper bound of the int8+zlib artifact: payload plus framing, with no compression."""
    shapes = tensor_shapes(config, predictor=config.save_predictor)
    total = FRAMING_FIXED
    for name, shape in shapes.items():
        payload, storages = _stored(name, shape)
        total += payload + storages * FRAMING_PER_STORAGE + len(name) * FRAMING_PER_NAME_CHAR
        total += FRAMING_PER_QUANTIZED * (storages - 1)
    return total


def min_total_bytes(config: TrainConfig, code_bytes: int = DEFAULT_CODE_BYTES) -> int:
    """Artifact plus code at the optimistic zlib ratio: below this the shape might fit."""
    return int(estimate_artifact_bytes(config) * BEST_ZLIB_RATIO) + code_bytes


def fits_cap(config: TrainConfig, code_bytes: int = DEFAULT_CODE_BYTES) -> bool:
    """False when artifact plus code cannot fit the 16,000,000-byte cap even after zlib."""
    return min_total_bytes(config, code_bytes) <= SIZE_CAP_BYTES


def size_violation(config: TrainConfig, code_bytes: int = DEFAULT_CODE_BYTES) -> tuple[float, str] | None:
    """A space constraint: (relative excess over the cap, reason) when `config` cannot fit, else None."""
    if fits_cap(config, code_bytes):
        return None
    total = min_total_bytes(config, code_bytes)
    return (total - SIZE_CAP_BYTES) / SIZE_CAP_BYTES, (
        f"{config.num_layers}x{config.model_dim} mlp {config.mlp_mult}: at least {total:,} bytes of artifact "
        f"+ code after zlib, over the {SIZE_CAP_BYTES:,}-byte cap")


# fp32 weights, their gradients, Adam's two moments (Muon keeps one, so this over-counts it) and the
# weight average: 5 copies. Activations are left out, so this is a floor, never an estimate.
TRAINING_COPIES = 5


def memory_floor_bytes(config: TrainConfig) -> int:
    """Bytes a training run of `config` needs at the very least: a shape over the device's memory
    cannot train there, and is refused before its first step rather than failing in it."""
    return 4 * TRAINING_COPIES * count_parameters(config)


def memory_violation(config: TrainConfig, device_bytes: int) -> str | None:
    """The reason `config` cannot train on a device of `device_bytes`, or None when it may."""
    need = memory_floor_bytes(config)
    if need <= device_bytes:
        return None
    return (f"{config.num_layers}x{config.model_dim} mlp {config.mlp_mult}: at least {need / 2**30:,.1f} GiB for "
            f"weights, gradients, optimiser state and the average, over the device's {device_bytes / 2**30:,.1f} GiB")
