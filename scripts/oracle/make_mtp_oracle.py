#!/usr/bin/env python3
"""Reference outputs of the `mtp` fixture's MTP layer (`model.layers.3.*`), built from
transformers' own hy_v3 modules (transformers itself skips the layer when loading).

Usage (from the repository root, in the oracle venv):

    .venv/bin/python scripts/oracle/make_mtp_oracle.py

The MTP layer as Tencent's Hy3 release defines it (names and wiring as vLLM's `hy_v3_mtp`
reads them): for position p, with t the token sequence and h the main model's final-normed
hidden states (`HYV3Model(...).last_hidden_state`),

    e = embed_tokens(t[p + 1])          (zeroed at p == 0)
    x = eh_proj(cat([enorm(e), hnorm(h[p])]))
    y = HYV3DecoderLayer(x) at position p, causal over the MTP layer's own positions
    logits[p] = lm_head(final_layernorm(y))   (the main model's lm_head)

predicting t[p + 2]. The norms are transformers' HYV3RMSNorm, the block transformers'
HYV3DecoderLayer (a sparse one: attention with QK-norm and RoPE, the MoE) with the MTP
tensors loaded into it, eh_proj a bias-free nn.Linear.

Writes crates/model/tests/fixtures/oracle/mtp/oracle_mtp.safetensors:
  * sequence   i64 [T]       the fixture's prompt and its 24 greedy tokens;
  * hidden     f32 [T, H]    the main model's final-normed hidden states;
  * mtp_logits f32 [T-1, V]  the MTP layer's logits at positions 0..T-2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from transformers import HYV3ForCausalLM
from transformers.models.hy_v3.modeling_hy_v3 import HYV3DecoderLayer, HYV3RMSNorm

torch.set_num_threads(2)


@torch.no_grad()
def main() -> int:
    d = Path("crates/model/tests/fixtures/oracle/mtp")
    meta = json.loads((d / "oracle.json").read_text())
    seq = torch.tensor(meta["input_ids"] + meta["greedy_ids"], dtype=torch.long)
    model = HYV3ForCausalLM.from_pretrained(
        str(d), dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    cfg = model.config
    L, H = cfg.num_hidden_layers, cfg.hidden_size
    prefix = f"model.layers.{L}."
    mtp = {}
    with safe_open(str(d / "model.safetensors"), "pt") as fh:
        for k in fh.keys():
            if k.startswith(prefix):
                mtp[k[len(prefix):]] = fh.get_tensor(k).float()

    # The main model: final-normed hidden states and (as a check) its own logits.
    out = model.model(input_ids=seq[None])
    hidden = out.last_hidden_state[0]
    with safe_open(str(d / "oracle.safetensors"), "pt") as fh:
        ref = fh.get_tensor("logits")
    P = ref.shape[0]
    assert (model.lm_head(hidden[:P]) - ref).abs().max().item() < 1e-5

    def norm(name):
        n = HYV3RMSNorm(H, eps=cfg.rms_norm_eps)
        n.weight.copy_(mtp.pop(f"{name}.weight"))
        return n

    enorm, hnorm, final = norm("enorm"), norm("hnorm"), norm("final_layernorm")
    eh_proj = torch.nn.Linear(2 * H, H, bias=False)
    eh_proj.weight.copy_(mtp.pop("eh_proj.weight"))
    # A sparse (MoE) decoder layer of the main model's configuration, holding the MTP block.
    block = HYV3DecoderLayer(cfg, layer_idx=L - 1).eval()
    missing, unexpected = block.load_state_dict(mtp, strict=False)
    assert not unexpected, unexpected
    assert not [m for m in missing if "e_score_correction_bias" not in m], missing
    assert "mlp.e_score_correction_bias" in mtp
    block.mlp.e_score_correction_bias.copy_(mtp["mlp.e_score_correction_bias"])

    n = seq.shape[0] - 1
    e = model.model.embed_tokens(seq[1:])
    e[0] = 0.0  # position 0
    x = eh_proj(torch.cat([enorm(e), hnorm(hidden[:n])], dim=-1))[None]
    pos = torch.arange(n)[None]
    cos_sin = model.model.rotary_emb(x, position_ids=pos)
    mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
    y = block(x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
    logits = model.lm_head(final(y[0]))

    save_file(
        {
            "sequence": seq.contiguous(),
            "hidden": hidden.contiguous(),
            "mtp_logits": logits.float().contiguous(),
        },
        str(d / "oracle_mtp.safetensors"),
        metadata={"format": "pt"},
    )
    hits = (logits.argmax(-1)[:-1] == seq[2:]).sum().item()
    print(f"T={seq.shape[0]} mtp_logits {tuple(logits.shape)}; argmax equals t[p+2] at {hits}/{n - 1}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
