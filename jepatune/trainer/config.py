"""`TrainConfig`: every knob of a ByteJEPA run, with the reference's defaults.

This is the one source of truth for a run. Knob names are the reference's, in lower
case, so `--set model_dim=256` does what people coming from the reference expect.
A config loads from a flat TOML file and takes `key=value` overrides; unknown keys and
impossible values raise `ConfigError` naming the key. No torch is imported here.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jepatune.errors import ConfigError, JepatuneError

REGULARIZERS = ("varcov", "lejepa", "none")
PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
RETIRED_KNOBS = frozenset({"ce_weight"})  # knobs that did nothing, removed


def knob(default: Any, help: str) -> Any:
    """A dataclass field with its documentation attached (shown by `jepatune train --help-config`)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    # --- data and evaluation ---------------------------------------------------------
    data_path: str = knob("data/demo", "folder of fineweb_train_*.bin / fineweb_val_*.bin byte shards")
    seed: int = knob(1337, "seed for init, data-independent randomness and LeJEPA directions")
    val_tokens: int = knob(0, "tokens of the val split used by intermediate evals (a fixed prefix); 0 = all")
    val_batch_size: int = knob(524_288, "validation tokens per step's worth of micro-batches: one forward pass "
                                        "takes val_batch_size / grad_accum_steps per rank, as in the reference")
    val_loss_every: int = knob(1000, "evaluate (and report) every N steps; 0 = only at the end")
    eval_steps: tuple[int, ...] = knob((), "extra steps at which to evaluate and report, e.g. ASHA rungs")
    train_log_every: int = knob(200, "print the train loss every N steps; 0 = never")
    probe_steps: int = knob(
        0, "> 0: at each evaluation before the end, branch off for this many steps of pure CE with the LR "
        "decayed to 0, report that branch's BPB as probe_bpb, then continue the main run untouched")

    # --- budget -------------------------------------------------------------------------
    iterations: int = knob(50_000, "budget in optimiser steps; the curriculum and SWA start are fractions of it")
    max_wallclock_seconds: float = knob(
        0.0, "wall-clock budget in seconds; > 0 drives curriculum, SWA and warm-down by time, as the reference"
    )
    warmdown_iters: int = knob(2000, "LR warm-down length in steps (in average steps under a wall clock)")
    warmdown_frac: float = knob(0.0, "> 0: warm-down over this fraction of the budget instead of warmdown_iters")
    warmup_steps: int = knob(20, "compile-priming steps before training, then undone (only with compile=true)")
    train_batch_tokens: int = knob(524_288, "tokens per optimiser step, across all ranks and micro-batches")
    train_seq_len: int = knob(4096, "sequence length in bytes")
    grad_accum_steps: int = knob(8, "micro-batches per step across all ranks; each rank runs this / world size")

    # --- model --------------------------------------------------------------------------
    vocab_size: int = knob(256, "byte vocabulary")
    num_layers: int = knob(9, "transformer blocks: floor(L/2) encoders, the rest decoders (U-net skips)")
    model_dim: int = knob(512, "residual width")
    num_heads: int = knob(8, "query heads; model_dim / num_heads is the head dim (must be even)")
    num_kv_heads: int = knob(4, "key/value heads (GQA); must divide num_heads")
    mlp_mult: int = knob(2, "MLP hidden width = mlp_mult * model_dim")
    tie_embeddings: bool = knob(True, "share the input embedding with the output head")
    rope_base: float = knob(10_000.0, "RoPE base")
    logit_softcap: float = knob(30.0, "logits = c * tanh(logits / c)")
    qk_gain_init: float = knob(1.5, "initial per-head query gain")
    tied_embed_init_std: float = knob(0.005, "std of the tied embedding's normal init")

    # --- optimisers and schedule ---------------------------------------------------------
    embed_lr: float = knob(0.6, "Adam LR of the embedding when untied")
    head_lr: float = knob(0.008, "Adam LR of the untied output head")
    tied_embed_lr: float = knob(0.05, "Adam LR of the tied embedding")
    matrix_lr: float = knob(0.04, "Muon LR of block and predictor matrices")
    scalar_lr: float = knob(0.04, "Adam LR of vectors, scalars, control tensors and skip weights")
    muon_momentum: float = knob(0.95, "Muon momentum after warm-up")
    muon_backend_steps: int = knob(5, "Newton-Schulz iterations")
    muon_momentum_warmup_start: float = knob(0.85, "Muon momentum at step 0")
    muon_momentum_warmup_steps: int = knob(500, "steps of linear momentum warm-up")
    beta1: float = knob(0.9, "Adam beta1")
    beta2: float = knob(0.95, "Adam beta2")
    adam_eps: float = knob(1e-8, "Adam epsilon")
    grad_clip_norm: float = knob(0.0, "global grad-norm clip; 0 = off")

    # --- JEPA curriculum ------------------------------------------------------------------
    jepa_weight: float = knob(1.0, "weight of the JEPA latent-prediction loss in stage 1")
    regularizer: str = knob("varcov", "anti-collapse regulariser: varcov (reference), lejepa (SIGReg) or none")
    sigreg_weight: float = knob(0.05, "weight of the regulariser in stage 1")
    varcov_cov_weight: float = knob(0.04, "varcov: weight of the covariance penalty against the variance term")
    lejepa_directions: int = knob(1024, "lejepa: random projection directions per step")
    lejepa_points: int = knob(17, "lejepa: integration points of the Epps-Pulley statistic on [0, 3]")
    lejepa_positions: int = knob(8192, "lejepa: random positions per micro-batch it is computed on; 0 = all")
    jepa_pure_frac: float = knob(0.10, "end of stage 1 (pure JEPA) as a fraction of the budget")
    ce_pure_frac: float = knob(0.80, "end of stage 2 (bridge) / start of stage 3 (pure CE)")

    # --- SWA (an EMA of weights) ----------------------------------------------------------
    swa_enabled: bool = knob(True, "keep an EMA of the weights and export it")
    swa_start_frac: float | None = knob(None, "SWA start as a fraction of the budget; unset = ce_pure_frac")
    swa_decay: float = knob(0.995, "EMA decay per step")
    swa_fp32_shadow: bool = knob(
        False, "fix: average bf16 parameters in an fp32 shadow (the reference averages bf16 in place)"
    )
    swa_start_choices: tuple[float, ...] = knob(
        (), "more SWA starts (fractions of the budget), each kept as its own average: the run ships whichever "
            "average, or the raw weights, scores best on swa_select_tokens bytes of the train stream no step read; "
            "() = ship swa_start_frac's average, as the reference; swa_enabled=false keeps none")
    swa_select_tokens: int = knob(65_536, "bytes of unread train stream that swa_start_choices are judged on")

    # --- export ------------------------------------------------------------------------
    save_predictor: bool = knob(
        True, "keep the JEPA predictor in the artifact (the reference does; evaluation never uses it)")

    # --- the reference's model.bfloat16() call, under bf16 precision only -------------------
    # The reference casts the whole model to bf16, then its linear weights back to fp32. The cast
    # has three side effects, each reproduced by default and each a switch (fix: false).
    bf16_rope: bool = knob(
        True, "RoPE's inverse frequencies and positions in bf16, as the reference's cast leaves them (at "
              "sequence 4096 about 770 distinct positions); false = fp32 tables")
    bf16_loss_weights: bool = knob(
        True, "the curriculum's loss weights held in bf16 (sigreg_weight 0.05 acts as 0.050049, bridge weights "
              "rounded); false = fp32")
    bf16_init_round: bool = knob(
        True, "linear weights rounded to bf16 once at init (the cast there and back); false = fp32 init")

    # --- runtime -----------------------------------------------------------------------
    device: str = knob("auto", "auto, cpu or cuda")
    precision: str = knob("auto", "bf16 = the reference's mixed precision, fp32, auto = bf16 on CUDA else fp32")
    compile: bool = knob(False, "torch.compile the model")

    def __post_init__(self) -> None:
        types_ = _field_types()
        for f in dataclasses.fields(self):
            check_type(f.name, getattr(self, f.name), types_[f.name])
        _validate(self)

    # --- derived values, so no caller recomputes them differently ------------------------
    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def swa_start(self) -> float:
        return self.ce_pure_frac if self.swa_start_frac is None else self.swa_start_frac

    def replace(self, **changes: Any) -> TrainConfig:
        return apply_overrides(self, changes)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Defaults updated by `values` (as read from JSON or TOML: lists become tuples). Retired knobs,
        which configs stored by older versions hold, are dropped."""
        return apply_overrides(cls(), {k: v for k, v in values.items() if k not in RETIRED_KNOBS})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_toml(self) -> str:
        """Flat TOML that `load_config` reads back; unset optional knobs are left out."""
        lines = []
        for name, value in self.to_dict().items():
            if value is not None:
                lines.append(f"{name} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


def _validate(c: TrainConfig) -> None:
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}={getattr(c, key)!r}: {msg}")

    for key in ("jepa_pure_frac", "ce_pure_frac", "warmdown_frac"):
        need(0.0 <= getattr(c, key) <= 1.0, key, "must be a fraction in [0, 1]")
    if c.swa_start_frac is not None:
        need(0.0 <= c.swa_start_frac <= 1.0, "swa_start_frac", "must be a fraction in [0, 1] (or unset)")
    need(c.jepa_pure_frac <= c.ce_pure_frac, "jepa_pure_frac", f"must not exceed ce_pure_frac={c.ce_pure_frac}")
    need(0.0 <= c.swa_decay < 1.0, "swa_decay", "must be in [0, 1)")
    need(all(0.0 <= f <= 1.0 for f in c.swa_start_choices), "swa_start_choices", "must be fractions in [0, 1]")
    need(c.swa_select_tokens > 0, "swa_select_tokens", "must be positive (at least one sequence is read)")
    for key in ("iterations", "train_seq_len", "train_batch_tokens", "vocab_size", "num_layers", "model_dim",
                "num_heads", "num_kv_heads", "mlp_mult", "grad_accum_steps", "val_batch_size",
                "muon_backend_steps", "lejepa_directions", "lejepa_points"):
        need(getattr(c, key) > 0, key, "must be positive")
    for key in ("val_tokens", "val_loss_every", "train_log_every", "probe_steps", "warmdown_iters", "warmup_steps",
                "muon_momentum_warmup_steps", "lejepa_positions", "max_wallclock_seconds", "grad_clip_norm",
                "jepa_weight", "sigreg_weight", "varcov_cov_weight", "embed_lr", "head_lr",
                "tied_embed_lr", "matrix_lr", "scalar_lr", "adam_eps", "tied_embed_init_std"):
        need(getattr(c, key) >= 0, key, "must not be negative")
    need(c.vocab_size <= 65_536, "vocab_size", "must fit the uint16 shard format (<= 65536)")
    need(c.model_dim % c.num_heads == 0, "model_dim", f"must be divisible by num_heads={c.num_heads}")
    need(c.num_heads % c.num_kv_heads == 0, "num_heads", f"must be divisible by num_kv_heads={c.num_kv_heads}")
    need(c.head_dim % 2 == 0, "num_heads", f"gives an odd head dim {c.head_dim}; RoPE needs it even")
    need(c.logit_softcap > 0, "logit_softcap", "must be positive")
    need(all(math.isfinite(getattr(c, k)) for k in ("rope_base", "qk_gain_init")), "rope_base", "must be finite")
    for key in ("beta1", "beta2", "muon_momentum", "muon_momentum_warmup_start"):
        need(0.0 <= getattr(c, key) < 1.0, key, "must be in [0, 1)")
    per_step = c.grad_accum_steps * c.train_seq_len
    need(c.train_batch_tokens % per_step == 0, "train_batch_tokens",
         f"must be a multiple of grad_accum_steps * train_seq_len = {per_step}")
    need(c.val_batch_size // c.grad_accum_steps >= c.train_seq_len, "val_batch_size",
         f"must hold one sequence ({c.train_seq_len}) per micro-batch: at least grad_accum_steps * train_seq_len = "
         f"{c.grad_accum_steps * c.train_seq_len}")
    need(all(s > 0 for s in c.eval_steps), "eval_steps", "must be positive step numbers")
    need(c.regularizer in REGULARIZERS, "regularizer", f"must be one of {', '.join(REGULARIZERS)}")
    need(c.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}")
    need(c.device in DEVICES, "device", f"must be one of {', '.join(DEVICES)}")


# --- loading and overrides ------------------------------------------------------------------

@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)  # slow (it evaluates string annotations): once is enough


def _unknown_key(key: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean {close[0]}?" if close else "; `jepatune train --help-config` lists the knobs"
    return ConfigError(f"unknown config key {key!r}{hint}")


def check_type(key: str, value: Any, tp: Any) -> None:
    options = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
    for option in options:
        if option is type(None) and value is None:
            return
        origin = typing.get_origin(option)
        if origin is tuple and isinstance(value, tuple) and all(_is_a(v, typing.get_args(option)[0]) for v in value):
            return
        if option in (int, bool, str, float) and _is_a(value, option):
            return
    raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")


def _is_a(value: Any, tp: type) -> bool:
    """`value` is of the scalar type `tp`; an int serves as a float, a bool as neither."""
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return type(value) is tp


def _tuple_of(options: tuple[Any, ...]) -> Any:
    """The item type of the tuple among a field's `options`, or None."""
    return next((typing.get_args(o)[0] for o in options if typing.get_origin(o) is tuple), None)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Turn a TOML value or a `--set` string into the field's type."""
    options = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
    if not isinstance(value, str) or str in options:
        if isinstance(value, list | tuple):
            value = tuple(float(v) if _tuple_of(options) is float and _is_a(v, float) else v for v in value)
        if float in options and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        return value
    text = value.strip()
    if type(None) in options and text.lower() in ("none", "null", ""):
        return None
    for option in options:
        try:
            if option is bool:
                if text.lower() in ("true", "1", "yes", "on"):
                    return True
                if text.lower() in ("false", "0", "no", "off"):
                    return False
            elif option is int:
                return int(text.replace("_", ""))
            elif option is float:
                return float(text.replace("_", ""))
            elif typing.get_origin(option) is tuple:
                item = typing.get_args(option)[0]
                return tuple(item(s.replace("_", "")) for s in text.strip("()[]").replace(",", " ").split())
        except ValueError:
            continue
    raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")


