//! `switchyard run-batch`: vLLM's offline batch runner (`vllm run-batch -i in.jsonl -o
//! out.jsonl --model ...`) over the OpenAI Batch API file format.
//!
//! Each input line is one request, `{"custom_id", "method": "POST", "url", "body"}`, and each
//! gets one output line, in input order, in OpenAI's batch output format:
//! `{"id": "batch_req_…", "custom_id", "response": {"status_code", "request_id", "body"},
//! "error": null}`. The body is what `switchyard serve` answers: the lines go through the
//! server's own axum app, built in-process ([`crate::serve::build_state`]) and called with
//! `tower::ServiceExt::oneshot` without binding a port, so validation, routing and response
//! shapes are the server's. A request the server refuses keeps its 4xx status and the OpenAI
//! error body in `response`, as OpenAI's batch output does. A line that is not a request at
//! all (not JSON, no `custom_id`, a `method` other than POST, a `url` that is not served) gets
//! `"response": null, "error": {"code", "message"}`. One bad line never stops the batch.
//! Blank lines are skipped, as vLLM does.
//!
//! Concurrency: at most `--max-concurrency` requests are in flight (default twice
//! `--max-num-seqs`, vLLM's choice), so the engine batches them continuously. Results that
//! finish early wait in a reorder buffer until the lines before them are written; the reader
//! stays at most [`REORDER_WINDOW_PER_SLOT`] × the concurrency lines ahead of the writer, which
//! bounds memory when one early request is slow.

