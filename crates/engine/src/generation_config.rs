//! The model's own sampling defaults from its `generation_config.json`, applied the way vLLM
//! applies them (`--generation-config auto`, vLLM's default since 0.7): a request that leaves
//! `temperature`, `top_p`, `top_k`, `min_p` or `repetition_penalty` unset gets the model's
//! value instead of the API's default, and a request without a token limit stops after the
//! model's `max_new_tokens`. A value the request sets always wins. Other keys (`do_sample`,
//! beam settings, `eos_token_id`, which [`crate::tokenizer`] reads) are ignored, as in vLLM.

use std::path::{Path, PathBuf};

use crate::sampling::SamplingParams;
use crate::tokenizer::GENERATION_CONFIG_FILE;

/// Errors reading a generation config; each names the file, and the key where one is at fault.
#[derive(Debug, thiserror::Error)]
pub enum GenerationConfigError {
    /// The file exists but could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not a JSON object.
    #[error("{} is not a valid generation config: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// A key's value is outside the range requests may use.
    #[error("{}: {key} {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

/// The sampling keys of a `generation_config.json` that become request defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    /// Default `temperature`.
    pub temperature: Option<f32>,
    /// Default `top_p`.
    pub top_p: Option<f32>,
    /// Default `top_k` (0 or -1: no top-k, as in a request).
    pub top_k: Option<i64>,
    /// Default `min_p`.
    pub min_p: Option<f32>,
    /// Default `repetition_penalty`.
    pub repetition_penalty: Option<f32>,
    /// Default token limit for requests that set none.
    pub max_new_tokens: Option<usize>,
}

/// Which of the defaultable sampling fields a request set itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetFields {
    /// `temperature` was in the request.
    pub temperature: bool,
    /// `top_p` was in the request.
    pub top_p: bool,
    /// `top_k` was in the request.
    pub top_k: bool,
    /// `min_p` was in the request.
    pub min_p: bool,
    /// `repetition_penalty` was in the request.
    pub repetition_penalty: bool,
}

impl GenerationDefaults {
    /// The defaults in `dir`'s `generation_config.json`; none when the file does not exist.
    pub fn from_dir(dir: &Path) -> Result<Self, GenerationConfigError> {
        let path = dir.join(GENERATION_CONFIG_FILE);
        if !path.is_file() {
            return Ok(Self::default());
        }
        Self::from_file(&path)
    }

