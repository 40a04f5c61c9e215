//! Test harness: a tiny random model made once per test binary, and `switchyard serve` started
//! as the real binary on a free port (killed when the [`Server`] drops), with its stderr kept so
//! tests can check what it logged.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The switchyard binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// The tiny test model's folder (made on first use; shared by every test in the binary).
pub fn model_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let dir = root.join("switchyard-tiny-model");
        if dir.join("tokenizer.json").is_file() && dir.join("config.json").is_file() {
            return dir;
        }
        // Write elsewhere and rename, so concurrent test binaries never see half a model.
        let tmp = root.join(format!("switchyard-tiny-model.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let out = Command::new(BIN)
            .args([
                "make-test-model",
                "--preset",
                "tiny",
                "--seed",
                "7",
                "--out",
            ])
            .arg(&tmp)
            .output()
            .expect("run make-test-model");
        assert!(
            out.status.success(),
            "make-test-model failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if std::fs::rename(&tmp, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        assert!(dir.join("tokenizer.json").is_file());
        dir
    })
}

/// Runs the switchyard binary with `args`: (exit success, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run switchyard");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The tiny test model's folder as a command-line argument.
pub fn model_arg() -> String {
    model_dir().to_str().expect("utf-8 path").to_string()
}

/// Runs `switchyard generate --model <tiny model> --json` with `args` (input ids, limits, flags):
/// (exit success, stdout, stderr).
pub fn generate_json(args: &[&str]) -> (bool, String, String) {
    let dir = model_arg();
    run_cli(&[&["generate", "--model", dir.as_str(), "--json"], args].concat())
}

/// The `generated_ids` of what `generate --json` printed.
pub fn generated_ids(stdout: &str) -> Vec<u64> {
    let v: Value = serde_json::from_str(stdout.trim()).expect("generate --json prints JSON");
    v["generated_ids"]
        .as_array()
        .expect("generated_ids")
        .iter()
        .map(|x| x.as_u64().expect("id"))
        .collect()
}

/// Runs `switchyard bench --model <tiny model> --prompt-len 8 --gen-len 3 --json` with extra
/// `args`, asserts it succeeded and returns its JSON report.
pub fn bench_json(args: &[&str]) -> Value {
    let dir = model_arg();
    let (ok, out, err) = run_cli(
        &[
            &[
                "bench",
                "--model",
                dir.as_str(),
                "--prompt-len",
                "8",
                "--gen-len",
                "3",
                "--json",
            ],
            args,
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("bench --json prints JSON: {e}: {out}"))
}

/// A running `switchyard serve`.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    log: Arc<Mutex<String>>,
}

/// Options for [`Server::start_with`].
#[derive(Default)]
pub struct Opts<'a> {
    /// Extra flags.
    pub args: &'a [&'a str],
    /// Extra environment variables.
    pub env: &'a [(&'a str, &'a str)],
}

impl Server {
    /// A server with the test defaults (512-token context, 32 MiB KV cache, no key).
    pub fn start() -> Self {
        Self::start_with(Opts::default())
    }

    /// A server with extra flags and environment.
    pub fn start_with(o: Opts<'_>) -> Self {
        Self::start_model(model_dir(), o)
    }

    /// A server for the model in `model`, with extra flags and environment.
    pub fn start_model(model: &Path, o: Opts<'_>) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--port", "0"]);
        // The test defaults, unless the caller sets them.
        for (flag, value) in [("--max-model-len", "512"), ("--kv-cache-memory", "32MiB")] {
            if !o.args.contains(&flag) {
                cmd.args([flag, value]);
            }
        }
        cmd.arg("--model")
            .arg(model)
            .args(o.args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in o.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn switchyard serve");
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().expect("stderr");
        let l2 = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut l) = l2.lock() {
                    l.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("switchyard listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let base = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(b) => b,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "server did not start; log:\n{}",
                    log.lock().map(|l| l.clone()).unwrap_or_default()
                );
            }
        };
        Server { child, base, log }
    }

    /// `base` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Everything the server wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM (via `kill`) and waits up to `timeout` for exit; returns the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client without connection reuse surprises (each test builds its own).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .expect("client")
}

/// Parses an SSE body into `(event name, data)` pairs.
pub fn parse_sse(body: &str) -> Vec<(Option<String>, String)> {
    body.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|block| {
            let mut name = None;
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
                }
            }
            (name, data.join("\n"))
        })
        .collect()
}