def apply_overrides(config: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """A new config with `overrides` (values or strings) applied and validated."""
    types_ = _field_types()
    changes = {}
    for key, value in overrides.items():
        if key not in types_:
            raise _unknown_key(key)
        changes[key] = _coerce(key, value, types_[key])
    return dataclasses.replace(config, **changes)


def parse_set_args(items: list[str]) -> dict[str, str]:
    """`["a=1", "b=x"]` -> {"a": "1", "b": "x"}; a malformed item is a ConfigError."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set model_dim=256")
        out[key.strip()] = value
    return out


def read_toml(path: Path, what: str, error: type[JepatuneError]) -> dict[str, Any]:
    """The TOML document at `path`; every way it can be unreadable is one `error` naming `what`."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist; check the path") from None
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({e.strerror or e}); give a readable TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise error(f"{what} {path} is not valid TOML ({e}); correct it there") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then a flat TOML file (optional), then overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        values = read_toml(path, "config file", ConfigError)
        nested = [k for k, v in values.items() if isinstance(v, dict)]
        if nested:
            raise ConfigError(f"config file {path}: tables are not used, write flat keys (found [{nested[0]}])")
    config = apply_overrides(TrainConfig(), values)
    return apply_overrides(config, overrides or {})


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return repr(value)


