//! Upstream clients against fake OpenAI / Anthropic servers on 127.0.0.1 with fault injection:
//! 500, 429 with Retry-After, hangs past the timeout, a connection reset mid-stream, malformed
//! JSON, a wrong content type, and a 400 that must not fall back.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use futures_util::StreamExt;
use serde_json::{json, Value};
use switchyard_router::upstream::{
    Dispatch, RetryPolicy, UpstreamBody, UpstreamError, UpstreamRequest, Upstreams,
};
use switchyard_router::{
    Action, BreakerPhase, Decision, EnvSource, Period, Policy, RouterState, SystemClock, WireFormat,
};

#[derive(Clone, Debug)]
enum Fault {
    Ok,
    Status(u16),
    RetryAfter(u64),
    Hang(u64),
    Malformed,
    WrongContentType,
    ResetMidStream,
}

#[derive(Default)]
struct Fake {
    script: Mutex<VecDeque<Fault>>,
    hits: Mutex<Vec<(HeaderMap, Value)>>,
}

fn openai_json() -> Value {
    json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-test",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."}, "finish_reason": "stop"}],
           "usage": {"prompt_tokens": 1000, "completion_tokens": 100, "prompt_tokens_details": {"cached_tokens": 400}}})
}

fn anthropic_json() -> Value {
    json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test",
           "content": [{"type": "text", "text": "Paris."}], "stop_reason": "end_turn",
           "usage": {"input_tokens": 600, "output_tokens": 100, "cache_read_input_tokens": 400}})
}

fn openai_sse(with_usage: bool) -> Vec<String> {
    let mut v = vec![
        json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            .to_string(),
        json!({"choices": [{"index": 0, "delta": {"content": "Par"}}]}).to_string(),
        json!({"choices": [{"index": 0, "delta": {"content": "is."}, "finish_reason": "stop"}]})
            .to_string(),
    ];
    if with_usage {
        v.push(
            json!({"choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": 2}})
                .to_string(),
        );
    }
    v.push("[DONE]".into());
    v.into_iter().map(|d| format!("data: {d}\n\n")).collect()
}

fn anthropic_sse() -> Vec<String> {
    [
        ("message_start", json!({"type": "message_start", "message": {"id": "msg_1", "model": "claude-test", "usage": {"input_tokens": 40, "output_tokens": 1}}})),
        ("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})),
        ("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Paris."}})),
        ("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
        ("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}})),
        ("message_stop", json!({"type": "message_stop"})),
    ]
    .iter()
    .map(|(e, d)| format!("event: {e}\ndata: {d}\n\n"))
    .collect()
}

async fn handle(fake: Arc<Fake>, anthropic: bool, headers: HeaderMap, body: Bytes) -> Response {
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    fake.hits.lock().unwrap().push((headers, req.clone()));
    let fault = fake.script.lock().unwrap().pop_front().unwrap_or(Fault::Ok);
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let json_resp = |status: u16, v: Value| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(v.to_string()))
            .unwrap()
    };
    match fault {
        Fault::Status(s) => json_resp(s, json!({"error": {"message": format!("injected {s}")}})),
        Fault::RetryAfter(secs) => Response::builder()
            .status(429)
            .header("content-type", "application/json")
            .header("retry-after", secs.to_string())
            .body(Body::from(
                json!({"error": {"message": "slow down"}}).to_string(),
            ))
            .unwrap(),
        Fault::Hang(ms) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            json_resp(
                200,
                if anthropic {
                    anthropic_json()
                } else {
                    openai_json()
                },
            )
        }
        Fault::Malformed => Response::builder()
            .header("content-type", "application/json")
            .body(Body::from("{\"choices\": [tru"))
            .unwrap(),
        Fault::WrongContentType => Response::builder()
            .header("content-type", "text/html")
            .body(Body::from("<html>gateway says hi</html>"))
            .unwrap(),
        Fault::ResetMidStream => {
            let events = if anthropic {
                anthropic_sse()
            } else {
                openai_sse(true)
            };
            let first: Vec<String> = events.into_iter().take(2).collect();
            let s = futures_util::stream::unfold(0usize, move |i| {
                let first = first.clone();
                async move {
                    if i < first.len() {
                        Some((
                            Ok::<Bytes, std::io::Error>(Bytes::from(first[i].clone())),
                            i + 1,
                        ))
                    } else if i == first.len() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Some((
                            Err(std::io::Error::new(
                                std::io::ErrorKind::ConnectionReset,
                                "injected reset",
                            )),
                            i + 1,
                        ))
                    } else {
                        None
                    }
                }
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(s))
                .unwrap()
        }
        Fault::Ok if stream => {
            let events = if anthropic {
                anthropic_sse()
            } else {
                openai_sse(true)
            };
            let s = futures_util::stream::iter(
                events
                    .into_iter()
                    .map(|e| Ok::<Bytes, std::io::Error>(Bytes::from(e))),
            );
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(s))
                .unwrap()
        }
        Fault::Ok => json_resp(
            200,
            if anthropic {
                anthropic_json()
            } else {
                openai_json()
            },
        ),
    }
}

