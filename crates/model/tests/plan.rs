//! The memory plan's weight bytes equal what real checkpoints store: the transformers-written
//! oracle fixtures (f32, bf16 with an f32 gate, hub tensor names, an MTP layer, sharded, FP8
//! with per-tensor scales) and random bf16/f32 test models, summed from their safetensors
//! headers. One GPU holds everything,
//! so the plan's total must match the files to the byte.

use std::path::Path;

use candle_core::DType;
use switchyard_model::plan::{plan, KvFormat, PlanDevice, PlanRequest, WeightFormat};
use switchyard_model::ModelConfig;

/// Sum of tensor bytes in every `*.safetensors` file of `dir`, read from the headers, and the
/// weight format they are stored in.
fn stored_bytes(dir: &Path) -> (u64, WeightFormat) {
    let (mut total, mut has_f32_only, mut has_fp8) = (0u64, true, false);
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors")
            && !p
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("oracle")
        {
            let bytes = std::fs::read(&p).unwrap();
            let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
            for (_, info) in meta.tensors() {
                total += (info.data_offsets.1 - info.data_offsets.0) as u64;
                has_f32_only &= info.dtype == safetensors::Dtype::F32;
                has_fp8 |= info.dtype == safetensors::Dtype::F8_E4M3;
            }
        }
    }
    let format = if has_fp8 {
        WeightFormat::Fp8
    } else if has_f32_only {
        WeightFormat::F32
    } else {
        WeightFormat::Bf16
    };
    (total, format)
}

fn one_gpu(format: WeightFormat, with_mtp: bool) -> PlanRequest {
    PlanRequest {
        device: PlanDevice::Cuda,
        gpus: 1,
        memory_bytes: 80 << 30,
        memory_utilization: 0.9,
        weights: format,
        kv: KvFormat::Bf16,
        max_context: 4096,
        max_num_seqs: 8,
        max_num_batched_tokens: 256,
        block_size: 16,
        with_mtp,
    }
}

#[test]
fn planned_weight_bytes_equal_the_oracle_checkpoints() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/oracle");
    let mut checked = 0;
    for e in std::fs::read_dir(&root).unwrap() {
        let dir = e.unwrap().path();
        if !dir.join("config.json").exists() {
            continue;
        }
        let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let (stored, format) = stored_bytes(&dir);
        let p = plan(&cfg, &one_gpu(format, cfg.num_mtp_layers > 0)).unwrap();
        // The plan counts FP8 scales per tensor (a weight and an input scale per matrix); the
        // block and per-channel fixtures store a grid of scales instead, a few bytes per
        // thousand weights on Hy3's shapes but a visible share of these tiny matrices.
        let per_tensor = cfg.quantization.as_ref().is_none_or(|q| {
            matches!(
                q,
                switchyard_model::Quantization::Fp8 {
                    weight_scales: switchyard_model::WeightScales::PerTensor,
                    ..
                }
            )
        });
        if !per_tensor {
            let rel = (p.weights_total_bytes as f64 - stored as f64).abs() / stored as f64;
            println!("{}: planned vs stored {rel:.2e}", dir.display());
            assert!(rel < 0.05, "{}: {rel}", dir.display());
            continue;
        }
        assert_eq!(p.weights_total_bytes, stored, "{}", dir.display());
        assert_eq!(p.devices[0].weights_bytes, stored, "{}", dir.display());
        checked += 1;
    }
    assert!(
        checked >= 8,
        "only {checked} fixtures found in {}",
        root.display()
    );
}

#[test]
fn planned_weight_bytes_equal_written_test_models() {
    for (preset, dtype, format) in [
        ("tiny", DType::F32, WeightFormat::F32),
        ("tiny", DType::BF16, WeightFormat::Bf16),
        ("small", DType::BF16, WeightFormat::Bf16),
        ("tiny", DType::F8E4M3, WeightFormat::Fp8),
    ] {
        let d = tempfile::tempdir().unwrap();
        let cfg = switchyard_model::presets::preset(preset).unwrap();
        switchyard_model::test_model::write_random_checkpoint(&cfg, d.path(), 1, dtype).unwrap();
        let p = plan(&cfg, &one_gpu(format, false)).unwrap();
        assert_eq!(
            p.weights_total_bytes,
            stored_bytes(d.path()).0,
            "{preset} {dtype:?}"
        );
        assert_eq!(stored_bytes(d.path()).1, format, "{preset} {dtype:?}");
    }
}

