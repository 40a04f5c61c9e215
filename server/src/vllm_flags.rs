//! vLLM's `serve` flags that a launch script written for vLLM carries, so that it starts
//! Switchyard unchanged: CORS (`--allowed-origins` and its siblings), the tool-call and
//! reasoning parser names, and the flags that configure something Switchyard does not have
//! (CUDA graphs, remote code, uvicorn), which are accepted and logged as having no effect.
//!
//! One difference from vLLM on purpose: vLLM answers every origin (`*`) by default, while
//! Switchyard sends no CORS headers unless `--allowed-origins` names some. Its router can spend
//! a paid frontier API's budget, so any web page open in a browser on the same machine must not
//! be able to call it unasked.

use anyhow::{bail, Context, Result};
use axum::http::{HeaderName, HeaderValue, Method};
use switchyard_engine::tool_calls::ToolCallFormat;
use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, CorsLayer};

/// Cross-origin requests from browsers (vLLM's flags and value forms).
#[derive(clap::Args, Debug, Default)]
pub struct CorsArgs {
    /// Origins browsers may call the API from (CORS), as vLLM takes them: a JSON list
    /// (`'["http://localhost:3000"]'`) or a comma-separated list; `*` allows any. Default:
    /// none, no CORS headers (vLLM allows any origin; see NOTES on why not here).
    #[arg(long, value_name = "ORIGINS")]
    pub allowed_origins: Option<String>,
    /// Methods allowed cross-origin (with `--allowed-origins`; default `*`).
    #[arg(long, value_name = "METHODS", requires = "allowed_origins")]
    pub allowed_methods: Option<String>,
    /// Request headers allowed cross-origin (with `--allowed-origins`; default `*`).
    #[arg(long, value_name = "HEADERS", requires = "allowed_origins")]
    pub allowed_headers: Option<String>,
    /// Let cross-origin requests carry credentials (cookies, `Authorization`); needs explicit
    /// origins, methods and headers, since browsers refuse `*` with credentials.
    #[arg(long, requires = "allowed_origins")]
    pub allow_credentials: bool,
}

/// A list flag's entries: a JSON list of strings, or comma-separated.
fn list(flag: &str, v: &str) -> Result<Vec<String>> {
    let t = v.trim();
    let items: Vec<String> = if t.starts_with('[') {
        serde_json::from_str::<Vec<String>>(t)
            .with_context(|| format!("{flag} {v:?}: not a JSON list of strings"))?
    } else {
        t.split(',').map(str::to_string).collect()
    };
    let items: Vec<String> = items
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if items.is_empty() {
        bail!("{flag} {v:?}: names nothing");
    }
    Ok(items)
}

impl CorsArgs {
    /// The CORS layer these flags describe; `None` without `--allowed-origins`.
    pub fn layer(&self) -> Result<Option<CorsLayer>> {
        let Some(origins) = &self.allowed_origins else {
            return Ok(None);
        };
        let any = |v: &[String]| v.iter().any(|s| s == "*");
        let origins = list("--allowed-origins", origins)?;
        let methods = match &self.allowed_methods {
            Some(m) => list("--allowed-methods", m)?,
            None => vec!["*".into()],
        };
        let headers = match &self.allowed_headers {
            Some(h) => list("--allowed-headers", h)?,
            None => vec!["*".into()],
        };
        if self.allow_credentials {
            for (flag, v) in [
                ("--allowed-origins", &origins),
                ("--allowed-methods", &methods),
                ("--allowed-headers", &headers),
            ] {
                if any(v) {
                    bail!(
                        "--allow-credentials cannot be used with {flag} `*` (browsers refuse \
                         credentials with a wildcard); list the allowed values"
                    );
                }
            }
        }
        let origin = if any(&origins) {
            AllowOrigin::any()
        } else {
            let v = origins
                .iter()
                .map(|o| {
                    let ok = (o.starts_with("http://") || o.starts_with("https://"))
                        && !o.ends_with('/');
                    if !ok {
                        bail!(
                            "--allowed-origins: {o:?} is not an origin (scheme://host[:port], \
                             no path or trailing slash)"
                        );
                    }
                    HeaderValue::from_str(o)
                        .with_context(|| format!("--allowed-origins: {o:?} is not a header value"))
                })
                .collect::<Result<Vec<_>>>()?;
            AllowOrigin::list(v)
        };
        let methods = if any(&methods) {
            AllowMethods::any()
        } else {
            AllowMethods::list(
                methods
                    .iter()
                    .map(|m| {
                        Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                            .with_context(|| format!("--allowed-methods: {m:?} is not a method"))
                    })
                    .collect::<Result<Vec<_>>>()?,
            )
        };
        let headers = if any(&headers) {
            AllowHeaders::any()
        } else {
            AllowHeaders::list(
                headers
                    .iter()
                    .map(|h| {
                        HeaderName::from_bytes(h.as_bytes())
                            .with_context(|| format!("--allowed-headers: {h:?} is not a header"))
                    })
                    .collect::<Result<Vec<_>>>()?,
            )
        };
        Ok(Some(
            CorsLayer::new()
                .allow_origin(origin)
                .allow_methods(methods)
                .allow_headers(headers)
                .allow_credentials(self.allow_credentials),
        ))
    }
}