use std::collections::{BTreeMap, HashSet};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::Body;
use axum::http::{header, Method, Request};
use axum::Router;
use futures_util::stream::{FuturesUnordered, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tower::ServiceExt;

use crate::http::{self, error::ApiError, AppState};
use crate::serve::{self, AppArgs};

/// `run-batch` flags: the input and output files, the concurrency, and serve's model, engine
/// and router flags.
#[derive(clap::Args, Debug)]
pub struct RunBatchArgs {
    /// Input JSONL in the OpenAI Batch API format (one request per line); `-` reads stdin.
    #[arg(short = 'i', long = "input-file", value_name = "PATH")]
    input_file: String,
    /// Output JSONL, one line per input line in input order; `-` writes stdout.
    #[arg(short = 'o', long = "output-file", value_name = "PATH")]
    output_file: String,
    /// Most requests in flight at once (default: twice --max-num-seqs, as vLLM; capped at
    /// --max-num-seqs + --max-waiting, what the engine admits without refusing).
    #[arg(long, value_name = "N")]
    max_concurrency: Option<usize>,
    /// Log a progress line every this many lines written (a progress bar instead when
    /// stderr is a terminal).
    #[arg(long, default_value_t = 100, value_name = "N")]
    progress_every: usize,
    #[command(flatten)]
    app: AppArgs,
}

/// The endpoints a batch line may name.
const SERVED_URLS: &[&str] = &["/v1/chat/completions", "/v1/completions", "/v1/responses"];

/// How far (in multiples of the concurrency) the reader may run ahead of the first line not
/// yet written: enough that one slow request does not stall the rest for long, small enough
/// that finished results waiting for it stay a bounded amount of memory.
const REORDER_WINDOW_PER_SLOT: usize = 16;

/// Counts for the progress log and the summary.
#[derive(Default)]
struct Tally {
    lines: usize,
    ok: usize,
    failed: usize,
    prompt_tokens: u64,
    completion_tokens: u64,
}

impl Tally {
    fn count(&mut self, out: &Value) {
        self.lines += 1;
        let resp = &out["response"];
        if resp["status_code"].as_u64() == Some(200) {
            self.ok += 1;
            let usage = &resp["body"]["usage"];
            let field = |a: &str, b: &str| usage[a].as_u64().or_else(|| usage[b].as_u64());
            self.prompt_tokens += field("prompt_tokens", "input_tokens").unwrap_or(0);
            self.completion_tokens += field("completion_tokens", "output_tokens").unwrap_or(0);
        } else {
            self.failed += 1;
        }
    }
}

/// What one input line turned into before any request ran.
enum Prepared {
    /// The output line is known already (the line is not a request, or is refused here).
    Done(Value),
    /// A request for the app.
    Call {
        custom_id: String,
        url: &'static str,
        body: Value,
    },
}

/// An output line carrying a response (`status`, `body`).
fn response_line(custom_id: Option<&str>, status: u16, body: Value) -> Value {
    json!({
        "id": http::new_id("batch_req_"),
        "custom_id": custom_id,
        "response": {
            "status_code": status,
            "request_id": http::new_id("req_"),
            "body": body,
        },
        "error": null,
    })
}

/// An output line for a line that is not a request: `response` null, `error` `{code, message}`.
fn error_line(custom_id: Option<&str>, code: &str, message: String) -> Value {
    json!({
        "id": http::new_id("batch_req_"),
        "custom_id": custom_id,
        "response": null,
        "error": {"code": code, "message": message},
    })
}

/// Checks one input line (`line_no` counts from 1) and extracts its request. `model_alias` is
/// the `--model` argument as given: vLLM serves under it, so a body naming it is pointed at
/// `served`.
fn prepare(line_no: usize, raw: &[u8], model_alias: &str, served: &str) -> Prepared {
    let text = match std::str::from_utf8(raw) {
        Ok(t) => t,
        Err(e) => {
            return Prepared::Done(error_line(
                None,
                "invalid_json_line",
                format!("line {line_no} is not valid UTF-8 ({e})"),
            ))
        }
    };
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            return Prepared::Done(error_line(
                None,
                "invalid_json_line",
                format!(
                    "line {line_no} is not valid JSON ({e}); each line must be one JSON object"
                ),
            ))
        }
    };
    let Some(obj) = v.as_object() else {
        return Prepared::Done(error_line(
            None,
            "invalid_json_line",
            format!("line {line_no} is not a JSON object; each line must be {{\"custom_id\", \"method\", \"url\", \"body\"}}"),
        ));
    };
    let custom_id = match obj.get("custom_id") {
        Some(Value::String(s)) => s.as_str(),
        Some(other) => {
            return Prepared::Done(error_line(
                None,
                "invalid_value",
                format!("line {line_no}: custom_id must be a string, not {other}"),
            ))
        }
        None => {
            return Prepared::Done(error_line(
                None,
                "missing_required_parameter",
                format!(
                "line {line_no} has no custom_id (a string that names the request in the output)"
            ),
            ))
        }
    };
    let id = Some(custom_id);
    match obj.get("method") {
        Some(Value::String(m)) if m.eq_ignore_ascii_case("POST") => {}
        Some(m) => {
            return Prepared::Done(error_line(
                id,
                "invalid_method",
                format!("line {line_no}: method {m} is not supported; batch requests use \"POST\""),
            ))
        }
        None => {
            return Prepared::Done(error_line(
                id,
                "missing_required_parameter",
                format!("line {line_no} has no method (use \"POST\")"),
            ))
        }
    }
    let url = match obj.get("url") {
        Some(Value::String(u)) => match SERVED_URLS.iter().find(|s| **s == u.as_str()) {
            Some(s) => *s,
            None => {
                let why = if u == "/v1/embeddings" {
                    "embeddings are not served by switchyard (it serves generative models only)"
                } else {
                    "that endpoint is not served in a batch"
                };
                return Prepared::Done(error_line(
                    id,
                    "invalid_url",
                    format!(
                        "line {line_no}: url {u:?}: {why}; supported: {}",
                        SERVED_URLS.join(", ")
                    ),
                ));
            }
        },
        Some(u) => {
            return Prepared::Done(error_line(
                id,
                "invalid_url",
                format!("line {line_no}: url must be a string, not {u}"),
            ))
        }
        None => {
            return Prepared::Done(error_line(
                id,
                "missing_required_parameter",
                format!(
                    "line {line_no} has no url (one of {})",
                    SERVED_URLS.join(", ")
                ),
            ))
        }
    };
    let Some(body) = obj.get("body") else {
        return Prepared::Done(error_line(
            id,
            "missing_required_parameter",
            format!("line {line_no} has no body (the request the endpoint takes)"),
        ));
    };
    if body.get("stream") == Some(&Value::Bool(true)) {
        let e = ApiError::Unsupported {
            param: "stream".into(),
            message: "a batch returns each response whole; remove stream or set it to false".into(),
        };
        return Prepared::Done(response_line(id, e.status().as_u16(), e.openai_body()));
    }
    let mut body = body.clone();
    if model_alias != served && body.get("model").and_then(Value::as_str) == Some(model_alias) {
        body["model"] = Value::String(served.to_string());
    }
    Prepared::Call {
        custom_id: custom_id.to_string(),
        url,
        body,
    }
}