#[test]
fn hy3_deployments() {
    let cfg = switchyard_model::presets::preset("hy3").unwrap();
    let req = |gpus: usize, gib: u64, weights, kv| PlanRequest {
        gpus,
        device: PlanDevice::Cuda,
        memory_bytes: gib << 30,
        memory_utilization: 0.9,
        weights,
        kv,
        max_context: 262_144,
        max_num_seqs: 64,
        max_num_batched_tokens: 8192,
        block_size: 16,
        with_mtp: false,
    };
    // bf16 Hy3 is about 2 bytes per parameter: 295B parameters need ~590 GB.
    let bf16 = plan(&cfg, &req(8, 80, WeightFormat::Bf16, KvFormat::Bf16)).unwrap();
    let params = bf16.parameters_total as f64;
    assert!((290e9..300e9).contains(&params), "{params}");
    let ratio = bf16.weights_total_bytes as f64 / params;
    assert!((2.0..2.001).contains(&ratio), "{ratio}");
    // Eight 80 GiB cards cannot hold bf16 weights with room to spare for a 256K sequence.
    assert!(!bf16.fits);
    assert!(
        bf16.reason.as_deref().unwrap().contains("GPU"),
        "{:?}",
        bf16.reason
    );
    // FP8 halves the projections: eight H100s then hold the weights and several 256K sequences.
    let fp8 = plan(&cfg, &req(8, 80, WeightFormat::Fp8, KvFormat::Bf16)).unwrap();
    assert!(fp8.fits, "{:?}", fp8.reason);
    assert!(fp8.weights_total_bytes < bf16.weights_total_bytes * 52 / 100);
    assert!(fp8.max_concurrency_at_max_context >= 1.0);
    // Every device's budget adds up: weights + activations + KV ≤ usable.
    for d in &fp8.devices {
        assert!(
            d.weights_bytes + d.activation_bytes + d.kv_cache_bytes <= fp8.usable_bytes_per_device
        );
        assert_eq!(
            d.kv_cache_bytes,
            d.kv_tokens * fp8.kv_bytes_per_token_per_device
        );
        assert_eq!(d.kv_tokens % 16, 0);
    }
    // fp8 KV holds twice the tokens of bf16 KV in the same space (to within a block).
    let fp8kv = plan(&cfg, &req(8, 80, WeightFormat::Fp8, KvFormat::Fp8)).unwrap();
    assert!(fp8kv.kv_tokens.abs_diff(2 * fp8.kv_tokens) <= 32);
}

fn cpu(memory_gib: u64, weights: WeightFormat) -> PlanRequest {
    PlanRequest {
        device: PlanDevice::Cpu,
        gpus: 1,
        memory_bytes: memory_gib << 30,
        memory_utilization: 1.0,
        weights,
        kv: KvFormat::Bf16,
        max_context: 32_768,
        max_num_seqs: 8,
        max_num_batched_tokens: 2048,
        block_size: 16,
        with_mtp: false,
    }
}

/// Hy3 on one CPU host: bf16 needs ~590 GB and is refused on 512 GiB with the quantized
/// formats offered by size; q8 holds ~1.06 and q4 ~0.63 bytes per parameter; the KV cache is
/// what the engine gives it by default (a quarter of what the weights leave).
#[test]
fn hy3_on_a_cpu_host() {
    let cfg = switchyard_model::presets::preset("hy3").unwrap();
    let bf16 = plan(&cfg, &cpu(512, WeightFormat::Bf16)).unwrap();
    assert!(!bf16.fits);
    let why = bf16.reason.clone().unwrap();
    assert!(why.starts_with("the weights need"), "{why}");
    assert!(
        why.contains("--quantize q8") && why.contains("--quantize q4"),
        "{why}"
    );
    let params = bf16.parameters_total as f64;
    for (f, lo, hi) in [
        (WeightFormat::Q8, 1.06, 1.07),
        (WeightFormat::Q4, 0.62, 0.64),
    ] {
        let p = plan(&cfg, &cpu(256, f)).unwrap();
        let per = p.weights_total_bytes as f64 / params;
        assert!((lo..hi).contains(&per), "{f:?}: {per} bytes per parameter");
        if f == WeightFormat::Q4 {
            assert!(p.fits, "{:?}", p.reason);
            let d = &p.devices[0];
            let left = ((256u64 << 30) - d.weights_bytes) / 4;
            let tokens = left / p.kv_bytes_per_token_per_device / 16 * 16;
            assert_eq!(d.kv_tokens, tokens);
            assert_eq!(p.kv_tokens, tokens);
        } else {
            // 310 GB of q8 weights do not fit in 256 GiB; q4 is offered and fits.
            let why = p.reason.clone().unwrap();
            assert!(
                why.contains("--quantize q4") && why.contains("fits"),
                "{why}"
            );
            assert!(!why.contains("--quantize q8 ("), "{why}");
        }
    }
    // A context the default cache cannot hold says how to get it.
    let mut r = cpu(400, WeightFormat::Q4);
    r.max_context = 262_144;
    let p = plan(&cfg, &r).unwrap();
    assert!(!p.fits);
    assert!(
        p.reason.as_deref().unwrap().contains("--kv-cache-memory"),
        "{:?}",
        p.reason
    );
}

#[test]
fn cpu_and_gpu_formats_are_refused_where_they_do_not_run() {
    let cfg = switchyard_model::presets::preset("hy3").unwrap();
    let e = plan(&cfg, &cpu(512, WeightFormat::Fp8)).unwrap_err();
    assert!(e.to_string().starts_with("--weights:"), "{e}");
    let mut r = cpu(512, WeightFormat::Q4);
    r.device = PlanDevice::Cuda;
    let e = plan(&cfg, &r).unwrap_err();
    assert!(e.to_string().starts_with("--weights: q4"), "{e}");
    let mut r = cpu(512, WeightFormat::Q4);
    r.kv = KvFormat::Fp8;
    let e = plan(&cfg, &r).unwrap_err();
    assert!(e.to_string().starts_with("--kv-dtype:"), "{e}");
    let mut r = cpu(512, WeightFormat::Q4);
    r.gpus = 2;
    let e = plan(&cfg, &r).unwrap_err();
    assert!(e.to_string().starts_with("--gpus:"), "{e}");
    assert_eq!(
        WeightFormat::parse("Q4_1").unwrap(),
        WeightFormat::Q4,
        "--quantize's spellings"
    );
    let e = WeightFormat::parse("q3_k").unwrap_err();
    assert!(e.to_string().contains("q8 or q4"), "{e}");
}
