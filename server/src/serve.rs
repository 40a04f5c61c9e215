//! `switchyard serve`: loads the router policy and the model, starts the engine, and serves the
//! HTTP API (see [`crate::http`]) until SIGTERM or Ctrl-C. Shutdown is graceful: the listener
//! closes at once, in-flight requests get up to `--shutdown-timeout` seconds to finish, then the
//! process exits.
//!
//! The router comes up before the model so a bad policy fails in milliseconds, naming the file
//! and the field. Without `--router` the built-in default policy applies; either way one log
//! line says which remote tiers are enabled and, for disabled ones, which key variable is unset.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use switchyard_engine::generation_config::GenerationDefaults;
use switchyard_router::{JsonlAppender, Policy, RouterState};

use crate::http::{self, routing::Routing, AppState};
use crate::loading::{self, parse_bytes, EngineArgs, ModelArgs};
use crate::vllm_flags;

/// `serve` flags (DESIGN.md contract, plus vLLM's names where one exists).
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    app: AppArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 picks a free one; the address is printed on stdout).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Environment variable holding the API key `/v1/*` requires (`Authorization: Bearer` or
    /// `x-api-key`); without it (or --api-key) the API is open.
    #[arg(long)]
    api_key_env: Option<String>,
    /// The API key `/v1/*` requires (vLLM's flag). It shows in `ps`; --api-key-env keeps it in
    /// the environment instead.
    #[arg(long, conflicts_with = "api_key_env")]
    api_key: Option<String>,
    #[command(flatten)]
    cors: vllm_flags::CorsArgs,
    /// Seconds in-flight requests get to finish after SIGTERM or Ctrl-C.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
    /// Accepted for vLLM compatibility; no effect (there is no uvicorn: RUST_LOG sets the log
    /// levels, e.g. `RUST_LOG=warn`).
    #[arg(long, value_name = "LEVEL")]
    uvicorn_log_level: Option<String>,
}