/// Runs one request through the app: its output line.
async fn call(app: Router, custom_id: String, url: &'static str, body: Value) -> Value {
    let bytes = match serde_json::to_vec(&body) {
        Ok(b) => b,
        Err(e) => {
            let e = ApiError::Internal(format!("re-encoding the body: {e}"));
            return response_line(Some(&custom_id), e.status().as_u16(), e.openai_body());
        }
    };
    let req = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(bytes));
    let resp = match req {
        Ok(req) => match app.oneshot(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        },
        Err(e) => {
            let e = ApiError::Internal(format!("building the request: {e}"));
            return response_line(Some(&custom_id), e.status().as_u16(), e.openai_body());
        }
    };
    let status = resp.status();
    let body = match axum::body::to_bytes(resp.into_body(), usize::MAX).await {
        Ok(b) => serde_json::from_slice(&b)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&b).into_owned())),
        Err(e) => {
            let e = ApiError::Internal(format!("reading the response: {e}"));
            return response_line(Some(&custom_id), e.status().as_u16(), e.openai_body());
        }
    };
    response_line(Some(&custom_id), status.as_u16(), body)
}

/// The most requests in flight: the flag or twice `--max-num-seqs`, capped at what the engine
/// admits without a queue-full refusal.
fn concurrency(flag: Option<usize>, max_num_seqs: usize, max_waiting: usize) -> usize {
    let cap = (max_num_seqs + max_waiting).max(1);
    let want = flag.unwrap_or(2 * max_num_seqs).max(1);
    if want > cap {
        tracing::warn!(
            requested = want,
            cap,
            "--max-concurrency is above --max-num-seqs + --max-waiting; using {cap}"
        );
    }
    want.min(cap)
}

/// Opens the input: a file, or stdin for `-`.
async fn open_input(path: &str) -> Result<Box<dyn AsyncBufRead + Unpin + Send>> {
    if path == "-" {
        return Ok(Box::new(tokio::io::BufReader::new(tokio::io::stdin())));
    }
    let f = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("--input-file {path}: cannot open"))?;
    Ok(Box::new(tokio::io::BufReader::new(f)))
}

/// Opens the output: a file (created or truncated), or stdout for `-`. Refuses the input file
/// itself, which truncating would destroy.
fn open_output(path: &str, input: &str) -> Result<Box<dyn Write + Send>> {
    if path == "-" {
        return Ok(Box::new(std::io::BufWriter::new(std::io::stdout())));
    }
    if input != "-" {
        if let (Ok(a), Ok(b)) = (
            Path::new(path).canonicalize(),
            Path::new(input).canonicalize(),
        ) {
            if a == b {
                anyhow::bail!("--output-file {path} is the input file; write somewhere else");
            }
        }
    }
    let f = std::fs::File::create(path)
        .with_context(|| format!("--output-file {path}: cannot create"))?;
    Ok(Box::new(std::io::BufWriter::new(f)))
}

pub fn run(args: RunBatchArgs) -> Result<()> {
    if args.input_file != "-" && !Path::new(&args.input_file).is_file() {
        anyhow::bail!("--input-file {}: no such file", args.input_file);
    }
    let output = open_output(&args.output_file, &args.input_file)?;
    let limit = concurrency(
        args.max_concurrency,
        args.app.engine.max_num_seqs,
        args.app.engine.max_waiting,
    );
    let state = serve::build_state(&args.app, None)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("switchyard-batch")
        .build()
        .context("starting the async runtime")?;
    let r = rt.block_on(run_lines(&args, state, output, limit));
    rt.shutdown_background();
    r
}

