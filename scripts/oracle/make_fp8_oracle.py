#!/usr/bin/env python3
"""Turn an existing oracle fixture into an FP8 checkpoint (the form of Hy3's released FP8
variant) and compute transformers' reference outputs on the dequantized weights.

Usage (from the repository root):

    .venv/bin/python scripts/oracle/make_fp8_oracle.py \
        --src crates/model/tests/fixtures/oracle/hub_dialect \
        --out crates/model/tests/fixtures/oracle/fp8_hub

What is written to --out:
  * config.json: the source config plus
    `quantization_config = {"quant_method": "fp8", "activation_scheme": "static", "fmt": "e4m3",
    "ignored_layers": ["lm_head"]}`;
  * model.safetensors: every projection matrix (`*_proj.weight`: attention q/k/v/o, the dense
    MLP, each routed expert, the shared expert, the MTP layer's eh_proj) quantized per tensor to
    float8_e4m3fn with `scale = amax / 448`, beside it `<prefix>.weight_scale` and
    `<prefix>.input_scale` (f32; shape [] for attention weight scales and [1] for the others,
    the reverse for input scales, so both shapes occur). Embeddings, lm_head and norms are
    stored in bf16; the router gate weight and the expert bias stay f32 (as in Hy3's release);
  * oracle.safetensors: input_ids, `logits` (f32 prefill logits of transformers' HYV3ForCausalLM
    on the dequantized weights `q.float() * scale` with the bf16 tensors upcast), `logits_bf16`
    (the same model in bf16, router in f32), `router_margin_per_token` (smallest top-k score gap
    over the MoE layers, per prompt token), `fp8_all` (all 256 e4m3 bit patterns) with
    `fp8_all_f32` (torch's decoding of them), `dequant.<name>` for a few matrices (torch's
    `q.float() * scale`, to check the loader's bytes), and make_oracles.py's `hidden.*` and
    `router.*` taps;
  * oracle.json: greedy_ids (24 tokens, f32, KV cache), margins, checks.

input_scale: static activation scales as a calibrating quantizer writes them, amax(input)/448
over the prompt, taken with hooks on transformers' nn.Linear projections; the routed experts
(fused in transformers, so no module per expert) get the MoE block's input amax, and the MTP
layer (not run) 1.0. Switchyard reads and validates input_scale but computes with dequantized
weights and unquantized activations, so the values do not enter the reference.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_oracles as mo  # noqa: E402  (run_reference, bf16_model, write_json; same venv)

import torch.nn.functional as F  # noqa: E402
from transformers import HYV3ForCausalLM  # noqa: E402
from transformers.models.hy_v3.modeling_hy_v3 import HYV3TopKRouter  # noqa: E402

E4M3_MAX = 448.0
QUANT_CONFIG = {
    "quant_method": "fp8",
    "activation_scheme": "static",
    "fmt": "e4m3",
    "ignored_layers": ["lm_head"],
}


def is_projection(name: str, t: torch.Tensor) -> bool:
    return name.endswith("_proj.weight") and t.dim() == 2


def is_router(name: str) -> bool:
    return name.endswith("router.gate.weight") or name.endswith("expert_bias") or mo.is_router_param(name)


def quantize(w: torch.Tensor):
    """Per-tensor e4m3: returns (q, scale) with w ≈ q.float() * scale."""
    w = w.float()
    amax = w.abs().max().clamp(min=1e-12)
    scale = (amax / E4M3_MAX).float()
    q = (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def load_tensors(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("model*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return out


@torch.no_grad()
def load_reference(cfg: dict, tensors: dict) -> tuple[HYV3ForCausalLM, dict]:
    """transformers' own loader (hub-name conversion included) on f32 tensors in a temp dir."""
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        c = dict(cfg)
        c.pop("quantization_config", None)
        c["torch_dtype"] = "float32"
        # transformers 5.24 needs moe_intermediate_size for the hub_v4 dialect (see the source
        # fixture's oracle.json transformers_checks).
        if "moe_intermediate_size" not in c and "expert_hidden_dim" in c:
            c["moe_intermediate_size"] = c["expert_hidden_dim"]
        mo.write_json(d / "config.json", c)
        save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"))
        m, info = HYV3ForCausalLM.from_pretrained(
            str(d),
            dtype=torch.float32,
            attn_implementation="eager",
            experts_implementation="eager",
            output_loading_info=True,
        )
    m.eval()
    assert not info.get("missing_keys"), info["missing_keys"]
    assert not info.get("mismatched_keys"), info["mismatched_keys"]
    return m, info


