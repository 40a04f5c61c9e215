//! A redacting wrapper for upstream API keys.
//!
//! Keys are read from the environment variable a tier names (`api_key_env`) and must never reach
//! a log line, a telemetry record, a decision or an error message. [`ApiKey`] prints, debugs and
//! serialises as `[redacted]`; the only way to the bytes is [`ApiKey::expose`], which the upstream
//! client calls when it builds the `Authorization` / `x-api-key` header.

use std::fmt;

use serde::{Serialize, Serializer};

/// What every redacted value prints as.
pub const REDACTED: &str = "[redacted]";

/// An upstream credential. Debug, Display and Serialize never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key read from the environment or a secret store.
    pub fn new(value: impl Into<String>) -> Self {
        ApiKey(value.into())
    }

    /// The key itself, for building the request header. Never log the result.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Reads the key from `var` through `env`; `None` when unset or blank (a blank key is treated
    /// as unset so a `FOO=` line in a `.env` file disables the tier instead of sending `Bearer `).
    pub fn from_env(var: &str, env: &crate::state::EnvSource) -> Option<ApiKey> {
        env.get(var)
            .filter(|v| !v.trim().is_empty())
            .map(|v| ApiKey(v.trim().to_string()))
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({REDACTED})")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for ApiKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_never_printed() {
        let k = ApiKey::new("sk-live-abcdef0123456789");
        assert_eq!(format!("{k}"), REDACTED);
        assert!(!format!("{k:?}").contains("abcdef"));
        assert!(!serde_json::to_string(&k).unwrap().contains("abcdef"));
        assert_eq!(k.expose(), "sk-live-abcdef0123456789");
    }
}