def describe_knobs() -> str:
    """One line per knob: name, default, help."""
    rows = [f"  {f.name:<28} {f.default!r:<12} {f.metadata.get('help', '')}" for f in dataclasses.fields(TrainConfig)]
    return "\n".join(rows)


# Named starting points; a preset is a set of overrides on the reference defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # The published run: the defaults, driven by the wall clock (one hour) and compiled, as the reference.
    "reference": {"max_wallclock_seconds": 3600.0, "compile": True},
    # A CPU-sized model for the demo and quick experiments: about 0.5M parameters,
    # 4K bytes per step in one micro-batch, about 0.3 s a step on 2 cores.
    "tiny": {
        "num_layers": 4, "model_dim": 128, "num_heads": 4, "num_kv_heads": 2, "train_seq_len": 256,
        "train_batch_tokens": 4096, "grad_accum_steps": 1, "iterations": 300, "warmdown_frac": 0.3,
        "muon_momentum_warmup_steps": 50,
        "val_loss_every": 50, "val_tokens": 65_536, "val_batch_size": 32_768, "train_log_every": 50,
        "lejepa_directions": 256, "lejepa_positions": 1024,
    },
    # The demo sweep's proxy: 0.14M parameters, 2K bytes per step, about 80 ms a step on one core.
    "demo": {
        "num_layers": 4, "model_dim": 64, "num_heads": 2, "num_kv_heads": 1, "train_seq_len": 128,
        "train_batch_tokens": 2048, "grad_accum_steps": 1, "iterations": 300, "warmdown_frac": 0.3,
        "muon_momentum_warmup_steps": 50, "val_loss_every": 50, "val_tokens": 32_768, "val_batch_size": 16_384,
        "train_log_every": 0, "lejepa_directions": 128, "lejepa_positions": 1024, "swa_select_tokens": 32_768,
    },
}
