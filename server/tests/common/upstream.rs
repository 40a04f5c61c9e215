//! Fake upstream tiers for routing tests: an OpenAI-compatible and an Anthropic server (axum,
//! in the test process) that record what they are sent and answer a fixed text with fixed
//! usage, or fail on demand; a policy file with both as tiers; and a `switchyard serve` routing
//! over them with telemetry on.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post as axum_post;
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::{Opts, Server};

/// The key the fake frontier tier is given; it must never appear in logs or telemetry.
pub const FRONTIER_KEY: &str = "sk-test-frontier-9f8e7d";
pub const CLAUDE_KEY: &str = "sk-test-claude-1a2b3c";

/// The fake OpenAI tier's JSON usage: 1000 prompt tokens (400 cached), 100 completion tokens.
/// At $5 / $0.5 / $15 per Mtok: (600×5 + 400×0.5 + 100×15) / 1e6.
pub const FRONTIER_JSON_COST: f64 = 0.0047;

/// What the fake upstream answers next.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Ok,
    Fail500,
    /// Send the first two events of a stream, then reset the connection.
    ResetMidStream,
}

/// A fake upstream that records what it was sent.
pub struct Fake {
    anthropic: bool,
    mode: Mutex<Mode>,
    hits: Mutex<Vec<(HeaderMap, Value)>>,
    script: Mutex<VecDeque<Mode>>,
}

impl Fake {
    /// An upstream speaking OpenAI chat completions, or Anthropic messages.
    pub fn new(anthropic: bool) -> Arc<Self> {
        Arc::new(Self {
            anthropic,
            mode: Mutex::new(Mode::Ok),
            hits: Mutex::new(Vec::new()),
            script: Mutex::new(VecDeque::new()),
        })
    }

    /// What every later request gets (after any [`queue`](Self::queue)d modes).
    pub fn set_mode(&self, m: Mode) {
        *self.mode.lock().unwrap() = m;
    }

    /// The requests received so far: headers and JSON body.
    pub fn hits(&self) -> Vec<(HeaderMap, Value)> {
        self.hits.lock().unwrap().clone()
    }

    /// The next request gets `m`, then the set mode again.
    pub fn queue(&self, m: Mode) {
        self.script.lock().unwrap().push_back(m);
    }
}

pub fn openai_json() -> Value {
    json!({"id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": "gpt-test",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": "Remote answer."}, "finish_reason": "stop"}],
           "usage": {"prompt_tokens": 1000, "completion_tokens": 100, "prompt_tokens_details": {"cached_tokens": 400}}})
}

pub fn anthropic_json() -> Value {
    json!({"id": "msg_fake", "type": "message", "role": "assistant", "model": "claude-test",
           "content": [{"type": "text", "text": "Remote answer."}], "stop_reason": "end_turn", "stop_sequence": null,
           "usage": {"input_tokens": 600, "output_tokens": 100, "cache_read_input_tokens": 400}})
}

pub fn openai_sse(include_usage: bool) -> Vec<String> {
    let mut v = vec![
        json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-test",
               "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}),
        json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-test",
               "choices": [{"index": 0, "delta": {"content": "Remote "}, "finish_reason": null}]}),
        json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-test",
               "choices": [{"index": 0, "delta": {"content": "answer."}, "finish_reason": "stop"}]}),
    ]
    .into_iter()
    .map(|c| c.to_string())
    .collect::<Vec<_>>();
    if include_usage {
        v.push(
            json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-test",
                   "choices": [], "usage": {"prompt_tokens": 1000, "completion_tokens": 100}})
            .to_string(),
        );
    }
    v.push("[DONE]".into());
    v.into_iter().map(|d| format!("data: {d}\n\n")).collect()
}

