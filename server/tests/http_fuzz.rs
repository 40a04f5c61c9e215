//! Property test of the HTTP API's contract for bad input: every request the generator makes (a
//! valid request for `/v1/chat/completions`, `/v1/completions` or `/v1/messages`, then one
//! mutation: a wrong type, an out-of-range or unparsable number, a long or odd string, nested
//! junk, a missing field, an unknown role or content part, an empty list, a duplicated key, a
//! non-object or truncated body, a wrong content type, `n`, stop lists, logprobs, tools, a
//! `max_tokens` at or past the context, several of these at once, a client hanging up
//! mid-stream; plus `GET /v1/models/{id}` with odd ids) gets HTTP 200 with a well-formed body
//! or stream (OpenAI streams end in `data: [DONE]`, Anthropic's in `message_stop`, every choice
//! finishes, no text holds a stop string), or a 4xx in the endpoint's error shape whose message
//! is not empty and which names the mutated field (OpenAI `param`, or the message). Never a
//! 5xx, a dropped connection or a hang. Afterwards the server is healthy and no work is lost:
//! no sequence running or waiting, no KV block in use, no 5xx counted, no panic logged.
//!
//! One server, a fixed number of cases and a fixed seed, so a failure reproduces and shrinks.
//! To explore: `HTTP_FUZZ_CASES=2500 HTTP_FUZZ_SEED=7 HTTP_FUZZ_SURVEY=1` runs more cases from
//! another seed and lists every failure instead of shrinking the first. The bugs the test
//! found are kept as fixed cases in `found_bugs_stay_fixed`.

mod common;

use std::time::{Duration, Instant};

use common::{anthropic_error, metric, metric_sum, openai_error, parse_sse, post, Server};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::{json, Value};

/// A request taking longer than this is a hang: the largest generation the generator asks
/// for is one 512-token context on the tiny model (a second or two in the dev profile).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Cases per run: 4-5 s in the dev profile on the 2-core dev machine (2,500 take ~25 s).
const DEFAULT_CASES: u32 = 400;
/// The context the test server runs with (`common::Server`'s `--max-model-len`).
const CONTEXT: i64 = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ep {
    Chat,
    Completions,
    Messages,
    Responses,
}

impl Ep {
    fn path(self) -> &'static str {
        match self {
            Ep::Chat => "/v1/chat/completions",
            Ep::Completions => "/v1/completions",
            Ep::Messages => "/v1/messages",
            Ep::Responses => "/v1/responses",
        }
    }

    /// Top-level fields the server reads.
    fn fields(self) -> &'static [&'static str] {
        const SAMPLING: [&str; 9] = [
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "repetition_penalty",
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "logit_bias",
        ];
        const CHAT: [&str; 39] = [
            "model",
            "messages",
            "max_tokens",
            "max_completion_tokens",
            "n",
            "stop",
            "logprobs",
            "top_logprobs",
            "stream",
            "stream_options",
            "reasoning_effort",
            "chat_template_kwargs",
            "tools",
            "tool_choice",
            "response_format",
            "structured_outputs",
            "guided_regex",
            "ignore_eos",
            "truncate_prompt_tokens",
            "cache_salt",
            "prompt_logprobs",
            "return_tokens_as_token_ids",
            "min_tokens",
            "stop_token_ids",
            "include_stop_str_in_output",
            "skip_special_tokens",
            "add_generation_prompt",
            "continue_final_message",
            "priority",
            "return_token_ids",
            SAMPLING[0],
            SAMPLING[1],
            SAMPLING[2],
            SAMPLING[3],
            SAMPLING[4],
            SAMPLING[5],
            SAMPLING[6],
            SAMPLING[7],
            SAMPLING[8],
        ];
        const COMPLETIONS: [&str; 31] = [
            "model",
            "prompt",
            "max_tokens",
            "n",
            "best_of",
            "stop",
            "logprobs",
            "echo",
            "suffix",
            "stream",
            "stream_options",
            "ignore_eos",
            "truncate_prompt_tokens",
            "cache_salt",
            "prompt_logprobs",
            "return_tokens_as_token_ids",
            "min_tokens",
            "stop_token_ids",
            "include_stop_str_in_output",
            "skip_special_tokens",
            "priority",
            "return_token_ids",
            SAMPLING[0],
            SAMPLING[1],
            SAMPLING[2],
            SAMPLING[3],
            SAMPLING[4],
            SAMPLING[5],
            SAMPLING[6],
            SAMPLING[7],
            SAMPLING[8],
        ];
        const MESSAGES: [&str; 14] = [
            "model",
            "messages",
            "max_tokens",
            "system",
            "stop_sequences",
            "temperature",
            "top_p",
            "top_k",
            "stream",
            "tools",
            "tool_choice",
            "output_format",
            "ignore_eos",
            "priority",
        ];
        const RESPONSES: [&str; 18] = [
            "model",
            "input",
            "instructions",
            "max_output_tokens",
            "temperature",
            "top_p",
            "stream",
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "text",
            "reasoning",
            "metadata",
            "previous_response_id",
            "background",
            "store",
            "ignore_eos",
            "priority",
        ];
        match self {
            Ep::Chat => &CHAT,
            Ep::Completions => &COMPLETIONS,
            Ep::Messages => &MESSAGES,
            Ep::Responses => &RESPONSES,
        }
    }

    /// Nested fields worth mutating too.
    fn nested(self) -> &'static [&'static str] {
        match self {
            Ep::Chat => &[
                "messages[0]",
                "messages[0].role",
                "messages[0].content",
                "messages[0].name",
                "stream_options.include_usage",
            ],
            Ep::Completions => &["prompt[0]", "stream_options.include_usage"],
            Ep::Messages => &["messages[0]", "messages[0].role", "messages[0].content"],
            Ep::Responses => &[
                "input[0]",
                "input[0].role",
                "input[0].content",
                "input[0].type",
                "text.format",
                "text.format.type",
                "reasoning.effort",
            ],
        }
    }

    /// Where the first message of a valid body is.
    fn first_message(self) -> &'static str {
        if self == Ep::Responses {
            "input[0]"
        } else {
            "messages[0]"
        }
    }

    /// Fields a request must have.
    fn required(self) -> &'static [&'static str] {
        match self {
            Ep::Chat => &[
                "model",
                "messages",
                "messages[0].role",
                "messages[0].content",
            ],
            Ep::Completions => &["model", "prompt"],
            Ep::Messages => &[
                "model",
                "messages",
                "max_tokens",
                "messages[0].role",
                "messages[0].content",
            ],
            Ep::Responses => &["model", "input", "input[0].role", "input[0].content"],
        }
    }
}

