//! Tensor + expert parallel execution (`HyV3Model::load_parallel` over an in-process
//! communicator, one thread per rank) against transformers' logits and against one rank:
//! prefill logits within the single-device bound, decode equal to prefill, greedy
//! continuations equal; the paged batched forward equal to one rank's; the bytes each rank
//! holds equal to `switchyard plan`'s per-device bytes; a rank that goes away makes the others
//! fail instead of hang; and configurations that cannot be split are refused naming the field.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use switchyard_model::plan::{
    plan, rank_weight_bytes, KvFormat, MemoryPlan, PlanDevice, PlanRequest, WeightFormat,
};
use switchyard_model::{
    Checkpoint, HyV3Model, InProcessGroup, IsqType, KvDtype, LoadOptions, Logits, ModelConfig,
    PagedSeq,
};

mod common;
use common::{argmax, argmax_agreement, greedy_ids, input_ids, max_abs};

/// The single-device oracle test's bound (tests/oracle.rs).
const F32_TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/oracle")
}

fn opts(dtype: DType) -> LoadOptions {
    LoadOptions {
        dtype,
        device: Device::Cpu,
        load_mtp: false,
        quantize: None,
    }
}

/// Every rank of `dir` over `world` ranks in `dtype`; `f` on each, results in rank order.
fn on_ranks<R: Send>(
    dir: &Path,
    world: usize,
    dtype: DType,
    f: impl Fn(&HyV3Model) -> R + Sync,
) -> Vec<R> {
    common::on_ranks(dir, world, &opts(dtype), f)
}

