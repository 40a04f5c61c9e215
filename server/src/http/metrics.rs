//! `/metrics`: the server's Prometheus registry. Counters and histograms are updated as
//! requests run; the engine gauges (running, waiting, KV blocks, prefix-cache hit rate) are read
//! from the engine's atomics at scrape time, so a scrape always shows the engine's current state.
//! Names follow vLLM's where one exists (`num_requests_running`, `time_to_first_token_seconds`),
//! under the `switchyard_` prefix.

use std::sync::atomic::Ordering;

use prometheus::{
    CounterVec, Encoder, Gauge, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};
use switchyard_engine::engine::EngineHandle;

/// Request latency buckets (seconds): from a cached health probe to a long generation on CPU.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
];
/// Time-to-first-token buckets (seconds): vLLM's, which span GPU prefill to a queued CPU request.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
];

/// The registry and every metric in it.
pub struct Metrics {
    registry: Registry,
    /// HTTP requests by endpoint and status.
    pub requests: IntCounterVec,
    /// Time to the response head by endpoint (the whole request unless it streams).
    pub request_latency: HistogramVec,
    /// Time from arrival to the last token, by endpoint (generation requests).
    pub e2e_latency: HistogramVec,
    /// Time from submission to the first token, by endpoint.
    pub ttft: HistogramVec,
    /// Prompt tokens of finished generations, by endpoint.
    pub prompt_tokens: IntCounterVec,
    /// Prompt tokens served from the prefix cache, by endpoint.
    pub cached_tokens: IntCounterVec,
    /// Generated tokens, by endpoint.
    pub generation_tokens: IntCounterVec,
    /// Generations ended by the client going away, by endpoint.
    pub cancelled: IntCounterVec,
    /// Generations finished, by endpoint and finish reason.
    pub finished: IntCounterVec,
    /// Routed requests by the router's action and the tier that served them (`none` when
    /// refused).
    pub router_requests: IntCounterVec,
    /// US dollars spent on remote tiers, by tier.
    pub router_cost_usd: CounterVec,
    /// Fallbacks from a tier that failed or was unavailable, by the tier left and the tier that
    /// served instead.
    pub router_fallbacks: IntCounterVec,
    /// Retries of upstream calls, by the tier that finally served.
    pub router_retries: IntCounterVec,
    /// Requests through the cascade, by result (`passed`, `escalated`, `escalation_failed`).
    pub router_cascade: IntCounterVec,
    running: IntGauge,
    waiting: IntGauge,
    kv_used: IntGauge,
    kv_free: IntGauge,
    kv_total: IntGauge,
    kv_usage: Gauge,
    prefix_queries: IntGauge,
    prefix_hits: IntGauge,
    prefix_hit_rate: Gauge,
    engine_steps: IntGauge,
    engine_preemptions: IntGauge,
    engine_tokens_computed: IntGauge,
    engine_busy_seconds: Gauge,
    spec_draft_tokens: IntGauge,
    spec_accepted_tokens: IntGauge,
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new_custom(Some("switchyard".into()), None)?;
        fn reg<C: prometheus::core::Collector + Clone + 'static>(
            r: &Registry,
            c: C,
        ) -> prometheus::Result<C> {
            r.register(Box::new(c.clone()))?;
            Ok(c)
        }
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels)?,
            )
        };
        let hist = |name: &str, help: &str, buckets: &[f64]| {
            reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                    &["endpoint"],
                )?,
            )
        };
        let gauge = |name: &str, help: &str| reg(&registry, IntGauge::new(name, help)?);
        let fgauge = |name: &str, help: &str| reg(&registry, Gauge::new(name, help)?);
        Ok(Self {
            requests: counter("http_requests_total", "HTTP requests by endpoint and status code.", &["endpoint", "status"])?,
            request_latency: hist(
                "http_request_duration_seconds",
                "Time from request arrival to the response head (the whole request unless it streams).",
                LATENCY_BUCKETS,
            )?,
            e2e_latency: hist(
                "e2e_request_latency_seconds",
                "Time from request arrival to its last generated token.",
                LATENCY_BUCKETS,
            )?,
            ttft: hist(
                "time_to_first_token_seconds",
                "Time from engine submission to the first generated token.",
                TTFT_BUCKETS,
            )?,
            prompt_tokens: counter("prompt_tokens_total", "Prompt tokens of finished generations.", &["endpoint"])?,
            cached_tokens: counter(
                "prompt_tokens_cached_total",
                "Prompt tokens served from the prefix cache.",
                &["endpoint"],
            )?,
            generation_tokens: counter("generation_tokens_total", "Generated tokens.", &["endpoint"])?,
            cancelled: counter(
                "requests_cancelled_total",
                "Generations cancelled because the client went away.",
                &["endpoint"],
            )?,
            finished: counter(
                "requests_finished_total",
                "Generations finished, by finish reason.",
                &["endpoint", "finish_reason"],
            )?,
            router_requests: counter(
                "router_requests_total",
                "Routed requests by router action and serving tier.",
                &["action", "tier"],
            )?,
            router_cost_usd: reg(
                &registry,
                CounterVec::new(
                    Opts::new("router_cost_usd_total", "US dollars spent on remote tiers."),
                    &["tier"],
                )?,
            )?,
            router_fallbacks: counter(
                "router_fallbacks_total",
                "Requests that fell back from a failing or unavailable tier.",
                &["from", "to"],
            )?,
            router_retries: counter(
                "router_upstream_retries_total",
                "Upstream call retries, by the tier that finally served.",
                &["tier"],
            )?,
            router_cascade: counter(
                "router_cascade_total",
                "Requests whose local answer the cascade checked, by result.",
                &["result"],
            )?,
            running: gauge("num_requests_running", "Sequences the engine is running.")?,
            waiting: gauge("num_requests_waiting", "Requests waiting for the engine (queued or not yet seen).")?,
            kv_used: gauge("kv_cache_blocks_used", "KV cache blocks referenced by sequences.")?,
            kv_free: gauge("kv_cache_blocks_free", "KV cache blocks not referenced by any sequence.")?,
            kv_total: gauge("kv_cache_blocks_total", "KV cache blocks.")?,
            kv_usage: fgauge("kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0 to 1).")?,
            prefix_queries: gauge("prefix_cache_queries", "Full prompt blocks looked up in the prefix cache.")?,
            prefix_hits: gauge("prefix_cache_hits", "Prompt blocks found in the prefix cache.")?,
            prefix_hit_rate: fgauge(
                "prefix_cache_hit_rate",
                "Prefix cache hits over queries since start (0 when nothing was looked up).",
            )?,
            engine_steps: gauge("engine_steps", "Engine steps run since start.")?,
            engine_preemptions: gauge("engine_preemptions", "Sequences preempted since start.")?,
            engine_tokens_computed: gauge("engine_tokens_computed", "Tokens the model computed (prefill and decode).")?,
            engine_busy_seconds: fgauge("engine_busy_seconds", "Seconds spent in model forwards.")?,
            spec_draft_tokens: gauge(
                "spec_decode_draft_tokens",
                "Speculative draft tokens checked by the model since start.",
            )?,
            spec_accepted_tokens: gauge(
                "spec_decode_accepted_tokens",
                "Speculative draft tokens accepted since start.",
            )?,
            registry,
        })
    }

    /// Reads the engine's counters into the gauges and renders the registry as text.
    pub fn render(&self, engine: &EngineHandle) -> Result<String, String> {
        let m = engine.metrics();
        let ld = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed) as i64;
        let ld64 = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        self.running.set(ld(&m.running));
        self.waiting.set(ld(&m.waiting) + ld(&m.pending));
        let total = ld(&m.kv_blocks_total);
        let used = ld(&m.kv_blocks_used);
        self.kv_total.set(total);
        self.kv_used.set(used);
        self.kv_free.set((total - used).max(0));
        self.kv_usage.set(if total > 0 {
            used as f64 / total as f64
        } else {
            0.0
        });
        let (q, h) = (ld64(&m.prefix_queries), ld64(&m.prefix_hits));
        self.prefix_queries.set(q as i64);
        self.prefix_hits.set(h as i64);
        self.prefix_hit_rate
            .set(if q > 0 { h as f64 / q as f64 } else { 0.0 });
        self.engine_steps.set(ld64(&m.steps) as i64);
        self.engine_preemptions.set(ld64(&m.preemptions) as i64);
        self.engine_tokens_computed
            .set(ld64(&m.tokens_computed) as i64);
        self.engine_busy_seconds.set(ld64(&m.busy_ns) as f64 * 1e-9);
        self.spec_draft_tokens
            .set(ld64(&m.spec_draft_tokens) as i64);
        self.spec_accepted_tokens
            .set(ld64(&m.spec_accepted_tokens) as i64);
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .map_err(|e| e.to_string())?;
        String::from_utf8(buf).map_err(|e| e.to_string())
    }
}