async fn serve(fake: Arc<Fake>) -> String {
    let f1 = fake.clone();
    let f2 = fake.clone();
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(move |h: HeaderMap, b: Bytes| handle(f1.clone(), false, h, b)),
        )
        .route(
            "/v1/messages",
            post(move |h: HeaderMap, b: Bytes| handle(f2.clone(), true, h, b)),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/v1")
}

struct Setup {
    upstreams: Upstreams,
    state: Arc<RouterState>,
    a: Arc<Fake>,
    b: Arc<Fake>,
}

/// Tier `a` (kind `a_kind`) and tier `b` (openai), both on fake servers; `c` has no key set.
async fn setup(a_kind: &str, a_max_retries: u32, a_first_token_ms: u64) -> Setup {
    let (a, b) = (Arc::new(Fake::default()), Arc::new(Fake::default()));
    let (url_a, url_b) = (serve(a.clone()).await, serve(b.clone()).await);
    let toml = format!(
        r#"
[[tiers]]
name = "local"
kind = "local"

[[tiers]]
name = "a"
kind = "{a_kind}"
base_url = "{url_a}"
api_key_env = "A_KEY"
model = "model-a"
input_usd_per_mtok = 5.0
output_usd_per_mtok = 15.0
cached_input_usd_per_mtok = 0.5
max_retries = {a_max_retries}
first_token_timeout_ms = {a_first_token_ms}
breaker = {{ failure_threshold = 2, cooldown_ms = 60000 }}

[[tiers]]
name = "b"
kind = "openai"
base_url = "{url_b}"
api_key_env = "B_KEY"
model = "model-b"
max_retries = 0

[[tiers]]
name = "c"
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "C_KEY_UNSET"
model = "model-c"
"#
    );
    let policy = Arc::new(Policy::from_toml_str(&toml, "test.toml").unwrap());
    let env = EnvSource::Fixed(BTreeMap::from([
        ("A_KEY".to_string(), "sk-a-secret".to_string()),
        ("B_KEY".to_string(), "sk-b-secret".to_string()),
    ]));
    let state = Arc::new(RouterState::new(Arc::new(SystemClock), env));
    let upstreams = Upstreams::new(policy, state.clone())
        .unwrap()
        .with_retry_policy(RetryPolicy {
            base_ms: 10,
            max_backoff_ms: 40,
            max_retry_after_ms: 5_000,
        });
    Setup {
        upstreams,
        state,
        a,
        b,
    }
}

fn decision(chain: &[&str]) -> Decision {
    Decision {
        action: Action::Escalate,
        tier: Some(chain[0].to_string()),
        reasons: vec![],
        scores: BTreeMap::new(),
        fallbacks: chain[1..].iter().map(|s| s.to_string()).collect(),
        refusal: None,
        cascade: None,
    }
}

fn openai_req(stream: bool) -> UpstreamRequest {
    UpstreamRequest {
        body: json!({"model": "auto", "stream": stream, "messages": [{"role": "user", "content": "Capital of France?"}]}),
        format: WireFormat::OpenAi,
    }
}

