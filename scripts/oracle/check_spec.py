#!/usr/bin/env python3
"""Independent float32 numpy implementation of the hy_v3 forward pass exactly as written in README.md.

It reads each fixture directory the way the Rust loader is meant to (either config dialect, either tensor
naming, single file or sharded, MTP layer skipped) and compares its prefill logits and expert choices with
the transformers oracle. If this passes, README.md is a sufficient spec.

    .venv/bin/python scripts/oracle/check_spec.py crates/model/tests/fixtures/oracle
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

# ---------------------------------------------------------------- config normalisation


def normalise_config(c: dict) -> dict:
    n = c["num_hidden_layers"]
    h = c["hidden_size"]
    heads = c["num_attention_heads"]
    out = dict(
        vocab=c["vocab_size"],
        hidden=h,
        layers=n,
        heads=heads,
        kv_heads=c.get("num_key_value_heads", heads),
        head_dim=c.get("head_dim") or h // heads,
        inter=c["intermediate_size"],
        eps=c.get("rms_norm_eps", 1e-5),
        n_exp=c.get("num_experts", c.get("num_local_experts")),
        top_k=c.get("num_experts_per_tok", c.get("moe_topk")),
        n_shared=c.get("num_shared_experts", 1),
        scale=c.get("router_scaling_factor", 1.0),
        route_norm=c.get("route_norm", True),
        tie=c.get("tie_word_embeddings", False),
    )
    out["moe_inter"] = c.get("moe_intermediate_size", c.get("expert_hidden_dim"))
    rp = c.get("rope_parameters") or c.get("rope_scaling") or {}
    out["theta"] = float(rp.get("rope_theta", c.get("rope_theta", 11158840.0)))
    assert rp.get("rope_type", "default") == "default"
    if c.get("mlp_layer_types") is not None:
        out["sparse"] = [t == "sparse" for t in c["mlp_layer_types"]]
    else:
        k = c.get("first_k_dense_replace", 1)
        out["sparse"] = [i >= k for i in range(n)]
    assert c.get("moe_router_use_sigmoid", True) and c.get("qk_norm", True)
    assert c.get("moe_router_enable_expert_bias", True)
    return out


# ---------------------------------------------------------------- weights


def load_weights(d: Path, cfg: dict) -> dict:
    idx = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(idx.read_text())["weight_map"].values())) if idx.exists() else ["model.safetensors"]
    raw, fp8 = {}, []
    for f in files:
        with safe_open(str(d / f), "pt") as fh:
            for k in fh.keys():
                m = re.match(r"model\.layers\.(\d+)\.", k)
                if m and int(m.group(1)) >= cfg["layers"]:
                    continue  # MTP layer(s): model.layers.{>= num_hidden_layers}.*
                t = fh.get_tensor(k)
                if str(t.dtype) == "torch.float8_e4m3fn":
                    fp8.append(k)
                raw[k] = t.float().numpy()
    # FP8 (README §5): per-tensor e4m3 weights times their f32 weight_scale; input_scale unused.
    for k in fp8:
        scale = raw[k[: -len("weight")] + "weight_scale"]
        assert scale.size == 1, (k, scale.shape)
        raw[k] = raw[k] * np.float32(scale.reshape(()))
    raw = {k: v for k, v in raw.items() if not k.endswith(("weight_scale", "input_scale"))}
    w = {}
    for k, v in raw.items():  # hub names -> canonical (fused) names
        k = k.replace(".mlp.router.gate.weight", ".mlp.gate.weight")
        k = k.replace(".mlp.expert_bias", ".mlp.e_score_correction_bias")
        k = k.replace(".mlp.shared_mlp.", ".mlp.shared_experts.")
        w[k] = v
    for i in range(cfg["layers"]):
        p = f"model.layers.{i}.mlp.experts"
        if f"{p}.0.gate_proj.weight" in w:
            e = cfg["n_exp"]
            g = np.stack([w.pop(f"{p}.{j}.gate_proj.weight") for j in range(e)])
            u = np.stack([w.pop(f"{p}.{j}.up_proj.weight") for j in range(e)])
            w[f"{p}.gate_up_proj"] = np.concatenate([g, u], axis=1)  # [E, 2*Ie, H], gate rows first
            w[f"{p}.down_proj"] = np.stack([w.pop(f"{p}.{j}.down_proj.weight") for j in range(e)])
    return w


# ---------------------------------------------------------------- forward


def rms(x, wt, eps):
    x = x.astype(np.float32)
    return wt * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def forward(cfg, w, ids):
    t = len(ids)
    hd, nh, nkv = cfg["head_dim"], cfg["heads"], cfg["kv_heads"]
    x = w["model.embed_tokens.weight"][ids]
    inv = 1.0 / (cfg["theta"] ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    ang = np.arange(t, dtype=np.float32)[:, None] * inv[None]  # [T, hd/2]
    cos = np.cos(np.concatenate([ang, ang], -1))
    sin = np.sin(np.concatenate([ang, ang], -1))

    def rope(v):  # v [T, n, hd], NeoX / rotate_half layout
        h2 = hd // 2
        rot = np.concatenate([-v[..., h2:], v[..., :h2]], -1)
        return v * cos[:, None] + rot * sin[:, None]

    mask = np.triu(np.full((t, t), -np.inf, dtype=np.float32), 1)
    routes = {}
    for i in range(cfg["layers"]):
        p = f"model.layers.{i}."
        hN = rms(x, w[p + "input_layernorm.weight"], cfg["eps"])
        q = (hN @ w[p + "self_attn.q_proj.weight"].T).reshape(t, nh, hd)
        k = (hN @ w[p + "self_attn.k_proj.weight"].T).reshape(t, nkv, hd)
        v = (hN @ w[p + "self_attn.v_proj.weight"].T).reshape(t, nkv, hd)
        q = rope(rms(q, w[p + "self_attn.q_norm.weight"], cfg["eps"]))
        k = rope(rms(k, w[p + "self_attn.k_norm.weight"], cfg["eps"]))
        g = nh // nkv
        out = np.zeros((t, nh, hd), np.float32)
        for hh in range(nh):
            kv = hh // g  # query head hh uses kv head hh // (nh / nkv)
            s = (q[:, hh] @ k[:, kv].T) * hd**-0.5 + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            out[:, hh] = (s / s.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + out.reshape(t, nh * hd) @ w[p + "self_attn.o_proj.weight"].T

        hN = rms(x, w[p + "post_attention_layernorm.weight"], cfg["eps"])
        if not cfg["sparse"][i]:
            m = p + "mlp."
            y = (silu(hN @ w[m + "gate_proj.weight"].T) * (hN @ w[m + "up_proj.weight"].T)) @ w[m + "down_proj.weight"].T
        else:
            m = p + "mlp."
            scores = sigmoid(hN @ w[m + "gate.weight"].T)  # [T, E]
            choice = scores + w[m + "e_score_correction_bias"][None]
            kk = cfg["top_k"]
            sel = np.argsort(-choice, axis=-1, kind="stable")[:, :kk]
            wt = np.take_along_axis(scores, sel, -1)
            if cfg["route_norm"]:
                wt = wt / (wt.sum(-1, keepdims=True) + 1e-20)
            wt = wt * cfg["scale"]
            ie = cfg["moe_inter"]
            gu = w[m + "experts.gate_up_proj"]
            dn = w[m + "experts.down_proj"]
            y = np.zeros_like(hN)
            for tok in range(t):
                for j, e in enumerate(sel[tok]):
                    a = gu[e] @ hN[tok]
                    y[tok] += wt[tok, j] * (dn[e] @ (silu(a[:ie]) * a[ie:]))
            s = m + "shared_experts."
            y = y + (silu(hN @ w[s + "gate_proj.weight"].T) * (hN @ w[s + "up_proj.weight"].T)) @ w[s + "down_proj.weight"].T
            order = np.argsort(sel, axis=-1)
            routes[i] = np.take_along_axis(sel, order, -1)
        x = x + y
    x = rms(x, w["model.norm.weight"], cfg["eps"])
    head = w["model.embed_tokens.weight"] if cfg["tie"] else w["lm_head.weight"]
    return x @ head.T, routes


def main(root: Path) -> int:
    bad = 0
    for d in sorted(p for p in root.iterdir() if (p / "oracle.json").exists()):
        cfg = normalise_config(json.loads((d / "config.json").read_text()))
        w = load_weights(d, cfg)
        with safe_open(str(d / "oracle.safetensors"), "pt") as fh:
            ids = fh.get_tensor("input_ids").numpy()
            ref = fh.get_tensor("logits").numpy()
            ref_routes = {
                int(k.split(".")[1][5:]): fh.get_tensor(k).numpy() for k in fh.keys() if k.endswith("topk_idx")
            }
        logits, routes = forward(cfg, w, ids)
        diff = float(np.abs(logits - ref).max())
        routes_ok = set(routes) == set(ref_routes) and all((routes[i] == ref_routes[i]).all() for i in routes)
        ok = diff < 2e-4 and routes_ok
        bad += not ok
        print(f"{d.name:<16} max|dlogit|={diff:.2e} routes {'match' if routes_ok else 'DIFFER'}  {'OK' if ok else 'FAIL'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "crates/model/tests/fixtures/oracle")))
