//! The tiny hy_v3 oracles on a CUDA device (feature `cuda`; run by `scripts/gpu-check.sh`).
//!
//! Loads the transformers fixtures of `crates/model/tests/fixtures/oracle` (made by
//! `scripts/oracle/make_oracles.py`, read as `tests/oracle.rs` reads them) onto
//! `Device::new_cuda(0)` and compares logits with transformers':
//! - f32 compute, every fixture: prefill logits within [`F32_TOL`] (the MoE blocks run the CUDA
//!   gate with the reference expert GEMMs), and the same through a paged KV cache on the device
//!   (the CUDA KV write and paged attention), two sequences of different lengths batched
//!   together, a prefill chunk then token-by-token decode, scrambled block tables;
//! - bf16 compute, the fixtures the CPU bf16 test uses: prefill logits within [`BF16_TOL`] of the
//!   f32 oracle (the CPU test's bound) with the argmax equal at every position (the MoE blocks
//!   run the CUDA gate, dispatch and expert kernels), and the paged path with a bf16 KV cache;
//! - an FP8 (E4M3) paged KV cache under f32 compute against transformers with its key and value
//!   states rounded to E4M3 (`oracle_fp8_kv.safetensors`, `scripts/oracle/make_fp8_kv_oracle.py`),
//!   within [`FP8_KV_TOL`]; and with per-layer KV scales added to a copy of the checkpoint
//!   (`self_attn.k_scale`/`v_scale` from `oracle_fp8_kv_scaled.safetensors`) against
//!   transformers with K/V rounded as fp8(k / k_scale) × k_scale.
//!
//! Prints one PASS/FAIL line per check and a summary. Exit status: 0 all passed, 1 a check
//! failed, 2 the run could not proceed (no CUDA device, fixtures missing).
//!
//! Fixtures: the first argument, else `GPU_ORACLE_FIXTURES`, else
//! `crates/model/tests/fixtures/oracle` under the current folder, else the source tree's.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use switchyard_model::{HyV3Model, KvDtype, LoadOptions, Logits, PagedSeq};

/// f32 compute on the GPU vs transformers' f32 logits (issue #7's bound; the CPU path reaches
/// 5.5e-6, cuBLAS summation order differs).
const F32_TOL: f32 = 1e-3;
/// bf16 compute vs the f32 oracle: the bound of `tests/oracle.rs`
/// (`bf16_compute_within_measured_tolerance`, worst measured 0.154 on the CPU).
const BF16_TOL: f32 = 0.25;
/// FP8 KV cache, f32 compute, vs the fp8-rounded oracle: the f32 bound plus room for a key or
/// value that f32 noise moves across an E4M3 rounding boundary (the CPU test's `FP8_KV_TOL`;
/// the CPU measured 7.6e-6).
const FP8_KV_TOL: f32 = 5e-3;
/// The fixtures with an fp8-rounded oracle.
const FP8_KV_CASES: [&str; 1] = ["bf16_attn_tiles"];
/// Suffix of a case name that means: the fixture with its `oracle_fp8_kv_scaled.safetensors`
/// KV scales added to the checkpoint, judged against that oracle.
const KV_SCALED: &str = "+kv_scales";
/// Every fixture, f32 compute.
const F32_CASES: [&str; 7] = [
    "f32_basic",
    "bf16_f32router",
    "sharded",
    "hub_dialect",
    "head_dim_ne",
    "e192_k8",
    "mtp",
];
/// The fixtures the CPU bf16 test uses.
const BF16_CASES: [&str; 4] = ["f32_basic", "bf16_f32router", "hub_dialect", "e192_k8"];
/// Tokens per KV block in the paged check: several blocks per prompt and a partial last one.
const PAGED_BLOCK: usize = 4;
/// The second sequence of the paged batch prefills this many tokens before decoding.
const SECOND_SEQ_CHUNK: usize = 3;