fn anthropic_req(stream: bool) -> UpstreamRequest {
    UpstreamRequest {
        body: json!({"model": "auto", "max_tokens": 64, "stream": stream, "system": "Be brief.",
                     "messages": [{"role": "user", "content": [{"type": "text", "text": "Capital of France?"}]}]}),
        format: WireFormat::Anthropic,
    }
}

fn script(f: &Fake, faults: &[Fault]) {
    f.script.lock().unwrap().extend(faults.iter().cloned());
}

#[tokio::test]
async fn openai_json_with_key_usage_and_spend() {
    let s = setup("openai", 2, 5_000).await;
    let d = s
        .upstreams
        .dispatch(
            &decision(&["a", "local"]),
            &openai_req(false),
            Some("team-a"),
        )
        .await;
    let Dispatch::Remote {
        tier,
        body:
            UpstreamBody::Json {
                value,
                usage,
                cost_usd,
            },
        report,
    } = d
    else {
        panic!("expected a remote JSON answer, got {d:?}")
    };
    assert_eq!(tier, "a");
    assert_eq!(report.retries, 0);
    assert_eq!(value["choices"][0]["message"]["content"], "Paris.");
    assert_eq!(
        (
            usage.input_tokens,
            usage.cached_input_tokens,
            usage.output_tokens
        ),
        (600, 400, 100)
    );
    let want = (600.0 * 5.0 + 400.0 * 0.5 + 100.0 * 15.0) / 1e6;
    assert!((cost_usd - want).abs() < 1e-12);
    assert!((s.state.spent(Some("a"), Some("team-a"), Period::Daily) - want).abs() < 1e-12);
    let hits = s.a.hits.lock().unwrap();
    assert_eq!(hits[0].0["authorization"], "Bearer sk-a-secret");
    assert_eq!(hits[0].1["model"], "model-a");
}

#[tokio::test]
async fn anthropic_tier_serves_an_openai_client() {
    let s = setup("anthropic", 0, 5_000).await;
    let d = s
        .upstreams
        .dispatch(&decision(&["a", "local"]), &openai_req(false), None)
        .await;
    let Dispatch::Remote {
        body: UpstreamBody::Json { value, usage, .. },
        ..
    } = d
    else {
        panic!("{d:?}")
    };
    assert_eq!(value["object"], "chat.completion");
    assert_eq!(value["choices"][0]["message"]["content"], "Paris.");
    assert_eq!(value["usage"]["prompt_tokens"], 1000);
    assert_eq!(usage.cached_input_tokens, 400);
    let hits = s.a.hits.lock().unwrap();
    assert_eq!(hits[0].0["x-api-key"], "sk-a-secret");
    assert_eq!(hits[0].0["anthropic-version"], "2023-06-01");
    assert!(hits[0].0.get("authorization").is_none());
    assert_eq!(
        hits[0].1["messages"][0]["content"][0]["text"],
        "Capital of France?"
    );
    assert!(hits[0].1["max_tokens"].as_u64().is_some());
}

#[tokio::test]
async fn openai_tier_serves_an_anthropic_client() {
    let s = setup("openai", 0, 5_000).await;
    let d = s
        .upstreams
        .dispatch(&decision(&["a", "local"]), &anthropic_req(false), None)
        .await;
    let Dispatch::Remote {
        body: UpstreamBody::Json { value, .. },
        ..
    } = d
    else {
        panic!("{d:?}")
    };
    assert_eq!(value["type"], "message");
    assert_eq!(value["content"][0]["text"], "Paris.");
    assert_eq!(value["usage"]["input_tokens"], 600);
    let hits = s.a.hits.lock().unwrap();
    assert_eq!(hits[0].1["messages"][0]["role"], "system");
}

#[tokio::test]
async fn retries_500_then_succeeds() {
    let s = setup("openai", 2, 5_000).await;
    script(&s.a, &[Fault::Status(500), Fault::Status(503)]);
    let d = s
        .upstreams
        .dispatch(&decision(&["a", "local"]), &openai_req(false), None)
        .await;
    let Dispatch::Remote { tier, report, .. } = d else {
        panic!("{d:?}")
    };
    assert_eq!(tier, "a");
    assert_eq!(report.retries, 2);
    assert!(report.errors[0].contains("HTTP 500"), "{:?}", report.errors);
}

