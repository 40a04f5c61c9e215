#!/usr/bin/env python3
"""Reference logits for an FP8 (E4M3) KV cache, from transformers' own hy_v3 forward.

vLLM's `--kv-cache-dtype fp8` (no checkpoint scales, so a unit scale) stores each key after
QK-norm and RoPE, and each value, as float8_e4m3fn, and attention reads them back. This script
reproduces that in transformers: it loads an existing fixture in float32 and wraps the
attention function so that the key and value states it receives (the whole causal context of a
prefill) are rounded through `torch.float8_e4m3fn` and back. Everything else stays float32.

    .venv/bin/python scripts/oracle/make_fp8_kv_oracle.py crates/model/tests/fixtures/oracle/bf16_attn_tiles

writes `oracle_fp8_kv.safetensors` (`logits`, f32 [T, V], for the fixture's `input_ids`) and
prints how far these logits are from the fixture's float32 ones. Deterministic: no randomness.

It also writes `oracle_fp8_kv_scaled.safetensors`: the same with per-layer KV scales, as FP8
checkpoints calibrated by llm-compressor or ModelOpt carry them (`self_attn.k_scale`,
`self_attn.v_scale`) and vLLM applies them: stored = fp8(k / k_scale), read back × k_scale
(values likewise). The scales are calibrated on the prompt as those tools do, amax / 448 per
layer for keys and for values, from an unrounded pass. Holds `logits`, `k_scale` [L] and
`v_scale` [L] (f32).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import HYV3ForCausalLM
from transformers.models.hy_v3 import modeling_hy_v3


def fp8_round(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """x / scale rounded to the nearest E4M3 value (ties to even), times scale, in float32."""
    y = x / scale
    # Below 464 (halfway to the next step) E4M3 rounds to at most 448: nothing saturates.
    assert y.abs().max().item() < 464.0, "E4M3 would overflow (this fixture needs a KV scale)"
    return y.to(torch.float8_e4m3fn).to(x.dtype) * scale


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    case = Path(argv[0])
    model = HYV3ForCausalLM.from_pretrained(
        str(case),
        dtype=torch.float32,
        attn_implementation="eager",
        experts_implementation="eager",
    )
    model.eval()
    plain = modeling_hy_v3.eager_attention_forward
    calls = []

    def rounded_kv_attention(module, query, key, value, *args, **kwargs):
        calls.append(tuple(key.shape))
        return plain(module, query, fp8_round(key), fp8_round(value), *args, **kwargs)

    oracle = load_file(str(case / "oracle.safetensors"))
    ids = oracle["input_ids"]

    # Calibration: per-layer amax of the (unrounded) key and value states.
    amax = {}

    def calibrating_attention(module, query, key, value, *args, **kwargs):
        k0, v0 = amax.get(module.layer_idx, (0.0, 0.0))
        amax[module.layer_idx] = (max(k0, key.abs().max().item()), max(v0, value.abs().max().item()))
        return plain(module, query, key, value, *args, **kwargs)

    modeling_hy_v3.eager_attention_forward = calibrating_attention
    with torch.no_grad():
        model(input_ids=ids[None])
    layers = sorted(amax)
    k_scale = torch.tensor([amax[l][0] / 448.0 for l in layers], dtype=torch.float32)
    v_scale = torch.tensor([amax[l][1] / 448.0 for l in layers], dtype=torch.float32)

    def scaled_kv_attention(module, query, key, value, *args, **kwargs):
        i = module.layer_idx
        ks, vs = k_scale[i].item(), v_scale[i].item()
        return plain(module, query, fp8_round(key, ks), fp8_round(value, vs), *args, **kwargs)

    for name, wrapper, extra in [
        ("oracle_fp8_kv.safetensors", rounded_kv_attention, {}),
        ("oracle_fp8_kv_scaled.safetensors", scaled_kv_attention, {"k_scale": k_scale, "v_scale": v_scale}),
    ]:
        modeling_hy_v3.eager_attention_forward = wrapper
        calls.clear()
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0].float().contiguous()
        assert calls or wrapper is scaled_kv_attention, "the attention wrapper was never called"
        out = case / name
        save_file({"logits": logits, **extra}, str(out))
        d = (logits - oracle["logits"]).abs().max().item()
        agree = (logits.argmax(-1) == oracle["logits"].argmax(-1)).sum().item()
        print(f"{out}: max|Δ| vs the f32-KV logits {d:.4f}, argmax agree {agree}/{len(ids)}")
    print(f"k_scale {k_scale.tolist()}\nv_scale {v_scale.tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