/// Reads, runs and writes every line; prints the summary.
async fn run_lines(
    args: &RunBatchArgs,
    state: Arc<AppState>,
    mut output: Box<dyn Write + Send>,
    limit: usize,
) -> Result<()> {
    let t0 = Instant::now();
    let metrics = state.engine.metrics();
    let (steps0, generated0) = engine_counts(&state);
    let served = state.model_id.clone();
    let app = http::app(state.clone());
    let mut input = open_input(&args.input_file).await?;
    tracing::info!(
        input = %args.input_file,
        output = %args.output_file,
        max_concurrency = limit,
        "running batch"
    );
    // A bar on a terminal, unless the per-request log lines would scroll through it
    // (`RUST_LOG=info,switchyard::http=warn` quiets them).
    let request_log = tracing::enabled!(target: "switchyard::http", tracing::Level::INFO);
    let bar = (std::io::stderr().is_terminal() && !request_log).then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {pos} lines written, {msg} ({elapsed})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        b
    });
    let window = limit.saturating_mul(REORDER_WINDOW_PER_SLOT);
    let every = args.progress_every.max(1);
    let mut in_flight = FuturesUnordered::new();
    let mut done: BTreeMap<usize, Value> = BTreeMap::new();
    let (mut next_index, mut next_write, mut line_no) = (0usize, 0usize, 0usize);
    let mut eof = false;
    let mut tally = Tally::default();
    let mut buf = Vec::new();
    // OpenAI requires unique custom_ids; a repeat is answered too, with a warning.
    let mut seen = HashSet::new();
    let mut repeats = 0usize;
    loop {
        // Start requests while there is room in flight and in the reorder window.
        while !eof && in_flight.len() < limit && next_index - next_write < window {
            buf.clear();
            let n = input
                .read_until(b'\n', &mut buf)
                .await
                .with_context(|| format!("reading {}", args.input_file))?;
            if n == 0 {
                eof = true;
                break;
            }
            line_no += 1;
            let raw = buf.trim_ascii();
            if raw.is_empty() {
                continue;
            }
            let index = next_index;
            next_index += 1;
            match prepare(line_no, raw, &args.app.model.model, &served) {
                Prepared::Done(v) => {
                    done.insert(index, v);
                }
                Prepared::Call {
                    custom_id,
                    url,
                    body,
                } => {
                    if !seen.insert(custom_id.clone()) {
                        repeats += 1;
                        if repeats == 1 {
                            tracing::warn!(
                                line = line_no,
                                custom_id = %custom_id,
                                "custom_id repeats an earlier line's (OpenAI requires unique ids); answered anyway, match outputs by position"
                            );
                        }
                    }
                    let task = tokio::spawn(call(app.clone(), custom_id.clone(), url, body));
                    in_flight.push(async move {
                        let v = task.await.unwrap_or_else(|e| {
                            let e = ApiError::Internal(format!("the request failed: {e}"));
                            response_line(Some(&custom_id), e.status().as_u16(), e.openai_body())
                        });
                        (index, v)
                    });
                }
            }
        }
        // Write every line whose predecessors are all written.
        let before = next_write;
        while let Some(v) = done.remove(&next_write) {
            tally.count(&v);
            serde_json::to_writer(&mut output, &v).context("writing the output")?;
            output.write_all(b"\n").context("writing the output")?;
            next_write += 1;
            if next_write % every == 0 {
                progress(bar.as_ref(), &tally, t0, metrics, None);
            }
        }
        if next_write > before {
            output.flush().context("writing the output")?;
            if let Some(b) = &bar {
                b.set_position(next_write as u64);
            }
        }
        match in_flight.next().await {
            Some((index, v)) => {
                done.insert(index, v);
            }
            None if eof && done.is_empty() => break,
            None => {}
        }
    }
    output.flush().context("writing the output")?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if repeats > 0 {
        tracing::warn!("{repeats} line(s) repeated an earlier line's custom_id");
    }
    let (steps1, generated1) = engine_counts(&state);
    let per_step = (generated1 - generated0) as f64 / (steps1 - steps0).max(1) as f64;
    progress(None, &tally, t0, metrics, Some(per_step));
    Ok(())
}