#[tokio::test]
async fn honours_retry_after() {
    let s = setup("openai", 1, 5_000).await;
    script(&s.a, &[Fault::RetryAfter(1)]);
    let t = Instant::now();
    let d = s
        .upstreams
        .dispatch(&decision(&["a", "local"]), &openai_req(false), None)
        .await;
    assert!(matches!(d, Dispatch::Remote { .. }), "{d:?}");
    assert!(
        t.elapsed() >= Duration::from_millis(1_000),
        "waited only {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn long_retry_after_moves_to_the_next_tier_at_once() {
    let s = setup("openai", 3, 5_000).await;
    script(&s.a, &[Fault::RetryAfter(3_600)]);
    let t = Instant::now();
    let d = s
        .upstreams
        .dispatch(&decision(&["a", "b", "local"]), &openai_req(false), None)
        .await;
    let Dispatch::Remote { tier, report, .. } = d else {
        panic!("{d:?}")
    };
    assert_eq!(tier, "b");
    assert_eq!(report.abandoned, vec!["a".to_string()]);
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn hang_past_timeout_falls_back_to_local() {
    let s = setup("openai", 1, 200).await;
    script(&s.a, &[Fault::Hang(2_000), Fault::Hang(2_000)]);
    let t = Instant::now();
    let d = s
        .upstreams
        .dispatch(&decision(&["a", "local"]), &openai_req(false), None)
        .await;
    let Dispatch::Local { tier, report } = d else {
        panic!("{d:?}")
    };
    assert_eq!(tier, "local");
    assert_eq!(report.retries, 1);
    assert!(
        report.errors.iter().all(|e| e.contains("within 200 ms")),
        "{:?}",
        report.errors
    );
    assert!(t.elapsed() < Duration::from_millis(1_500));
}

#[tokio::test]
async fn malformed_json_and_wrong_content_type_are_retried() {
    let s = setup("openai", 2, 5_000).await;
    script(&s.a, &[Fault::Malformed, Fault::WrongContentType]);
    let d = s
        .upstreams
        .dispatch(&decision(&["a", "local"]), &openai_req(false), None)
        .await;
    let Dispatch::Remote { report, .. } = d else {
        panic!("{d:?}")
    };
    assert_eq!(report.retries, 2);
    assert!(
        report.errors[0].contains("malformed JSON"),
        "{:?}",
        report.errors
    );
    assert!(
        report.errors[1].contains("text/html"),
        "{:?}",
        report.errors
    );
}

#[tokio::test]
async fn bad_request_is_not_retried_or_fallen_back() {
    let s = setup("openai", 2, 5_000).await;
    script(&s.a, &[Fault::Status(400)]);
    let d = s
        .upstreams
        .dispatch(&decision(&["a", "b", "local"]), &openai_req(false), None)
        .await;
    let Dispatch::Failed { error, report } = d else {
        panic!("{d:?}")
    };
    assert_eq!(error.http_status(), 400);
    assert_eq!(report.retries, 0);
    assert!(s.b.hits.lock().unwrap().is_empty());
}

#[tokio::test]
async fn disabled_tier_is_skipped_and_breaker_opens() {
    let s = setup("openai", 0, 5_000).await;
    let d = s
        .upstreams
        .dispatch(&decision(&["c", "b", "local"]), &openai_req(false), None)
        .await;
    let Dispatch::Remote { tier, report, .. } = d else {
        panic!("{d:?}")
    };
    assert_eq!(tier, "b");
    assert!(
        report.errors[0].contains("C_KEY_UNSET"),
        "{:?}",
        report.errors
    );

    script(&s.a, &[Fault::Status(502), Fault::Status(502)]);
    for _ in 0..2 {
        let d = s
            .upstreams
            .dispatch(&decision(&["a", "local"]), &openai_req(false), None)
            .await;
        assert!(matches!(d, Dispatch::Local { .. }), "{d:?}");
    }
    assert_eq!(s.state.breaker_phase("a"), BreakerPhase::Open);
    let before = s.a.hits.lock().unwrap().len();
    let d = s
        .upstreams
        .dispatch(&decision(&["a", "local"]), &openai_req(false), None)
        .await;
    let Dispatch::Local { report, .. } = d else {
        panic!("{d:?}")
    };
    assert!(report.errors[0].contains("circuit breaker open"));
    assert_eq!(
        s.a.hits.lock().unwrap().len(),
        before,
        "an open breaker sends nothing"
    );
}

#[tokio::test]
async fn stream_passthrough_drops_unrequested_usage_chunk_and_records_spend() {
    let s = setup("openai", 0, 5_000).await;
    let d = s
        .upstreams
        .dispatch(&decision(&["a", "local"]), &openai_req(true), Some("k"))
        .await;
    let Dispatch::Remote {
        body: UpstreamBody::Stream(mut st),
        ..
    } = d
    else {
        panic!("{d:?}")
    };
    let handle = st.summary_handle();
    let mut data = Vec::new();
    while let Some(ev) = st.next().await {
        data.push(ev.expect("no stream error").data);
    }
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert!(
        !data.iter().any(|d| d.contains("\"usage\"")),
        "usage chunk was not asked for"
    );
    let text: String = data
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v.pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .collect();
    assert_eq!(text, "Paris.");
    let summary = handle.lock().unwrap().clone();
    assert!(summary.completed && summary.error.is_none());
    assert_eq!(summary.usage.output_tokens, 2);
    assert!(s.state.spent(Some("a"), Some("k"), Period::Daily) > 0.0);
    let hits = s.a.hits.lock().unwrap();
    assert_eq!(
        hits[0].1["stream_options"]["include_usage"], true,
        "usage is always requested"
    );
}

#[tokio::test]
async fn anthropic_stream_translated_for_openai_client() {
    let s = setup("anthropic", 0, 5_000).await;
    let mut req = openai_req(true);
    req.body["stream_options"] = json!({"include_usage": true});
    let d = s
        .upstreams
        .dispatch(&decision(&["a", "local"]), &req, None)
        .await;
    let Dispatch::Remote {
        body: UpstreamBody::Stream(st),
        ..
    } = d
    else {
        panic!("{d:?}")
    };
    let events: Vec<_> = st.map(|e| e.unwrap().data).collect().await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 3);
    assert!(events.iter().any(|e| e.contains("Paris.")));
}

#[tokio::test]
async fn reset_mid_stream_is_a_stream_error() {
    let s = setup("openai", 2, 5_000).await;
    script(&s.a, &[Fault::ResetMidStream]);
    let d = s
        .upstreams
        .dispatch(&decision(&["a", "local"]), &openai_req(true), None)
        .await;
    let Dispatch::Remote {
        body: UpstreamBody::Stream(st),
        report,
        ..
    } = d
    else {
        panic!("{d:?}")
    };
    assert_eq!(report.retries, 0);
    let items: Vec<Result<_, UpstreamError>> = st.collect().await;
    assert!(items[0].is_ok());
    let last = items.last().unwrap();
    assert!(
        matches!(last, Err(UpstreamError::Stream { .. })),
        "{last:?}"
    );
    assert!(last
        .as_ref()
        .unwrap_err()
        .to_string()
        .contains("after it had started"));
    assert_eq!(
        s.a.hits.lock().unwrap().len(),
        1,
        "a started stream is never retried"
    );
}

#[tokio::test]
async fn keys_never_appear_in_errors_or_debug() {
    let s = setup("openai", 0, 5_000).await;
    script(&s.a, &[Fault::Status(401)]);
    let d = s
        .upstreams
        .dispatch(&decision(&["a", "local"]), &openai_req(false), None)
        .await;
    let text = format!("{d:?} {:?}", s.upstreams);
    assert!(
        !text.contains("sk-a-secret") && !text.contains("sk-b-secret"),
        "{text}"
    );
}
