//! Tokens per second of prefill and decode through the engine's forward: one
//! [`HyV3Model::forward_paged`] call over a batch of sequences in a paged KV cache, exactly what
//! each engine step runs (the engine adds scheduling and sampling, measured by the `scheduler`
//! bench). Criterion's `elem/s` is tokens/s.
//!
//! - `prefill/<dtype>/b<B>_p<P>`: B prompts of P tokens in one step (logits of the last
//!   position only, as the engine asks); throughput B·P tokens.
//! - `decode/<dtype>/b<B>_ctx<P>`: one new token for each of B sequences whose caches hold P
//!   tokens; throughput B tokens. Each iteration writes the same slot again, so the context
//!   stays at P; the cache holds zeros before it (attention costs the same for any values).
//!
//! The model is the `small` preset (the shape `../shared/PEERS.md` measures llama.cpp on, 633M
//! parameters, 137M active) with random weights, generated once into the target folder. Batches
//! 1 and 4 for prefill, 1, 4 and 16 for decode: single-user latency, and the batch sizes where
//! decode turns from bandwidth- to compute-bound on a CPU. P = 128 as in NOTES.md's
//! `switchyard bench` figures, so the two compare.
//!
//! Environment (all optional):
//! - `SWITCHYARD_BENCH_MODEL`: a model folder to load instead of the generated one;
//! - `SWITCHYARD_BENCH_PRESET`: the preset to generate (`tiny`, `small`; default `small`, `tiny`
//!   in criterion's test mode);
//! - `SWITCHYARD_BENCH_DTYPES`: compute dtypes, default `f32,bf16`;
//! - `SWITCHYARD_BENCH_PREFILL_BATCH` (default `1,4`), `SWITCHYARD_BENCH_DECODE_BATCH`
//!   (default `1,4,16`): batch sizes;
//! - `SWITCHYARD_BENCH_PROMPT_LEN`: P, default 128;
//! - `SWITCHYARD_BENCH_KV_DTYPE`: `auto` (the engine's default: f32 for an f32 model, bf16
//!   otherwise), `f32` or `bf16`.

use candle_core::DType;
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use switchyard_benches::{
    bench_model_dir, env_list, env_usize, env_words, parse_dtype, test_mode, Rng, SEED,
};
use switchyard_model::{HyV3Model, KvDtype, LoadOptions, Logits, PagedKvCache, PagedSeq};

/// Tokens per KV block: the engine's default (`EngineConfig::block_size`).
const BLOCK_SIZE: usize = 16;
/// Prompt length and decode context: NOTES.md's `switchyard bench --prompt-len 128`.
const PROMPT_LEN: usize = 128;
/// Prompt length in test mode, where only the code path matters.
const TEST_PROMPT_LEN: usize = 16;

/// A loaded model with a KV cache big enough for the largest batch, one block run per
/// sequence, and the prompts.
struct Setup {
    model: HyV3Model,
    kv: PagedKvCache,
    tables: Vec<Vec<u32>>,
    prompts: Vec<Vec<u32>>,
}

impl Setup {
    fn load(dtype: &str, max_batch: usize, prompt_len: usize) -> Self {
        let dir = bench_model_dir();
        let opts = LoadOptions {
            dtype: parse_dtype(dtype),
            ..LoadOptions::default()
        };
        let model = HyV3Model::load_dir(&dir, &opts)
            .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));
        let kv_dtype = match std::env::var("SWITCHYARD_BENCH_KV_DTYPE").as_deref() {
            Ok("auto") | Err(_) if opts.dtype == DType::F32 => KvDtype::F32,
            Ok("auto") | Err(_) => KvDtype::Bf16,
            Ok(other) => KvDtype::from_name(other).unwrap_or_else(|| {
                panic!("SWITCHYARD_BENCH_KV_DTYPE={other:?}: auto, f32, bf16 or fp8")
            }),
        };
        // Room for the prompt and the decode token after it.
        let per_seq = (prompt_len + 1).div_ceil(BLOCK_SIZE);
        let kv = model.new_paged_cache(max_batch * per_seq, BLOCK_SIZE, kv_dtype);
        let tables = (0..max_batch)
            .map(|s| (s * per_seq..(s + 1) * per_seq).map(|b| b as u32).collect())
            .collect();
        let mut rng = Rng::new(SEED);
        let vocab = model.config().vocab_size;
        let prompts = (0..max_batch)
            .map(|_| rng.tokens(prompt_len, vocab))
            .collect();
        Self {
            model,
            kv,
            tables,
            prompts,
        }
    }

    /// One [`HyV3Model::forward_paged`] step over the first `batch` sequences: their whole
    /// prompts (prefill), or one token after them (decode).
    fn step(&mut self, batch: usize, decode: bool) {
        let seqs: Vec<PagedSeq<'_>> = (0..batch)
            .map(|s| {
                let prompt = &self.prompts[s];
                let (tokens, pos0) = if decode {
                    // The first prompt token as the "sampled" one: any id costs the same.
                    (&prompt[..1], prompt.len())
                } else {
                    (&prompt[..], 0)
                };
                PagedSeq {
                    tokens,
                    pos0,
                    block_table: &self.tables[s],
                    logits: Logits::Last,
                }
            })
            .collect();
        let out = self
            .model
            .forward_paged(&seqs, &mut self.kv)
            .expect(if decode { "decode" } else { "prefill" });
        std::hint::black_box(out);
    }
}

fn tokens(c: &mut Criterion) {
    let prompt_len = env_usize(
        "SWITCHYARD_BENCH_PROMPT_LEN",
        if test_mode() {
            TEST_PROMPT_LEN
        } else {
            PROMPT_LEN
        },
    );
    let prefill_batches = env_list("SWITCHYARD_BENCH_PREFILL_BATCH", &[1, 4]);
    let decode_batches = env_list("SWITCHYARD_BENCH_DECODE_BATCH", &[1, 4, 16]);
    let max_batch = prefill_batches
        .iter()
        .chain(&decode_batches)
        .copied()
        .max()
        .unwrap_or(1);
    for dtype in env_words("SWITCHYARD_BENCH_DTYPES", &["f32", "bf16"]) {
        // Loaded when the first benchmark of this dtype runs (not at all under a filter that
        // excludes them, or with `--list`), dropped before the next dtype loads.
        let mut setup: Option<Setup> = None;
        let load = || Setup::load(&dtype, max_batch, prompt_len);
        let groups = [
            ("prefill", &prefill_batches, false),
            ("decode", &decode_batches, true),
        ];
        for (group, batches, decode) in groups {
            let mut g = c.benchmark_group(group);
            // A step takes 0.5–3 s: one iteration per sample instead of criterion's 1..=10.
            g.sampling_mode(SamplingMode::Flat);
            for &b in batches {
                // B·P prompt tokens, or one new token for each of B sequences after P.
                let (tokens, id) = if decode {
                    (b, format!("b{b}_ctx{prompt_len}"))
                } else {
                    (b * prompt_len, format!("b{b}_p{prompt_len}"))
                };
                g.throughput(Throughput::Elements(tokens as u64));
                g.bench_function(BenchmarkId::new(&dtype, id), |bch| {
                    let s = setup.get_or_insert_with(load);
                    bch.iter(|| s.step(b, decode))
                });
            }
            g.finish();
        }
    }
}

criterion_group! {
    name = benches;
    config = switchyard_benches::criterion();
    targets = tokens
}
criterion_main!(benches);
