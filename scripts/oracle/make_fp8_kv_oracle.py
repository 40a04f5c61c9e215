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
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import HYV3ForCausalLM
from transformers.models.hy_v3 import modeling_hy_v3


def fp8_round(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest E4M3 value (ties to even), as float32 again."""
    assert x.abs().max().item() <= 448.0, "E4M3 would overflow (this fixture needs a KV scale)"
    return x.to(torch.float8_e4m3fn).to(x.dtype)


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

    modeling_hy_v3.eager_attention_forward = rounded_kv_attention
    oracle = load_file(str(case / "oracle.safetensors"))
    ids = oracle["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0].float().contiguous()
    assert calls, "the attention wrapper was never called"
    out = case / "oracle_fp8_kv.safetensors"
    save_file({"logits": logits}, str(out))
    d = (logits - oracle["logits"]).abs().max().item()
    agree = (logits.argmax(-1) == oracle["logits"].argmax(-1)).sum().item()
    print(
        f"{out}: {len(calls)} attention calls, key states {calls[0]}; "
        f"max|Δ| vs the f32-KV logits {d:.4f}, argmax agree {agree}/{len(ids)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
