//! Setup shared by the Switchyard criterion benches (`cargo bench -p switchyard-benches`):
//! the criterion defaults, test-mode detection, `SWITCHYARD_BENCH_*` environment knobs, a
//! seeded random source for weights and inputs, and the generated test model the `tokens`
//! bench loads.
//!
//! Everything runs on the CPU and offline: the test model is written once by
//! [`switchyard_model::test_model::write_random_checkpoint`] into the target folder and reused.
#![deny(missing_docs)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use criterion::Criterion;
use half::bf16;

/// Seed of every generated model and input, so runs compare like with like.
pub const SEED: u64 = 0;

/// Criterion samples per benchmark: its minimum. The slow benches (a prefill step is ~0.5–3 s
/// here) would otherwise take minutes each; 10 samples still give a usable spread.
const SAMPLE_SIZE: usize = 10;
/// Warm-up per benchmark: long enough to page in weights and settle the allocator, short enough
/// that a whole `cargo bench -p switchyard-benches` stays within a few minutes on 2 cores.
const WARM_UP: Duration = Duration::from_secs(1);
/// Measurement time per benchmark (criterion's default is 5 s).
const MEASUREMENT: Duration = Duration::from_secs(3);

/// Criterion with this crate's defaults (10 samples, 1 s warm-up, 3 s measurement). Command-line
/// options (`--sample-size`, `--measurement-time`, `--warm-up-time`) override them.
pub fn criterion() -> Criterion {
    Criterion::default()
        .sample_size(SAMPLE_SIZE)
        .warm_up_time(WARM_UP)
        .measurement_time(MEASUREMENT)
}

/// Whether criterion runs in test mode (each benchmark once): `cargo bench -- --test`, or the
/// bench binary run by `cargo test --benches` (no `--bench` argument). The benches then use
/// small shapes (the `tiny` preset, fewer experts) so a CI check costs seconds, not minutes.
/// `SWITCHYARD_BENCH_QUICK=1` asks for the small shapes in a timed run too.
pub fn test_mode() -> bool {
    if std::env::var_os("SWITCHYARD_BENCH_QUICK").is_some_and(|v| v != "0") {
        return true;
    }
    let args: Vec<String> = std::env::args().collect();
    let has = |f: &str| args.iter().any(|a| a == f);
    has("--test") || !has("--bench")
}

/// A comma-separated list of numbers from `var`, or `default` when unset.
///
/// # Panics
/// When the variable is set but not a list of numbers (a bench has no better way to say so).
pub fn env_list(var: &str, default: &[usize]) -> Vec<usize> {
    match std::env::var(var) {
        Ok(s) => s
            .split(',')
            .map(|x| {
                x.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{var}={s:?}: expected numbers like 1,4,16"))
            })
            .collect(),
        Err(_) => default.to_vec(),
    }
}

/// A number from `var`, or `default` when unset.
///
/// # Panics
/// When the variable is set but not a number.
pub fn env_usize(var: &str, default: usize) -> usize {
    env_list(var, &[default])[0]
}

/// A comma-separated list of words from `var`, or `default` when unset.
pub fn env_words(var: &str, default: &[&str]) -> Vec<String> {
    match std::env::var(var) {
        Ok(s) => s
            .split(',')
            .map(|w| w.trim().to_string())
            .filter(|w| !w.is_empty())
            .collect(),
        Err(_) => default.iter().map(|w| w.to_string()).collect(),
    }
}

/// `f32` or `bf16` as a candle dtype.
///
/// # Panics
/// On any other name.
pub fn parse_dtype(name: &str) -> DType {
    match name {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        other => panic!("dtype {other:?}: the benches run f32 or bf16"),
    }
}

/// A seeded random source (SplitMix64): fast enough to fill gigabytes of bench weights in
/// seconds, and the same numbers on every run and machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A source for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-scale, scale)`.
    pub fn uniform(&mut self, scale: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        (2.0 * u - 1.0) * scale
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// `n` values uniform in `[-scale, scale)`.
    pub fn vec_f32(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(scale)).collect()
    }

    /// `n` token ids below `vocab`.
    pub fn tokens(&mut self, n: usize, vocab: usize) -> Vec<u32> {
        (0..n).map(|_| self.below(vocab) as u32).collect()
    }

    /// A CPU tensor of `shape` uniform in `[-scale, scale)`, in `dtype` (f32 or bf16; bf16 is
    /// filled directly, without an f32 copy, so multi-gigabyte expert stacks fit in memory).
    ///
    /// # Panics
    /// On dtypes other than f32 and bf16.
    pub fn tensor(&mut self, shape: &[usize], scale: f32, dtype: DType) -> Tensor {
        let n: usize = shape.iter().product();
        let t = match dtype {
            DType::F32 => Tensor::from_vec(self.vec_f32(n, scale), shape, &Device::Cpu),
            DType::BF16 => {
                let v: Vec<bf16> = (0..n)
                    .map(|_| bf16::from_f32(self.uniform(scale)))
                    .collect();
                Tensor::from_vec(v, shape, &Device::Cpu)
            }
            other => panic!("bench tensors are f32 or bf16, not {other:?}"),
        };
        t.expect("a CPU tensor of a matching length")
    }
}

/// Where generated bench models are kept: `SWITCHYARD_BENCH_CACHE`, else
/// `<target>/switchyard-bench-models` beside the running bench executable
/// (`<target>/<profile>/deps/<bench>`), so `cargo clean` removes them.
pub fn model_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SWITCHYARD_BENCH_CACHE") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("the bench executable's path");
    exe.ancestors()
        .nth(3)
        .unwrap_or_else(|| Path::new("."))
        .join("switchyard-bench-models")
}

/// The model folder the `tokens` bench loads: `SWITCHYARD_BENCH_MODEL` when set (any hy_v3
/// folder, a real checkpoint included), else a random-weight model of `SWITCHYARD_BENCH_PRESET`
/// (default `small`, `tiny` in test mode) written once, in bf16, with seed [`SEED`].
///
/// # Panics
/// When the model cannot be written.
pub fn bench_model_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SWITCHYARD_BENCH_MODEL") {
        return PathBuf::from(d);
    }
    let preset = std::env::var("SWITCHYARD_BENCH_PRESET")
        .unwrap_or_else(|_| if test_mode() { "tiny" } else { "small" }.to_string());
    generated_model(&preset)
}

/// A random-weight model of `preset` in the cache folder, written on first use. bf16 on disk:
/// half the bytes of f32, and loading it as f32 widens exactly, so one file serves both dtypes.
///
/// # Panics
/// When the preset is unknown or the files cannot be written.
pub fn generated_model(preset: &str) -> PathBuf {
    let dir = model_cache_dir().join(format!("{preset}-seed{SEED}-bf16"));
    // Written last, so a folder without it is an interrupted write.
    let done = dir.join("complete");
    if done.exists() {
        return dir;
    }
    let cfg = switchyard_model::presets::preset(preset)
        .unwrap_or_else(|e| panic!("SWITCHYARD_BENCH_PRESET: {e}"));
    eprintln!(
        "switchyard-benches: writing the {preset} test model to {} (once)",
        dir.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
    switchyard_model::test_model::write_random_checkpoint(&cfg, &dir, SEED, DType::BF16)
        .unwrap_or_else(|e| panic!("writing the {preset} test model to {}: {e}", dir.display()));
    std::fs::write(&done, b"").expect("marking the test model complete");
    dir
}
