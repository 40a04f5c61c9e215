//! `switchyard bench`: prefill and decode throughput through the real engine (paged KV cache,
//! continuous batching), with the decode roofline from measured memory bandwidth.

use std::time::Instant;

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use switchyard_engine::engine::{Event, GenerateRequest};

use crate::loading::{self, EngineArgs, ModelArgs};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt tokens per request (random ids; ignored with `--prompt-file`).
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Use this text file as every request's prompt instead of random ids (real text is what
    /// speculative decoding needs to be measured on).
    #[arg(long, value_name = "FILE")]
    prompt_file: Option<std::path::PathBuf>,
    /// With `--prompt-file`: apply the model's chat template (one user message).
    #[arg(long, requires = "prompt_file")]
    chat: bool,
    /// Generated tokens per request.
    #[arg(long, default_value_t = 64)]
    gen_len: usize,
    /// Concurrent requests.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    engine: EngineArgs,
}

/// Bytes copied to estimate memory bandwidth: well past the last-level cache (32 MiB here).
const BW_BYTES: usize = 512 << 20;

/// Read+write bandwidth of a large parallel copy, in bytes/s (best of 3).
fn memory_bandwidth() -> f64 {
    use rayon::prelude::*;
    let src = vec![1u8; BW_BYTES];
    let mut dst = vec![0u8; BW_BYTES];
    let chunk = BW_BYTES / rayon::current_num_threads().max(1);
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
        best = best.max(2.0 * BW_BYTES as f64 / t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    best
}

/// A memory figure of this process from `/proc/self/status` (`VmHWM` peak, `VmRSS` current),
/// in bytes; NaN where unknown.
fn status_bytes(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb * 1024.0)
}

/// Speculative tokens (drafted, accepted) so far.
fn spec_counts(e: &switchyard_engine::engine::EngineHandle) -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let m = e.metrics();
    (
        m.spec_draft_tokens.load(Relaxed),
        m.spec_accepted_tokens.load(Relaxed),
    )
}