/// Engine steps and generated tokens so far.
fn engine_counts(state: &AppState) -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let m = state.engine.metrics();
    (m.steps.load(Relaxed), m.tokens_generated.load(Relaxed))
}

/// A progress line (bar message or log line), or with `per_step` the final summary on stderr.
fn progress(
    bar: Option<&indicatif::ProgressBar>,
    t: &Tally,
    t0: Instant,
    m: &switchyard_engine::engine::EngineMetrics,
    per_step: Option<f64>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let secs = t0.elapsed().as_secs_f64();
    let tps = t.completion_tokens as f64 / secs.max(1e-9);
    if let Some(per_step) = per_step {
        eprintln!(
            "run-batch: {} lines, {} ok, {} failed in {secs:.1} s; {} prompt + {} completion tokens, {tps:.1} completion tokens/s, {per_step:.2} tokens per engine step",
            t.lines, t.ok, t.failed, t.prompt_tokens, t.completion_tokens
        );
        return;
    }
    let msg = format!(
        "{} ok, {} failed, {tps:.1} tokens/s, {} running",
        t.ok,
        t.failed,
        m.running.load(Relaxed)
    );
    match bar {
        Some(b) => b.set_message(msg),
        None => tracing::info!(lines = t.lines, "{msg}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(p: Prepared) -> Value {
        match p {
            Prepared::Done(v) => v,
            Prepared::Call { .. } => panic!("expected an output line"),
        }
    }

    #[test]
    fn bad_lines_name_the_problem() {
        let e = done(prepare(3, b"{not json", "m", "m"));
        assert_eq!(e["error"]["code"], "invalid_json_line");
        assert!(e["error"]["message"].as_str().unwrap().contains("line 3"));
        assert!(e["response"].is_null() && e["custom_id"].is_null());
        let e = done(prepare(
            1,
            br#"{"method":"POST","url":"/v1/completions","body":{}}"#,
            "m",
            "m",
        ));
        assert_eq!(e["error"]["code"], "missing_required_parameter");
        let e = done(prepare(
            1,
            br#"{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{}}"#,
            "m",
            "m",
        ));
        assert_eq!(e["error"]["code"], "invalid_url");
        assert_eq!(e["custom_id"], "a");
        let e = done(prepare(
            1,
            br#"{"custom_id":"a","method":"GET","url":"/v1/completions","body":{}}"#,
            "m",
            "m",
        ));
        assert_eq!(e["error"]["code"], "invalid_method");
        let e = done(prepare(
            1,
            br#"{"custom_id":"a","method":"POST","url":"/v1/completions","body":{"stream":true}}"#,
            "m",
            "m",
        ));
        assert_eq!(e["response"]["status_code"], 400);
        assert_eq!(e["response"]["body"]["error"]["param"], "stream");
        assert!(e["error"].is_null());
        assert!(e["id"].as_str().unwrap().starts_with("batch_req_"));
    }

    #[test]
    fn model_argument_names_the_served_model() {
        let p = prepare(
            1,
            br#"{"custom_id":"a","method":"POST","url":"/v1/completions","body":{"model":"/x/tiny","prompt":"hi"}}"#,
            "/x/tiny",
            "tiny",
        );
        match p {
            Prepared::Call { body, url, .. } => {
                assert_eq!(body["model"], "tiny");
                assert_eq!(url, "/v1/completions");
            }
            Prepared::Done(v) => panic!("{v}"),
        }
    }

    #[test]
    fn concurrency_is_capped_by_what_the_engine_admits() {
        assert_eq!(concurrency(None, 64, 256), 128);
        assert_eq!(concurrency(Some(3), 64, 256), 3);
        assert_eq!(concurrency(Some(1000), 4, 8), 12);
        assert_eq!(concurrency(Some(0), 4, 8), 1);
    }
}