/// A request body: JSON (with `"\u{1}RAW:<text>"` strings replaced by `<text>` verbatim when
/// sent, for numbers JSON values cannot hold), or raw bytes.
#[derive(Clone, Debug)]
enum Body {
    Json(Value),
    Raw(Vec<u8>),
}

const RAW: &str = "\u{1}RAW:";

fn raw(text: &str) -> Value {
    Value::String(format!("{RAW}{text}"))
}

impl Body {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Body::Raw(b) => b.clone(),
            Body::Json(v) => {
                let mut s = v.to_string();
                // Splice raw tokens in place of their marker strings.
                while let Some(start) = s.find("\"\\u0001RAW:") {
                    let body_start = start + "\"\\u0001RAW:".len();
                    let Some(len) = s[body_start..].find('"') else {
                        break;
                    };
                    let text = s[body_start..body_start + len].to_string();
                    s.replace_range(start..body_start + len + 1, &text);
                }
                s.into_bytes()
            }
        }
    }
}

/// One generated request.
#[derive(Clone, Debug)]
struct Case {
    ep: Ep,
    body: Body,
    content_type: Option<&'static str>,
    headers: Vec<(&'static str, String)>,
    /// The field the mutation changed, as a path; its root must be named by a 4xx.
    target: Option<String>,
    /// What the mutation did, for the failure message.
    what: String,
    /// The status this case must get, where the mutation decides it.
    expect: Option<u16>,
    /// Read the first bytes of the answer and hang up (a client going away mid-stream).
    abandon: bool,
}

/// Sets (or with `None` removes) the value at `path` (`a.b`, `a[0].b`); missing parents are
/// left alone.
fn set_path(root: &mut Value, path: &str, v: Option<Value>) {
    let segs: Vec<&str> = path.split('.').collect();
    let mut cur = root;
    for (i, seg) in segs.iter().enumerate() {
        let (key, idx) = match seg.find('[') {
            Some(b) => (&seg[..b], seg[b + 1..seg.len() - 1].parse::<usize>().ok()),
            None => (*seg, None),
        };
        let last = i + 1 == segs.len();
        let Some(obj) = cur.as_object_mut() else {
            return;
        };
        match idx {
            None if last => {
                match v {
                    Some(v) => obj.insert(key.to_string(), v),
                    None => obj.remove(key),
                };
                return;
            }
            None => {
                let Some(next) = obj.get_mut(key) else { return };
                cur = next;
            }
            Some(j) => {
                let Some(arr) = obj.get_mut(key).and_then(Value::as_array_mut) else {
                    return;
                };
                if last {
                    match v {
                        Some(v) if j < arr.len() => arr[j] = v,
                        Some(v) => arr.push(v),
                        None if j < arr.len() => {
                            arr.remove(j);
                        }
                        None => {}
                    }
                    return;
                }
                let Some(next) = arr.get_mut(j) else { return };
                cur = next;
            }
        }
    }
}

/// A short prompt text.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("hi".to_string()),
        Just("count to three".to_string()),
        "[a-z ]{1,24}",
    ]
}

/// A valid request for `ep`, with streaming, `n`, stops and logprobs varied.
fn valid(ep: Ep) -> BoxedStrategy<Value> {
    let stop = prop_oneof![
        Just(None),
        Just(Some(json!("."))),
        Just(Some(json!(["\n", "zz"]))),
    ];
    match ep {
        Ep::Chat => (
            text(),
            any::<bool>(),
            1i64..=3,
            1i64..=6,
            stop,
            prop_oneof![Just(None), Just(Some(0)), Just(Some(3))],
            any::<bool>(),
        )
            .prop_map(|(t, stream, n, max, stop, top, usage)| {
                let mut b = json!({"model": "local", "max_tokens": max, "stream": stream,
                                   "messages": [{"role": "user", "content": t}]});
                if n > 1 {
                    b["n"] = json!(n);
                }
                if let Some(s) = stop {
                    b["stop"] = s;
                }
                if let Some(k) = top {
                    b["logprobs"] = json!(true);
                    b["top_logprobs"] = json!(k);
                }
                if stream && usage {
                    b["stream_options"] = json!({"include_usage": true});
                }
                b
            })
            .boxed(),
        Ep::Completions => (
            prop_oneof![
                text().prop_map(Value::String),
                prop::collection::vec(1u32..200, 1..6).prop_map(|v| json!(v)),
                Just(json!(["one", "two"])),
            ],
            any::<bool>(),
            1i64..=2,
            1i64..=6,
            stop,
            prop_oneof![Just(None), Just(Some(0)), Just(Some(2))],
        )
            .prop_map(|(prompt, stream, n, max, stop, lp)| {
                let mut b = json!({"model": "local", "prompt": prompt, "max_tokens": max,
                                   "stream": stream});
                if n > 1 {
                    b["n"] = json!(n);
                }
                if let Some(s) = stop {
                    b["stop"] = s;
                }
                if let Some(k) = lp {
                    b["logprobs"] = json!(k);
                }
                b
            })
            .boxed(),
        Ep::Messages => (text(), any::<bool>(), 1i64..=6, stop, any::<bool>())
            .prop_map(|(t, stream, max, stop, system)| {
                let mut b = json!({"model": "local", "max_tokens": max, "stream": stream,
                                   "messages": [{"role": "user", "content": t}]});
                if let Some(s) = stop {
                    b["stop_sequences"] = match s {
                        Value::String(s) => json!([s]),
                        s => s,
                    };
                }
                if system {
                    b["system"] = json!("be brief");
                }
                b
            })
            .boxed(),
        Ep::Responses => (text(), any::<bool>(), 1i64..=6, any::<bool>())
            .prop_map(|(t, stream, max, instructions)| {
                let mut b = json!({"model": "local", "max_output_tokens": max, "stream": stream,
                                   "input": [{"role": "user", "content": [{"type": "input_text", "text": t}]}]});
                if instructions {
                    b["instructions"] = json!("be brief");
                }
                b
            })
            .boxed(),
    }
}

/// Values of every JSON type and shape, for wrong-type mutations.
fn junk() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        Just(json!(3.75)),
        Just(json!("x")),
        Just(json!([])),
        Just(json!({})),
        Just(json!([1, "a", null, {"b": [true]}])),
        Just(json!({"a": {"b": [1, {"c": null}]}})),
        Just(json!([[["deep"]]])),
    ]
}