    /// The defaults in a `generation_config.json`, range-checked as request fields are.
    pub fn from_file(path: &Path) -> Result<Self, GenerationConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| GenerationConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&text).map_err(|source| GenerationConfigError::Parse {
                path: path.to_path_buf(),
                source,
            })?;
        // Key by key, so that a value of the wrong type is named (null counts as absent).
        fn key<T: serde::de::DeserializeOwned>(
            map: &serde_json::Map<String, serde_json::Value>,
            path: &Path,
            key: &'static str,
        ) -> Result<Option<T>, GenerationConfigError> {
            match map.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|e| {
                    GenerationConfigError::Invalid {
                        path: path.to_path_buf(),
                        key,
                        message: format!("has the wrong type: {e}"),
                    }
                }),
            }
        }
        let d = Self {
            temperature: key(&map, path, "temperature")?,
            top_p: key(&map, path, "top_p")?,
            top_k: key(&map, path, "top_k")?,
            min_p: key(&map, path, "min_p")?,
            repetition_penalty: key(&map, path, "repetition_penalty")?,
            max_new_tokens: key(&map, path, "max_new_tokens")?,
        };
        d.check(path)?;
        Ok(d)
    }

    fn check(&self, path: &Path) -> Result<(), GenerationConfigError> {
        let bad = |key, message: String| GenerationConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            message,
        };
        let in_range = |key, v: Option<f32>, ok: fn(f32) -> bool, range: &str| match v {
            Some(x) if !(x.is_finite() && ok(x)) => {
                Err(bad(key, format!("must be {range}, got {x}")))
            }
            _ => Ok(()),
        };
        in_range(
            "temperature",
            self.temperature,
            |x| (0.0..=2.0).contains(&x),
            "in [0, 2]",
        )?;
        in_range("top_p", self.top_p, |x| x > 0.0 && x <= 1.0, "in (0, 1]")?;
        in_range(
            "min_p",
            self.min_p,
            |x| (0.0..=1.0).contains(&x),
            "in [0, 1]",
        )?;
        in_range(
            "repetition_penalty",
            self.repetition_penalty,
            |x| x > 0.0,
            "positive",
        )?;
        if let Some(k) = self.top_k.filter(|&k| k < -1) {
            return Err(bad("top_k", format!("must be -1, 0 or positive, got {k}")));
        }
        if self.max_new_tokens == Some(0) {
            return Err(bad("max_new_tokens", "must be positive, got 0".into()));
        }
        Ok(())
    }

    /// Whether there is nothing to apply.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The defaults as `key=value` pairs, for the start-up log.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        let mut add = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                parts.push(format!("{k}={v}"));
            }
        };
        add("temperature", self.temperature.map(|x| x.to_string()));
        add("top_p", self.top_p.map(|x| x.to_string()));
        add("top_k", self.top_k.map(|x| x.to_string()));
        add("min_p", self.min_p.map(|x| x.to_string()));
        add(
            "repetition_penalty",
            self.repetition_penalty.map(|x| x.to_string()),
        );
        add("max_new_tokens", self.max_new_tokens.map(|x| x.to_string()));
        parts.join(", ")
    }

    /// Fills the fields the request left unset with the model's values.
    pub fn apply(&self, p: &mut SamplingParams, set: SetFields) {
        if let (false, Some(t)) = (set.temperature, self.temperature) {
            p.temperature = t;
        }
        if let (false, Some(x)) = (set.top_p, self.top_p) {
            p.top_p = x;
        }
        if let (false, Some(k)) = (set.top_k, self.top_k) {
            p.top_k = usize::try_from(k).ok().filter(|&k| k > 0);
        }
        if let (false, Some(x)) = (set.min_p, self.min_p) {
            p.min_p = x;
        }
        if let (false, Some(x)) = (set.repetition_penalty, self.repetition_penalty) {
            p.repetition_penalty = x;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(json: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(GENERATION_CONFIG_FILE);
        std::fs::write(&p, json).unwrap();
        (d, p)
    }

    #[test]
    fn hunyuan_style_config_fills_only_unset_fields() {
        // Tencent's Hunyuan generation configs carry sampling defaults like these.
        let (d, _) = write(
            r#"{"do_sample": true, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05,
                "temperature": 0.7, "eos_token_id": [127960], "max_new_tokens": 512}"#,
        );
        let g = GenerationDefaults::from_dir(d.path()).unwrap();
        assert_eq!(g.max_new_tokens, Some(512));
        let mut p = SamplingParams::default();
        g.apply(&mut p, SetFields::default());
        assert_eq!(
            (
                p.temperature,
                p.top_p,
                p.top_k,
                p.min_p,
                p.repetition_penalty
            ),
            (0.7, 0.8, Some(20), 0.0, 1.05)
        );
        // A field the request set keeps the request's value, even when it equals the API
        // default.
        let mut p = SamplingParams::default();
        let set = SetFields {
            temperature: true,
            top_k: true,
            ..SetFields::default()
        };
        g.apply(&mut p, set);
        assert_eq!((p.temperature, p.top_p, p.top_k), (1.0, 0.8, None));
        assert_eq!(
            g.summary(),
            "temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, max_new_tokens=512"
        );
    }

    #[test]
    fn missing_file_or_keys_change_nothing() {
        let d = tempfile::tempdir().unwrap();
        assert!(GenerationDefaults::from_dir(d.path()).unwrap().is_empty());
        let (d, _) = write(r#"{"bos_token_id": 1, "eos_token_id": 2}"#);
        let g = GenerationDefaults::from_dir(d.path()).unwrap();
        assert!(g.is_empty());
        let mut p = SamplingParams::default();
        g.apply(&mut p, SetFields::default());
        assert_eq!(p, SamplingParams::default());
        // top_k -1 and 0 mean "no top-k", as in a request.
        let (d, _) = write(r#"{"top_k": -1}"#);
        let mut p = SamplingParams {
            top_k: Some(5),
            ..SamplingParams::default()
        };
        GenerationDefaults::from_dir(d.path())
            .unwrap()
            .apply(&mut p, SetFields::default());
        assert_eq!(p.top_k, None);
    }

    #[test]
    fn bad_values_name_the_file_and_key() {
        for (json, key) in [
            (r#"{"temperature": -0.5}"#, "temperature"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"min_p": 1.5}"#, "min_p"),
            (r#"{"repetition_penalty": 0}"#, "repetition_penalty"),
            (r#"{"top_k": -3}"#, "top_k"),
            (r#"{"max_new_tokens": 0}"#, "max_new_tokens"),
            (r#"{"temperature": "warm"}"#, "temperature"),
        ] {
            let (_d, p) = write(json);
            let e = GenerationDefaults::from_file(&p).unwrap_err().to_string();
            assert!(
                e.contains(GENERATION_CONFIG_FILE) && e.contains(key),
                "{json}: {e}"
            );
        }
    }
}