/// Prefill logits, decode-step logits, and a greedy continuation of `steps` tokens.
fn run_case(m: &HyV3Model, ids: &[u32], steps: usize) -> (Tensor, Tensor, Vec<u32>) {
    let mut cache = m.new_cache();
    let prefill = m.forward(ids, &mut cache, Logits::All).unwrap();
    let mut cache = m.new_cache();
    let rows: Vec<Tensor> = ids
        .iter()
        .map(|&id| m.forward(&[id], &mut cache, Logits::Last).unwrap())
        .collect();
    let decode = Tensor::cat(&rows, 0).unwrap();
    let mut cache = m.new_cache();
    let mut last = m.forward(ids, &mut cache, Logits::Last).unwrap();
    let mut greedy = Vec::new();
    for _ in 0..steps {
        let next = argmax(&last.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        greedy.push(next);
        last = m.forward(&[next], &mut cache, Logits::Last).unwrap();
    }
    (prefill, decode, greedy)
}

/// Every rank returns the same logits (bit for bit) and tokens.
fn check_ranks_agree(case: &str, out: &[(Tensor, Tensor, Vec<u32>)]) {
    for (r, o) in out.iter().enumerate().skip(1) {
        assert_eq!(max_abs(&o.0, &out[0].0), 0.0, "{case}: rank {r} prefill");
        assert_eq!(o.2, out[0].2, "{case}: rank {r} greedy");
    }
}

fn check_oracle_case(case: &str, world: usize) {
    let dir = fixtures().join(case);
    let t = candle_core::safetensors::load(dir.join("oracle.safetensors"), &Device::Cpu).unwrap();
    let ids = input_ids(&t);
    let want = t["logits"].clone();
    let greedy = greedy_ids(&dir);
    let out = on_ranks(&dir, world, DType::F32, |m| run_case(m, &ids, greedy.len()));
    check_ranks_agree(case, &out);
    let (prefill, decode, got) = &out[0];
    let d = max_abs(prefill, &want);
    let d2 = max_abs(decode, prefill);
    println!("{case} tp={world}: prefill max|Δ| = {d:.2e}, decode-vs-prefill {d2:.2e}");
    assert!(
        d <= F32_TOL,
        "{case} tp={world}: prefill logits differ by {d}"
    );
    assert!(d2 <= F32_TOL, "{case} tp={world}: decode differs by {d2}");
    assert_eq!(
        got, &greedy,
        "{case} tp={world}: greedy continuation differs"
    );
}

// Every fixture has 4 query heads, so 2 and 4 ranks are the splits there are; with 2 KV heads
// (1 in e192_k8) 4 ranks replicate each KV head on 2 (4) ranks.

#[test]
fn tp_f32_basic_matches_oracle() {
    for n in [2, 4] {
        check_oracle_case("f32_basic", n);
    }
}

#[test]
fn tp_e192_top8_with_dense_layers_matches_oracle() {
    for n in [2, 4] {
        check_oracle_case("e192_k8", n);
    }
}

#[test]
fn tp_hub_dialect_per_expert_tensors_and_dense_layer_match_oracle() {
    for n in [2, 4] {
        check_oracle_case("hub_dialect", n);
    }
}

#[test]
fn tp_head_dim_ne_two_shared_experts_matches_oracle() {
    for n in [2, 4] {
        check_oracle_case("head_dim_ne", n);
    }
}

#[test]
fn tp_sharded_checkpoint_matches_oracle() {
    check_oracle_case("sharded", 2);
}

/// A random model whose every split is uneven: 7 experts (so with 8 ranks one rank holds no
/// expert), vocabulary 509, shared expert 33 and dense 130 wide, tied embeddings; 8 query heads
/// over 2 KV heads (4 and 8 ranks replicate each KV head on 2 and 4 ranks). Written to a
/// temporary folder.
fn uneven_model() -> (ModelConfig, tempfile::TempDir) {
    let mut cfg = switchyard_model::presets::preset("tiny").unwrap();
    cfg.num_experts = 7;
    cfg.num_attention_heads = 8;
    cfg.num_key_value_heads = 2;
    cfg.vocab_size = 509;
    cfg.moe_intermediate_size = 33;
    cfg.intermediate_size = 130;
    cfg.tie_word_embeddings = true;
    cfg.gate.n_group = 1;
    cfg.gate.topk_group = 1;
    let tmp = tempfile::tempdir().unwrap();
    switchyard_model::test_model::write_random_checkpoint(&cfg, tmp.path(), 7, DType::F32).unwrap();
    (cfg, tmp)
}

/// [`uneven_model`] over 2, 4 and 8 ranks gives the logits and greedy tokens of one rank.
#[test]
fn tp_uneven_splits_equal_one_rank() {
    let (_, tmp) = uneven_model();
    let ids: Vec<u32> = (0..13).map(|i| (i * 37 + 11) % 509).collect();
    let one = on_ranks(tmp.path(), 1, DType::F32, |m| run_case(m, &ids, 12));
    for n in [2, 4, 8] {
        let out = on_ranks(tmp.path(), n, DType::F32, |m| {
            let s = m.shard();
            assert_eq!(s.world, n);
            run_case(m, &ids, 12)
        });
        check_ranks_agree("uneven", &out);
        let d = max_abs(&out[0].0, &one[0].0);
        let d2 = max_abs(&out[0].1, &one[0].1);
        println!("uneven tp={n}: prefill max|Δ| vs tp=1 = {d:.2e}, decode {d2:.2e}");
        assert!(d <= F32_TOL && d2 <= F32_TOL, "tp={n}: {d} {d2}");
        assert_eq!(out[0].2, one[0].2, "tp={n}: greedy differs");
    }
}

/// The paged batched forward (chunked prefill of three prompts, then decode, scattered
/// blocks; each rank has its own cache of its KV heads) equals one rank's.
#[test]
fn tp_paged_batch_equals_one_rank() {
    let dir = fixtures().join("e192_k8");
    let prompts: Vec<Vec<u32>> = vec![
        (0..11).map(|i| (i * 7 + 3) % 200).collect(),
        (0..4).map(|i| (i * 13 + 5) % 200).collect(),
        (0..17).map(|i| (i * 29 + 1) % 200).collect(),
    ];
    let paged = |m: &HyV3Model| -> Vec<Tensor> {
        let bs = 3;
        let mut kv = m.new_paged_cache(64, bs, KvDtype::F32);
        assert_eq!(kv.layout().kv_heads, m.local_kv_heads());
        let mut free: Vec<u32> = (0..64u32).rev().collect();
        let mut tables: Vec<Vec<u32>> = vec![vec![]; prompts.len()];
        let mut seqs: Vec<Vec<u32>> = prompts.clone();
        let mut done = vec![0usize; prompts.len()];
        let mut out = Vec::new();
        for _step in 0..8 {
            let mut toks: Vec<(usize, Vec<u32>)> = Vec::new();
            for (i, s) in seqs.iter().enumerate() {
                let n = (s.len() - done[i]).min(5);
                let t = s[done[i]..done[i] + n].to_vec();
                while tables[i].len() * bs < done[i] + n {
                    tables[i].push(free.pop().unwrap());
                }
                toks.push((i, t));
            }
            let batch: Vec<PagedSeq<'_>> = toks
                .iter()
                .map(|(i, t)| PagedSeq {
                    tokens: t,
                    pos0: done[*i],
                    block_table: &tables[*i],
                    logits: Logits::All,
                })
                .collect();
            let l = m.forward_paged(&batch, &mut kv).unwrap();
            for ((i, t), l) in toks.iter().zip(&l) {
                done[*i] += t.len();
                if done[*i] == seqs[*i].len() {
                    let rows = l.dim(0).unwrap();
                    let last = l.narrow(0, rows - 1, 1).unwrap();
                    let next = argmax(&last.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                    seqs[*i].push(next);
                }
                out.push(l.clone());
            }
        }
        out
    };
    let one = on_ranks(&dir, 1, DType::F32, paged).remove(0);
    for n in [2, 4] {
        let got = on_ranks(&dir, n, DType::F32, paged).remove(0);
        assert_eq!(got.len(), one.len());
        let d = got
            .iter()
            .zip(&one)
            .map(|(a, b)| max_abs(a, b))
            .fold(0f32, f32::max);
        println!("paged e192_k8 tp={n}: max|Δ| vs tp=1 = {d:.2e}");
        assert!(d <= F32_TOL, "tp={n}: paged logits differ by {d}");
    }
}

/// The bytes each rank holds equal the plan's per-device weight bytes (f32 and bf16 compute;
/// the plan's `bf16` format keeps the gate weight and expert bias in f32, as the loader does),
/// and with `--quantize q8|q4` the plan's `q8`/`q4` bytes.
#[test]
fn rank_weight_bytes_equal_the_plan() {
    let mut checked = 0;
    for case in [
        "f32_basic",
        "bf16_f32router",
        "e192_k8",
        "hub_dialect",
        "head_dim_ne",
    ] {
        let dir = fixtures().join(case);
        let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let ckpt = Arc::new(Checkpoint::open(&dir).unwrap());
        for (dtype, format) in [
            (DType::F32, WeightFormat::F32),
            (DType::BF16, WeightFormat::Bf16),
        ] {
            for n in [1, 2, 4] {
                check_rank_bytes(&cfg, &ckpt, dtype, format, n, case);
                checked += n;
            }
        }
    }
    assert_eq!(checked, 5 * 2 * 7);
    // Quantized at load (`--quantize`, f32 for what stays dense): the bytes the kernels'
    // matrices really hold, padding included.
    for case in ["f32_basic", "e192_k8", "head_dim_ne"] {
        let dir = fixtures().join(case);
        let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let ckpt = Arc::new(Checkpoint::open(&dir).unwrap());
        for format in [WeightFormat::Q8, WeightFormat::Q4] {
            for n in [1, 2, 4] {
                check_rank_bytes(&cfg, &ckpt, DType::F32, format, n, case);
            }
        }
    }
    // Uneven splits everywhere, a rank without experts at 8, tied embeddings.
    let (cfg, tmp) = uneven_model();
    let ckpt = Arc::new(Checkpoint::open(tmp.path()).unwrap());
    for (dtype, format) in [
        (DType::F32, WeightFormat::F32),
        (DType::BF16, WeightFormat::Bf16),
        (DType::F32, WeightFormat::Q8),
        (DType::F32, WeightFormat::Q4),
    ] {
        for n in [2, 4, 8] {
            let p = check_rank_bytes(&cfg, &ckpt, dtype, format, n, "uneven");
            assert_eq!(p.devices[n - 1].routed_experts, 7 / n);
        }
    }
}

/// Loads each of `n` ranks of `cfg` (one rank through the plain loader when `n` is 1), one
/// after another since loading needs no forward pass, and checks that it holds the weight bytes
/// `switchyard plan` gives its device. Returns the plan.
fn check_rank_bytes(
    cfg: &ModelConfig,
    ckpt: &Arc<Checkpoint>,
    dtype: DType,
    format: WeightFormat,
    n: usize,
    what: &str,
) -> MemoryPlan {
    // GPUs do not take the quantized formats: their plan stands in for the layout.
    let quantize = match format {
        WeightFormat::Q8 => Some(IsqType::Q8),
        WeightFormat::Q4 => Some(IsqType::Q4),
        _ => None,
    };
    let p = plan(
        cfg,
        &plan_request(
            n,
            if quantize.is_some() {
                WeightFormat::F32
            } else {
                format
            },
        ),
    )
    .unwrap();
    let opts = LoadOptions {
        quantize,
        ..opts(dtype)
    };
    for (r, c) in InProcessGroup::new(n).build().into_iter().enumerate() {
        let m = if n == 1 {
            HyV3Model::load(cfg.clone(), ckpt.clone(), &opts, |_, _| {})
        } else {
            HyV3Model::load_parallel(cfg.clone(), ckpt.clone(), &opts, Arc::new(c), |_, _| {})
        }
        .unwrap();
        let planned = rank_weight_bytes(cfg, format, n, r).unwrap().total();
        if quantize.is_none() {
            assert_eq!(
                planned, p.devices[r].weights_bytes,
                "{what} tp={n} rank {r}"
            );
        }
        assert_eq!(
            m.weight_bytes(),
            planned,
            "{what} {dtype:?} {format:?} tp={n} rank {r}"
        );
    }
    p
}

fn plan_request(gpus: usize, weights: WeightFormat) -> PlanRequest {
    PlanRequest {
        gpus,
        device: PlanDevice::Cuda,
        memory_bytes: 80 << 30,
        memory_utilization: 0.9,
        weights,
        kv: KvFormat::Bf16,
        max_context: 4096,
        max_num_seqs: 8,
        max_num_batched_tokens: 256,
        block_size: 16,
        with_mtp: false,
    }
}

/// A rank that leaves the group (its thread ends) makes the others' forward fail promptly.
#[test]
fn a_rank_leaving_makes_the_others_fail_not_hang() {
    let dir = fixtures().join("f32_basic");
    let comms = InProcessGroup::new(2).build(); // no timeout: only the abort can free rank 0
    let t0 = Instant::now();
    let out: Vec<Result<(), String>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let dir = &dir;
                s.spawn(move || {
                    let rank = switchyard_model::Communicator::rank(&c);
                    let m = HyV3Model::load_dir_parallel(dir, &opts(DType::F32), Arc::new(c))
                        .map_err(|e| e.to_string())?;
                    if rank == 1 {
                        return Err("rank 1 went away".to_string());
                    }
                    let mut cache = m.new_cache();
                    for _ in 0..3 {
                        m.forward(&[1, 2, 3], &mut cache, Logits::Last)
                            .map_err(|e| e.to_string())?;
                    }
                    Ok(())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(t0.elapsed() < Duration::from_secs(60));
    let e = out[0].as_ref().unwrap_err();
    assert!(e.contains("rank 1 left the group"), "{e}");
}

/// Splits the plan cannot make are refused before loading, naming the field and the flag.
#[test]
fn bad_tensor_parallel_sizes_name_the_field_and_flag() {
    let dir = fixtures().join("f32_basic");
    for n in [3, 8] {
        let c = InProcessGroup::new(n).build().remove(0);
        let e = HyV3Model::load_dir_parallel(&dir, &opts(DType::F32), Arc::new(c)).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!(
                "num_attention_heads 4 is not divisible by --tensor-parallel-size {n}"
            )),
            "{msg}"
        );
    }
}

/// bf16 compute split over ranks (the CPU bf16 kernels: fused routed + shared expert passes
/// over a rank's local experts and intermediate slices) against the f32 oracle, with the
/// single-device bf16 test's bound and argmax agreement (tests/oracle.rs), and against one
/// bf16 rank.
#[test]
fn tp_bf16_compute_within_the_single_device_bound() {
    const BF16_TOL: f32 = 0.25;
    for case in ["bf16_f32router", "e192_k8", "hub_dialect"] {
        let dir = fixtures().join(case);
        let t =
            candle_core::safetensors::load(dir.join("oracle.safetensors"), &Device::Cpu).unwrap();
        let ids = input_ids(&t);
        let want = t["logits"].clone();
        let prefill = |m: &HyV3Model| {
            let mut cache = m.new_cache();
            m.forward(&ids, &mut cache, Logits::All).unwrap()
        };
        let one = on_ranks(&dir, 1, DType::BF16, prefill).remove(0);
        for n in [2, 4] {
            let got = on_ranks(&dir, n, DType::BF16, prefill).remove(0);
            let d32 = max_abs(&got, &want);
            let d1 = max_abs(&got, &one);
            let (agree, rows) = argmax_agreement(&got, &want);
            println!(
                "{case} bf16 tp={n}: max|Δ| vs f32 oracle {d32:.3}, vs bf16 tp=1 {d1:.3}, \
                 argmax agree {agree}/{rows}"
            );
            assert!(
                d32 <= BF16_TOL,
                "{case} tp={n}: bf16 logits differ by {d32}"
            );
            assert!(agree * 10 >= rows * 8, "{case} tp={n}: argmax {agree}");
        }
    }
}