#[cfg(test)]
impl ServeArgs {
    /// The port to listen on (for the CLI parsing tests).
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// The flags that shape the application itself (model, engine, router, request defaults):
/// shared by `serve` and `run-batch`, which builds the same app in-process.
#[derive(clap::Args, Debug)]
pub struct AppArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Model id in `/v1/models` and responses (default: the model folder's name, or the hub id).
    /// As in vLLM, several names may follow: requests may name any of them, responses and
    /// `/v1/models` use the first.
    #[arg(long, num_args = 1.., value_name = "NAME")]
    pub served_model_name: Vec<String>,
    /// Router policy TOML (tiers, rules, budgets; merged over the built-in default). Without
    /// it the built-in default policy routes (its `frontier` tier needs FRONTIER_API_KEY).
    #[arg(long)]
    pub router: Option<PathBuf>,
    /// Append one JSON line per /v1 inference request (decision, tier, tokens, cost, latency,
    /// outcome) to this file.
    #[arg(long)]
    pub telemetry: Option<PathBuf>,
    /// Add the semantic signals to routing: MiniLM sentence embeddings for the exemplar
    /// categories and the RouteLLM-trained difficulty score (`models/router/`). The MiniLM
    /// files come from $SWITCHYARD_MINILM_DIR, the scripts/minilm.sh cache, or the hf-hub cache.
    #[arg(long)]
    pub classifier: bool,
    /// Largest request body accepted (bytes; suffixes like 4MiB work); larger gets HTTP 413.
    #[arg(long, default_value = "4MiB")]
    pub max_body_bytes: String,
    /// Cap on `max_tokens` when an OpenAI request sets none (it defaults to the rest of the
    /// context, up to this).
    #[arg(long, default_value_t = 4096)]
    pub default_max_tokens: usize,
    /// Chat template to use instead of the model's: a Jinja file, or the template text
    /// (vLLM's flag). Tool calls are parsed in the format it writes.
    #[arg(long, value_name = "FILE|TEMPLATE")]
    pub chat_template: Option<String>,
    /// Sampling defaults for fields a request leaves unset (vLLM's flag): `auto` takes
    /// `temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty` and `max_new_tokens`
    /// (the default token limit) from the model's generation_config.json; `vllm` ignores the
    /// file (the API defaults: temperature 1, no truncation); a folder reads its
    /// generation_config.json instead.
    #[arg(long, value_name = "auto|vllm|DIR", default_value = "auto")]
    pub generation_config: String,
    /// How the model writes tool calls (vLLM's flag): `auto` (the default) reads it off the
    /// chat template; `hermes` (`<tool_call>{json}</tool_call>`) or `hy_v3` (Hy3's
    /// `<arg_key>`/`<arg_value>` form) force one, for a template the detection gets wrong.
    #[arg(long, value_name = "auto|hermes|hy_v3", default_value = "auto")]
    pub tool_call_parser: String,
    /// vLLM's reasoning parser name. Reasoning between `<think>` and `</think>` is always
    /// split off (`reasoning_content`, Anthropic `thinking`); the names of vLLM's parsers for
    /// that form are accepted, others refused.
    #[arg(long, value_name = "NAME")]
    pub reasoning_parser: Option<String>,
    /// Do not log one line per request (vLLM's flag; the metrics still count them).
    #[arg(long)]
    pub disable_log_requests: bool,
    /// End every OpenAI stream with a usage chunk, as `stream_options.include_usage` asks
    /// (vLLM's flag).
    #[arg(long)]
    pub enable_force_include_usage: bool,
    #[command(flatten)]
    pub ignored: vllm_flags::IgnoredArgs,
}

/// The sampling defaults `--generation-config` names without the model: `vllm` (none) or a
/// folder's (`None` for `auto`, which reads the model folder once it is resolved). Checked
/// before the model loads, so a bad flag fails at once.
fn explicit_generation_defaults(flag: &str) -> Result<Option<GenerationDefaults>> {
    match flag {
        "auto" => Ok(None),
        "vllm" => Ok(Some(GenerationDefaults::default())),
        other => {
            let p = std::path::Path::new(other);
            let file = p.join(switchyard_engine::tokenizer::GENERATION_CONFIG_FILE);
            if !p.is_dir() {
                anyhow::bail!(
                    "--generation-config {other:?}: use auto, vllm, or a folder holding a \
                     generation_config.json"
                );
            }
            if !file.is_file() {
                anyhow::bail!(
                    "--generation-config {other:?}: the folder has no generation_config.json"
                );
            }
            Ok(Some(GenerationDefaults::from_file(&file)?))
        }
    }
}

/// Logs the sampling defaults in force, as vLLM does.
fn log_generation_defaults(d: &GenerationDefaults) {
    if !d.is_empty() {
        tracing::info!(
            defaults = %d.summary(),
            "requests that leave these fields unset use the model's generation config \
             (--generation-config vllm turns this off)"
        );
    }
}

/// The model id to serve under: the flag, else the folder name of a local `--model`, else the
/// hub id as given.
fn served_name(args: &AppArgs) -> String {
    if let Some(n) = args.served_model_name.first() {
        return n.clone();
    }
    let p = std::path::Path::new(&args.model.model);
    if p.is_dir() {
        if let Some(name) = p
            .canonicalize()
            .ok()
            .and_then(|c| c.file_name().map(|n| n.to_string_lossy().into_owned()))
        {
            return name;
        }
    }
    args.model.model.clone()
}

/// The API key: `--api-key` as given, or read from the `--api-key-env` variable; an empty key
/// or an unset or empty variable is an error, so a typo never leaves the API open.
fn api_key(key: Option<&str>, var: Option<&str>) -> Result<Option<String>> {
    if let Some(k) = key {
        if k.trim().is_empty() {
            anyhow::bail!("--api-key is empty");
        }
        return Ok(Some(k.trim().to_string()));
    }
    let Some(var) = var else { return Ok(None) };
    match std::env::var(var) {
        Ok(k) if !k.trim().is_empty() => Ok(Some(k.trim().to_string())),
        _ => anyhow::bail!(
            "--api-key-env {var}: the environment variable {var} is not set or is empty"
        ),
    }
}

pub fn run(args: ServeArgs) -> Result<()> {
    let key = api_key(args.api_key.as_deref(), args.api_key_env.as_deref())?;
    let cors = args.cors.layer()?;
    if let Some(level) = &args.uvicorn_log_level {
        tracing::info!(
            flag = "--uvicorn-log-level",
            level = %level,
            "accepted for vLLM compatibility; no effect: there is no uvicorn (RUST_LOG sets levels)"
        );
    }
    let state = build_state(&args.app, key)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("switchyard-http")
        .build()
        .context("starting the async runtime")?;
    let r = rt.block_on(serve(
        state,
        cors,
        &args.host,
        args.port,
        Duration::from_secs(args.shutdown_timeout),
    ));
    // Requests still running after the timeout are abandoned, not awaited.
    rt.shutdown_background();
    r
}

/// Loads the router, the model and the engine, and builds the state every handler shares
/// (`api_key`: what `/v1/*` requires, if anything).
pub fn build_state(args: &AppArgs, api_key: Option<String>) -> Result<Arc<AppState>> {
    let max_body = usize::try_from(parse_bytes(&args.max_body_bytes).context("--max-body-bytes")?)
        .context("--max-body-bytes is too large")?;
    let tool_call_format = vllm_flags::tool_call_parser(&args.tool_call_parser)?;
    if let Some(p) = &args.reasoning_parser {
        vllm_flags::reasoning_parser(p)?;
    }
    args.ignored.log();
    let mut routing = router(args.router.as_deref(), args.telemetry.as_deref())?;
    if args.classifier {
        let t = std::time::Instant::now();
        let scorer = switchyard_classifier::RouterScorer::load_default()
            .context("--classifier: loading MiniLM and the router models (run scripts/minilm.sh to fetch MiniLM)")?;
        routing.scorer = Some(std::sync::Arc::new(scorer));
        tracing::info!(
            secs = t.elapsed().as_secs_f32(),
            "semantic router classifier loaded"
        );
    }
    let model_id = served_name(args);
    // Read before the model loads where possible (a local folder), so a bad file fails fast.
    let explicit = match explicit_generation_defaults(&args.generation_config)? {
        None if std::path::Path::new(&args.model.model).is_dir() => Some(
            GenerationDefaults::from_dir(std::path::Path::new(&args.model.model))?,
        ),
        d => d,
    };
    let (engine, dir) = loading::start_engine(&args.model, &args.engine)?;
    let tokenizer = engine.info().tokenizer.clone();
    let template = loading::chat_template(&tokenizer, &dir, args.chat_template.as_deref())?;
    let generation_defaults = match explicit {
        Some(d) => d,
        None => GenerationDefaults::from_dir(&dir)?,
    };
    log_generation_defaults(&generation_defaults);
    Ok(Arc::new(AppState {
        tokenizer,
        tools_template: template
            .tools_fallback()
            .context("compiling the tool-calling chat template")?,
        template,
        fingerprint: http::fingerprint(&model_id, &dir),
        model_id,
        other_names: args.served_model_name.iter().skip(1).cloned().collect(),
        model_dir: dir,
        api_key,
        metrics: http::metrics::Metrics::new().context("registering metrics")?,
        routing,
        created: http::unix_now(),
        max_body_bytes: max_body,
        default_max_tokens: args.default_max_tokens.max(1),
        generation_defaults,
        responses: Default::default(),
        tool_call_format,
        log_requests: !args.disable_log_requests,
        force_include_usage: args.enable_force_include_usage,
        engine,
    }))
}

/// Loads the policy (or the default), builds the upstream clients and opens the telemetry file;
/// logs which remote tiers are enabled.
fn router(
    policy: Option<&std::path::Path>,
    telemetry: Option<&std::path::Path>,
) -> Result<Routing> {
    let policy = match policy {
        Some(p) => Policy::from_path(p).with_context(|| format!("--router {}", p.display()))?,
        None => Policy::default_policy(),
    };
    let telemetry = telemetry
        .map(|p| JsonlAppender::open(p).with_context(|| format!("--telemetry {}", p.display())))
        .transpose()?;
    let routing = Routing::new(
        Arc::new(policy),
        Arc::new(RouterState::default()),
        telemetry,
    )
    .context("setting up the router's upstream clients")?;
    let tiers = routing.tier_summary();
    let c = routing.policy.cascade();
    let cascade = match (c.enabled, routing.policy.cascade_tier()) {
        (false, _) => "off (x-switchyard-cascade: on enables it per request)".to_string(),
        (true, Some(t)) => format!(
            "on: local answers failing their checks go to `{}`{}",
            t.name,
            if c.buffer_streams {
                ""
            } else {
                "; streams unchecked"
            }
        ),
        (true, None) => "on, but there is no remote tier".to_string(),
    };
    tracing::info!(
        target: "switchyard::router",
        policy = %routing.policy.origin(),
        remote_tiers = %if tiers.is_empty() { "none".to_string() } else { tiers.join("; ") },
        cascade = %cascade,
        "router ready"
    );
    Ok(routing)
}

async fn serve(
    state: Arc<AppState>,
    cors: Option<tower_http::cors::CorsLayer>,
    host: &str,
    port: u16,
    grace: Duration,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .with_context(|| format!("cannot listen on {host}:{port}"))?;
    let addr: SocketAddr = listener.local_addr().context("reading the bound address")?;
    tracing::info!(
        %addr,
        model = %state.model_id,
        auth = state.api_key.is_some(),
        max_model_len = state.engine.info().scheduler.max_model_len,
        "serving"
    );
    // The one line scripts and tests wait for.
    println!("switchyard listening on http://{addr}");
    use std::io::Write;
    let _ = std::io::stdout().flush();

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let app = match cors {
        // Outermost, so preflight requests are answered before the API key is checked.
        Some(c) => http::app(state).layer(c),
        None => http::app(state),
    };
    let mut server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });
    tokio::select! {
        r = &mut server => {
            return match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(anyhow::Error::new(e).context("the HTTP server failed")),
                Err(e) => Err(anyhow::anyhow!("the HTTP server task failed: {e}")),
            };
        }
        s = shutdown_signal() => {
            tracing::info!(signal = s, grace_secs = grace.as_secs(), "shutting down: no new connections; waiting for in-flight requests");
        }
    }
    let _ = stop_tx.send(());
    match tokio::time::timeout(grace, &mut server).await {
        Ok(Ok(Ok(()))) => tracing::info!("all requests finished; exiting"),
        Ok(Ok(Err(e))) => {
            return Err(anyhow::Error::new(e).context("the HTTP server failed while shutting down"))
        }
        Ok(Err(e)) => return Err(anyhow::anyhow!("the HTTP server task failed: {e}")),
        Err(_) => tracing::warn!(
            grace_secs = grace.as_secs(),
            "shutdown timeout reached; exiting with requests in flight"
        ),
    }
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT), naming which.
async fn shutdown_signal() -> &'static str {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => "SIGINT",
        _ = term => "SIGTERM",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn missing_key_variable_is_an_error() {
        assert!(super::api_key(None, Some("SWITCHYARD_TEST_SURELY_UNSET_VAR")).is_err());
        assert_eq!(super::api_key(None, None).unwrap(), None);
        assert_eq!(
            super::api_key(Some(" k "), None).unwrap().as_deref(),
            Some("k")
        );
        assert!(super::api_key(Some(" "), None)
            .unwrap_err()
            .to_string()
            .contains("--api-key"));
    }
}