/// vLLM's `--tool-call-parser` names this server reads, and the format each means. `auto`
/// (the default) takes the format the chat template writes.
pub const TOOL_CALL_PARSERS: &[(&str, Option<ToolCallFormat>)] = &[
    ("auto", None),
    ("hermes", Some(ToolCallFormat::Hermes)),
    ("hy_v3", Some(ToolCallFormat::Hy3)),
];

/// The tool-call format `--tool-call-parser` forces, if any.
pub fn tool_call_parser(name: &str) -> Result<Option<ToolCallFormat>> {
    TOOL_CALL_PARSERS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .with_context(|| {
            format!(
                "--tool-call-parser {name:?} is not supported; use one of: {} (auto: the \
                 format the chat template writes)",
                TOOL_CALL_PARSERS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// vLLM's `--reasoning-parser` names for models that write their reasoning between
/// `<think>` and `</think>`, which is what Switchyard's reasoning split reads (always on; see
/// `switchyard_engine::reasoning`).
pub const REASONING_PARSERS: &[&str] = &["hy_v3", "deepseek_r1", "deepseek_v3", "qwen3", "glm45"];

/// Checks a `--reasoning-parser` name.
pub fn reasoning_parser(name: &str) -> Result<()> {
    if REASONING_PARSERS.contains(&name) {
        return Ok(());
    }
    bail!(
        "--reasoning-parser {name:?} is not supported; the reasoning split reads <think> … \
         </think> blocks, as vLLM's {} parsers do",
        REASONING_PARSERS.join(", ")
    )
}

/// vLLM flags for things Switchyard does not have: accepted so vLLM launch lines run, and
/// logged once at start-up as having no effect.
#[derive(clap::Args, Debug, Default)]
pub struct IgnoredArgs {
    /// Accepted for vLLM compatibility; no effect (no remote code runs: the hy_v3 model is
    /// built in).
    #[arg(long)]
    pub trust_remote_code: bool,
    /// Accepted for vLLM compatibility; no effect (there are no CUDA graphs to disable).
    #[arg(long)]
    pub enforce_eager: bool,
    /// Accepted for vLLM compatibility; no effect (engine statistics are in /metrics and not
    /// logged periodically).
    #[arg(long)]
    pub disable_log_stats: bool,
    /// Accepted for vLLM compatibility; no effect (tool_choice "auto" is always served).
    #[arg(long)]
    pub enable_auto_tool_choice: bool,
}

impl IgnoredArgs {
    /// Logs the flags given that have no effect.
    pub fn log(&self) {
        for (on, flag, why) in [
            (
                self.trust_remote_code,
                "--trust-remote-code",
                "no remote code runs; the hy_v3 model is built in",
            ),
            (
                self.enforce_eager,
                "--enforce-eager",
                "there are no CUDA graphs to disable",
            ),
            (
                self.disable_log_stats,
                "--disable-log-stats",
                "engine statistics are in /metrics, not logged periodically",
            ),
            (
                self.enable_auto_tool_choice,
                "--enable-auto-tool-choice",
                "tool_choice \"auto\" is always served",
            ),
        ] {
            if on {
                tracing::info!(flag, "accepted for vLLM compatibility; no effect: {why}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_take_json_or_commas() {
        assert_eq!(
            list("--x", r#"["http://a:1", "https://b"]"#).unwrap(),
            ["http://a:1", "https://b"]
        );
        assert_eq!(list("--x", "GET, POST").unwrap(), ["GET", "POST"]);
        assert!(list("--x", "[1]").unwrap_err().to_string().contains("--x"));
        assert!(list("--x", " , ")
            .unwrap_err()
            .to_string()
            .contains("nothing"));
    }

    #[test]
    fn bad_cors_values_name_the_flag() {
        let cors = |o: &str, m: Option<&str>, cred: bool| CorsArgs {
            allowed_origins: Some(o.into()),
            allowed_methods: m.map(Into::into),
            allowed_headers: None,
            allow_credentials: cred,
        };
        for (args, words) in [
            (cors("localhost:3000", None, false), "not an origin"),
            (cors("http://a/", None, false), "trailing slash"),
            (cors("*", None, true), "--allowed-origins `*`"),
            (cors("http://a", None, true), "--allowed-methods `*`"),
            (cors("http://a", Some("G(T"), false), "--allowed-methods"),
        ] {
            let e = args.layer().unwrap_err().to_string();
            assert!(e.contains(words), "{e}");
        }
        assert!(cors("http://a:3000", Some("GET,post"), false)
            .layer()
            .unwrap()
            .is_some());
        assert!(CorsArgs::default().layer().unwrap().is_none());
    }

    #[test]
    fn parser_names() {
        assert_eq!(tool_call_parser("auto").unwrap(), None);
        assert_eq!(
            tool_call_parser("hy_v3").unwrap(),
            Some(ToolCallFormat::Hy3)
        );
        let e = tool_call_parser("mistral").unwrap_err().to_string();
        assert!(e.contains("hermes") && e.contains("hy_v3"), "{e}");
        reasoning_parser("hy_v3").unwrap();
        let e = reasoning_parser("gptoss").unwrap_err().to_string();
        assert!(e.contains("<think>"), "{e}");
    }
}
