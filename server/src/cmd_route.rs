//! `switchyard route`: explain the router's decision for a prompt or a request body without
//! serving it (DESIGN.md: prints `{"action", "tier", "reasons", "scores"}`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use switchyard_router::{explain, Policy, RouteRequest, RouterState};

#[derive(clap::Args, Debug)]
pub struct RouteArgs {
    /// Router policy (TOML); default: the built-in models/router/default.toml.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// A prompt, routed as one user message.
    #[arg(long, conflicts_with = "request")]
    prompt: Option<String>,
    /// An OpenAI chat-completions or Anthropic Messages request body (JSON file).
    #[arg(long)]
    request: Option<PathBuf>,
    /// Print the decision as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: RouteArgs) -> Result<()> {
    let policy = match &a.policy {
        Some(p) => Policy::from_path(p)?,
        None => Policy::default_policy(),
    };
    let req = match (&a.prompt, &a.request) {
        (Some(p), _) => RouteRequest::from_prompt(p),
        (None, Some(f)) => {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", f.display()))?;
            RouteRequest::from_json(&v)
                .with_context(|| format!("{} is not a chat request", f.display()))?
        }
        (None, None) => anyhow::bail!("give --prompt TEXT or --request FILE.json"),
    };
    let d = explain(&policy, &req, &RouterState::default());
    if a.json {
        println!("{}", serde_json::to_string(&d)?);
    } else {
        println!(
            "{} → tier {}",
            d.action.as_str(),
            d.tier.as_deref().unwrap_or("none (refused)")
        );
        for r in &d.reasons {
            println!("  - {r}");
        }
    }
    Ok(())
}
