//! The op layer the model calls: MoE gate top-k, expert dispatch/combine and attention.
//!
//! Every op has a CPU implementation here that doubles as the reference for its CUDA
//! counterpart (feature `cuda`), so the model code never changes when a faster backend lands.
#![deny(missing_docs)]

pub(crate) mod cpu_amx;
pub(crate) mod cpu_bf16dot;
pub mod cpu_gemv;
pub mod cpu_moe;
pub mod cpu_ops;
pub mod cpu_q4;
pub mod cpu_q8;
pub mod cpu_quant;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod gate;
pub mod moe;
pub mod paged;

pub use gate::{gate_topk, GateConfig, GateOutput, ScoreFunction};
pub use moe::{dispatch, experts_forward, DispatchPlan, ExpertWeights};
pub use paged::{paged_attention, reshape_and_cache, KvElem, KvLayout, SeqAttn, F8E4M3};

/// Whether the CPU bf16 products run on AMX tiles here (the CPU has AMX, Linux grants it, and
/// `SWITCHYARD_AMX` is not `0`): prefill and batched steps of a bf16 model then round their
/// activations to bf16 before each projection.
pub fn cpu_tiles_enabled() -> bool {
    cpu_amx::enabled()
}

/// Whether the environment variable `var` is `0`: how a CPU kernel path is turned off
/// (`SWITCHYARD_AMX=0`, `SWITCHYARD_BF16_DOT=0`, `SWITCHYARD_Q8_TILES=0`).
pub(crate) fn env_off(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "0")
}

/// The environment variable `var` as a count of at least 1, or `default` when it is unset or
/// not a number (the `*_MIN_TOKENS` tuning knobs).
pub(crate) fn env_count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .max(1)
}

/// Errors from the op layer; messages name the argument that is wrong.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// An argument has the wrong size, shape or value.
    #[error("invalid kernel argument: {0}")]
    InvalidArgument(String),
    /// A CUDA driver call (module load, allocation, launch) failed.
    #[error("CUDA: {0}")]
    Cuda(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