@torch.no_grad()
def calibrate_input_amax(model: HYV3ForCausalLM, prompt: torch.Tensor) -> dict:
    """amax of each projection's input over the prompt, keyed by transformers module name."""
    amax = {}
    handles = []

    def hook(name):
        def f(mod, inp):
            amax[name] = max(amax.get(name, 0.0), inp[0].detach().abs().max().item())

        return f

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) or name.endswith(".mlp"):
            handles.append(mod.register_forward_pre_hook(hook(name)))
    try:
        model(input_ids=prompt[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return amax


@torch.no_grad()
def router_margins(model: HYV3ForCausalLM, prompt: torch.Tensor) -> torch.Tensor:
    """Per prompt token, the smallest gap over MoE layers between the k-th and (k+1)-th
    (sigmoid + bias) expert score: where it is tiny, bf16 rounding can change the experts."""
    gaps = []

    def hook(mod, inp, out):
        hs, bias = inp
        s = torch.sigmoid(F.linear(hs.reshape(-1, hs.shape[-1]).float(), mod.weight.float())) + bias.float()
        srt = s.sort(-1, descending=True).values
        gaps.append(srt[:, mod.top_k - 1] - srt[:, mod.top_k])

    handles = [
        layer.mlp.gate.register_forward_hook(hook)
        for layer in model.model.layers
        if isinstance(getattr(layer.mlp, "gate", None), HYV3TopKRouter)
    ]
    try:
        model(input_ids=prompt[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(gaps).min(0).values.float()


def input_scale_for(name: str, amax: dict) -> float:
    prefix = name[: -len(".weight")]
    candidates = [prefix, prefix.replace(".shared_mlp.", ".shared_experts.")]
    if ".mlp.experts." in prefix:  # routed expert: the MoE block's input
        candidates.append(prefix.split(".mlp.experts.")[0] + ".mlp")
    for c in candidates:
        if c in amax and amax[c] > 0:
            return amax[c] / E4M3_MAX
    return 1.0  # MTP layer (not run in the forward pass)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=Path("crates/model/tests/fixtures/oracle/hub_dialect"))
    ap.add_argument("--out", type=Path, default=Path("crates/model/tests/fixtures/oracle/fp8_hub"))
    args = ap.parse_args(argv)

    src_cfg = json.loads((args.src / "config.json").read_text())
    src = load_tensors(args.src)
    with safe_open(str(args.src / "oracle.safetensors"), "pt") as fh:
        prompt = fh.get_tensor("input_ids").long()
        src_logits = fh.get_tensor("logits")

    # Pipeline check: the unquantized source through the same loading path reproduces its oracle.
    m0, _ = load_reference(src_cfg, src)
    src_diff = (m0(input_ids=prompt[None]).logits[0].float() - src_logits).abs().max().item()
    assert src_diff < 1e-5, src_diff
    amax = calibrate_input_amax(m0, prompt)
    del m0

    stored, dequant, scales = {}, {}, {}
    for name in sorted(src):
        t = src[name]
        if is_projection(name, t):
            q, scale = quantize(t)
            prefix = name[: -len(".weight")]
            attn = ".self_attn." in name
            stored[name] = q.contiguous()
            stored[f"{prefix}.weight_scale"] = scale.reshape(() if attn else (1,)).clone()
            inp = torch.tensor(input_scale_for(name, amax), dtype=torch.float32)
            stored[f"{prefix}.input_scale"] = inp.reshape((1,) if attn else ()).clone()
            dequant[name] = q.float() * scale
            scales[name] = scale.item()
        elif is_router(name):
            stored[name] = t.float().contiguous()
            dequant[name] = stored[name]
        else:
            stored[name] = t.bfloat16().contiguous()
            dequant[name] = stored[name].float()

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    cfg = dict(src_cfg)
    cfg["quantization_config"] = QUANT_CONFIG
    cfg["torch_dtype"] = "bfloat16"
    mo.write_json(args.out / "config.json", dict(sorted(cfg.items())))
    save_file(stored, str(args.out / "model.safetensors"), metadata={"format": "pt"})

    # Reference on the dequantized weights, read back from the written file (so what Rust reads
    # is what the reference saw).
    back = load_tensors(args.out)
    for name, q in back.items():
        if q.dtype == torch.float8_e4m3fn:
            prefix = name[: -len(".weight")]
            ws = back[f"{prefix}.weight_scale"].float().reshape(())
            assert torch.equal(q.float() * ws, dequant[name]), name
    model, info = load_reference(cfg, dequant)
    ref = mo.run_reference(model, prompt)
    with torch.no_grad():
        mb = mo.bf16_model(model)
        logits_bf16 = mb(input_ids=prompt[None]).logits[0].float()
        del mb

    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    check = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.experts.3.down_proj.weight",
        "model.layers.2.mlp.shared_mlp.gate_proj.weight",
    ]
    oracle = {
        "input_ids": prompt.clone(),
        "logits": ref["logits"].contiguous(),
        "logits_bf16": logits_bf16.contiguous(),
        "fp8_all": codes.contiguous(),
        "fp8_all_f32": codes.float().contiguous(),
        "router_margin_per_token": router_margins(model, prompt).contiguous(),
    }
    for n in check:
        oracle[f"dequant.{n}"] = dequant[n].contiguous()
    for k, v in ref["hidden"].items():  # the same debug taps as make_oracles.py writes
        oracle[f"hidden.{k}"] = v.contiguous()
    for li, r in sorted(ref["router"].items()):
        oracle[f"router.layer{li}.topk_idx"] = r["idx"].long().contiguous()
        oracle[f"router.layer{li}.topk_weight"] = r["w"].contiguous()
    save_file(oracle, str(args.out / "oracle.safetensors"), metadata={"format": "pt"})

    quant_err = max((dequant[n] - src[n].float()).abs().max().item() for n in scales)
    logit_shift = (ref["logits"] - src_logits).abs().max().item()
    meta = {
        "case": args.out.name,
        "description": f"{args.src.name} quantized to FP8 (per-tensor e4m3 projections with f32 weight_scale "
        "and static input_scale; embeddings, lm_head and norms bf16; router gate and expert bias f32); "
        "config.json carries quantization_config. Reference = transformers on the dequantized weights.",
        "source_fixture": args.src.name,
        "input_ids": prompt.tolist(),
        "greedy_ids": ref["greedy"],
        "dtype": "float8_e4m3fn",
        "compute_dtype_of_logits": "float32",
        "quantization_config": QUANT_CONFIG,
        "quantized_tensors": len(scales),
        "max_abs_quantization_error": quant_err,
        "max_abs_logit_shift_vs_source_oracle": logit_shift,
        "max_abs_logit": ref["logits"].abs().max().item(),
        "greedy_min_top1_top2_margin": ref["greedy_margin"],
        "router_min_kth_margin": ref["router_margin"],
        "bias_changed_selection": {"tokens_changed": ref["bias_changed"], "token_layer_pairs": ref["bias_total"]},
        "logits_bf16_max_abs_diff_vs_f32": (logits_bf16 - ref["logits"]).abs().max().item(),
        "checks": {
            "source_through_reference_loader_max_abs_diff": src_diff,
            "reference_unexpected_keys_ignored": sorted(info.get("unexpected_keys", []))[:3],
            "written_file_dequantizes_to_reference_weights": True,
            "prefill_argmax_matches_generate": ref["prefill_argmax_matches"],
        },
        "versions": {"transformers": mo.transformers.__version__, "torch": torch.__version__},
        "notes": "logits: float32 prefill logits of transformers HYV3ForCausalLM (eager) with weights "
        "q.float() * weight_scale for FP8 tensors and bf16 tensors upcast to f32. greedy_ids: generate(do_sample="
        f"False, max_new_tokens={mo.NEW_TOKENS}) in float32 with KV cache. input_scale is not used by the "
        "reference (weight-only dequantization).",
    }
    mo.write_json(args.out / "oracle.json", meta)
    total = sum(f.stat().st_size for f in args.out.iterdir())
    assert total < 1_000_000, total
    print(json.dumps({k: meta[k] for k in (
        "quantized_tensors", "max_abs_quantization_error", "max_abs_logit_shift_vs_source_oracle",
        "greedy_min_top1_top2_margin", "router_min_kth_margin", "logits_bf16_max_abs_diff_vs_f32")}, indent=1))
    print(f"{args.out}: {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
