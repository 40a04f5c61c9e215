//! In-situ quantization (ISQ, mistral.rs's name): weights quantized while the model loads,
//! from whatever the checkpoint stores, for the CPU kernels of `switchyard_kernels::cpu_quant`
//! (`cpu_q8`: 8-bit, `cpu_q4`: 4-bit).
//!
//! What `--quantize q8|q4` quantizes: every projection — the stacked q/k/v and `o_proj`, dense
//! MLPs, the shared expert, each routed expert (one at a time, so peak memory stays near the
//! quantized size) and the lm_head — after stacking and after a tensor-parallel rank's
//! narrowing, so each rank quantizes exactly the slice it multiplies. The router (f32), the
//! norms and the embedding (a lookup, not a product) stay dense. With `q4` the lm_head is Q8
//! ([`IsqType::lm_head`]), as llama.cpp's 4-bit presets keep the output matrix at 6 bits or
//! more: every logit goes through it. On the demo model (1000 tokens, logits vs the f32
//! model) every other projection at 4 bits with a q8 lm_head is 0.083 RMS away (KL 0.0009);
//! a 4-bit lm_head on top makes it 0.463 (KL 0.046; NOTES.md, session 9).
//!
//! A projection whose input size is not a multiple of [`Q8_BLOCK`] (64; Q4's groups are 64
//! weights too) is zero-padded to
//! the next multiple before quantizing, and its input is zero-padded at run time: zero weights
//! times zero activations add nothing, so the result is the unpadded product's (the CUDA MoE
//! path pads its expert weights the same way). Real checkpoints' sizes are multiples of 64;
//! the padding is for small test models, whose projections would otherwise stay unquantized
//! and leave the quantized path untested. The load log says when it happens.
//!
//! Activations are f32 with quantized weights (`HyV3Model::activation_dtype`), whatever
//! `--dtype` says (it sets the embedding's stored dtype). The Q8 kernels take f32 in and give
//! f32 out, so bf16 activations would only add a rounding and two conversions per projection.
//! Measured 2026-11-28 against a build computing in bf16 around the same Q8 weights: on the
//! SmolLM2 demo model, logits vs f32 compute RMS 0.263 (f32 activations) vs 0.276 (bf16),
//! max 1.31 vs 1.64 (bf16 compute with bf16 weights: 0.210, 1.41); on the small preset,
//! decode the same within noise (batch 1: 72–78 tok/s both) and prefill 7–26% faster in f32.

use std::str::FromStr;

use candle_core::{Tensor, D};
use switchyard_kernels::cpu_q8::Q8_BLOCK;
use switchyard_kernels::cpu_quant::QuantKind;

use crate::ModelError;

/// The flag that chooses in-situ quantization (aliases `--isq`).
pub const QUANTIZE_FLAG: &str = "--quantize";

/// How to quantize projection weights at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IsqType {
    /// int8 weights with one f32 scale per 64 inputs (1.0625 bytes per weight; llama.cpp's
    /// Q8_0 with a wider block), products in the `cpu_q8` integer kernels.
    Q8,
    /// 4-bit weights with an f16 step and minimum per 32 inputs (0.625 bytes per weight;
    /// llama.cpp's Q4_1 grid), products in the `cpu_q4` integer kernels; the lm_head is Q8.
    Q4,
}

impl IsqType {
    /// The choices [`IsqType::from_str`] accepts, for error messages and help.
    pub const CHOICES: &'static str = "q8 (also written q8_0), q4 (also written q4_1)";

    /// The name `--quantize` takes.
    pub fn name(self) -> &'static str {
        self.kind().name()
    }

    /// The kernels' format.
    pub fn kind(self) -> QuantKind {
        match self {
            IsqType::Q8 => QuantKind::Q8,
            IsqType::Q4 => QuantKind::Q4,
        }
    }

    /// The format the lm_head gets: Q8 for both (see the module docs).
    pub fn lm_head(self) -> IsqType {
        IsqType::Q8
    }
}

impl std::fmt::Display for IsqType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for IsqType {
    type Err = String;

    /// `q8` or `q4`, or `q8_0` / `q4_1` as llama.cpp users write them (any case).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "q8" | "q8_0" => Ok(IsqType::Q8),
            "q4" | "q4_1" => Ok(IsqType::Q4),
            _ => Err(format!(
                "unknown {QUANTIZE_FLAG} {s:?}; choices: {}",
                IsqType::CHOICES
            )),
        }
    }
}

/// Refuses quantization on a device other than the CPU (there are no GPU quantized kernels).
pub(crate) fn check_device(
    isq: Option<IsqType>,
    device: &candle_core::Device,
) -> Result<(), ModelError> {
    match isq {
        Some(q) if !device.is_cpu() => Err(ModelError::LoadOption {
            flag: QUANTIZE_FLAG.into(),
            message: format!(
                "{QUANTIZE_FLAG} {q} runs on the CPU only (--device cpu): the quantized \
                 kernels are CPU kernels, there are no GPU ones"
            ),
        }),
        _ => Ok(()),
    }
}

/// `n` rounded up to a whole number of quantization blocks.
pub(crate) fn padded(n: usize) -> usize {
    n.next_multiple_of(Q8_BLOCK)
}

