//! Token usage normalisation and the cost model.
//!
//! The two wire formats count cached prompt tokens differently:
//! - OpenAI `usage.prompt_tokens` **includes** `usage.prompt_tokens_details.cached_tokens`;
//! - Anthropic `usage.input_tokens` **excludes** `cache_read_input_tokens` and
//!   `cache_creation_input_tokens`.
//!
//! [`Usage`] holds disjoint counts (uncached input, cache reads, cache writes, output), so
//! `cost = Σ price × tokens` is the same formula for every tier.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Tokens in a price table are quoted per million.
const TOKENS_PER_PRICE_UNIT: f64 = 1_000_000.0;

/// Prices of one tier in USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Prices {
    /// Uncached prompt tokens.
    pub input_usd_per_mtok: f64,
    /// Generated tokens.
    pub output_usd_per_mtok: f64,
    /// Prompt tokens served from the provider's prompt cache.
    pub cached_input_usd_per_mtok: f64,
    /// Prompt tokens written to the provider's prompt cache (Anthropic bills these separately).
    pub cache_write_usd_per_mtok: f64,
}

/// Normalised token counts of one response; the four counts are disjoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens billed at the full input price.
    pub input_tokens: u64,
    /// Prompt tokens read from the provider's cache.
    pub cached_input_tokens: u64,
    /// Prompt tokens written to the provider's cache.
    pub cache_write_tokens: u64,
    /// Generated tokens.
    pub output_tokens: u64,
}

fn count(v: &Value, path: &[&str]) -> u64 {
    let mut cur = v;
    for p in path {
        match cur.get(p) {
            Some(next) => cur = next,
            None => return 0,
        }
    }
    cur.as_u64().unwrap_or(0)
}

impl Usage {
    /// From an OpenAI `usage` object (`prompt_tokens` includes the cached ones).
    pub fn from_openai(usage: &Value) -> Usage {
        let prompt = count(usage, &["prompt_tokens"]);
        let cached = count(usage, &["prompt_tokens_details", "cached_tokens"]).min(prompt);
        Usage {
            input_tokens: prompt - cached,
            cached_input_tokens: cached,
            cache_write_tokens: 0,
            output_tokens: count(usage, &["completion_tokens"]),
        }
    }

    /// From an Anthropic `usage` object (`input_tokens` excludes cache reads and writes).
    pub fn from_anthropic(usage: &Value) -> Usage {
        Usage {
            input_tokens: count(usage, &["input_tokens"]),
            cached_input_tokens: count(usage, &["cache_read_input_tokens"]),
            cache_write_tokens: count(usage, &["cache_creation_input_tokens"]),
            output_tokens: count(usage, &["output_tokens"]),
        }
    }

    /// All prompt tokens, cached or not (what OpenAI calls `prompt_tokens`).
    pub fn prompt_tokens(&self) -> u64 {
        self.input_tokens + self.cached_input_tokens + self.cache_write_tokens
    }

    /// Adds another response's counts (e.g. the attempts of a retried request).
    pub fn add(&mut self, other: &Usage) {
        self.input_tokens += other.input_tokens;
        self.cached_input_tokens += other.cached_input_tokens;
        self.cache_write_tokens += other.cache_write_tokens;
        self.output_tokens += other.output_tokens;
    }

    /// Cost in USD at `prices`.
    pub fn cost_usd(&self, prices: &Prices) -> f64 {
        (self.input_tokens as f64 * prices.input_usd_per_mtok
            + self.cached_input_tokens as f64 * prices.cached_input_usd_per_mtok
            + self.cache_write_tokens as f64 * prices.cache_write_usd_per_mtok
            + self.output_tokens as f64 * prices.output_usd_per_mtok)
            / TOKENS_PER_PRICE_UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PRICES: Prices = Prices {
        input_usd_per_mtok: 5.0,
        output_usd_per_mtok: 15.0,
        cached_input_usd_per_mtok: 0.5,
        cache_write_usd_per_mtok: 6.25,
    };

    #[test]
    fn openai_cached_tokens_are_inside_prompt_tokens() {
        let u = Usage::from_openai(&json!({
            "prompt_tokens": 1000, "completion_tokens": 200,
            "prompt_tokens_details": {"cached_tokens": 600}
        }));
        assert_eq!(u.input_tokens, 400);
        assert_eq!(u.cached_input_tokens, 600);
        assert_eq!(u.prompt_tokens(), 1000);
        let want = (400.0 * 5.0 + 600.0 * 0.5 + 200.0 * 15.0) / 1e6;
        assert!((u.cost_usd(&PRICES) - want).abs() < 1e-12);
    }

    #[test]
    fn anthropic_input_tokens_exclude_cache() {
        let u = Usage::from_anthropic(&json!({
            "input_tokens": 50, "output_tokens": 10,
            "cache_read_input_tokens": 900, "cache_creation_input_tokens": 100
        }));
        assert_eq!(u.prompt_tokens(), 1050);
        let want = (50.0 * 5.0 + 900.0 * 0.5 + 100.0 * 6.25 + 10.0 * 15.0) / 1e6;
        assert!((u.cost_usd(&PRICES) - want).abs() < 1e-12);
    }

    #[test]
    fn malformed_usage_counts_zero() {
        let u = Usage::from_openai(
            &json!({"prompt_tokens": "many", "prompt_tokens_details": {"cached_tokens": 5}}),
        );
        assert_eq!(u, Usage::default());
        assert_eq!(Usage::from_anthropic(&json!(null)), Usage::default());
    }
}
