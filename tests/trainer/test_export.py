"""The int8 + zlib artifact: stored layout, quantisation error, round trip, refusal of bad files."""

from __future__ import annotations

import io
import os
import pickle
import zlib

import pytest
import torch

from jepatune.errors import ExportError
from jepatune.trainer import export
from jepatune.trainer.export import (
    ARTIFACT_NAME,
    CLIP_Q,
    artifact_bytes,
    dequantize_state_dict,
    drop_predictor,
    fits_cap,
    quantize_state_dict,
    read_artifact,
    write_artifact,
)

QUANTISED = ("tok_emb.weight", "blocks.0.attn.c_q.weight", "blocks.0.attn.c_k.weight", "conv.weight",
             "predictor.fc.weight")  # fmt: skip
CONTROL = ("skip_weights", "blocks.0.attn_scale", "blocks.0.mlp_scale", "blocks.0.resid_mix",
           "blocks.0.attn.q_gain")  # fmt: skip


def ref_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Reference names and shapes (width 512), plus a few tensors that exercise the other rules."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype)

    return {
        "tok_emb.weight": randn(256, 512, dtype=torch.bfloat16),  # 131,072 elements: quantised
        "skip_weights": randn(4, 512),
        "blocks.0.attn_scale": randn(512),
        "blocks.0.mlp_scale": randn(512),
        "blocks.0.resid_mix": randn(2, 512),
        "blocks.0.attn.q_gain": randn(8),
        "blocks.0.attn.c_q.weight": randn(512, 512),
        "blocks.0.attn.c_k.weight": randn(256, 512),
        "predictor.fc.weight": randn(512, 512),
        "lm_head.weight": randn(64, 512, dtype=torch.bfloat16),  # 32,768 elements: kept, fp16
        "blocks.0.attn.rotary.inv_freq": randn(32),  # small fp32, not control: kept, fp16
        "half.weight": randn(64, dtype=torch.float16),  # small fp16: kept as it is
        "conv.weight": randn(64, 32, 48),  # 98,304 elements, 3-D: one per-tensor scale
        "step": torch.tensor(1234, dtype=torch.int64),
        "mask": torch.rand(3, 5, generator=g) > 0.5,
    }


def test_format_keys_and_optional_sections() -> None:
    obj, _ = quantize_state_dict(ref_state())
    assert obj["__quant_format__"] == "int8_clean_per_row_v1"
    assert set(obj) == {"__quant_format__", "quantized", "scales", "dtypes", "passthrough", "qmeta",
                        "passthrough_orig_dtypes"}  # fmt: skip
    assert set(obj["quantized"]) == set(obj["scales"]) == set(obj["dtypes"]) == set(QUANTISED)
    assert set(obj["passthrough"]) == set(ref_state()) - set(QUANTISED)
    # qmeta and passthrough_orig_dtypes appear only when they have entries.
    small, _ = quantize_state_dict({"blocks.0.attn_scale": torch.ones(512), "step": torch.tensor(3)})
    assert set(small) == {"__quant_format__", "quantized", "scales", "dtypes", "passthrough"}


def test_stored_dtypes_of_every_piece() -> None:
    sd = ref_state()
    sd["blocks.1.attn.q_gain"] = torch.ones(8, dtype=torch.bfloat16)  # bf16 control: stored fp32
    obj, stats = quantize_state_dict(sd)
    for name in QUANTISED:
        assert obj["quantized"][name].dtype == torch.int8
        assert obj["quantized"][name].shape == sd[name].shape
        if sd[name].ndim == 2:
            assert obj["scales"][name].dtype == torch.float16
            assert obj["scales"][name].shape == (sd[name].shape[0],)
            assert obj["qmeta"][name] == {"scheme": "per_row", "axis": 0}
        else:
            assert obj["scales"][name].dtype == torch.float32 and obj["scales"][name].ndim == 0
            assert name not in obj["qmeta"]
    assert obj["dtypes"]["tok_emb.weight"] == "bfloat16"
    assert obj["dtypes"]["blocks.0.attn.c_q.weight"] == "float32"
    for name in CONTROL + ("blocks.1.attn.q_gain",):
        assert obj["passthrough"][name].dtype == torch.float32
    assert "blocks.1.attn.q_gain" not in obj["passthrough_orig_dtypes"]
    assert obj["passthrough"]["lm_head.weight"].dtype == torch.float16
    assert obj["passthrough"]["blocks.0.attn.rotary.inv_freq"].dtype == torch.float16
    assert obj["passthrough_orig_dtypes"] == {"lm_head.weight": "bfloat16",
                                              "blocks.0.attn.rotary.inv_freq": "float32"}  # fmt: skip
    assert obj["passthrough"]["half.weight"].dtype == torch.float16
    for name in ("step", "mask"):
        assert obj["passthrough"][name].dtype == sd[name].dtype
        assert torch.equal(obj["passthrough"][name], sd[name])

    stored = [*obj["quantized"].values(), *obj["scales"].values(), *obj["passthrough"].values()]
    assert stats == {
        "param_count": sum(t.numel() for t in sd.values()),
        "num_tensors": len(sd),
        "num_float_tensors": len(QUANTISED),
        "num_nonfloat_tensors": 2,
        "baseline_tensor_bytes": sum(t.numel() * t.element_size() for t in sd.values()),
        "int8_payload_bytes": sum(t.numel() * t.element_size() for t in stored),
    }