/// Zero-pads the last dimension of `x` to `to` entries (`x` itself when it has them).
pub(crate) fn pad_last(x: &Tensor, to: usize) -> Result<Tensor, ModelError> {
    let n = x.dim(D::Minus1)?;
    Ok(if n == to {
        x.clone()
    } else {
        x.pad_with_zeros(D::Minus1, 0, to - n)?
    })
}

/// Zero-pads SwiGLU weights, `gate_up` `[.., 2·I, H]` (gate rows first) and `down`
/// `[.., H, I]`, to `I' = I.next_multiple_of(m)` and `H' = H.next_multiple_of(m)`. Exact: the
/// padded gate and up rows give SiLU(0)·0 = 0 for the padded down columns, and the padded
/// hidden columns meet zero inputs; the padded output rows are zero (callers drop them).
pub(crate) fn pad_swiglu(
    gate_up: Tensor,
    down: Tensor,
    m: usize,
) -> Result<(Tensor, Tensor), ModelError> {
    let rows = gate_up.rank() - 2;
    let (i, h) = (gate_up.dim(rows)? / 2, gate_up.dim(rows + 1)?);
    let (pi, ph) = (i.next_multiple_of(m), h.next_multiple_of(m));
    let (mut gate_up, mut down) = (gate_up, down);
    if pi != i {
        let g = gate_up
            .narrow(rows, 0, i)?
            .pad_with_zeros(rows, 0, pi - i)?;
        let u = gate_up
            .narrow(rows, i, i)?
            .pad_with_zeros(rows, 0, pi - i)?;
        gate_up = Tensor::cat(&[g, u], rows)?;
        down = down.pad_with_zeros(rows + 1, 0, pi - i)?;
    }
    if ph != h {
        gate_up = gate_up.pad_with_zeros(rows + 1, 0, ph - h)?;
        down = down.pad_with_zeros(rows, 0, ph - h)?;
    }
    Ok((gate_up, down))
}

/// The projection input sizes of `cfg` that are not whole blocks (`name = size` each), for
/// the one load-log line that says they are padded.
pub(crate) fn unaligned_inputs(cfg: &crate::ModelConfig) -> Vec<String> {
    let mut v = vec![
        ("hidden_size", cfg.hidden_size),
        (
            "num_attention_heads·head_dim",
            cfg.num_attention_heads * cfg.head_dim,
        ),
    ];
    if cfg.layer_kinds.contains(&crate::LayerKind::Dense) {
        v.push(("intermediate_size", cfg.intermediate_size));
    }
    if cfg.layer_kinds.contains(&crate::LayerKind::Moe) {
        v.push(("moe_intermediate_size", cfg.moe_intermediate_size));
        if cfg.num_shared_experts > 1 {
            v.push((
                "moe_intermediate_size·num_shared_experts",
                cfg.moe_intermediate_size * cfg.num_shared_experts,
            ));
        }
    }
    v.into_iter()
        .filter(|(_, n)| n % Q8_BLOCK != 0)
        .map(|(k, n)| format!("{k} = {n}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_names_users_write() {
        for s in ["q8", "Q8", "q8_0", "Q8_0"] {
            assert_eq!(s.parse::<IsqType>().unwrap(), IsqType::Q8, "{s}");
        }
        for s in ["q4", "Q4", "q4_1", "Q4_1"] {
            assert_eq!(s.parse::<IsqType>().unwrap(), IsqType::Q4, "{s}");
        }
        let e = "q4_0".parse::<IsqType>().unwrap_err();
        assert!(
            e.contains("--quantize") && e.contains("q8") && e.contains("q4_1"),
            "{e}"
        );
        for (t, name) in [(IsqType::Q8, "q8"), (IsqType::Q4, "q4")] {
            assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{name}\""));
            assert_eq!(t.name(), name);
        }
    }

    #[test]
    fn padding_swiglu_changes_no_product() {
        let dev = candle_core::Device::Cpu;
        let (i, h, t) = (5, 7, 3);
        let gu = Tensor::randn(0f32, 1.0, (2 * i, h), &dev).unwrap();
        let dn = Tensor::randn(0f32, 1.0, (h, i), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (t, h), &dev).unwrap();
        let mlp = |gu: &Tensor, dn: &Tensor, x: &Tensor| {
            let y = x.matmul(&gu.t().unwrap()).unwrap();
            let n = y.dim(1).unwrap() / 2;
            let a =
                (y.narrow(1, 0, n).unwrap().silu().unwrap() * y.narrow(1, n, n).unwrap()).unwrap();
            a.matmul(&dn.t().unwrap()).unwrap()
        };
        let want = mlp(&gu, &dn, &x);
        let (pgu, pdn) = pad_swiglu(gu, dn, 4).unwrap();
        assert_eq!(pgu.dims(), [16, 8]);
        assert_eq!(pdn.dims(), [8, 8]);
        let got = mlp(&pgu, &pdn, &pad_last(&x, 8).unwrap());
        let got = got.narrow(1, 0, h).unwrap();
        let d = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "{d}");
    }
}
