//! `--quantize q4` (in-situ 4-bit quantization at load) against the f32 model running on the
//! weights q4 holds. For each oracle fixture the test writes a second checkpoint in which
//! every projection the loader quantizes (q/k/v/o, dense and shared MLPs, routed experts) is
//! replaced by its Q4 values `q · d + m` and the lm_head by its Q8 values (q4 keeps the head at
//! 8 bits), each quantized here from the stored tensor exactly as the loader does (rows padded
//! with zeros to whole groups of 64). The f32 model on that checkpoint (candle's matmuls, the
//! path the transformers oracle tests) must then match the q4 model up to the kernels'
//! activation rounding, while the q4 model itself must be measurably away from the original
//! weights' logits: the reference explains what quantization changed, all of it.
//!
//! What this catches: a wrong nibble order, step or minimum in any projection, a projection
//! left dense or quantized to the wrong format, padding that shifts columns; what it cannot:
//! errors the f32 path shares (those are `tests/oracle.rs`'s).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use switchyard_kernels::cpu_q8::set_tiles;
use switchyard_kernels::cpu_quant::{QuantKind, QuantMatrix};
use switchyard_model::{HyV3Model, IsqType, LoadOptions, Logits};

mod common;
use common::{input_ids, max_abs};

/// Fixtures with every kind of projection: dense and MoE layers, fused and per-expert (hub)
/// expert tensors, head_dim ≠ hidden/heads, bf16 weights. Not `e192_k8`: its expert choices
/// are near-tied at most positions (192 experts on a 32-wide random model), so any rounding of
/// the activations flips some (measured: 2 of 12 rows, RMS ratio 0.29; `tests/q8.rs` bounds it
/// by transformers' own bf16 distance for the same reason).
const CASES: [&str; 4] = ["f32_basic", "hub_dialect", "head_dim_ne", "bf16_f32router"];

/// q4 vs the f32 model on q4's own weights (RMS over the logits of the rows without a flipped
/// expert choice, [`FLIP`]), as a fraction of q4's distance from the original weights' logits
/// on the same rows. What is left is the activation rounding: the row kernels' 8-bit grid
/// (`cpu_q4` module docs: at most `max|x| / 254` per value of a block of 32) and, on the AMX
/// tiles, bf16 operands. Measured 2026-11-29: 0.02–0.05 (row kernels 0.03–0.05, tiles
/// 0.02–0.03). A 4-bit lm_head where the reference has q4's 8-bit one measured 0.15–0.22.
const MAX_RATIO: f32 = 0.1;

/// A row (position) farther from the reference than this fraction of q4's largest distance
/// from the original logits has a near-tied expert choice that the activation rounding
/// flipped: measured on `f32_basic`'s row kernels, one row 1.67 away (every other ≤ 0.13, and
/// q4 is 4.8 from the original weights).
const FLIP: f32 = 0.25;

/// At most one row in this many may have a flipped choice ([`FLIP`]).
const NEAR_TIE_ROWS: usize = 8;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/oracle")
}

/// Whether the loader quantizes this tensor, and to which format under `--quantize q4`.
fn quantized_as(name: &str) -> Option<QuantKind> {
    let projections = [
        "q_proj.weight",
        "k_proj.weight",
        "v_proj.weight",
        "o_proj.weight",
        "gate_proj.weight",
        "up_proj.weight",
        "down_proj.weight",
        "experts.gate_up_proj",
        "experts.down_proj",
    ];
    if name == "lm_head.weight" {
        Some(QuantKind::Q8)
    } else if name.starts_with("model.layers.") && projections.iter().any(|p| name.ends_with(p)) {
        Some(QuantKind::Q4)
    } else {
        None
    }
}