def test_per_row_error_bound_and_outlier_clipping() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 4096, generator=g)
    w[5, 100] = 1000.0  # an outlier far beyond the 99.99984th percentile of its row
    obj, _ = quantize_state_dict({"w": w})
    q, s16 = obj["quantized"]["w"], obj["scales"]["w"]
    deq = dequantize_state_dict(obj)["w"]

    clip = torch.quantile(w.abs(), CLIP_Q, dim=1)
    s32 = (clip / 127).clamp_min(1 / 127)
    assert torch.equal(s16, s32.half())
    # q is rounded against the fp32 scale, which is then stored fp16 (as the reference does):
    # the error is half a step plus |q| times the scale's fp16 rounding.
    bound = s32 / 2 + 127 * (s16.float() - s32).abs() + 1e-6
    unclipped = w.abs() <= clip[:, None]
    err = (w - deq).abs()
    assert bool((err <= bound[:, None])[unclipped].all())
    assert float((err / s32[:, None])[unclipped].max()) > 0.45  # the bound is not vacuous

    # The outlier is clipped to the row's percentile, well short of its value.
    assert int(q[5, 100]) == 127
    assert float(clip[5]) < 995.0
    assert float(deq[5, 100]) == pytest.approx(127 * float(s16[5]), rel=1e-6)
    assert float(deq[5, 100]) < 996.0


def test_tiny_row_gets_the_scale_floor() -> None:
    w = torch.randn(300, 512, generator=torch.Generator().manual_seed(2))
    w[7] *= 1e-4
    obj, _ = quantize_state_dict({"w": w})
    assert float(obj["scales"]["w"][7]) == pytest.approx(1 / 127, rel=1e-3)
    assert obj["scales"]["w"][7] == torch.tensor(1 / 127).half()
    assert not obj["quantized"]["w"][7].any()  # |w| / (1/127) < 0.5 everywhere: all zero
    assert float(obj["scales"]["w"][0]) > 1 / 127  # an ordinary row keeps its own scale


def test_three_d_tensor_gets_one_per_tensor_scale() -> None:
    w = torch.randn(64, 32, 48, generator=torch.Generator().manual_seed(3))
    obj, _ = quantize_state_dict({"w": w, "zeros": torch.zeros(2, 200, 200)})
    s = obj["scales"]["w"]
    assert s.dtype == torch.float32 and s.ndim == 0
    assert "qmeta" not in obj
    clip = torch.quantile(w.abs().flatten(), CLIP_Q)
    assert float(s) == pytest.approx(float(clip) / 127, rel=1e-6)
    deq = dequantize_state_dict(obj)
    unclipped = w.abs() <= clip
    assert bool(((w - deq["w"]).abs() <= float(s) / 2 + 1e-6)[unclipped].all())
    assert float(obj["scales"]["zeros"]) == 1.0  # an all-zero tensor falls back to scale 1
    assert not deq["zeros"].any()


def test_write_read_round_trip(tmp_path) -> None:
    sd = ref_state()
    path = tmp_path / "run" / ARTIFACT_NAME
    size = write_artifact(sd, path)
    assert size == path.stat().st_size == len(artifact_bytes(sd)[0])
    assert [p.name for p in path.parent.iterdir()] == [ARTIFACT_NAME]  # no temporary left behind
    back = read_artifact(path)
    assert set(back) == set(sd)
    for name, t in sd.items():
        assert back[name].shape == t.shape, name
        assert back[name].dtype == t.dtype, name
        if t.is_floating_point():
            # Rows with max |w| < 1 get the 1/127 scale floor: error up to half of 1/127.
            torch.testing.assert_close(back[name].float(), t.float(), atol=1 / 254 + 1e-3, rtol=0)
        else:
            assert torch.equal(back[name], t)


