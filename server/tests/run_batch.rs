//! `switchyard run-batch` (vLLM's offline batch runner over the OpenAI Batch API format), run
//! as the real binary on the tiny test model: one output line per input line in input order,
//! bodies equal to what `switchyard serve` answers for the same requests, bad lines answered
//! with the status or error that names their problem, stdin/stdout, and a batch larger than
//! the concurrency limit decoded in shared engine steps with the same greedy tokens as
//! `switchyard generate`.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{generate_json, generated_ids, model_arg, openai_error, post, Opts, Server, BIN};
use serde_json::{json, Value};

/// Flags every run uses: the test server's context and cache, no prefix caching (so
/// `cached_tokens` cannot depend on the order requests ran in).
const ENGINE: &[&str] = &[
    "--max-model-len",
    "512",
    "--kv-cache-memory",
    "32MiB",
    "--no-prefix-caching",
];

/// One batch input line.
fn line(custom_id: &str, url: &str, body: Value) -> String {
    json!({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).to_string()
}

/// Runs `run-batch` with `args` (after the model and engine flags), feeding `stdin`: (exit
/// success, stdout, stderr).
fn run_batch(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(BIN)
        .args(["run-batch", "--model", &model_arg()])
        .args(ENGINE)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn run-batch");
    let mut input = child.stdin.take().expect("stdin");
    let text = stdin.to_string();
    let feeder = std::thread::spawn(move || {
        let _ = input.write_all(text.as_bytes());
    });
    let out = child.wait_with_output().expect("run-batch");
    let _ = feeder.join();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The output lines as JSON, checking every line's envelope: an `id` that starts with
/// `batch_req_`, and exactly one of `response` / `error`.
fn output_lines(text: &str) -> Vec<Value> {
    assert!(
        text.ends_with('\n'),
        "the output ends with a newline: {text:?}"
    );
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            assert!(v["id"].as_str().unwrap().starts_with("batch_req_"), "{v}");
            assert!(v.get("custom_id").is_some(), "{v}");
            assert_ne!(v["response"].is_null(), v["error"].is_null(), "{v}");
            if !v["response"].is_null() {
                assert!(v["response"]["request_id"].is_string(), "{v}");
                assert!(v["response"]["status_code"].is_u64(), "{v}");
            }
            v
        })
        .collect()
}

/// A response body without what differs between two runs of the same request.
fn comparable(mut body: Value) -> Value {
    let o = body.as_object_mut().expect("a JSON object body");
    o.remove("id");
    o.remove("created");
    body
}