fn main() -> ExitCode {
    match run() {
        Ok(0) => ExitCode::SUCCESS,
        Ok(n) => {
            eprintln!("gpu_oracle: {n} check(s) FAILED");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("gpu_oracle: cannot run: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn fixtures() -> Result<PathBuf> {
    let candidates = [
        std::env::args().nth(1).map(PathBuf::from),
        std::env::var_os("GPU_ORACLE_FIXTURES").map(PathBuf::from),
        Some(PathBuf::from("crates/model/tests/fixtures/oracle")),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/oracle")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.join("f32_basic/oracle.safetensors").is_file())
        .ok_or_else(|| {
            anyhow!(
                "oracle fixtures not found: pass their folder as the first argument or set \
                 GPU_ORACLE_FIXTURES (crates/model/tests/fixtures/oracle in the repository)"
            )
        })
}

struct Oracle {
    ids: Vec<u32>,
    /// f32 logits `[T, vocab]` on the host.
    logits: Tensor,
    /// The logits are the fp8-rounded-KV oracle's.
    fp8_kv: bool,
}

/// The tensors of a fixture file, on the host.
fn fixture_tensors(path: &Path) -> Result<std::collections::HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))
}

/// The file's `logits` as f32.
fn logits_of(t: &std::collections::HashMap<String, Tensor>, path: &Path) -> Result<Tensor> {
    Ok(t.get("logits")
        .ok_or_else(|| anyhow!("{} has no logits", path.display()))?
        .to_dtype(DType::F32)?)
}

fn oracle(dir: &Path) -> Result<Oracle> {
    let path = dir.join("oracle.safetensors");
    let t = fixture_tensors(&path)?;
    let ids = t
        .get("input_ids")
        .ok_or_else(|| anyhow!("{} has no input_ids", path.display()))?
        .to_vec1::<i64>()?
        .into_iter()
        .map(|x| u32::try_from(x).context("token id out of range"))
        .collect::<Result<_>>()?;
    Ok(Oracle {
        ids,
        logits: logits_of(&t, &path)?,
        fp8_kv: false,
    })
}

/// The oracle whose logits are transformers' with key and value states rounded to E4M3.
fn fp8_kv_oracle(dir: &Path) -> Result<Oracle> {
    let path = dir.join("oracle_fp8_kv.safetensors");
    Ok(Oracle {
        logits: logits_of(&fixture_tensors(&path)?, &path)?,
        fp8_kv: true,
        ..oracle(dir)?
    })
}

struct Ctx {
    device: Device,
    root: PathBuf,
    passes: usize,
    failures: usize,
}

impl Ctx {
    fn verdict(&mut self, ok: bool, line: String) {
        if ok {
            self.passes += 1;
            println!("  PASS  {line}");
        } else {
            self.failures += 1;
            println!("  FAIL  {line}");
        }
    }

    fn load(&self, case: &str, dtype: DType) -> Result<HyV3Model> {
        self.load_dir(&self.root.join(case), dtype)
    }

    fn load_dir(&self, dir: &Path, dtype: DType) -> Result<HyV3Model> {
        let opts = LoadOptions {
            dtype,
            device: self.device.clone(),
            load_mtp: false,
            quantize: None,
        };
        HyV3Model::load_dir(dir, &opts)
            .with_context(|| format!("loading {} in {dtype:?}", dir.display()))
    }
}

/// A copy of the fixture in `dir` with `oracle_fp8_kv_scaled.safetensors`' per-layer `k_scale`
/// and `v_scale` added to its checkpoint as `model.layers.{l}.self_attn.{k,v}_scale`.
fn with_kv_scales(dir: &Path) -> Result<tempfile::TempDir> {
    let out = tempfile::tempdir()?;
    for f in std::fs::read_dir(dir)? {
        let f = f?.path();
        if let Some(name) = f.file_name() {
            std::fs::copy(&f, out.path().join(name))?;
        }
    }
    let scales = fixture_tensors(&dir.join("oracle_fp8_kv_scaled.safetensors"))?;
    let st = out.path().join("model.safetensors");
    let mut w = fixture_tensors(&st)?;
    for kind in ["k_scale", "v_scale"] {
        let v = scales
            .get(kind)
            .ok_or_else(|| anyhow!("the scaled oracle has no {kind}"))?
            .to_vec1::<f32>()?;
        for (l, s) in v.into_iter().enumerate() {
            w.insert(
                format!("model.layers.{l}.self_attn.{kind}"),
                Tensor::new(s, &Device::Cpu)?,
            );
        }
    }
    candle_core::safetensors::save(&w, &st)?;
    Ok(out)
}

fn run() -> Result<usize> {
    let root = fixtures()?;
    let device = Device::new_cuda(0)
        .map_err(|e| anyhow!("{e}"))
        .context("opening CUDA device 0 (is there a GPU and a CUDA 13 driver?)")?;
    println!("gpu_oracle: fixtures {}", root.display());
    let mut c = Ctx {
        device,
        root,
        passes: 0,
        failures: 0,
    };
    let t0 = Instant::now();
    println!("\n== f32 compute (max|Δ| ≤ {F32_TOL:e} vs transformers f32)");
    for case in F32_CASES {
        for (what, res) in [
            ("prefill", check_prefill(&mut c, case, DType::F32)),
            ("paged", check_paged(&mut c, case, DType::F32, KvDtype::F32)),
        ] {
            if let Err(e) = res {
                c.verdict(false, format!("f32 {what} {case}: error: {e:#}"));
            }
        }
    }
    println!(
        "\n== bf16 compute (max|Δ| ≤ {BF16_TOL} vs transformers f32, argmax equal except near \
         ties the error explains)"
    );
    for case in BF16_CASES {
        for (what, res) in [
            ("prefill", check_prefill(&mut c, case, DType::BF16)),
            (
                "paged",
                check_paged(&mut c, case, DType::BF16, KvDtype::Bf16),
            ),
        ] {
            if let Err(e) = res {
                c.verdict(false, format!("bf16 {what} {case}: error: {e:#}"));
            }
        }
    }
    println!("\n== fp8 KV cache, f32 compute (max|Δ| ≤ {FP8_KV_TOL:e} vs transformers with fp8-rounded K/V)");
    for case in FP8_KV_CASES {
        if let Err(e) = check_paged(&mut c, case, DType::F32, KvDtype::Fp8) {
            c.verdict(false, format!("fp8 KV paged {case}: error: {e:#}"));
        }
        if let Err(e) = check_paged(
            &mut c,
            &format!("{case}{KV_SCALED}"),
            DType::F32,
            KvDtype::Fp8,
        ) {
            c.verdict(
                false,
                format!("fp8 KV paged {case} with KV scales: error: {e:#}"),
            );
        }
    }
    println!(
        "\ngpu_oracle: {} passed, {} failed ({:.1} s)",
        c.passes,
        c.failures,
        t0.elapsed().as_secs_f64()
    );
    Ok(c.failures)
}

/// Max |a − b| over two host tensors of the same shape.
fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Argmax agreement of `got` with the oracle, per position: (equal, near ties, misses). A
/// differing position is a near tie when the oracle's top-2 gap is within twice that row's
/// max |Δ|: the measured error alone can swap the two.
fn argmax_agreement(got: &Tensor, reference: &Tensor) -> Result<(usize, usize, usize)> {
    let (g, r) = (got.to_vec2::<f32>()?, reference.to_vec2::<f32>()?);
    let (mut equal, mut near, mut miss) = (0, 0, 0);
    for (a, b) in g.iter().zip(&r) {
        let (ia, ib) = (argmax(a), argmax(b));
        if ia == ib {
            equal += 1;
            continue;
        }
        let row_err = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        if b[ib] - b[ia] <= 2.0 * row_err {
            near += 1;
        } else {
            miss += 1;
        }
    }
    Ok((equal, near, miss))
}

/// Judges `logits` (host, `[T, vocab]`) against the oracle with the bound of `dtype`.
fn judge(
    c: &mut Ctx,
    label: String,
    logits: &Tensor,
    o: &Oracle,
    dtype: DType,
    paths: &str,
) -> Result<()> {
    let d = max_abs(logits, &o.logits)?;
    if dtype == DType::F32 {
        let tol = if o.fp8_kv { FP8_KV_TOL } else { F32_TOL };
        c.verdict(
            d <= tol && d.is_finite(),
            format!("{label}: max|Δ| {d:.2e} (bound {tol:e}); MoE {paths}"),
        );
    } else {
        let (equal, near, miss) = argmax_agreement(logits, &o.logits)?;
        let rows = equal + near + miss;
        // Near ties still count against the CPU test's floor of 80% agreement.
        let ok = d <= BF16_TOL && miss == 0 && equal * 10 >= rows * 8;
        c.verdict(
            ok,
            format!(
                "{label}: max|Δ| {d:.3} (bound {BF16_TOL}), argmax equal {equal}/{rows}, near-tie \
                 flips {near}, misses {miss}; MoE {paths}"
            ),
        );
    }
    Ok(())
}

fn check_prefill(c: &mut Ctx, case: &str, dtype: DType) -> Result<()> {
    let o = oracle(&c.root.join(case))?;
    let m = c.load(case, dtype)?;
    let paths = m.moe_paths().join(", ");
    let mut cache = m.new_cache();
    let t = Instant::now();
    let logits = m
        .forward(&o.ids, &mut cache, Logits::All)?
        .to_device(&Device::Cpu)?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let label = format!(
        "{} prefill {case:<15} ({} tokens, {ms:.0} ms)",
        dtype_name(dtype),
        o.ids.len()
    );
    judge(c, label, &logits, &o, dtype, &paths)
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bf16",
        _ => "f32",
    }
}