pub fn run(a: BenchArgs) -> Result<()> {
    anyhow::ensure!(
        a.prompt_len > 0 && a.gen_len > 1 && a.batch > 0,
        "--prompt-len, --batch must be positive and --gen-len at least 2"
    );
    let mut eargs = a.engine.clone();
    eargs.no_prefix_caching = true;
    eargs.max_num_seqs = eargs.max_num_seqs.max(a.batch);
    let loaded = loading::load_for(&a.model, &eargs)?;
    let text_prompt = match &a.prompt_file {
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("--prompt-file {}", f.display()))?;
            let ids =
                loading::encode_prompt(&loaded.tokenizer, &loaded.dir, &text, a.chat, None, None)?;
            anyhow::ensure!(!ids.is_empty(), "--prompt-file {} is empty", f.display());
            Some(ids)
        }
        None => None,
    };
    let prompt_len = text_prompt.as_ref().map_or(a.prompt_len, Vec::len);
    // What the ranks really hold (quantized weights at their int8 + scale size).
    let weights_bytes = loaded.weight_bytes() as f64;
    if eargs.max_model_len.is_none() {
        eargs.max_model_len = Some(prompt_len + a.gen_len);
    }
    let engine = loading::start_loaded(loaded, &eargs)?;
    let cfg = engine.info().model.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let run_once = |rng: &mut rand::rngs::StdRng, gen: usize| -> Result<(f64, f64, f64)> {
        let t0 = Instant::now();
        let mut streams = Vec::new();
        for _ in 0..a.batch {
            let prompt: Vec<u32> = match &text_prompt {
                Some(ids) => ids.clone(),
                None => (0..prompt_len)
                    .map(|_| rng.random_range(0..cfg.vocab_size as u32))
                    .collect(),
            };
            let req = GenerateRequest {
                ignore_eos: true,
                ..GenerateRequest::greedy(prompt, gen)
            };
            streams.push(engine.submit(req)?);
        }
        // One thread per stream so each first-token time is observed when it happens.
        let times: Vec<Result<(f64, f64)>> = std::thread::scope(|sc| {
            let hs: Vec<_> = streams
                .into_iter()
                .map(|mut s| {
                    sc.spawn(move || -> Result<(f64, f64)> {
                        let mut first = None;
                        while let Some(ev) = s.blocking_recv() {
                            match ev {
                                Event::Token(_) => {
                                    first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
                                }
                                Event::Finished(_) => break,
                                Event::Error(e) => anyhow::bail!(e),
                            }
                        }
                        Ok((first.unwrap_or(f64::NAN), t0.elapsed().as_secs_f64()))
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("bench reader thread panicked")))
                })
                .collect()
        });
        let times = times.into_iter().collect::<Result<Vec<_>>>()?;
        let last_first = times.iter().map(|t| t.0).fold(0.0, f64::max);
        let ttft = times.iter().map(|t| t.0).fold(f64::INFINITY, f64::min);
        let total = times.iter().map(|t| t.1).fold(0.0, f64::max);
        Ok((ttft, last_first, total))
    };
    // Warm-up (page in weights, allocate).
    run_once(&mut rng, 2)?;
    let spec_before = spec_counts(&engine);
    let (ttft, prefill_done, total) = run_once(&mut rng, a.gen_len)?;
    let (drafted, accepted) = {
        let (d, acc) = spec_counts(&engine);
        (d - spec_before.0, acc - spec_before.1)
    };
    // Resident memory while serving, before the bandwidth probe allocates its buffers.
    let rss_serving = status_bytes("VmRSS:");
    let rss_peak = status_bytes("VmHWM:");
    let prefill_tok_s = (a.batch * prompt_len) as f64 / prefill_done;
    let decode_tok_s = (a.batch * (a.gen_len - 1)) as f64 / (total - prefill_done);
    let bw = memory_bandwidth();
    let (_, active) = cfg.parameter_counts();
    let dtype = engine.info().dtype;
    let (total_params, _) = cfg.parameter_counts();
    // Bytes per parameter as held (below the dtype's with --quantize).
    let bytes_per_param = weights_bytes / total_params as f64;
    let roofline = bw / (active as f64 * bytes_per_param);
    let kv_bytes = engine.info().kv_cache_bytes as f64;
    let out = serde_json::json!({
        "prefill_tok_s": prefill_tok_s,
        "decode_tok_s": decode_tok_s,
        "ttft_ms": ttft * 1e3,
        "total_tok_s": (a.batch * a.gen_len) as f64 / total,
        "batch": a.batch,
        "prompt_len": prompt_len,
        "prompt": if a.prompt_file.is_some() { "file" } else { "random" },
        "speculative": a.engine.speculative_config.as_ref().map(|c| serde_json::json!({
            "method": switchyard_engine::speculative::SpeculativeConfig::parse_json(c)
                .ok()
                .map(|c| c.method),
            "draft_tokens": drafted,
            "accepted_tokens": accepted,
            "acceptance_rate": accepted as f64 / drafted.max(1) as f64,
        })),
        "gen_len": a.gen_len,
        "dtype": format!("{dtype:?}").to_lowercase(),
        "quantize": a.model.quantize.map(|q| q.name()),
        "device": engine.info().device,
        "memory_bandwidth_gb_s": bw / 1e9,
        "active_params": active,
        "decode_roofline_tok_s_batch1": roofline,
        "decode_roofline_ratio": decode_tok_s / a.batch as f64 / roofline,
        "threads": rayon::current_num_threads(),
        "weights_bytes": weights_bytes,
        "kv_cache_bytes": kv_bytes,
        "kv_dtype": engine.info().kv_dtype.name(),
        "kv_cache_tokens": engine.info().num_blocks * engine.info().block_size,
        "rss_serving_bytes": rss_serving,
        "rss_peak_bytes": rss_peak,
        "rss_serving_over_weights_plus_kv": rss_serving / (weights_bytes + kv_bytes),
    });
    if a.json {
        println!("{out}");
    } else {
        println!(
            "prefill {prefill_tok_s:.1} tok/s · decode {decode_tok_s:.1} tok/s (batch {}) · TTFT {:.1} ms · bandwidth {:.1} GB/s · batch-1 decode roofline {roofline:.1} tok/s",
            a.batch,
            ttft * 1e3,
            bw / 1e9
        );
    }
    Ok(())
}