def test_artifact_bytes_is_zlib_of_torch_save() -> None:
    blob, stats = artifact_bytes(ref_state())
    raw = zlib.decompress(blob)
    assert zlib.compress(raw, level=9) == blob
    obj = torch.load(io.BytesIO(raw), weights_only=True)
    assert obj["__quant_format__"] == "int8_clean_per_row_v1"
    assert stats["num_tensors"] == len(ref_state())


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _raises_one_line(path) -> str:
    with pytest.raises(ExportError) as info:
        read_artifact(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def test_read_refuses_missing_garbage_and_unsafe_files(tmp_path) -> None:
    assert "not found" in _raises_one_line(tmp_path / "absent.ptz")

    garbage = tmp_path / "garbage.ptz"
    garbage.write_bytes(b"this is not an artifact")
    assert "zlib" in _raises_one_line(garbage)

    not_torch = tmp_path / "not_torch.ptz"
    not_torch.write_bytes(zlib.compress(b"\x00" * 100))
    _raises_one_line(not_torch)

    # Both a bare pickle and a torch.save zip that would run a command are refused unrun.
    marker = tmp_path / "executed"
    evil_pickle = tmp_path / "evil_pickle.ptz"
    evil_pickle.write_bytes(zlib.compress(pickle.dumps(_Evil(str(marker)), protocol=2)))
    evil_zip = tmp_path / "evil_zip.ptz"
    buf = io.BytesIO()
    torch.save({"__quant_format__": "int8_clean_per_row_v1", "x": _Evil(str(marker))}, buf)
    evil_zip.write_bytes(zlib.compress(buf.getvalue()))
    for path in (evil_pickle, evil_zip):
        _raises_one_line(path)
    assert not marker.exists()


def _save(path, obj) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    path.write_bytes(zlib.compress(buf.getvalue()))


def test_read_refuses_wrong_format_and_bad_dtype(tmp_path) -> None:
    wrong = tmp_path / "wrong.ptz"
    obj, _ = quantize_state_dict(ref_state())
    _save(wrong, {**obj, "__quant_format__": "int6_v0"})
    assert "int8_clean_per_row_v1" in _raises_one_line(wrong)
    _save(wrong, torch.zeros(3))
    _raises_one_line(wrong)

    # dtype names come from the file: an attribute of torch that is not a dtype is refused.
    bad = tmp_path / "bad.ptz"
    _save(bad, {**obj, "dtypes": {**obj["dtypes"], "conv.weight": "load"}})
    assert "'load'" in _raises_one_line(bad)


def test_quantile_fallback_matches_torch_quantile(monkeypatch) -> None:
    g = torch.Generator().manual_seed(4)
    rows = torch.randn(7, 3001, generator=g).abs()
    flat = torch.randn(100_003, generator=g).abs()
    sd = {"w": torch.randn(40, 2000, generator=g), "v": torch.randn(10, 100, 80, generator=g)}
    direct = quantize_state_dict(sd)[0]
    monkeypatch.setattr(export, "QUANTILE_MAX_N", 16)  # force the hand-written path
    assert torch.equal(export.clip_quantile(rows), torch.quantile(rows, CLIP_Q, dim=1))
    assert torch.equal(export.clip_quantile(flat), torch.quantile(flat, CLIP_Q))
    fallback = quantize_state_dict(sd)[0]
    for part in ("quantized", "scales"):
        for name in sd:
            assert torch.equal(fallback[part][name], direct[part][name]), (part, name)


def test_drop_predictor() -> None:
    sd = {"predictor.fc.weight": torch.ones(2), "predictor.proj.weight": torch.ones(2),
          "predictor_gate": torch.ones(2), "blocks.0.predictor.w": torch.ones(2),
          "tok_emb.weight": torch.ones(2)}  # fmt: skip
    assert list(drop_predictor(sd)) == ["predictor_gate", "blocks.0.predictor.w", "tok_emb.weight"]
    assert len(sd) == 5  # the input is left as it was


def test_fits_cap() -> None:
    assert fits_cap(15_080_959, 51_873)  # the reference run: 15,132,832 bytes
    assert fits_cap(16_000_000)
    assert not fits_cap(16_000_001)
    assert not fits_cap(15_999_000, 1_001)