/// Numbers at and past every edge: negative, zero, huge, tiny, float where an integer is
/// expected, and numbers or words JSON cannot hold.
fn odd_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(-1)),
        Just(json!(0)),
        Just(raw("-0")),
        Just(json!(-0.0)),
        Just(json!(1)),
        Just(json!(2)),
        Just(json!(0.5)),
        Just(json!(1.5)),
        Just(json!(17)),
        Just(json!(21)),
        Just(json!(i64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(u64::MAX)),
        Just(raw("18446744073709551616")),
        Just(raw("1e308")),
        Just(raw("-1e308")),
        Just(raw("1e-308")),
        Just(raw("5e-324")),
        Just(raw("1e-45")),
        Just(raw("1e400")),
        Just(raw("NaN")),
        Just(raw("Infinity")),
        Just(json!("NaN")),
        Just(json!("inf")),
        Just(json!("-0")),
        Just(json!("1")),
    ]
}

/// Strings with control characters, odd unicode and any scalar value.
fn odd_string() -> impl Strategy<Value = String> {
    let ch = prop_oneof![
        4 => any::<char>(),
        1 => Just('\0'),
        1 => Just('\u{7f}'),
        1 => Just('\u{202e}'),
        1 => Just('\u{feff}'),
        1 => Just('\u{fffd}'),
        1 => Just('"'),
        1 => Just('\\'),
        1 => Just('{'),
        1 => Just('\n'),
    ];
    prop::collection::vec(ch, 0..40).prop_map(|v| v.into_iter().collect())
}

/// A long string (up to a 4 KiB-to-512 KiB body; the server accepts 4 MiB).
fn long_string() -> impl Strategy<Value = String> {
    (
        prop_oneof![Just("word "), Just("\u{1f600}"), Just("x"), Just("\u{0}")],
        prop_oneof![Just(1_000usize), Just(20_000), Just(100_000)],
    )
        .prop_map(|(unit, n)| unit.repeat(n))
}

/// A field of `ep` (top-level or nested).
fn field(ep: Ep) -> impl Strategy<Value = String> {
    let all: Vec<String> = ep
        .fields()
        .iter()
        .chain(ep.nested())
        .map(|s| s.to_string())
        .collect();
    prop::sample::select(all)
}

/// Bodies nested `depth` deep.
fn nested(depth: usize, object: bool) -> Value {
    let mut v = json!(1);
    for _ in 0..depth {
        v = if object {
            json!({ "a": v })
        } else {
            json!([v])
        };
    }
    v
}

