#!/usr/bin/env python3
"""FP8 checkpoints with finer-grained weight scales than make_fp8_oracle.py's per-tensor form,
the two forms most FP8 models on the Hub use, with transformers' reference outputs.

Usage (from the repository root, in the oracle venv; the block case also needs `accelerate`):

    .venv/bin/python scripts/oracle/make_fp8_scaled_oracle.py --scheme block
    .venv/bin/python scripts/oracle/make_fp8_scaled_oracle.py --scheme channel

--scheme block -> crates/model/tests/fixtures/oracle/fp8_block (DeepSeek-V3 / Qwen3-FP8 style):
  * config.json: `quantization_config = {"quant_method": "fp8", "fmt": "e4m3",
    "activation_scheme": "dynamic", "weight_block_size": [8, 16], "modules_to_not_convert":
    ["lm_head"]}` (blocks of 8 rows x 16 columns: non-square, so a row/column mix-up shows);
  * every projection matrix stored float8_e4m3fn, quantized per 8x16 block with
    `scale = amax(block) / 448`, and beside it `<prefix>.weight_scale_inv` f32
    [rows / 8, cols / 16] (the name is historical: it multiplies, `w = q * scale_inv`);
  * the reference is transformers loading *this* FP8 checkpoint itself: without a GPU its
    FineGrainedFP8 quantizer dequantizes at load (`Fp8Dequantize`), an implementation
    independent of Switchyard's. The script checks it equals `q.float() * scale` expanded
    per block, and that the logits equal those of transformers on those dequantized weights;
  * oracle.safetensors also holds a standalone matrix whose shape is *not* a whole number of
    blocks (`partial.q` f8 [20, 40], `partial.scale_inv` f32 [3, 3] for blocks [8, 16]) with
    torch's dequantization `partial.dequant` (the edge blocks cover 4 rows and 8 columns),
    as vLLM's block-FP8 layers accept; transformers' own loader refuses such shapes.

--scheme channel -> crates/model/tests/fixtures/oracle/fp8_channel (llm-compressor's
  FP8_DYNAMIC scheme, `quant_method: "compressed-tensors"`, `format: "float-quantized"`):
  * config.json: one config group targeting `Linear`, weights 8-bit float, symmetric,
    `strategy: "channel"`; input activations 8-bit float, dynamic, `strategy: "token"`;
    `ignore: ["lm_head"]`; `kv_cache_scheme: null`;
  * every projection stored float8_e4m3fn with `<prefix>.weight_scale` bf16 [rows, 1]
    (`scale = amax(row) / 448`, rounded to bf16 first, as llm-compressor stores scales in the
    model's dtype, then used to quantize);
  * the reference is transformers on the dequantized weights `q.float() * scale.float()`
    (compressed-tensors' loader in transformers targets `nn.Linear` modules, and hy_v3's
    routed experts are fused parameters, so it cannot load the routed experts).

Both: embeddings, lm_head and norms bf16, router gate weight and expert bias f32, as in
make_fp8_oracle.py; oracle.safetensors holds input_ids, `logits` (f32), `logits_bf16`,
`router_margin_per_token` and `dequant.<name>` for a few matrices; oracle.json the greedy ids.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fp8_oracle as f8  # noqa: E402  (quantization helpers, reference loader)
import make_oracles as mo  # noqa: E402

from transformers import FineGrainedFP8Config, HYV3Config, HYV3ForCausalLM  # noqa: E402

E4M3_MAX = f8.E4M3_MAX
BLOCK = (8, 16)

BLOCK_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": list(BLOCK),
    "modules_to_not_convert": ["lm_head"],
}

CHANNEL_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 8,
                "type": "float",
                "symmetric": True,
                "strategy": "channel",
                "dynamic": False,
                "group_size": None,
                "block_structure": None,
                "actorder": None,
                "observer": "minmax",
            },
            "input_activations": {
                "num_bits": 8,
                "type": "float",
                "symmetric": True,
                "strategy": "token",
                "dynamic": True,
                "group_size": None,
                "block_structure": None,
                "actorder": None,
                "observer": None,
            },
            "output_activations": None,
        }
    },
    "ignore": ["lm_head"],
    "kv_cache_scheme": None,
}


def grid_scales(w: torch.Tensor, bm: int, bn: int) -> torch.Tensor:
    """amax / 448 per [bm, bn] block (edge blocks partial), shape [ceil(r/bm), ceil(c/bn)]."""
    r, c = w.shape
    sr, sc = -(-r // bm), -(-c // bn)
    s = torch.empty(sr, sc, dtype=torch.float32)
    for i in range(sr):
        for j in range(sc):
            blk = w[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn]
            s[i, j] = blk.abs().max().clamp(min=1e-12) / E4M3_MAX
    return s


def expand(s: torch.Tensor, r: int, c: int, bm: int, bn: int) -> torch.Tensor:
    """The per-element scale of a block grid, cut to [r, c]."""
    return s.repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:r, :c]


def quantize_block(w: torch.Tensor, bm: int, bn: int):
    w = w.float()
    s = grid_scales(w, bm, bn)
    full = expand(s, *w.shape, bm, bn)
    q = (w / full).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, s, q.float() * full


def quantize_channel(w: torch.Tensor):
    w = w.float()
    s = (w.abs().amax(1, keepdim=True).clamp(min=1e-12) / E4M3_MAX).bfloat16()
    q = (w / s.float()).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, s, q.float() * s.float()


@torch.no_grad()
def load_fp8_block_with_transformers(out: Path, cfg: dict) -> HYV3ForCausalLM:
    """transformers' own FP8 loader on the written checkpoint (dequantizes without a GPU)."""
    config = HYV3Config.from_pretrained(str(out))
    # As in make_fp8_oracle.load_reference: transformers 5.24 reads the hub dialect's expert
    # width only from moe_intermediate_size.
    config.moe_intermediate_size = cfg.get("moe_intermediate_size", cfg.get("expert_hidden_dim"))
    m, info = HYV3ForCausalLM.from_pretrained(
        str(out),
        config=config,
        dtype=torch.float32,
        attn_implementation="eager",
        experts_implementation="eager",
        quantization_config=FineGrainedFP8Config(weight_block_size=list(BLOCK), dequantize=True),
        output_loading_info=True,
    )
    m.eval()
    assert not info.get("missing_keys"), info["missing_keys"]
    assert not info.get("mismatched_keys"), info["mismatched_keys"]
    return m


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scheme", choices=["block", "channel"], required=True)
    ap.add_argument("--src", type=Path, default=Path("crates/model/tests/fixtures/oracle/hub_dialect"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    out = args.out or Path(f"crates/model/tests/fixtures/oracle/fp8_{args.scheme}")

    src_cfg = json.loads((args.src / "config.json").read_text())
    src = f8.load_tensors(args.src)
    from safetensors import safe_open

    with safe_open(str(args.src / "oracle.safetensors"), "pt") as fh:
        prompt = fh.get_tensor("input_ids").long()
        src_logits = fh.get_tensor("logits")

    stored, dequant, quantized = {}, {}, []
    for name in sorted(src):
        t = src[name]
        if f8.is_projection(name, t):
            prefix = name[: -len(".weight")]
            if args.scheme == "block":
                q, s, dq = quantize_block(t, *BLOCK)
                stored[f"{prefix}.weight_scale_inv"] = s.contiguous()
            else:
                q, s, dq = quantize_channel(t)
                stored[f"{prefix}.weight_scale"] = s.contiguous()
            stored[name] = q.contiguous()
            dequant[name] = dq
            quantized.append(name)
        elif f8.is_router(name):
            stored[name] = t.float().contiguous()
            dequant[name] = stored[name]
        else:
            stored[name] = t.bfloat16().contiguous()
            dequant[name] = stored[name].float()

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    qcfg = BLOCK_CONFIG if args.scheme == "block" else CHANNEL_CONFIG
    cfg = dict(src_cfg)
    cfg["quantization_config"] = qcfg
    cfg["torch_dtype"] = "bfloat16"
    mo.write_json(out / "config.json", dict(sorted(cfg.items())))
    save_file(stored, str(out / "model.safetensors"), metadata={"format": "pt"})

    model, _ = f8.load_reference(cfg, dequant)
    ref = mo.run_reference(model, prompt)
    checks = {}
    if args.scheme == "block":
        # transformers' FP8 loader, reading the file just written, must see the same weights
        # and give the same logits as the reference built from this script's dequantization.
        tm = load_fp8_block_with_transformers(out, cfg)
        sd, msd = tm.state_dict(), model.state_dict()
        weight_diff = max((sd[k].float() - msd[k].float()).abs().max().item() for k in msd)
        logits_tf = tm(input_ids=prompt[None]).logits[0].float()
        tf_diff = (logits_tf - ref["logits"]).abs().max().item()
        assert weight_diff == 0.0 and tf_diff == 0.0, (weight_diff, tf_diff)
        checks["transformers_fp8_loader_weights_max_abs_diff"] = weight_diff
        checks["transformers_fp8_loader_logits_max_abs_diff"] = tf_diff
        ref["logits"] = logits_tf
        del tm
    with torch.no_grad():
        mb = mo.bf16_model(model)
        logits_bf16 = mb(input_ids=prompt[None]).logits[0].float()
        del mb

    check = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.1.mlp.experts.3.down_proj.weight",
        "model.layers.2.mlp.shared_mlp.gate_proj.weight",
    ]
    oracle = {
        "input_ids": prompt.clone(),
        "logits": ref["logits"].contiguous(),
        "logits_bf16": logits_bf16.contiguous(),
        "router_margin_per_token": f8.router_margins(model, prompt).contiguous(),
    }
    for n in check:
        oracle[f"dequant.{n}"] = dequant[n].contiguous()
    if args.scheme == "block":
        gen = torch.Generator().manual_seed(8016)
        w = torch.randn(20, 40, generator=gen) * torch.linspace(0.01, 3.0, 40)
        q, s, dq = quantize_block(w, *BLOCK)
        assert s.shape == (3, 3)
        oracle["partial.q"] = q.contiguous()
        oracle["partial.scale_inv"] = s.contiguous()
        oracle["partial.dequant"] = dq.contiguous()
    save_file(oracle, str(out / "oracle.safetensors"), metadata={"format": "pt"})

    quant_err = max((dequant[n] - src[n].float()).abs().max().item() for n in quantized)
    meta = {
        "case": out.name,
        "description": f"{args.src.name} quantized to FP8 e4m3 with "
        + ("8x16 block scales (weight_scale_inv, quant_method fp8)" if args.scheme == "block"
           else "per-output-channel bf16 scales (weight_scale, compressed-tensors float-quantized)")
        + "; embeddings, lm_head and norms bf16; router gate and expert bias f32.",
        "source_fixture": args.src.name,
        "input_ids": prompt.tolist(),
        "greedy_ids": ref["greedy"],
        "dtype": "float8_e4m3fn",
        "compute_dtype_of_logits": "float32",
        "quantization_config": qcfg,
        "quantized_tensors": len(quantized),
        "max_abs_quantization_error": quant_err,
        "max_abs_logit_shift_vs_source_oracle": (ref["logits"] - src_logits).abs().max().item(),
        "greedy_min_top1_top2_margin": ref["greedy_margin"],
        "router_min_kth_margin": ref["router_margin"],
        "logits_bf16_max_abs_diff_vs_f32": (logits_bf16 - ref["logits"]).abs().max().item(),
        "checks": checks,
        "versions": {"transformers": mo.transformers.__version__, "torch": torch.__version__},
    }
    mo.write_json(out / "oracle.json", meta)
    total = sum(f.stat().st_size for f in out.iterdir())
    assert total < 1_000_000, total
    print(json.dumps({k: meta[k] for k in (
        "quantized_tensors", "max_abs_quantization_error", "max_abs_logit_shift_vs_source_oracle",
        "greedy_min_top1_top2_margin", "router_min_kth_margin", "logits_bf16_max_abs_diff_vs_f32",
        "checks")}, indent=1))
    print(f"{out}: {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
