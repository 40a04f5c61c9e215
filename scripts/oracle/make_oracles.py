#!/usr/bin/env python3
"""Build tiny random hy_v3 (Tencent Hy3) checkpoints and transformers reference outputs.

Usage (from the repository root):

    .venv/bin/python scripts/oracle/make_oracles.py --out crates/model/tests/fixtures/oracle

Every case directory gets
  * config.json                       (transformers dialect or one of Tencent's hub dialects)
  * model.safetensors | model-*.safetensors + model.safetensors.index.json
  * oracle.safetensors                input_ids i64[T], logits f32[T,V], logits_bf16 f32[T,V],
                                      hidden.* and router.* debug tensors (see README.md)
  * oracle.json                       input_ids, greedy_ids (24), dtype, notes, checks

Deterministic: every random number comes from a torch.Generator seeded from the case's seed.
See scripts/oracle/README.md for the forward-pass semantics the Rust engine must reproduce.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import HYV3Config, HYV3ForCausalLM  # noqa: E402
from transformers.models.hy_v3.modeling_hy_v3 import HYV3TopKRouter  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

NEW_TOKENS = 24

# Acceptance thresholds for a seed (so that a correct f32 Rust implementation cannot flip a
# greedy token or an expert choice because of float rounding).
MIN_GREEDY_MARGIN = 2e-3  # top1 - top2 logit gap at every greedy step
MIN_ROUTER_MARGIN = 1e-4  # gap between k-th and (k+1)-th (sigmoid + bias) score, every token/layer
MIN_DISTINCT_GREEDY = 4
MIN_BIAS_CHANGED_FRAC = 0.10

# --------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------

BASE = dict(
    vocab_size=256,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    num_experts=8,
    num_experts_per_tok=2,
    num_shared_experts=1,
    moe_intermediate_size=16,
    router_scaling_factor=2.826,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


# The AMX tile cases (bf16_tiles, bf16_attn_tiles): every projection a whole number of 16x32
# tiles, 4 experts top-2 so each sees many prompt tokens.
TILE_CFG = dict(
    BASE,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_experts=4,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
# transformers' own bf16 run must stay near f32, and no expert choice may be near a tie, so
# bf16 rounding anywhere cannot flip one: the bf16 checks then measure the kernels, not a
# chaotic seed.
TILE_CASE = dict(
    max_bf16_diff=0.2,
    min_router_margin=3e-3,
    storage="bfloat16",
    layout="fused",
    dialect="transformers",
    shard=None,
    mtp=False,
)


def case_list():
    f32 = dict(BASE)
    return [
        dict(
            name="f32_basic",
            cfg=f32,
            seed=1000,
            prompt_len=16,
            storage="float32",
            layout="fused",
            dialect="transformers",
            shard=None,
            mtp=False,
            desc="f32 weights, layer 0 dense, layers 1-2 MoE (8 experts, top-2, 1 shared), GQA 4q/2kv, "
            "single model.safetensors in transformers' in-memory (fused-expert) layout.",
        ),
        dict(
            name="bf16_f32router",
            cfg=dict(BASE, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
            seed=2000,
            prompt_len=14,
            storage="bfloat16",
            layout="fused",
            dialect="transformers",
            shard=None,
            mtp=False,
            desc="bf16 weights except mlp.gate.weight and mlp.e_score_correction_bias (f32, full precision), "
            "fused layout. `logits` = float32 math on the bf16-rounded weights.",
        ),
        dict(
            name="sharded",
            cfg=f32,
            seed=1000,  # same seed/config as f32_basic -> identical weights and oracle
            prompt_len=16,
            storage="float32",
            layout="save_pretrained",
            dialect="transformers",
            shard="60KB",
            mtp=False,
            desc="Same model as f32_basic (same seed) written by transformers save_pretrained(max_shard_size) -> "
            "index + shards. NOTE: transformers 5.24 save_pretrained reverses its conversion mapping, so the "
            "tensors are in the hub naming (per-expert experts.{j}.*, router.gate, expert_bias, shared_mlp) "
            "while config.json is the transformers dialect.",
        ),
        dict(
            name="hub_dialect",
            cfg=dict(
                BASE,
                rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
                rms_norm_eps=1e-6,
                router_scaling_factor=2.5,
            ),
            seed=3000,
            prompt_len=18,
            storage="float32",
            layout="hub",
            dialect="hub_v4",
            shard=None,
            mtp=True,
            desc="Tencent original (transformers-4.57 era) config dialect: top-level rope_theta, expert_hidden_dim, "
            "first_k_dense_replace, qk_norm/route_norm/moe_router_* flags, num_nextn_predict_layers=1; hub tensor "
            "names (per-expert) plus an MTP layer model.layers.3.* that must be ignored.",
        ),
        dict(
            name="head_dim_ne",
            cfg=dict(
                BASE,
                hidden_size=48,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                num_shared_experts=2,
                router_scaling_factor=1.7,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
            seed=4000,
            prompt_len=20,
            storage="float32",
            layout="fused",
            dialect="transformers",
            shard=None,
            mtp=False,
            desc="head_dim=16 != hidden/heads=12 (q_proj [64,48], o_proj [48,64]), GQA 4q/2kv, 2 shared experts "
            "(shared intermediate = 2*16 = 32), router_scaling_factor 1.7.",
        ),
        dict(
            name="e192_k8",
            cfg=dict(
                BASE,
                vocab_size=256,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=1,
                head_dim=8,
                num_experts=192,
                num_experts_per_tok=8,
                num_shared_experts=1,
                moe_intermediate_size=4,
                mlp_layer_types=["dense", "dense", "sparse"],
                rope_parameters={"rope_type": "default", "rope_theta": 11158840.0},
            ),
            seed=5000,
            prompt_len=12,
            storage="bfloat16",
            layout="save_pretrained",
            dialect="hub_v5",
            shard="64KB",
            mtp=False,
            desc="192 experts top-8, layers 0-1 dense, layer 2 MoE (first_k_dense_replace=2), MQA 4q/1kv, bf16 weights with f32 "
            "router, sharded via save_pretrained (hub tensor names), config in Tencent's current hub dialect "
            "(rope_parameters dict + expert_hidden_dim + moe_intermediate_size + first_k_dense_replace, no "
            "mlp_layer_types).",
        ),
        dict(
            name="bf16_tiles",
            cfg=dict(TILE_CFG, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
            seed=6000,
            prompt_len=40,
            **TILE_CASE,
            desc="bf16 weights with every projection a whole number of 16x32 AMX tiles (hidden 64, expert "
            "intermediate 32, dense 128, q 64 / kv 32 rows) and a 40-token prompt, so each of the 4 experts "
            "(top-2) sees about 20 tokens: the CPU's AMX tile path runs in prefill where the CPU has AMX.",
        ),
        dict(
            name="bf16_attn_tiles",
            cfg=dict(TILE_CFG, num_attention_heads=8, num_key_value_heads=2, head_dim=32),
            seed=7000,
            prompt_len=100,
            **TILE_CASE,
            desc="bf16 weights with head_dim 32 (one AMX tile step per query and key row) and a 100-token "
            "prompt: the CPU's prefill attention runs on AMX tiles (two 64-token context chunks, GQA 8q/2kv) "
            "through the paged KV cache where the CPU has AMX; no near-tied expert choice.",
        ),
        dict(
            name="mtp",
            cfg=f32,
            seed=1000,  # same model as f32_basic
            prompt_len=16,
            storage="float32",
            layout="fused",
            dialect="transformers",
            shard=None,
            mtp=True,
            desc="f32_basic plus an MTP layer (model.layers.3.*: enorm, hnorm, eh_proj, final_layernorm and a full "
            "MoE decoder block, fused naming) and num_nextn_predict_layers=1 in config.json. The MTP tensors must "
            "be skipped; logits are those of f32_basic.",
        ),
    ]


# --------------------------------------------------------------------------------------
# model construction
# --------------------------------------------------------------------------------------


def build_config(cfg: dict) -> HYV3Config:
    c = HYV3Config(**copy.deepcopy(cfg), eos_token_id=None, bos_token_id=None, pad_token_id=None)
    c._attn_implementation = "eager"
    c._experts_implementation = "eager"
    return c


def is_router_param(name: str) -> bool:
    return name.endswith("mlp.gate.weight") or name.endswith("mlp.e_score_correction_bias")


@torch.no_grad()
def init_weights(model: HYV3ForCausalLM, gen: torch.Generator, bias_std: float) -> None:
    sd = model.state_dict(keep_vars=True)
    for name in sorted(sd):
        p = sd[name]
        shape = tuple(p.shape)

        def randn(*s):
            return torch.randn(*s, generator=gen, dtype=torch.float32)

        if "norm" in name:  # input/post-attention/q/k/final norms
            v = 1.0 + 0.3 * randn(*shape)
        elif name.endswith("e_score_correction_bias"):
            v = bias_std * randn(*shape)
        elif name == "model.embed_tokens.weight":
            v = randn(*shape)
        elif name == "lm_head.weight":
            v = 0.25 * randn(*shape)
        elif name.endswith("mlp.gate.weight"):
            v = 0.2 * randn(*shape)
        elif name.endswith("experts.gate_up_proj"):
            v = randn(*shape) / shape[-1] ** 0.5
        elif name.endswith("experts.down_proj"):
            v = randn(*shape) / shape[-1] ** 0.5
        elif name.endswith(".weight") and len(shape) == 2:
            v = randn(*shape) / shape[1] ** 0.5
        else:
            raise RuntimeError(f"unhandled parameter {name} {shape}")
        p.copy_(v)


@torch.no_grad()
def round_to_bf16(model: HYV3ForCausalLM) -> None:
    """Round every weight except the router gate / expert bias to bf16 (kept stored as f32)."""
    for name, p in model.state_dict(keep_vars=True).items():
        if not is_router_param(name):
            p.copy_(p.bfloat16().float())


def bf16_model(model: HYV3ForCausalLM) -> HYV3ForCausalLM:
    """bf16 copy with router gate + expert bias in f32 (what from_pretrained(dtype=bf16) gives)."""
    m = copy.deepcopy(model)
    m.to(torch.bfloat16)
    src = model.state_dict()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if is_router_param(name):
                p.data = src[name].clone().float()
        for name, b in m.named_buffers():
            if is_router_param(name):
                mod_name, attr = name.rsplit(".", 1)
                m.get_submodule(mod_name)._buffers[attr] = src[name].clone().float()
    m.config.dtype = torch.bfloat16
    return m


# --------------------------------------------------------------------------------------
# running the reference
# --------------------------------------------------------------------------------------


class Capture:
    """Forward hooks: hidden states after each block and router decisions."""

    def __init__(self, model: HYV3ForCausalLM):
        self.model = model
        self.handles = []
        self.reset()
        inner = model.model
        self.handles.append(inner.embed_tokens.register_forward_hook(self._hid("embed")))
        for i, layer in enumerate(inner.layers):
            self.handles.append(layer.register_forward_hook(self._hid(f"layer{i}")))
        self.handles.append(inner.norm.register_forward_hook(self._hid("final_norm")))
        for i, layer in enumerate(inner.layers):
            if hasattr(layer.mlp, "gate") and isinstance(layer.mlp.gate, HYV3TopKRouter):
                self.handles.append(layer.mlp.gate.register_forward_hook(self._router(i)))

    def reset(self):
        self.hidden = {}
        self.router = {}

    def _hid(self, key):
        def hook(mod, inp, out):
            self.hidden[key] = out.detach().float().reshape(-1, out.shape[-1]).clone()

        return hook

    def _router(self, layer_idx):
        def hook(mod, inp, out):
            hs, bias = inp
            logits = F.linear(hs.reshape(-1, hs.shape[-1]).float(), mod.weight.float())
            scores = torch.sigmoid(logits)
            biased = scores + bias.float()
            k = mod.top_k
            srt = torch.sort(biased, dim=-1, descending=True).values
            margin = (srt[:, k - 1] - srt[:, k]).min().item() if biased.shape[-1] > k else float("inf")
            sel_b = torch.topk(biased, k, dim=-1).indices.sort(dim=-1).values
            sel_u = torch.topk(scores, k, dim=-1).indices.sort(dim=-1).values
            changed = (sel_b != sel_u).any(dim=-1)
            _, w, idx = out
            order = idx.argsort(dim=-1)
            self.router[layer_idx] = dict(
                idx=idx.gather(1, order).detach().clone(),
                w=w.gather(1, order).detach().float().clone(),
                margin=margin,
                changed=int(changed.sum()),
                tokens=int(changed.numel()),
            )

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def run_reference(model: HYV3ForCausalLM, prompt: torch.Tensor):
    cap = Capture(model)
    try:
        out = model(input_ids=prompt[None], use_cache=False)
        logits = out.logits[0].float().clone()
        hidden = dict(cap.hidden)
        router = dict(cap.router)

        gen = model.generate(
            input_ids=prompt[None],
            attention_mask=torch.ones_like(prompt)[None],
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            eos_token_id=None,
            pad_token_id=0,
            use_cache=True,
        )
        greedy = gen[0, prompt.numel():].tolist()
        assert len(greedy) == NEW_TOKENS

        # Re-run the whole sequence as one prefill: checks decode/prefill consistency and gives
        # the margins at every greedy step and every routing decision.
        cap.reset()
        full = torch.cat([prompt, torch.tensor(greedy[:-1], dtype=torch.long)])
        fl = model(input_ids=full[None], use_cache=False).logits[0].float()
        steps = fl[prompt.numel() - 1 :]
        top2 = torch.topk(steps, 2, dim=-1).values
        greedy_margin = (top2[:, 0] - top2[:, 1]).min().item()
        prefill_argmax = steps.argmax(-1).tolist()
        router_margin = min((r["margin"] for r in cap.router.values()), default=float("inf"))
        changed = sum(r["changed"] for r in cap.router.values())
        total = sum(r["tokens"] for r in cap.router.values())
    finally:
        cap.remove()
    return dict(
        logits=logits,
        hidden=hidden,
        router=router,
        greedy=greedy,
        greedy_margin=greedy_margin,
        prefill_argmax_matches=prefill_argmax == greedy,
        router_margin=router_margin,
        bias_changed=changed,
        bias_total=total,
    )


# --------------------------------------------------------------------------------------
# checkpoint writing
# --------------------------------------------------------------------------------------


def fused_to_hub(sd: dict, cfg: HYV3Config) -> dict:
    """transformers (fused) names -> Tencent hub names. Mirrors conversion_mapping.py['hy_v3'] reversed."""
    out = {}
    ie = cfg.moe_intermediate_size
    for name, t in sd.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            pre = name[: -len("gate_up_proj")]
            assert t.shape[1] == 2 * ie
            for j in range(t.shape[0]):
                out[f"{pre}{j}.gate_proj.weight"] = t[j, :ie].clone().contiguous()
                out[f"{pre}{j}.up_proj.weight"] = t[j, ie:].clone().contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            pre = name[: -len("down_proj")]
            for j in range(t.shape[0]):
                out[f"{pre}{j}.down_proj.weight"] = t[j].clone().contiguous()
        elif name.endswith("mlp.gate.weight"):
            out[name.replace("mlp.gate.weight", "mlp.router.gate.weight")] = t
        elif name.endswith("mlp.e_score_correction_bias"):
            out[name.replace("mlp.e_score_correction_bias", "mlp.expert_bias")] = t
        elif ".mlp.shared_experts." in name:
            out[name.replace(".mlp.shared_experts.", ".mlp.shared_mlp.")] = t
        else:
            out[name] = t
    return out


def storage_state_dict(model: HYV3ForCausalLM, storage: str) -> dict:
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if storage == "bfloat16":
        for k in sd:
            if not is_router_param(k):
                sd[k] = sd[k].bfloat16()
    return sd


def mtp_tensors(model: HYV3ForCausalLM, cfg: HYV3Config, gen: torch.Generator, storage: str, hub: bool) -> dict:
    """Random MTP layer at index num_hidden_layers (one full MoE decoder block + enorm/hnorm/eh_proj/final_layernorm)."""
    n = cfg.num_hidden_layers
    moe_idx = [i for i, t in enumerate(cfg.mlp_layer_types) if t == "sparse"][-1]
    src = {k: v for k, v in model.state_dict().items() if k.startswith(f"model.layers.{moe_idx}.")}
    out = {}
    for k, v in src.items():
        newk = f"model.layers.{n}." + k[len(f"model.layers.{moe_idx}.") :]
        if "norm" in k:
            out[newk] = 1.0 + 0.3 * torch.randn(v.shape, generator=gen)
        elif k.endswith("e_score_correction_bias"):
            out[newk] = 0.1 * torch.randn(v.shape, generator=gen)
        else:
            out[newk] = torch.randn(v.shape, generator=gen) / v.shape[-1] ** 0.5
    h = cfg.hidden_size
    for nm in ("enorm", "hnorm", "final_layernorm"):
        out[f"model.layers.{n}.{nm}.weight"] = 1.0 + 0.3 * torch.randn(h, generator=gen)
    out[f"model.layers.{n}.eh_proj.weight"] = torch.randn(h, 2 * h, generator=gen) / (2 * h) ** 0.5
    if storage == "bfloat16":
        out = {k: (v if is_router_param(k) else v.bfloat16()) for k, v in out.items()}
    if hub:
        out = fused_to_hub(out, cfg)
    return {k: v.contiguous() for k, v in out.items()}


def transformers_config_dict(cfg: HYV3Config, storage: str) -> dict:
    d = {"architectures": ["HYV3ForCausalLM"]}
    d.update(cfg.to_diff_dict())  # what save_pretrained writes
    d["dtype"] = storage
    for k in list(d):
        if k.startswith("_"):
            d.pop(k)
    for k in ("head_dim", "mlp_layer_types", "rope_parameters", "moe_intermediate_size", "num_experts",
              "num_experts_per_tok", "num_shared_experts", "router_scaling_factor", "rms_norm_eps"):
        assert k in d, k
    return d


def hub_config_dict(cfg: HYV3Config, storage: str, variant: str, mtp: bool) -> dict:
    """Tencent hub dialects.

    hub_v4: the original (transformers 4.57 remote-code) config: top-level rope_theta, expert_hidden_dim only.
    hub_v5: the current hub config (after Tencent's 4.57 -> 5.x conversion): rope_parameters dict and both
            expert_hidden_dim and moe_intermediate_size; still first_k_dense_replace, no mlp_layer_types.
    """
    types = cfg.mlp_layer_types
    k_dense = 0
    while k_dense < len(types) and types[k_dense] == "dense":
        k_dense += 1
    assert all(t == "sparse" for t in types[k_dense:]), "hub dialect can only express a dense prefix"
    d = {
        "architectures": ["HYV3ForCausalLM"],
        "bos_token_id": None,
        "enable_attention_fp32_softmax": False,
        "enable_lm_head_fp32": False,
        "enable_moe_fp32_combine": True,
        "eos_token_id": None,
        "expert_hidden_dim": cfg.moe_intermediate_size,
        "first_k_dense_replace": k_dense,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "initializer_range": cfg.initializer_range,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "model_type": "hy_v3",
        "moe_router_enable_expert_bias": True,
        "moe_router_use_sigmoid": True,
        "num_attention_heads": cfg.num_attention_heads,
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
        "num_nextn_predict_layers": 1 if mtp else 0,
        "num_shared_experts": cfg.num_shared_experts,
        "output_router_logits": False,
        "pad_token_id": None,
        "qk_norm": True,
        "rms_norm_eps": cfg.rms_norm_eps,
        "route_norm": True,
        "router_scaling_factor": cfg.router_scaling_factor,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": cfg.vocab_size,
        "torch_dtype": storage,
    }
    theta = cfg.rope_parameters["rope_theta"]
    if variant == "hub_v4":
        d["rope_theta"] = theta
        d["attn_impl"] = "eager"
        d["transformers_version"] = "4.57.1"
    elif variant == "hub_v5":
        d["moe_intermediate_size"] = cfg.moe_intermediate_size
        d["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
        d["transformers_version"] = "5.7.0.dev0"
    else:
        raise ValueError(variant)
    return dict(sorted(d.items()))


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_checkpoint(case, model, cfg, out_dir: Path, gen_mtp: torch.Generator) -> dict:
    storage, layout = case["storage"], case["layout"]
    info = {}
    if layout == "fused":
        sd = storage_state_dict(model, storage)
        if case["mtp"]:
            sd.update(mtp_tensors(model, cfg, gen_mtp, storage, hub=False))
        save_file(sd, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        cdict = transformers_config_dict(cfg, storage)
    elif layout == "hub":
        sd = fused_to_hub(storage_state_dict(model, storage), cfg)
        if case["mtp"]:
            sd.update(mtp_tensors(model, cfg, gen_mtp, storage, hub=True))
        save_file(sd, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        cdict = None
    elif layout == "save_pretrained":
        m = bf16_model(model) if storage == "bfloat16" else model
        with tempfile.TemporaryDirectory() as td:
            m.save_pretrained(td, max_shard_size=case["shard"] or "50GB")
            for f in sorted(Path(td).iterdir()):
                if f.name.endswith(".safetensors") or f.name == "model.safetensors.index.json":
                    shutil.copy(f, out_dir / f.name)
        # self-check: save_pretrained wrote exactly fused_to_hub(state_dict) (names, dtypes, values)
        expect = fused_to_hub(storage_state_dict(model, storage), cfg)
        got = load_dir_tensors(out_dir)
        assert set(got) == set(expect), (set(got) ^ set(expect))
        for k in expect:
            assert got[k].dtype == expect[k].dtype, (k, got[k].dtype, expect[k].dtype)
            assert torch.equal(got[k], expect[k]), k
        info["save_pretrained_matches_fused_to_hub"] = True
        cdict = transformers_config_dict(cfg, storage)
    else:
        raise ValueError(layout)

    if case["dialect"] == "transformers":
        if case["mtp"]:
            cdict["num_nextn_predict_layers"] = 1
    else:
        cdict = hub_config_dict(cfg, storage, case["dialect"], case["mtp"])
    write_json(out_dir / "config.json", cdict)
    return info


def load_dir_tensors(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("model*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return out


def files_of(d: Path):
    return sorted(p for p in d.iterdir() if p.is_file())


# --------------------------------------------------------------------------------------
# transformers load checks
# --------------------------------------------------------------------------------------


@torch.no_grad()
def load_check(src_dir: Path, prompt: torch.Tensor, ref_logits: torch.Tensor, patch: dict | None = None) -> str:
    """from_pretrained(dir) in float32 and compare prefill logits with the oracle."""
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        for f in files_of(src_dir):
            if f.name.startswith("oracle"):
                continue
            shutil.copy(f, d / f.name)
        if patch:
            c = json.loads((d / "config.json").read_text())
            c.update(patch)
            write_json(d / "config.json", c)
        try:
            m, info = HYV3ForCausalLM.from_pretrained(
                str(d),
                dtype=torch.float32,
                attn_implementation="eager",
                experts_implementation="eager",
                output_loading_info=True,
            )
        except Exception as e:  # noqa: BLE001
            return f"from_pretrained FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        m.eval()
        missing = sorted(info.get("missing_keys", []))
        mism = info.get("mismatched_keys", [])
        unexpected = sorted(info.get("unexpected_keys", []))
        logits = m(input_ids=prompt[None]).logits[0].float()
        diff = (logits - ref_logits).abs().max().item()
        msg = f"max|dlogit|={diff:.3g}"
        if missing:
            msg += f"; missing={len(missing)} e.g. {missing[:3]}"
        if mism:
            msg += f"; mismatched={len(mism)} e.g. {list(mism)[:2]}"
        if unexpected:
            msg += f"; unexpected (ignored)={len(unexpected)} e.g. {unexpected[:2]}"
        ok = diff < 1e-4 and not missing and not mism
        return ("OK " if ok else "MISMATCH ") + msg


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def build_case(case, max_tries: int):
    cfg = build_config(case["cfg"])
    for attempt in range(max_tries):
        seed = case["seed"] + attempt
        gen = torch.Generator().manual_seed(seed)
        model = HYV3ForCausalLM(cfg).eval()
        init_weights(model, gen, bias_std=case.get("bias_std", 0.1))
        if case["storage"] == "bfloat16":
            round_to_bf16(model)
        prompt = torch.randint(0, cfg.vocab_size, (case["prompt_len"],), generator=gen, dtype=torch.long)
        ref = run_reference(model, prompt)
        reasons = []
        if not ref["prefill_argmax_matches"]:
            reasons.append("prefill argmax != generate")
        if ref["greedy_margin"] < MIN_GREEDY_MARGIN:
            reasons.append(f"greedy margin {ref['greedy_margin']:.2g}")
        if ref["router_margin"] < case.get("min_router_margin", MIN_ROUTER_MARGIN):
            reasons.append(f"router margin {ref['router_margin']:.2g}")
        if len(set(ref["greedy"])) < MIN_DISTINCT_GREEDY:
            reasons.append(f"only {len(set(ref['greedy']))} distinct greedy tokens")
        if "max_bf16_diff" in case:
            with torch.no_grad():
                mb = bf16_model(model)
                lb = mb(input_ids=prompt[None]).logits[0].float()
                del mb
            diff = (lb - ref["logits"]).abs().max().item()
            if diff > case["max_bf16_diff"]:
                reasons.append(f"bf16 compute differs from f32 by {diff:.3g}")
        if ref["bias_changed"] < MIN_BIAS_CHANGED_FRAC * ref["bias_total"]:
            reasons.append(f"bias changed only {ref['bias_changed']}/{ref['bias_total']}")
        if not reasons:
            return cfg, model, prompt, ref, seed, gen
        print(f"  [{case['name']}] seed {seed} rejected: {', '.join(reasons)}", flush=True)
    raise RuntimeError(f"no acceptable seed for {case['name']} in {max_tries} tries")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--cases", nargs="*", default=None, help="subset of case names")
    ap.add_argument("--max-tries", type=int, default=200)
    args = ap.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    cases = case_list()
    if args.cases:
        cases = [c for c in cases if c["name"] in set(args.cases)]
    rows = []
    built = {}
    for case in cases:
        name = case["name"]
        print(f"== {name}", flush=True)
        key = (json.dumps(case["cfg"], sort_keys=True), case["seed"], case["prompt_len"], case["storage"])
        if key in built:  # identical model (sharded / mtp reuse f32_basic)
            cfg, model, prompt, ref, seed = built[key]
            gen = torch.Generator().manual_seed(seed + 7_000_000)
        else:
            cfg, model, prompt, ref, seed, gen = build_case(case, args.max_tries)
            built[key] = (cfg, model, prompt, ref, seed)
        gen_mtp = torch.Generator().manual_seed(seed + 9_000_000)

        out_dir = args.out / name
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        info = write_checkpoint(case, model, cfg, out_dir, gen_mtp)

        # bf16-compute logits (router gate + bias kept in f32, as from_pretrained(dtype=bf16) does)
        with torch.no_grad():
            mb = bf16_model(model)
            logits_bf16 = mb(input_ids=prompt[None]).logits[0].float()
            del mb

        tensors = {
            "input_ids": prompt.clone(),
            "logits": ref["logits"].contiguous(),
            "logits_bf16": logits_bf16.contiguous(),
        }
        for k, v in ref["hidden"].items():
            tensors[f"hidden.{k}"] = v.contiguous()
        for li, r in sorted(ref["router"].items()):
            tensors[f"router.layer{li}.topk_idx"] = r["idx"].long().contiguous()
            tensors[f"router.layer{li}.topk_weight"] = r["w"].contiguous()
        save_file(tensors, str(out_dir / "oracle.safetensors"), metadata={"format": "pt"})

        # transformers load checks
        checks = {}
        checks["from_pretrained"] = load_check(out_dir, prompt, ref["logits"])
        if case["dialect"] == "hub_v4":
            checks["from_pretrained_with_moe_intermediate_size_added"] = load_check(
                out_dir, prompt, ref["logits"], patch={"moe_intermediate_size": cfg.moe_intermediate_size}
            )
        if case["dialect"] == "hub_v5":
            checks["from_pretrained_with_mlp_layer_types_added"] = load_check(
                out_dir, prompt, ref["logits"], patch={"mlp_layer_types": list(cfg.mlp_layer_types)}
            )
        checks.update(info)

        n_params = sum(p.numel() for p in model.parameters())
        bf16_diff = (logits_bf16 - ref["logits"]).abs().max().item()
        meta = {
            "case": name,
            "description": case["desc"],
            "input_ids": prompt.tolist(),
            "greedy_ids": ref["greedy"],
            "dtype": case["storage"],
            "compute_dtype_of_logits": "float32",
            "config_dialect": case["dialect"],
            "tensor_layout": {
                "fused": "transformers in-memory names (mlp.experts.gate_up_proj/down_proj, mlp.gate.weight, "
                "mlp.e_score_correction_bias, mlp.shared_experts.*)",
                "hub": "Tencent hub names (mlp.experts.{j}.{gate,up,down}_proj.weight, mlp.router.gate.weight, "
                "mlp.expert_bias, mlp.shared_mlp.*)",
                "save_pretrained": "written by transformers save_pretrained -> Tencent hub names "
                "(mlp.experts.{j}.*, mlp.router.gate.weight, mlp.expert_bias, mlp.shared_mlp.*)",
            }[case["layout"]],
            "sharded": bool(case["shard"]),
            "has_mtp_layer": case["mtp"],
            "seed": seed,
            "num_params_main_model": n_params,
            "max_abs_logit": ref["logits"].abs().max().item(),
            "greedy_min_top1_top2_margin": ref["greedy_margin"],
            "router_min_kth_margin": ref["router_margin"],
            "bias_changed_selection": {"tokens_changed": ref["bias_changed"], "token_layer_pairs": ref["bias_total"]},
            "logits_bf16_max_abs_diff_vs_f32": bf16_diff,
            "suggested_tolerance": {
                "logits_f32_compute_max_abs": 2e-4,
                "logits_bf16_compute_max_abs": max(0.25, round(2 * bf16_diff, 2)),
            },
            "transformers_checks": checks,
            "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
            "notes": (
                "logits: float32 prefill logits of transformers HYV3ForCausalLM (eager attention, eager experts) "
                "on the stored weights (bf16 weights upcast to f32). logits_bf16: same model run in bfloat16 with "
                "mlp.gate.weight and e_score_correction_bias kept f32. greedy_ids: generate(do_sample=False, "
                f"max_new_tokens={NEW_TOKENS}, no eos) in float32 with KV cache. hidden.* are float32 [T,H] "
                "debug taps of the f32 prefill; router.layer{i}.topk_idx/topk_weight are the chosen experts "
                "(sorted by expert id) and their final weights (renormalised, times router_scaling_factor)."
            ),
        }
        write_json(out_dir / "oracle.json", meta)

        files = files_of(out_dir)
        total = sum(f.stat().st_size for f in files)
        assert total < 1_000_000, f"{name} is {total} bytes"
        rows.append(
            dict(
                case=name,
                params=n_params,
                files=len(files),
                kbytes=total / 1024,
                weights_kb=sum(f.stat().st_size for f in files if f.name.startswith("model")) / 1024,
                maxlogit=ref["logits"].abs().max().item(),
                distinct=len(set(ref["greedy"])),
                bias=f"{ref['bias_changed']}/{ref['bias_total']}",
                gm=ref["greedy_margin"],
                rm=ref["router_margin"],
                bf16=bf16_diff,
                load=checks["from_pretrained"].split(";")[0][:60],
            )
        )
        for k, v in checks.items():
            print(f"  {k}: {v}", flush=True)

    print()
    hdr = (
        f"{'case':<16}{'params':>8}{'files':>6}{'dir KiB':>9}{'wts KiB':>9}{'max|logit|':>11}"
        f"{'distinct':>9}{'bias chg':>10}{'greedy mgn':>11}{'router mgn':>11}{'bf16 diff':>10}  transformers load"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(
            f"{r['case']:<16}{r['params']:>8}{r['files']:>6}{r['kbytes']:>9.1f}{r['weights_kb']:>9.1f}"
            f"{r['maxlogit']:>11.3f}{r['distinct']:>9}{r['bias']:>10}{r['gm']:>11.2e}{r['rm']:>11.2e}"
            f"{r['bf16']:>10.3f}  {r['load']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