/// One mutation of a valid body.
#[derive(Clone, Debug)]
enum Mutation {
    /// Set a field to a value (wrong type, odd number, long or odd string, nested junk).
    Set(String, Value),
    /// Remove a required field.
    Remove(String),
    /// Put the field twice in the object: `first` then the original.
    Duplicate(String, Value),
    /// Replace the body.
    Replace(Body),
    /// Cut the serialised body after this fraction of its bytes.
    Truncate(f64),
    /// Send the body under another content type.
    ContentType(Option<&'static str>),
    /// A header the router reads.
    Header(&'static str, String),
    /// Several field mutations at once.
    Many(Vec<Mutation>),
    /// A completions prompt of `.0` token ids and `max_tokens` that fills the context exactly
    /// (`.1` false: HTTP 200) or by one token more (`.1` true: HTTP 400).
    AtContext(usize, bool),
    /// The client hangs up after the first bytes of the answer.
    Abandon,
}

fn mutation(ep: Ep) -> BoxedStrategy<Mutation> {
    let roles = prop::sample::select(vec![
        "tool",
        "function",
        "wizard",
        "",
        "USER",
        "system",
        "developer",
        "assistant",
        "user\u{0}",
    ]);
    let parts = prop_oneof![
        Just(json!([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}])),
        Just(json!([{"type": "image", "source": {"type": "base64", "data": "AA=="}}])),
        Just(json!([{"type": "input_audio", "input_audio": {"data": ""}}])),
        Just(json!([{"type": "tool_result", "tool_use_id": "t1", "content": "x"}])),
        Just(json!([{"type": "tool_use", "id": "t1", "name": "f", "input": {}}])),
        Just(json!([{"type": "document"}])),
        Just(json!([{"type": ""}])),
        Just(json!([{"type": null, "text": "x"}])),
        Just(json!([{"type": 5}])),
        Just(json!([{"type": "text"}])),
        Just(json!([{"type": "text", "text": 5}])),
        Just(json!([{"text": "no type"}])),
        Just(json!(["bare string"])),
        Just(json!([{"type": "text", "text": "ok"}, 7])),
        Just(json!([])),
    ];
    let tools = prop_oneof![
        Just(
            json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
        ),
        Just(json!([{"name": "f", "input_schema": {"type": "object"}}])),
        Just(json!([])),
        Just(json!([null])),
    ];
    let max_tokens_field = match ep {
        Ep::Chat => prop::sample::select(vec!["max_tokens", "max_completion_tokens"]).boxed(),
        Ep::Responses => Just("max_output_tokens").boxed(),
        _ => Just("max_tokens").boxed(),
    };
    let context = prop::sample::select(vec![
        CONTEXT - 1,
        CONTEXT,
        CONTEXT + 1,
        10_000,
        1 << 31,
        i64::MAX,
    ]);
    let stop_field = if ep == Ep::Messages {
        "stop_sequences"
    } else {
        "stop"
    };
    let stops = prop_oneof![
        Just(json!("")),
        Just(json!([""])),
        Just(json!([])),
        Just(json!([null])),
        Just(json!(["a", 1])),
        Just(json!(vec!["s"; 17])),
        Just(json!(vec!["s"; 16])),
        odd_string().prop_map(|s| json!([s])),
        long_string().prop_map(|s| json!([s])),
    ];
    let non_objects = prop_oneof![
        Just(Body::Raw(b"[]".to_vec())),
        Just(Body::Raw(b"\"x\"".to_vec())),
        Just(Body::Raw(b"1".to_vec())),
        Just(Body::Raw(b"null".to_vec())),
        Just(Body::Raw(b"true".to_vec())),
        Just(Body::Raw(Vec::new())),
        Just(Body::Raw(b"   ".to_vec())),
        Just(Body::Raw(b"{}".to_vec())),
        Just(Body::Raw(b"{\"model\": \"local\"}{}".to_vec())),
        Just(Body::Raw(vec![0xff, 0xfe, b'{', b'}'])),
        Just(Body::Raw(b"{\"model\": \"\\ud800\"}".to_vec())),
        Just(Body::Json(nested(200, false))),
        Just(Body::Json(nested(100, true))),
        Just(Body::Json(json!([{"model": "local"}]))),
    ];
    let mut options: Vec<(u32, BoxedStrategy<Mutation>)> = vec![
        (
            6,
            (field(ep), junk())
                .prop_map(|(f, v)| Mutation::Set(f, v))
                .boxed(),
        ),
        (
            5,
            (field(ep), odd_number())
                .prop_map(|(f, v)| Mutation::Set(f, v))
                .boxed(),
        ),
        (
            2,
            (field(ep), long_string())
                .prop_map(|(f, s)| Mutation::Set(f, Value::String(s)))
                .boxed(),
        ),
        (
            3,
            (field(ep), odd_string())
                .prop_map(|(f, s)| Mutation::Set(f, Value::String(s)))
                .boxed(),
        ),
        (
            2,
            (field(ep), 1usize..60, any::<bool>())
                .prop_map(|(f, d, o)| Mutation::Set(f, nested(d, o)))
                .boxed(),
        ),
        (
            2,
            prop::sample::select(ep.required().to_vec())
                .prop_map(|f| Mutation::Remove(f.to_string()))
                .boxed(),
        ),
        (
            2,
            (field(ep), junk())
                .prop_map(|(f, v)| Mutation::Duplicate(f, v))
                .boxed(),
        ),
        (2, non_objects.prop_map(Mutation::Replace).boxed()),
        (2, (0.0f64..1.0).prop_map(Mutation::Truncate).boxed()),
        (
            1,
            prop::sample::select(vec![
                None,
                Some("text/plain"),
                Some("application/x-www-form-urlencoded"),
                Some("multipart/form-data; boundary=x"),
                Some("application/json; charset=latin1"),
            ])
            .prop_map(Mutation::ContentType)
            .boxed(),
        ),
        (
            1,
            (
                prop::sample::select(vec!["x-switchyard-route", "x-switchyard-cascade"]),
                prop::sample::select(vec!["", "nowhere", "local", "on", "off", "auto"]),
            )
                .prop_map(|(h, v)| Mutation::Header(h, v.to_string()))
                .boxed(),
        ),
        (
            2,
            (max_tokens_field, context)
                .prop_map(|(f, m)| Mutation::Set(f.to_string(), json!(m)))
                .boxed(),
        ),
        (
            2,
            stops
                .prop_map(move |s| Mutation::Set(stop_field.to_string(), s))
                .boxed(),
        ),
        (
            1,
            tools.prop_map(|t| Mutation::Set("tools".into(), t)).boxed(),
        ),
    ];
    // Several field mutations at once: the error names one of them.
    let single = prop_oneof![
        (field(ep), junk()).prop_map(|(f, v)| Mutation::Set(f, v)),
        (field(ep), odd_number()).prop_map(|(f, v)| Mutation::Set(f, v)),
        (field(ep), odd_string()).prop_map(|(f, s)| Mutation::Set(f, Value::String(s))),
    ];
    options.push((
        3,
        prop::collection::vec(single, 2..4)
            .prop_map(Mutation::Many)
            .boxed(),
    ));
    // Stops a random model's text hits often, so stop matching runs mid-token.
    options.push((
        2,
        prop::sample::select(vec![
            json!(["e"]),
            json!([" "]),
            json!(["a", "o", "t"]),
            json!(["\u{fffd}"]),
            json!(["th", "in"]),
        ])
        .prop_map(move |st| Mutation::Set(stop_field.to_string(), st))
        .boxed(),
    ));
    options.push((1, Just(Mutation::Abandon).boxed()));
    if ep == Ep::Completions {
        options.push((
            2,
            (1usize..8, any::<bool>())
                .prop_map(|(k, over)| Mutation::AtContext(k, over))
                .boxed(),
        ));
    }
    if ep != Ep::Completions {
        let first = ep.first_message();
        options.push((
            2,
            roles
                .prop_map(move |r| Mutation::Set(format!("{first}.role"), json!(r)))
                .boxed(),
        ));
        options.push((
            2,
            parts
                .prop_map(move |p| Mutation::Set(format!("{first}.content"), p))
                .boxed(),
        ));
        let list = if ep == Ep::Responses {
            "input"
        } else {
            "messages"
        };
        options.push((1, Just(Mutation::Set(list.into(), json!([]))).boxed()));
    }
    if ep == Ep::Responses {
        options.push((
            2,
            prop_oneof![
                Just(json!({"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"})),
                Just(json!({"type": "function_call_output", "call_id": "c1", "output": "ok"})),
                Just(json!({"type": "function_call_output", "call_id": "c1"})),
                Just(json!({"type": "function_call", "name": 5})),
                Just(json!({"type": "reasoning", "summary": []})),
                Just(json!({"type": "web_search_call"})),
                Just(json!({"type": "message", "role": "developer", "content": "be brief"})),
                Just(json!({"role": "user", "content": [{"type": "input_image", "image_url": "x"}]})),
            ]
            .prop_map(|item| Mutation::Set("input[0]".into(), item))
            .boxed(),
        ));
        options.push((
            1,
            prop_oneof![
                Just(json!({"format": {"type": "json_object"}})),
                Just(json!({"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}})),
                Just(json!({"format": {"type": "json_schema", "name": "x", "schema": 5}})),
                Just(json!({"format": {"type": "grammar"}})),
            ]
            .prop_map(|t| Mutation::Set("text".into(), t))
            .boxed(),
        ));
    }
    if ep != Ep::Messages && ep != Ep::Responses {
        options.push((
            2,
            prop::sample::select(vec![-1i64, 0, 2, 16, 17, 100])
                .prop_map(|n| Mutation::Set("n".into(), json!(n)))
                .boxed(),
        ));
    }
    match ep {
        Ep::Chat => options.push((
            2,
            (
                prop_oneof![
                    Just(json!(true)),
                    Just(json!(false)),
                    Just(Value::Null),
                    Just(json!("yes"))
                ],
                prop_oneof![
                    Just(Value::Null),
                    Just(json!(0)),
                    Just(json!(20)),
                    Just(json!(21)),
                    Just(json!(-1))
                ],
            )
                .prop_map(|(lp, top)| {
                    Mutation::Set("logprobs".into(), json!({"__pair": [lp, top]}))
                })
                .boxed(),
        )),
        Ep::Completions => {
            options.push((
                2,
                prop::sample::select(vec![json!(0), json!(20), json!(21), json!(-1), json!(true)])
                    .prop_map(|v| Mutation::Set("logprobs".into(), v))
                    .boxed(),
            ));
            options.push((
                2,
                prop_oneof![
                    Just(json!([])),
                    Just(json!([[]])),
                    Just(json!([""])),
                    Just(json!([-1])),
                    Just(json!([1.5])),
                    Just(json!([u32::MAX])),
                    Just(json!([4_294_967_296u64])),
                    Just(json!([1, "a"])),
                    Just(json!([[1], "a", [2, 3]])),
                    Just(json!([[1], [-2]])),
                    Just(json!(vec!["p"; 65])),
                    Just(json!(vec![json!([1]); 64])),
                    // With `n` 16: more choices than the queue (256) holds.
                    Just(json!({"__n16": vec!["p"; 64]})),
                    Just(json!(vec![1; (CONTEXT + 1) as usize])),
                ]
                .prop_map(|p| Mutation::Set("prompt".into(), p))
                .boxed(),
            ));
        }
        Ep::Messages => options.push((
            1,
            prop_oneof![
                Just(json!([{"type": "image"}])),
                Just(json!([{"type": "text", "text": 1}])),
                Just(json!(5)),
                Just(json!("")),
                Just(json!([])),
            ]
            .prop_map(|s| Mutation::Set("system".into(), s))
            .boxed(),
        )),
        Ep::Responses => {}
    }
    prop::strategy::Union::new_weighted(options).boxed()
}

/// Applies `m` to the valid body `b`.
fn apply(ep: Ep, mut b: Value, m: Mutation) -> Case {
    let mut case = Case {
        ep,
        body: Body::Json(Value::Null),
        content_type: Some("application/json"),
        headers: vec![],
        target: None,
        what: shorten(&format!("{m:?}")),
        expect: None,
        abandon: false,
    };
    match m {
        Mutation::Many(ms) => {
            let mut targets = vec![];
            for m in ms {
                if let Mutation::Set(f, v) = m {
                    set_path(&mut b, &f, Some(v));
                    targets.push(f);
                }
            }
            case.target = Some(targets.join("|"));
        }
        Mutation::AtContext(k, over) => {
            b["prompt"] = json!(vec![5; k]);
            b["max_tokens"] = json!(CONTEXT - k as i64 + i64::from(over));
            b["n"] = json!(1);
            case.target = Some("max_tokens".into());
            case.expect = Some(if over { 400 } else { 200 });
        }
        Mutation::Abandon => {
            b["stream"] = json!(true);
            b["max_tokens"] = json!(200);
            b["ignore_eos"] = json!(true);
            case.abandon = true;
        }
        Mutation::Set(f, v) => {
            if let Some(pair) = v.get("__pair").and_then(Value::as_array) {
                // The chat logprobs pair: logprobs and top_logprobs together.
                set_path(&mut b, "logprobs", Some(pair[0].clone()));
                set_path(&mut b, "top_logprobs", Some(pair[1].clone()));
                case.target = Some("logprobs|top_logprobs".into());
            } else if let Some(p) = v.get("__n16") {
                b["prompt"] = p.clone();
                b["n"] = json!(16);
                case.target = Some("prompt|n".into());
            } else {
                set_path(&mut b, &f, Some(v));
                case.target = Some(f);
            }
        }
        Mutation::Remove(f) => {
            set_path(&mut b, &f, None);
            case.target = Some(f);
        }
        Mutation::Duplicate(f, v) => {
            // `{"f": v, ...original}`: serde keeps the last value, so this is the original
            // request; the body must still be served or refused cleanly.
            let original = b.to_string();
            let dup = format!("{{{}:{},", json!(f), v);
            let spliced = original.replacen('{', &dup, 1);
            case.body = Body::Raw(spliced.into_bytes());
            return case;
        }
        Mutation::Replace(body) => {
            case.body = body;
            return case;
        }
        Mutation::Truncate(frac) => {
            let bytes = Body::Json(b).bytes();
            let cut = ((bytes.len() as f64) * frac) as usize;
            case.body = Body::Raw(bytes[..cut.min(bytes.len().saturating_sub(1))].to_vec());
            return case;
        }
        Mutation::ContentType(ct) => case.content_type = ct,
        Mutation::Header(h, v) => case.headers.push((h, v)),
    }
    case.body = Body::Json(b);
    case
}

fn case() -> impl Strategy<Value = Case> {
    prop_oneof![
        Just(Ep::Chat),
        Just(Ep::Completions),
        Just(Ep::Messages),
        Just(Ep::Responses)
    ]
    .prop_flat_map(|ep| (Just(ep), valid(ep), mutation(ep)))
    .prop_map(|(ep, b, m)| apply(ep, b, m))
}

/// What came back.
struct Reply {
    status: u16,
    content_type: String,
    text: String,
}

async fn send(c: &reqwest::Client, s: &Server, case: &Case) -> Result<Reply, String> {
    let mut rb = c.post(s.url(case.ep.path())).body(case.body.bytes());
    if let Some(ct) = case.content_type {
        rb = rb.header("content-type", ct);
    }
    for (k, v) in &case.headers {
        rb = rb.header(*k, v);
    }
    let go = async {
        let mut r = rb.send().await.map_err(|e| format!("no response: {e:?}"))?;
        let status = r.status().as_u16();
        if case.abandon {
            // The first bytes, then drop the response: the server must cancel the work.
            let _ = r.chunk().await;
            return Ok(Reply {
                status,
                content_type: String::new(),
                text: String::new(),
            });
        }
        let content_type = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let text = r
            .text()
            .await
            .map_err(|e| format!("HTTP {status}: the body was cut: {e:?}"))?;
        Ok(Reply {
            status,
            content_type,
            text,
        })
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, go).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {REQUEST_TIMEOUT:?} (a hang)")),
    }
}

/// The field names a 4xx must mention for `target` (`a|b`: either).
fn roots(target: &str) -> Vec<String> {
    target
        .split('|')
        .map(|t| t.split(['.', '[']).next().unwrap_or(t).to_string())
        .collect()
}

/// Whether `message` has `word` as a whole word (`n` is not in "context length").
fn mentions(message: &str, word: &str) -> bool {
    let ident = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    message.match_indices(word).any(|(i, _)| {
        !ident(message[..i].chars().next_back()) && !ident(message[i + word.len()..].chars().next())
    })
}

/// How many choices a 200 must carry: `n` (default 1) per prompt.
fn choices(ep: Ep, body: &Value) -> usize {
    let n = body.get("n").and_then(Value::as_u64).unwrap_or(1) as usize;
    let prompts = match (ep, body.get("prompt")) {
        (Ep::Completions, Some(Value::Array(items))) if !items.iter().all(Value::is_number) => {
            items.len()
        }
        _ => 1,
    };
    n.max(1) * prompts
}

/// Checks one reply against the contract.
fn check(case: &Case, r: &Reply) -> Result<(), String> {
    let body_json = match &case.body {
        Body::Json(v) => Some(v.clone()),
        Body::Raw(b) => serde_json::from_slice::<Value>(b).ok(),
    };
    if let Some(want) = case.expect {
        if r.status != want {
            return Err(format!(
                "HTTP {} where {want} was due: {}",
                r.status, r.text
            ));
        }
    }
    match r.status {
        200 if case.abandon => Ok(()),
        200 => check_ok(case, r, body_json.as_ref()),
        400..=499 => check_error(case, r),
        s => Err(format!("HTTP {s} (must be 200 or 4xx): {}", r.text)),
    }
}

fn check_error(case: &Case, r: &Reply) -> Result<(), String> {
    let v: Value = serde_json::from_str(&r.text).map_err(|e| {
        format!(
            "HTTP {}: the error body is not JSON ({e}): {}",
            r.status, r.text
        )
    })?;
    let (message, param) = if case.ep == Ep::Messages {
        if v["type"] != "error" || !v["error"]["type"].is_string() {
            return Err(format!(
                "HTTP {}: not the Anthropic error shape: {v}",
                r.status
            ));
        }
        (v["error"]["message"].as_str(), None)
    } else {
        let e = &v["error"];
        let shaped = e.is_object()
            && e["type"].is_string()
            && e.get("param").is_some()
            && e.get("code").is_some();
        if !shaped {
            return Err(format!(
                "HTTP {}: not the OpenAI error shape: {v}",
                r.status
            ));
        }
        (e["message"].as_str(), e["param"].as_str())
    };
    let message = message.unwrap_or("");
    if message.trim().is_empty() {
        return Err(format!("HTTP {}: empty error message: {v}", r.status));
    }
    // A body the server could not parse as a whole is not about one field.
    let whole_body = param.is_none()
        && ["parse the JSON", "JSON object", "larger than"]
            .iter()
            .any(|w| message.contains(w));
    if let (Some(target), false) = (&case.target, whole_body) {
        let names = roots(target);
        let named = names
            .iter()
            .any(|n| param.is_some_and(|p| p.starts_with(n.as_str())) || mentions(message, n));
        if !named {
            return Err(format!(
                "HTTP {}: the mutation changed {target} but the error names neither it in param nor in the message: {v}",
                r.status
            ));
        }
    }
    Ok(())
}

fn check_ok(case: &Case, r: &Reply, body: Option<&Value>) -> Result<(), String> {
    let body = body.ok_or("HTTP 200 to a body that is not JSON")?;
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let want = choices(case.ep, body);
    if stream {
        if !r.content_type.starts_with("text/event-stream") {
            return Err(format!("stream with content-type {:?}", r.content_type));
        }
        if case.ep == Ep::Responses {
            return check_responses_stream(&r.text);
        }
        let texts = check_stream(case.ep, &r.text, want)?;
        return check_stops(body, &texts);
    }
    let v: Value =
        serde_json::from_str(&r.text).map_err(|e| format!("HTTP 200 body is not JSON ({e})"))?;
    match case.ep {
        Ep::Chat | Ep::Completions => {
            let object = if case.ep == Ep::Chat {
                "chat.completion"
            } else {
                "text_completion"
            };
            let ch = v["choices"].as_array().ok_or(format!("no choices: {v}"))?;
            let ok = v["object"] == object
                && ch.len() == want
                && ch.iter().all(|c| {
                    let text = if case.ep == Ep::Chat {
                        &c["message"]["content"]
                    } else {
                        &c["text"]
                    };
                    text.is_string() && c["finish_reason"].is_string()
                })
                && v["usage"]["completion_tokens"].is_u64();
            if !ok {
                return Err(format!(
                    "malformed {object} with {want} choices wanted: {v}"
                ));
            }
            let texts: Vec<String> = ch
                .iter()
                .map(|c| {
                    let t = c["message"]["content"].as_str().or(c["text"].as_str());
                    t.unwrap_or_default().to_string()
                })
                .collect();
            check_stops(body, &texts)?;
        }
        Ep::Messages => {
            let ok = v["type"] == "message"
                && v["content"][0]["text"].is_string()
                && v["stop_reason"].is_string()
                && v["usage"]["output_tokens"].is_u64();
            if !ok {
                return Err(format!("malformed message: {v}"));
            }
            let text = v["content"][0]["text"].as_str().unwrap_or_default();
            check_stops(body, &[text.to_string()])?;
        }
        Ep::Responses => check_response_object(&v)?,
    }
    Ok(())
}

/// A finished `response` object: completed or cut by the limit, with output items and usage.
fn check_response_object(v: &Value) -> Result<(), String> {
    let ok = v["object"] == "response"
        && matches!(v["status"].as_str(), Some("completed" | "incomplete"))
        && v["output"].as_array().is_some_and(|o| {
            o.iter().all(|i| {
                matches!(
                    i["type"].as_str(),
                    Some("message" | "function_call" | "reasoning")
                )
            })
        })
        && v["usage"]["output_tokens"].is_u64();
    if ok {
        Ok(())
    } else {
        Err(format!("malformed response: {v}"))
    }
}

/// A Responses event stream: named events numbered in order, from `response.created` to a
/// finished response, no error event.
fn check_responses_stream(text: &str) -> Result<(), String> {
    let events = parse_sse(text);
    let tail = last(text, 300);
    let mut names = vec![];
    for (i, (name, data)) in events.iter().enumerate() {
        let v: Value =
            serde_json::from_str(data).map_err(|e| format!("event data not JSON ({e}): {data}"))?;
        let name = name.as_deref().ok_or(format!("an unnamed event: {data}"))?;
        if v["type"] != name || v["sequence_number"] != json!(i) {
            return Err(format!("event {i} is not {name} number {i}: {data}"));
        }
        if name == "error" {
            return Err(format!("error event in a 200 stream: {data}"));
        }
        names.push(name.to_string());
    }
    let last_event = events.last().map(|(_, d)| d.as_str()).unwrap_or("");
    match (
        names.first().map(String::as_str),
        names.last().map(String::as_str),
    ) {
        (Some("response.created"), Some("response.completed" | "response.incomplete")) => {
            let v: Value = serde_json::from_str(last_event).map_err(|e| e.to_string())?;
            check_response_object(&v["response"])
        }
        _ => Err(format!("Responses stream not created..completed: {tail}")),
    }
}

/// The answer never contains a stop string: generation ends before it (or, with vLLM's
/// `include_stop_str_in_output`, right after it). With `min_tokens` the first tokens may hold
/// one, so nothing is checked then.
fn check_stops(body: &Value, texts: &[String]) -> Result<(), String> {
    if body
        .get("min_tokens")
        .and_then(Value::as_u64)
        .is_some_and(|m| m > 0)
    {
        return Ok(());
    }
    let stops: Vec<&str> = match body.get("stop").or(body.get("stop_sequences")) {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    let included = body.get("include_stop_str_in_output") == Some(&Value::Bool(true));
    for (i, t) in texts.iter().enumerate() {
        let ending = stops
            .iter()
            .filter(|s| included && !s.is_empty() && t.ends_with(**s))
            .map(|s| s.len())
            .max()
            .unwrap_or(0);
        let t = &t[..t.len() - ending];
        if let Some(s) = stops.iter().find(|s| !s.is_empty() && t.contains(**s)) {
            return Err(format!("choice {i} contains the stop string {s:?}: {t:?}"));
        }
    }
    Ok(())
}

fn check_stream(ep: Ep, text: &str, want: usize) -> Result<Vec<String>, String> {
    let events = parse_sse(text);
    let tail = last(text, 300);
    if ep == Ep::Messages {
        let names: Vec<&str> = events.iter().filter_map(|(n, _)| n.as_deref()).collect();
        if names.first() != Some(&"message_start") || names.last() != Some(&"message_stop") {
            return Err(format!(
                "Anthropic stream not message_start..message_stop: {tail}"
            ));
        }
        if names.contains(&"error") {
            return Err(format!("error event in a 200 stream: {text}"));
        }
        let mut out = String::new();
        for (_, d) in &events {
            let v: Value =
                serde_json::from_str(d).map_err(|e| format!("event data not JSON ({e}): {d}"))?;
            if let Some(t) = v["delta"]["text"].as_str() {
                out.push_str(t);
            }
        }
        return Ok(vec![out]);
    }
    if events.last().map(|(_, d)| d.as_str()) != Some("[DONE]") {
        return Err(format!("OpenAI stream does not end in [DONE]: {tail}"));
    }
    let mut finished = vec![false; want];
    let mut texts = vec![String::new(); want];
    for (_, d) in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(d).map_err(|e| format!("chunk not JSON ({e}): {d}"))?;
        if v.get("error").is_some() {
            return Err(format!("error chunk in a 200 stream: {d}"));
        }
        for c in v["choices"].as_array().into_iter().flatten() {
            let i = c["index"].as_u64().unwrap_or(u64::MAX) as usize;
            if i >= want {
                return Err(format!("choice index {i} of {want}: {d}"));
            }
            let piece = c["delta"]["content"].as_str().or(c["text"].as_str());
            texts[i].push_str(piece.unwrap_or_default());
            if c["finish_reason"].is_string() {
                finished[i] = true;
            }
        }
    }
    if !finished.iter().all(|f| *f) {
        return Err(format!(
            "not every one of {want} choices finished: {finished:?}"
        ));
    }
    Ok(texts)
}

/// `GET /v1/models/{id}` with odd ids: 200 for the served names, else a 4xx in the OpenAI shape.
async fn check_model_ids(c: &reqwest::Client, s: &Server) -> Vec<String> {
    let ids = [
        "local".to_string(),
        "switchyard-tiny-model".to_string(),
        "nope".to_string(),
        "x".repeat(10_000),
        "%FF".into(),
        "%00".into(),
        "%C3%28".into(),
        "a%2Fb".into(),
        "..".into(),
        "%F0%9F%98%80".into(),
        "%20".into(),
        "auto%3Fx%3D1".into(),
    ];
    let mut failures = vec![];
    for id in ids {
        let r = c.get(s.url(&format!("/v1/models/{id}"))).send().await;
        let shown = &id[..id.len().min(40)];
        let Ok(r) = r else {
            failures.push(format!("/v1/models/{shown}: no response"));
            continue;
        };
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        let case = Case {
            ep: Ep::Chat,
            body: Body::Json(Value::Null),
            content_type: None,
            headers: vec![],
            target: None,
            what: format!("GET /v1/models/{shown}"),
            expect: None,
            abandon: false,
        };
        let reply = Reply {
            status,
            content_type: String::new(),
            text: text.clone(),
        };
        let ok = match status {
            200 => serde_json::from_str::<Value>(&text).is_ok_and(|v| v["object"] == "model"),
            400..=499 => check_error(&case, &reply).is_ok(),
            _ => false,
        };
        if !ok {
            failures.push(format!("GET /v1/models/{shown}: HTTP {status}: {text}"));
        }
    }
    failures
}

/// After the run: healthy, nothing running or waiting, no KV block in use, no 5xx counted,
/// nothing panicked.
async fn check_after(c: &reqwest::Client, s: &Server) -> Result<(), String> {
    let health = c.get(s.url("/health")).send().await;
    if !health.as_ref().is_ok_and(|r| r.status() == 200) {
        return Err(format!("/health after the run: {health:?}"));
    }
    let t0 = Instant::now();
    loop {
        let text = c
            .get(s.url("/metrics"))
            .send()
            .await
            .map_err(|e| format!("/metrics: {e}"))?
            .text()
            .await
            .map_err(|e| format!("/metrics: {e}"))?;
        let running = metric(&text, "switchyard_num_requests_running");
        let waiting = metric(&text, "switchyard_num_requests_waiting");
        let used = metric(&text, "switchyard_kv_cache_blocks_used");
        let server_errors: f64 = ["status=\"5"]
            .iter()
            .map(|l| metric_sum(&text, "switchyard_http_requests_total", &[l]))
            .sum();
        if server_errors > 0.0 {
            return Err(format!("/metrics counts {server_errors} 5xx responses"));
        }
        if running == Some(0.0) && waiting == Some(0.0) && used == Some(0.0) {
            break;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "lost work 10 s after the run: running={running:?} waiting={waiting:?} kv_blocks_used={used:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = s.log();
    if log.contains("panicked") {
        return Err(format!("the server panicked:\n{log}"));
    }
    Ok(())
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn bad_input_gets_a_named_4xx_never_a_5xx_hang_or_lost_work() {
    let s = Server::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let c = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("client");
    let cases = env_u64("HTTP_FUZZ_CASES").map_or(DEFAULT_CASES, |n| n as u32);
    let config = Config {
        cases,
        failure_persistence: None,
        // Each shrink step is a request; a few dozen find a small case.
        max_shrink_iters: 64,
        ..Config::default()
    };
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&env_u64("HTTP_FUZZ_SEED").unwrap_or(4).to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed);
    let mut runner = TestRunner::new_with_rng(config, rng);
    let t0 = Instant::now();
    let statuses = std::cell::RefCell::new(std::collections::BTreeMap::<u16, usize>::new());
    // `HTTP_FUZZ_SURVEY=1`: run every case and list every failure (no shrinking), to see all
    // the bugs at once rather than the first one.
    let survey = std::env::var_os("HTTP_FUZZ_SURVEY").is_some();
    let found = std::cell::RefCell::new(Vec::<String>::new());
    let result = runner.run(&case(), |case| {
        let outcome = rt.block_on(send(&c, &s, &case)).and_then(|reply| {
            *statuses.borrow_mut().entry(reply.status).or_default() += 1;
            check(&case, &reply)
        });
        match outcome {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = format!("{} {}: {e}", case.ep.path(), case.what);
                if survey {
                    found.borrow_mut().push(e);
                    Ok(())
                } else {
                    Err(TestCaseError::fail(e))
                }
            }
        }
    });
    eprintln!(
        "http_fuzz: {cases} cases in {:.1} s, statuses {:?}",
        t0.elapsed().as_secs_f64(),
        statuses.borrow()
    );
    let found = found.into_inner();
    assert!(
        found.is_empty(),
        "{} failures:\n{}",
        found.len(),
        found.join("\n\n")
    );
    if let Err(e) = result {
        panic!("{e}\nserver log tail:\n{}", last(&s.log(), 3000));
    }
    let failures = rt.block_on(check_model_ids(&c, &s));
    assert!(failures.is_empty(), "{failures:#?}");
    if let Err(e) = rt.block_on(check_after(&c, &s)) {
        panic!("{e}");
    }
}

/// `s` cut to its first 200 bytes or a little more, on a character boundary.
fn shorten(s: &str) -> String {
    let mut i = s.len().min(200);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    if i < s.len() {
        format!("{}... ({} bytes)", &s[..i], s.len())
    } else {
        s.to_string()
    }
}

/// The last `n` bytes of `s` or a little more, on a character boundary.
fn last(s: &str, n: usize) -> &str {
    let mut i = s.len().saturating_sub(n);
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    &s[i..]
}

/// The bugs the property test found, as fixed cases.
#[tokio::test]
async fn found_bugs_stay_fixed() {
    let s = Server::start();
    let chat = |extra: Value| {
        let mut b = json!({"model": "local", "max_tokens": 4,
                           "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().into_iter().flatten() {
            b[k] = v.clone();
        }
        b
    };
    // 1. A context overflow through `max_completion_tokens` told the client to lower
    //    `max_tokens`, a field it had not sent.
    let r = post(
        &s,
        "/v1/chat/completions",
        chat(json!({"max_completion_tokens": 511})),
        &[],
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text);
    let v = r.json();
    let e = openai_error(&v);
    assert_eq!(e["code"], "context_length_exceeded");
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("lower max_completion_tokens")),
        "{v}"
    );
    // 2. The Anthropic shape has no `param`; its context error now names the fields.
    let r = post(
        &s,
        "/v1/messages",
        json!({"model": "local", "max_tokens": 4, "system": "word ".repeat(2000),
               "messages": [{"role": "user", "content": "hi"}]}),
        &[],
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text);
    let v = r.json();
    let m = anthropic_error(&v)["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(m.contains("system and messages"), "{m}");
    // 3. A temperature below f32's 1/T range (1e-45) left the sampler no candidate: HTTP 500,
    //    or an error chunk inside a 200 stream. It now samples the argmax.
    for stream in [false, true] {
        let r = post(
            &s,
            "/v1/completions",
            json!({"model": "local", "prompt": "abc", "max_tokens": 4, "temperature": 1e-45,
                   "stream": stream}),
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(!r.text.contains("\"error\""), "{}", r.text);
    }
    // 4. A repetition penalty of 1e-45 turned the prompt's positive logits into +inf: the same
    //    failure. 1e-308 and 1e308 (0 and inf as f32) were refused by the engine under
    //    `param: "sampling"`; they are now refused up front, naming the field (and `top_p`).
    let r = post(
        &s,
        "/v1/chat/completions",
        chat(json!({"repetition_penalty": 1e-45, "stream": true})),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(!r.text.contains("\"error\""), "{}", r.text);
    for (field, value) in [
        ("repetition_penalty", json!(1e-308)),
        ("repetition_penalty", json!(1e308)),
        ("top_p", json!(1e-308)),
    ] {
        let r = post(&s, "/v1/chat/completions", chat(json!({field: value})), &[]).await;
        assert_eq!(r.status, 400, "{field}={value}: {}", r.text);
        assert_eq!(openai_error(&r.json())["param"], field, "{}", r.text);
    }
    // 5. 64 prompts x n=16 is more choices than the queue holds (256 by default): it was a
    //    429 "retry later" that no retry could pass; it is a 400 naming `n`.
    let r = post(
        &s,
        "/v1/completions",
        json!({"model": "local", "prompt": vec!["p"; 64], "n": 16, "max_tokens": 2}),
        &[],
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(openai_error(&r.json())["param"], "n", "{}", r.text);
    // 6. `GET /v1/models/{id}` with an id that is not UTF-8 answered axum's plain-text 400.
    for id in ["%FF", "%C3%28"] {
        let r = common::client()
            .get(s.url(&format!("/v1/models/{id}")))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 400, "{id}");
        let v: Value = r.json().await.expect("JSON error body");
        assert_eq!(openai_error(&v)["param"], "model", "{v}");
    }
    let after = reqwest::Client::new();
    if let Err(e) = check_after(&after, &s).await {
        panic!("{e}");
    }
}