/// One sequence of the paged check.
struct PagedRun {
    table: Vec<u32>,
    /// Next position to feed.
    next: usize,
    /// Logit rows by position.
    rows: Vec<Option<Tensor>>,
}

/// Two copies of the prompt through a device-resident paged cache in one batch: sequence A
/// prefills half the prompt, B [`SECOND_SEQ_CHUNK`] tokens, then both decode token by token;
/// every position's logits are judged against the oracle.
fn check_paged(c: &mut Ctx, case: &str, dtype: DType, kv_dtype: KvDtype) -> Result<()> {
    let (o, m) = if let Some(base) = case.strip_suffix(KV_SCALED) {
        let dir = with_kv_scales(&c.root.join(base))?;
        let path = c.root.join(base).join("oracle_fp8_kv_scaled.safetensors");
        let o = Oracle {
            logits: logits_of(&fixture_tensors(&path)?, &path)?,
            fp8_kv: true,
            ..oracle(&c.root.join(base))?
        };
        (o, c.load_dir(dir.path(), dtype)?)
    } else if kv_dtype == KvDtype::Fp8 {
        (fp8_kv_oracle(&c.root.join(case))?, c.load(case, dtype)?)
    } else {
        (oracle(&c.root.join(case))?, c.load(case, dtype)?)
    };
    let paths = m.moe_paths().join(", ");
    let n = o.ids.len();
    let blocks = n.div_ceil(PAGED_BLOCK);
    let mut kv = m.try_new_paged_cache(2 * blocks + 2, PAGED_BLOCK, kv_dtype)?;
    if !kv.is_on_device() {
        bail!("the paged cache was not created on the device (built without `cuda`?)");
    }
    // Scrambled tables: A takes odd blocks in reverse, B even blocks in reverse.
    let table = |first: usize| -> Vec<u32> {
        (0..blocks)
            .map(|b| (2 * (blocks - 1 - b) + first) as u32)
            .collect()
    };
    let mut runs = [
        PagedRun {
            table: table(1),
            next: 0,
            rows: vec![None; n],
        },
        PagedRun {
            table: table(2),
            next: 0,
            rows: vec![None; n],
        },
    ];
    let first_chunk = [(n / 2).max(1), SECOND_SEQ_CHUNK.min(n)];
    let t = Instant::now();
    let mut steps = 0;
    while runs.iter().any(|r| r.next < n) {
        let active: Vec<usize> = (0..runs.len()).filter(|&i| runs[i].next < n).collect();
        let seqs: Vec<PagedSeq<'_>> = active
            .iter()
            .map(|&i| {
                let r = &runs[i];
                let len = if r.next == 0 { first_chunk[i] } else { 1 };
                PagedSeq {
                    tokens: &o.ids[r.next..r.next + len],
                    pos0: r.next,
                    block_table: &r.table,
                    logits: Logits::All,
                }
            })
            .collect();
        let lens: Vec<usize> = seqs.iter().map(|s| s.tokens.len()).collect();
        let out = m.forward_paged(&seqs, &mut kv)?;
        for ((&i, len), logits) in active.iter().zip(lens).zip(out) {
            let logits = logits.to_device(&Device::Cpu)?;
            let r = &mut runs[i];
            for j in 0..len {
                r.rows[r.next + j] = Some(logits.narrow(0, j, 1)?);
            }
            r.next += len;
        }
        steps += 1;
    }
    let ms = t.elapsed().as_secs_f64() * 1e3;
    for (name, r) in ["A", "B"].iter().zip(&runs) {
        let rows: Vec<Tensor> = r
            .rows
            .iter()
            .map(|x| x.clone().ok_or_else(|| anyhow!("a position got no logits")))
            .collect::<Result<_>>()?;
        let logits = Tensor::cat(&rows, 0)?;
        let label = format!(
            "{} paged   {case:<15} seq {name} ({n} tokens, blocks of {PAGED_BLOCK}, {:?} KV, \
             {steps} batched steps, {ms:.0} ms)",
            dtype_name(dtype),
            kv_dtype
        );
        judge(c, label, &logits, &o, dtype, &paths)?;
    }
    Ok(())
}