pub fn anthropic_sse() -> Vec<String> {
    [
        ("message_start", json!({"type": "message_start", "message": {"id": "msg_fake", "type": "message", "role": "assistant", "model": "claude-test", "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 600, "output_tokens": 1}}})),
        ("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})),
        ("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Remote "}})),
        ("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "answer."}})),
        ("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
        ("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 100}})),
        ("message_stop", json!({"type": "message_stop"})),
    ]
    .iter()
    .map(|(e, d)| format!("event: {e}\ndata: {d}\n\n"))
    .collect()
}

pub async fn fake_handler(fake: Arc<Fake>, headers: HeaderMap, body: Bytes) -> Response {
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    fake.hits.lock().unwrap().push((headers, req.clone()));
    let mode = fake
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or_else(|| *fake.mode.lock().unwrap());
    if mode == Mode::Fail500 {
        return Response::builder()
            .status(500)
            .header("content-type", "application/json")
            .body(Body::from(
                json!({"error": {"message": "injected failure"}}).to_string(),
            ))
            .unwrap();
    }
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        let mut events = if fake.anthropic {
            anthropic_sse()
        } else {
            let usage = req.pointer("/stream_options/include_usage") == Some(&json!(true));
            openai_sse(usage)
        };
        let reset = mode == Mode::ResetMidStream;
        if reset {
            events.truncate(2);
        }
        let items = futures_util::stream::iter(
            events
                .into_iter()
                .map(|e| Ok::<Bytes, std::io::Error>(Bytes::from(e))),
        );
        // The reset comes a moment later, once the head and first events are on the wire.
        let tail = futures_util::stream::iter(reset.then_some(())).then(|()| async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Err::<Bytes, _>(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "injected reset",
            ))
        });
        let s = items.chain(tail);
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(s))
            .unwrap();
    }
    let v = if fake.anthropic {
        anthropic_json()
    } else {
        openai_json()
    };
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from(v.to_string()))
        .unwrap()
}

/// Serves `fake` on a free port; returns its `/v1` base URL.
pub async fn serve_fake(fake: Arc<Fake>) -> String {
    let path = if fake.anthropic {
        "/v1/messages"
    } else {
        "/v1/chat/completions"
    };
    let f = fake.clone();
    let app = axum::Router::new().route(
        path,
        axum_post(move |h: HeaderMap, b: Bytes| fake_handler(f.clone(), h, b)),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/v1")
}

/// A policy with the local tier, `frontier` (OpenAI kind) and `claude` (Anthropic kind).
pub fn policy_file(dir: &Path, frontier_url: &str, claude_url: &str, extra: &str) -> PathBuf {
    let toml = format!(
        r#"
[[tiers]]
name = "local"
kind = "local"

[[tiers]]
name = "frontier"
kind = "openai"
base_url = "{frontier_url}"
api_key_env = "SY_TEST_FRONTIER_KEY"
model = "gpt-test"
input_usd_per_mtok = 5.0
output_usd_per_mtok = 15.0
cached_input_usd_per_mtok = 0.5
max_retries = 1
connect_timeout_ms = 2000
first_token_timeout_ms = 5000
request_timeout_ms = 20000

[[tiers]]
name = "claude"
kind = "anthropic"
base_url = "{claude_url}"
api_key_env = "SY_TEST_CLAUDE_KEY"
model = "claude-test"
input_usd_per_mtok = 3.0
output_usd_per_mtok = 15.0
cached_input_usd_per_mtok = 0.3
max_retries = 0
{extra}
"#
    );
    let p = dir.join("policy.toml");
    std::fs::write(&p, toml).unwrap();
    p
}

pub struct Setup {
    /// The server.
    pub server: Server,
    /// The OpenAI-kind upstream behind tier `frontier`.
    pub frontier: Arc<Fake>,
    /// The Anthropic-kind upstream behind tier `claude`.
    pub claude: Arc<Fake>,
    /// The server's telemetry file.
    pub telemetry: PathBuf,
    /// The policy file it routes with.
    pub policy: PathBuf,
    _dir: tempfile::TempDir,
}

/// A server routing with the test policy over two fake upstreams, keys set, telemetry on.
pub async fn setup(extra_policy: &str) -> Setup {
    setup_model(super::model_dir(), extra_policy).await
}

/// [`setup`] serving the model in `model`.
pub async fn setup_model(model: &Path, extra_policy: &str) -> Setup {
    let frontier = Fake::new(false);
    let claude = Fake::new(true);
    let (fu, cu) = (
        serve_fake(frontier.clone()).await,
        serve_fake(claude.clone()).await,
    );
    let dir = tempfile::tempdir().unwrap();
    let policy = policy_file(dir.path(), &fu, &cu, extra_policy);
    let telemetry = dir.path().join("telemetry.jsonl");
    let (p, t) = (
        policy.to_string_lossy().into_owned(),
        telemetry.to_string_lossy().into_owned(),
    );
    let server = Server::start_model(
        model,
        Opts {
            args: &["--router", &p, "--telemetry", &t],
            env: &[
                ("SY_TEST_FRONTIER_KEY", FRONTIER_KEY),
                ("SY_TEST_CLAUDE_KEY", CLAUDE_KEY),
            ],
        },
    );
    Setup {
        server,
        frontier,
        claude,
        telemetry,
        policy,
        _dir: dir,
    }
}