#[tokio::test]
async fn batch_lines_come_back_in_order_and_equal_what_serve_answers() {
    let chat = |text: &str, n: u32| {
        json!({"model": "local", "messages": [{"role": "user", "content": text}],
               "max_tokens": n, "temperature": 0})
    };
    let completion = |prompt: Value, n: u32| {
        json!({"model": "local", "prompt": prompt, "max_tokens": n, "temperature": 0,
               "ignore_eos": true})
    };
    // (custom_id, url, body) of the requests that succeed.
    let good = [
        ("chat-1", "/v1/chat/completions", chat("hello there", 6)),
        (
            "cmpl-1",
            "/v1/completions",
            completion(json!("once upon a time"), 9),
        ),
        ("chat-2", "/v1/chat/completions", chat("what is 2 + 2?", 10)),
        (
            "cmpl-2",
            "/v1/completions",
            completion(json!([5, 6, 7, 8]), 12),
        ),
        ("chat-3", "/v1/chat/completions", chat("name a colour", 3)),
        ("cmpl-3", "/v1/completions", completion(json!("the end"), 5)),
    ];
    let good_line = |i: usize| line(good[i].0, good[i].1, good[i].2.clone());
    // Input lines, with what each output line must be: Ok(index into `good`), or the failure.
    enum Want {
        Good(usize),
        /// `response: null`, this error code, a message containing this text.
        Error(Option<&'static str>, &'static str, &'static str),
        /// An OpenAI error body with this status and `param`.
        Refused(&'static str, u64, &'static str),
    }
    let lines: Vec<(String, Want)> =
        vec![
        (good_line(0), Want::Good(0)),
        (
            "{\"custom_id\": \"broken\", \"method\": ".to_string(),
            Want::Error(None, "invalid_json_line", "line 2 is not valid JSON"),
        ),
        (good_line(1), Want::Good(1)),
        (
            json!({"method": "POST", "url": "/v1/completions", "body": completion(json!("x"), 2)})
                .to_string(),
            Want::Error(None, "missing_required_parameter", "custom_id"),
        ),
        (
            line("emb", "/v1/embeddings", json!({"model": "local", "input": "x"})),
            Want::Error(Some("emb"), "invalid_url", "embeddings"),
        ),
        (good_line(2), Want::Good(2)),
        (
            line("nowhere", "/v1/nowhere", completion(json!("x"), 2)),
            Want::Error(Some("nowhere"), "invalid_url", "/v1/nowhere"),
        ),
        (
            json!({"custom_id": "get", "method": "GET", "url": "/v1/completions",
                   "body": completion(json!("x"), 2)})
            .to_string(),
            Want::Error(Some("get"), "invalid_method", "POST"),
        ),
        (
            line(
                "bad-field",
                "/v1/chat/completions",
                json!({"model": "local", "messages": [{"role": "user", "content": "hi"}],
                       "temperature": "hot"}),
            ),
            Want::Refused("bad-field", 400, "temperature"),
        ),
        (good_line(3), Want::Good(3)),
        (
            line(
                "streamed",
                "/v1/completions",
                json!({"model": "local", "prompt": "x", "max_tokens": 2, "stream": true}),
            ),
            Want::Refused("streamed", 400, "stream"),
        ),
        (
            line(
                "no-model",
                "/v1/completions",
                json!({"model": "gpt-nothing", "prompt": "x", "max_tokens": 2}),
            ),
            Want::Refused("no-model", 404, "model"),
        ),
        (good_line(4), Want::Good(4)),
        (good_line(5), Want::Good(5)),
    ];
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    // A blank line between requests is skipped (vLLM's rule), not answered.
    let mut text = String::new();
    for (i, (l, _)) in lines.iter().enumerate() {
        text.push_str(l);
        text.push('\n');
        if i == 5 {
            text.push_str("   \n");
        }
    }
    std::fs::write(&input, text).unwrap();
    let (ok, stdout, stderr) = run_batch(
        &[
            "-i",
            input.to_str().unwrap(),
            "-o",
            output.to_str().unwrap(),
            "--max-num-seqs",
            "4",
        ],
        "",
    );
    assert!(ok, "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    let out = output_lines(&std::fs::read_to_string(&output).unwrap());
    assert_eq!(out.len(), lines.len(), "one output line per input line");
    assert!(
        stderr.contains(&format!(
            "{} lines, {} ok, {} failed",
            lines.len(),
            good.len(),
            lines.len() - good.len()
        )),
        "{stderr}"
    );

    let s = Server::start_with(Opts {
        args: &["--no-prefix-caching"],
        ..Default::default()
    });
    for ((_, want), got) in lines.iter().zip(&out) {
        match want {
            Want::Good(i) => {
                let (id, url, body) = &good[*i];
                assert_eq!(got["custom_id"], *id, "{got}");
                assert!(got["error"].is_null(), "{got}");
                assert_eq!(got["response"]["status_code"], 200, "{got}");
                let served = post(&s, url, body.clone(), &[]).await;
                assert_eq!(served.status, 200, "{}", served.text);
                assert_eq!(
                    comparable(got["response"]["body"].clone()),
                    comparable(served.json()),
                    "{id}: run-batch and serve answer the same"
                );
            }
            Want::Error(id, code, text) => {
                assert_eq!(got["custom_id"], json!(id), "{got}");
                assert!(got["response"].is_null(), "{got}");
                assert_eq!(got["error"]["code"], *code, "{got}");
                let message = got["error"]["message"].as_str().unwrap();
                assert!(message.contains(text), "{got}");
            }
            Want::Refused(id, status, param) => {
                assert_eq!(got["custom_id"], *id, "{got}");
                assert!(got["error"].is_null(), "{got}");
                assert_eq!(got["response"]["status_code"], *status, "{got}");
                let e = openai_error(&got["response"]["body"]);
                assert_eq!(e["param"], *param, "{got}");
            }
        }
    }
}

#[test]
fn stdin_to_stdout_with_more_requests_than_in_flight_batches_them_greedily() {
    let (ok, out, err) = generate_json(&[
        "--input-ids",
        "5,6,7,8",
        "--max-tokens",
        "24",
        "--ignore-eos",
    ]);
    assert!(ok, "{err}");
    let greedy = generated_ids(&out);
    // Different lengths, so requests finish at different steps and new ones join running ones.
    let n = 12;
    let lengths: Vec<usize> = (0..n).map(|i| 4 + (i * 7) % 21).collect();
    let input: String = lengths
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            line(
                &format!("req-{i}"),
                "/v1/completions",
                json!({"model": "local", "prompt": [5, 6, 7, 8], "max_tokens": len,
                       "temperature": 0, "ignore_eos": true, "return_token_ids": true}),
            ) + "\n"
        })
        .collect();
    let (ok, stdout, stderr) = run_batch(&["-i", "-", "-o", "-", "--max-concurrency", "3"], &input);
    assert!(ok, "{stderr}");
    let out = output_lines(&stdout);
    assert_eq!(out.len(), n);
    for (i, (v, &len)) in out.iter().zip(&lengths).enumerate() {
        assert_eq!(v["custom_id"], format!("req-{i}"), "input order");
        assert_eq!(v["response"]["status_code"], 200, "{v}");
        let choice = &v["response"]["body"]["choices"][0];
        assert_eq!(choice["token_ids"], json!(greedy[..len]), "{v}");
    }
    assert!(
        stderr.contains(&format!("{n} lines, {n} ok, 0 failed")),
        "{stderr}"
    );
    // Requests one after another generate one token per engine step; three in flight share
    // steps.
    let per_step: f64 = stderr
        .split(" tokens per engine step")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no tokens per step in {stderr}"));
    assert!(per_step > 1.5, "{per_step} tokens per step: {stderr}");
}

#[test]
fn the_output_is_never_the_input_and_a_missing_input_fails_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let request = line(
        "a",
        "/v1/completions",
        json!({"model": "local", "prompt": "x", "max_tokens": 1}),
    );
    std::fs::write(&input, format!("{request}\n")).unwrap();
    let p = input.to_str().unwrap();
    let (ok, _, err) = run_batch(&["-i", p, "-o", p], "");
    assert!(!ok);
    assert!(err.contains("is the input file"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&input).unwrap(),
        format!("{request}\n")
    );
    let missing = dir.path().join("missing.jsonl");
    let (ok, _, err) = run_batch(&["-i", missing.to_str().unwrap(), "-o", "-"], "");
    assert!(!ok);
    assert!(err.contains("no such file"), "{err}");
    assert!(!err.contains("model loaded"), "{err}");
}
