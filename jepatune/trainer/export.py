"""The int8 + zlib artifact, format "int8_clean_per_row_v1" (reference: "Export: int8 + zlib").

Large 2-D float tensors are stored as int8 with one fp16 scale per row, other large float
tensors as int8 with one fp32 scale; small float tensors stay float (fp32 for the named
control tensors, fp16 otherwise); non-float tensors pass through. The dict is
`torch.save`d into memory and compressed with zlib level 9. The final score is the val_bpb
of the model loaded back from this artifact, so the format must match the reference exactly.
"""

from __future__ import annotations

import io
import os
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from jepatune.atomic import atomic_write_bytes
from jepatune.errors import ExportError
from jepatune.trainer.model import is_control  # control tensors stay fp32 in the artifact

QUANT_FORMAT = "int8_clean_per_row_v1"
ARTIFACT_NAME = "final_model.int8.ptz"
SIZE_CAP_BYTES = 16_000_000  # Parameter Golf: artifact plus code
KEEP_FLOAT_MAX_NUMEL = 65_536
CLIP_Q = 99.99984 / 100.0  # |w| beyond this quantile (per row, or per tensor) is clipped
QUANTILE_MAX_N = 2**24  # torch.quantile refuses a reduced dimension longer than this


def _nbytes(t: Tensor) -> int:
    return int(t.numel()) * int(t.element_size())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def clip_quantile(x: Tensor) -> Tensor:
    """`torch.quantile(x, CLIP_Q, dim=-1)` (linear interpolation) for fp32 `x` of any length.

    Past torch's size limit, the same arithmetic is done by hand: the rank is computed in
    fp32 as torch does, and since CLIP_Q is close to 1 only the top few values are needed.
    """
    n = x.shape[-1]
    if n <= QUANTILE_MAX_N:
        return torch.quantile(x, CLIP_Q, dim=-1)
    rank = torch.tensor(CLIP_Q, dtype=torch.float32) * (n - 1)
    lo, hi = int(rank), min(int(torch.ceil(rank)), n - 1)
    top = torch.topk(x, n - lo, dim=-1).values  # descending: top[..., n - 1 - r] has rank r
    return top[..., -1].lerp(top[..., n - 1 - hi], rank - lo)


def _quantize(t: Tensor) -> tuple[Tensor, Tensor]:
    """int8 values and scales of one large float tensor: per row if 2-D, else per tensor."""
    t32 = t.float()
    if t32.ndim == 2:
        clip = clip_quantile(t32.abs())[:, None]
        scale = (clip / 127.0).clamp_min(1.0 / 127.0)
        # q is computed with the fp32 scale and the scale then stored fp16, as the reference does.
        q = torch.round(t32.clamp(-clip, clip) / scale).clamp(-127, 127).to(torch.int8)
        return q.contiguous(), scale.squeeze(1).to(torch.float16).contiguous()
    clip_abs = float(clip_quantile(t32.abs().flatten()))
    scale = torch.tensor(clip_abs / 127.0 if clip_abs > 0 else 1.0, dtype=torch.float32)
    q = torch.round(t32.clamp(-clip_abs, clip_abs) / scale).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def _keep_float(name: str, t: Tensor, orig_dtypes: dict[str, str]) -> Tensor:
    if is_control(name):
        return t.float().contiguous()
    if t.dtype in (torch.float32, torch.bfloat16):
        orig_dtypes[name] = _dtype_name(t.dtype)
        return t.to(torch.float16).contiguous()
    return t


def quantize_state_dict(state_dict: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, int]]:
    """The artifact object for `state_dict`, and counts of tensors and bytes."""
    quantized: dict[str, Tensor] = {}
    scales: dict[str, Tensor] = {}
    dtypes: dict[str, str] = {}
    passthrough: dict[str, Tensor] = {}
    orig_dtypes: dict[str, str] = {}
    qmeta: dict[str, dict[str, Any]] = {}
    stats = dict.fromkeys(
        ("param_count", "num_tensors", "num_float_tensors", "num_nonfloat_tensors",
         "baseline_tensor_bytes", "int8_payload_bytes"),
        0,
    )  # fmt: skip
    for name, tensor in state_dict.items():
        t = tensor.detach().to("cpu").contiguous()
        stats["param_count"] += int(t.numel())
        stats["num_tensors"] += 1
        stats["baseline_tensor_bytes"] += _nbytes(t)
        if not t.is_floating_point():
            stats["num_nonfloat_tensors"] += 1
            passthrough[name] = t
            stats["int8_payload_bytes"] += _nbytes(t)
            continue
        if t.numel() <= KEEP_FLOAT_MAX_NUMEL:
            passthrough[name] = _keep_float(name, t, orig_dtypes)
            stats["int8_payload_bytes"] += _nbytes(passthrough[name])
            continue
        # As in the reference, num_float_tensors counts the quantised tensors only.
        stats["num_float_tensors"] += 1
        q, s = _quantize(t)
        if s.ndim > 0:
            qmeta[name] = {"scheme": "per_row", "axis": 0}
        quantized[name], scales[name] = q, s
        dtypes[name] = _dtype_name(t.dtype)
        stats["int8_payload_bytes"] += _nbytes(q) + _nbytes(s)
    obj: dict[str, Any] = {
        "__quant_format__": QUANT_FORMAT,
        "quantized": quantized,
        "scales": scales,
        "dtypes": dtypes,
        "passthrough": passthrough,
    }
    if qmeta:
        obj["qmeta"] = qmeta
    if orig_dtypes:
        obj["passthrough_orig_dtypes"] = orig_dtypes
    return obj, stats