/// `GET /metrics` of `s`, as text.
pub async fn metrics_text(s: &Server) -> String {
    client()
        .get(s.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text")
}

/// The value of a Prometheus sample line `name{labels} value` (first match, labels optional).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ') | Some(b'{'))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Sum of every sample of `name` whose labels contain all of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ') | Some(b'{'))
        })
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// A response read to the end: status, headers and body text.
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Response headers.
    pub headers: reqwest::header::HeaderMap,
    /// The body.
    pub text: String,
}

impl Reply {
    /// The body as JSON (panics with the body when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("{e}: {}", self.text))
    }

    /// A header that must be present.
    pub fn header(&self, name: &str) -> &str {
        self.header_opt(name)
            .unwrap_or_else(|| panic!("no {name} header: {:?}", self.headers))
    }

    /// A header, if present.
    pub fn header_opt(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `x-switchyard-cost-usd` header.
    pub fn cost(&self) -> f64 {
        self.header("x-switchyard-cost-usd").parse().unwrap()
    }
}

/// POSTs JSON `body` to `path` with extra `headers` and reads the whole reply.
pub async fn post(s: &Server, path: &str, body: Value, headers: &[(&str, &str)]) -> Reply {
    let mut rb = client().post(s.url(path)).json(&body);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let r = rb.send().await.expect("send");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.expect("body");
    Reply {
        status,
        headers,
        text,
    }
}

/// `GET path`: the status and the JSON body.
pub async fn get(s: &Server, path: &str) -> (u16, Value) {
    let r = client().get(s.url(path)).send().await.expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.expect("json body"))
}

/// Posts `body` to `path` and asserts an HTTP 400 in the OpenAI shape whose `param` is `param`.
pub async fn assert_refused(s: &Server, path: &str, body: Value, param: &str) {
    let r = post(s, path, body.clone(), &[]).await;
    assert_eq!(r.status, 400, "{path} {body}: {}", r.text);
    assert_eq!(
        openai_error(&r.json())["param"],
        param,
        "{path} {body}: {}",
        r.text
    );
}

/// Asserts the OpenAI error shape and returns the `error` object.
pub fn openai_error(v: &Value) -> &Value {
    let e = &v["error"];
    assert!(e.is_object(), "not an OpenAI error: {v}");
    assert!(e["message"].is_string(), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("param").is_some(), "{v}");
    assert!(e.get("code").is_some(), "{v}");
    e
}

/// Asserts the Anthropic error shape and returns the `error` object.
pub fn anthropic_error(v: &Value) -> &Value {
    assert_eq!(v["type"], "error", "{v}");
    let e = &v["error"];
    assert!(e["type"].is_string(), "{v}");
    assert!(e["message"].is_string(), "{v}");
    e
}

/// Asserts the DESIGN.md routing headers.
pub fn assert_routing_headers(h: &reqwest::header::HeaderMap) {
    assert_eq!(
        h.get("x-switchyard-tier").map(|v| v.to_str().unwrap_or("")),
        Some("local")
    );
    assert_eq!(
        h.get("x-switchyard-action")
            .map(|v| v.to_str().unwrap_or("")),
        Some("local")
    );
    assert!(h.get("x-switchyard-reason").is_some());
    assert_eq!(
        h.get("x-switchyard-cost-usd")
            .map(|v| v.to_str().unwrap_or("")),
        Some("0")
    );
}

/// The prompt length the server computes for a one-user-message chat.
pub fn chat_prompt_len(messages: &[(&str, &str)]) -> usize {
    use switchyard_engine::chat::{ChatMessage, ChatTemplate, RenderOptions};
    use switchyard_engine::tokenizer::Tokenizer;
    let tok = Tokenizer::from_dir(model_dir()).expect("tokenizer");
    let t = ChatTemplate::from_model_dir(model_dir())
        .expect("template")
        .with_special_tokens(
            tok.bos_token().map(String::from),
            tok.eos_token().map(String::from),
        );
    let msgs: Vec<ChatMessage> = messages
        .iter()
        .map(|(r, c)| ChatMessage::new(*r, *c))
        .collect();
    let text = t
        .render(&msgs, &RenderOptions::generation())
        .expect("render");
    tok.encode(&text, false).expect("encode").len()
}

/// Fake OpenAI / Anthropic upstream tiers and a server routing over them.
pub mod upstream;