/// `w` (`[.., cols]`, any float dtype) through `kind` and back, row by row with the columns
/// zero-padded to a multiple of 64 as the loader pads them; f32, same shape.
fn through(kind: QuantKind, w: &Tensor) -> Tensor {
    let dims = w.dims().to_vec();
    let cols = *dims.last().unwrap();
    let rows = w.elem_count() / cols;
    let padded = cols.next_multiple_of(64);
    let v = w
        .to_dtype(DType::F32)
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
        .pad_with_zeros(1, 0, padded - cols)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let deq = QuantMatrix::quantize(kind, &v, rows, padded)
        .unwrap()
        .dequantize_f64();
    let out: Vec<f32> = deq
        .chunks(padded)
        .flat_map(|r| r[..cols].iter().map(|&x| x as f32))
        .collect();
    Tensor::from_vec(out, dims, &Device::Cpu).unwrap()
}

/// A copy of fixture `case` whose quantized tensors hold q4's values (module docs).
fn dequantized_copy(case: &str, dir: &Path) -> usize {
    let src = fixtures().join(case);
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    // Every shard into one file (the loader takes a single `model.safetensors`).
    let mut t: HashMap<String, Tensor> = HashMap::new();
    for f in std::fs::read_dir(&src).unwrap() {
        let p = f.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("model") && name.ends_with(".safetensors") {
            t.extend(candle_core::safetensors::load(&p, &Device::Cpu).unwrap());
        }
    }
    let mut n = 0;
    for (name, w) in t.iter_mut() {
        if let Some(kind) = quantized_as(name) {
            *w = through(kind, w);
            n += 1;
        }
    }
    // A tied lm_head is the embedding's tensor, quantized for the head only: the reference
    // gets it as its own (Q8) lm_head and keeps the embedding exact.
    if cfg["tie_word_embeddings"].as_bool() == Some(true) && !t.contains_key("lm_head.weight") {
        let e = through(QuantKind::Q8, &t["model.embed_tokens.weight"]);
        t.insert("lm_head.weight".into(), e);
        n += 1;
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    n
}

fn opts(quantize: Option<IsqType>) -> LoadOptions {
    LoadOptions {
        dtype: DType::F32,
        quantize,
        ..Default::default()
    }
}

#[test]
fn q4_matches_the_f32_model_on_its_own_weights() {
    let tiles_modes: &[bool] = if switchyard_kernels::cpu_q8::bf16_products_available() {
        &[false, true]
    } else {
        &[false]
    };
    let mut worst = 0f32;
    for case in CASES {
        let tmp = tempfile::tempdir().unwrap();
        let replaced = dequantized_copy(case, tmp.path());
        let ids = input_ids(
            &candle_core::safetensors::load(
                fixtures().join(case).join("oracle.safetensors"),
                &Device::Cpu,
            )
            .unwrap(),
        );
        let run = |m: &HyV3Model| m.forward(&ids, &mut m.new_cache(), Logits::All).unwrap();
        let original = run(&HyV3Model::load_dir(&fixtures().join(case), &opts(None)).unwrap());
        let reference = run(&HyV3Model::load_dir(tmp.path(), &opts(None)).unwrap());
        let q4 = HyV3Model::load_dir(&fixtures().join(case), &opts(Some(IsqType::Q4))).unwrap();
        assert_eq!(q4.quantization(), Some(IsqType::Q4));
        assert!(
            q4.moe_paths().iter().all(|p| *p == "q4"),
            "{:?}",
            q4.moe_paths()
        );
        for &tiles in tiles_modes {
            set_tiles(tiles);
            let got = run(&q4);
            set_tiles(true);
            let d_orig = max_abs(&got, &original);
            let (rows_ref, ms_ref) = row_stats(&got, &reference);
            let (_, ms_orig) = row_stats(&got, &original);
            // Rows with a flipped near-tie expert choice (far beyond the rest) are counted,
            // the others measured.
            let near: Vec<usize> = (0..rows_ref.len())
                .filter(|&r| rows_ref[r] <= FLIP * d_orig)
                .collect();
            let far = rows_ref.len() - near.len();
            let mean =
                |ms: &[f32]| (near.iter().map(|&r| ms[r]).sum::<f32>() / near.len() as f32).sqrt();
            let (r_ref, r_orig) = (mean(&ms_ref), mean(&ms_orig));
            let path = if tiles { "tiles" } else { "rows" };
            println!(
                "{case} ({path}, {replaced} tensors replaced): q4 vs f32 on q4's weights RMS \
                 {r_ref:.4} (max {:.4}), vs the original weights RMS {r_orig:.4} (max \
                 {d_orig:.4}); ratio {:.3}; rows with a flipped choice: {far}/{}",
                max_abs(&got, &reference),
                r_ref / r_orig,
                rows_ref.len()
            );
            assert!(
                r_orig > 0.05,
                "{case}: q4 is {r_orig} RMS from the unquantized model: nothing quantized?"
            );
            assert!(
                r_ref <= MAX_RATIO * r_orig,
                "{case} ({path}): q4 is {r_ref} RMS from f32 on its own weights, {r_orig} from \
                 the original ones"
            );
            assert!(
                far * NEAR_TIE_ROWS <= rows_ref.len(),
                "{case} ({path}): {far} of {} rows beyond {FLIP} of the quantization's \
                 distance: {rows_ref:?}",
                rows_ref.len()
            );
            worst = worst.max(r_ref / r_orig);
        }
    }
    println!("worst RMS ratio {worst:.3}");
}

/// Per row (position) of two `[T, V]` tensors, the largest absolute difference and the mean
/// squared difference.
fn row_stats(a: &Tensor, b: &Tensor) -> (Vec<f32>, Vec<f32>) {
    let d = (a - b).unwrap();
    let max = d.abs().and_then(|d| d.max(1)).and_then(|d| d.to_vec1());
    let ms = d.sqr().and_then(|d| d.mean(1)).and_then(|d| d.to_vec1());
    (max.unwrap(), ms.unwrap())
}

/// A copy of fixture `case` with `value` written at flat index `at` of tensor `name`.
fn with_value(case: &str, dir: &Path, name: &str, at: usize, value: f32) {
    let src = fixtures().join(case);
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut t: HashMap<String, Tensor> =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let w = &t[name];
    let mut v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[at] = value;
    let changed = Tensor::from_vec(v, w.dims(), &Device::Cpu).unwrap();
    t.insert(name.into(), changed);
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
}

/// A weight the format cannot hold is refused at load, naming the flag, the module's
/// checkpoint path (the expert, for routed experts) and the weight's row and column.
#[test]
fn unrepresentable_weights_are_refused_naming_where() {
    let err = |dir: &Path, q: IsqType| {
        HyV3Model::load_dir(dir, &opts(Some(q)))
            .err()
            .map(|e| e.to_string())
    };
    // Expert 3's gate_up [32, 48] of layer 1: row 5, column 7.
    let tmp = tempfile::tempdir().unwrap();
    let name = "model.layers.1.mlp.experts.gate_up_proj";
    with_value(
        "f32_basic",
        tmp.path(),
        name,
        3 * 32 * 48 + 5 * 48 + 7,
        f32::NAN,
    );
    for q in [IsqType::Q8, IsqType::Q4] {
        let e = err(tmp.path(), q).expect("a NaN weight is refused");
        assert!(
            e.starts_with("--quantize: model.layers.1.mlp.experts.3: ")
                && e.contains("weight [5, 7] is not finite"),
            "{q}: {e}"
        );
    }
    // 1e5 is beyond f16's range: q4 stores steps and minimums in f16, q8 an f32 scale.
    let tmp = tempfile::tempdir().unwrap();
    let name = "model.layers.0.self_attn.k_proj.weight";
    with_value("f32_basic", tmp.path(), name, 2 * 48 + 9, 1e5);
    let e = err(tmp.path(), IsqType::Q4).expect("q4 refuses 1e5");
    assert!(
        e.starts_with("--quantize: model.layers.0.self_attn: ") && e.contains("beyond f16"),
        "{e}"
    );
    assert!(err(tmp.path(), IsqType::Q8).is_none(), "q8 holds 1e5");
}