def _torch_dtype(name: str) -> torch.dtype:
    # The name comes from a file: only accept real dtypes, never any other torch attribute.
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ExportError(f"artifact records unknown dtype {name!r}; re-export the model")
    return dtype


def dequantize_state_dict(obj: dict[str, Any]) -> dict[str, Tensor]:
    """The float state dict an artifact object stands for: q * scale, in the recorded dtypes."""
    out: dict[str, Tensor] = {}
    qmeta = obj.get("qmeta", {})
    orig_dtypes = obj.get("passthrough_orig_dtypes", {})
    for name, q in obj["quantized"].items():
        dtype = _torch_dtype(obj["dtypes"][name])
        s = obj["scales"][name]
        if qmeta.get(name, {}).get("scheme") == "per_row" or s.ndim > 0:
            s = s.float().view(q.shape[0], *([1] * (q.ndim - 1)))  # broadcast over trailing dims
            out[name] = (q.float() * s).to(dtype).contiguous()
        else:
            out[name] = (q.float() * float(s.item())).to(dtype).contiguous()
    for name, t in obj["passthrough"].items():
        t = t.detach().to("cpu").contiguous()
        if isinstance(orig := orig_dtypes.get(name), str):
            t = t.to(_torch_dtype(orig)).contiguous()
        out[name] = t
    return out


def artifact_bytes(state_dict: dict[str, Tensor]) -> tuple[bytes, dict[str, int]]:
    """The compressed artifact for `state_dict`, and the stats of `quantize_state_dict`."""
    obj, stats = quantize_state_dict(state_dict)
    buf = io.BytesIO()
    torch.save(obj, buf)
    return zlib.compress(buf.getvalue(), level=9), stats


def write_artifact(state_dict: dict[str, Tensor], path: str | os.PathLike) -> int:
    """Write the artifact for `state_dict` to `path` atomically; return its size in bytes."""
    blob, _ = artifact_bytes(state_dict)
    try:
        atomic_write_bytes(path, blob)
    except OSError as e:
        raise ExportError(
            f"{path}: cannot write artifact ({e.strerror or e}); choose a writable folder"
        ) from e
    return len(blob)


def read_artifact(path: str | os.PathLike) -> dict[str, Tensor]:
    """Load an artifact written by `write_artifact` back into a float state dict."""
    path = Path(path)
    fix = f"pass a {ARTIFACT_NAME} written by jepatune (or re-export the model)"
    try:
        blob = path.read_bytes()
    except FileNotFoundError as e:
        raise ExportError(f"{path}: artifact not found; {fix}") from e
    except OSError as e:
        raise ExportError(f"{path}: cannot read artifact ({e.strerror or e}); {fix}") from e
    return decode_artifact(blob, str(path))


def decode_artifact(blob: bytes, where: str = "artifact") -> dict[str, Tensor]:
    """The float state dict of artifact bytes (as written by `write_artifact`)."""
    fix = f"pass a {ARTIFACT_NAME} written by jepatune (or re-export the model)"
    try:
        raw = zlib.decompress(blob)
    except zlib.error as e:
        raise ExportError(f"{where}: not a zlib-compressed artifact ({e}); {fix}") from e
    try:
        # weights_only refuses pickles that would import or call anything but tensors and
        # plain containers. Any failure to load these untrusted bytes is the file's fault.
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"{where}: not a torch-saved artifact or refused as unsafe ({reason}); {fix}") from e
    fmt = obj.get("__quant_format__") if isinstance(obj, dict) else None
    if fmt != QUANT_FORMAT:
        raise ExportError(f"{where}: artifact format {fmt!r}, expected {QUANT_FORMAT!r}; {fix}")
    try:
        return dequantize_state_dict(obj)
    except ExportError as e:
        raise ExportError(f"{where}: {e}") from e
    except (KeyError, AttributeError, TypeError, ValueError, RuntimeError) as e:
        raise ExportError(f"{where}: malformed artifact ({type(e).__name__}: {e}); {fix}") from e


def fits_cap(model_bytes: int, code_bytes: int = 0) -> bool:
    """Whether artifact plus code fit the Parameter Golf cap of 16,000,000 bytes."""
    return model_bytes + code_bytes <= SIZE_CAP_BYTES


def drop_predictor(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state_dict` without the JEPA predictor, which evaluation never uses (about 0.5 MB saved)."""
    return {k: v for k, v in state_dict.items() if not k.startswith("predictor.")}
