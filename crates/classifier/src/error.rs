//! The crate's error type.

use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong loading or running the classifier.
#[derive(Debug, Error)]
pub enum ClassifierError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The embedding model could not be found.
    #[error("embedding model not found: {0}")]
    ModelNotFound(String),
    /// A configuration file is missing a field or names something unsupported.
    #[error("bad configuration: {0}")]
    Config(String),
    /// The tokenizer failed to load or to encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A tensor operation failed (shapes, dtypes, missing weights).
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    /// Input the classifier cannot score.
    #[error("bad input: {0}")]
    Input(String),
    /// A data file (exemplars, RouteLLM CSV, fitted artifact) is malformed.
    #[error("{path}: {message}")]
    Data {
        /// The file (or data set) at fault.
        path: String,
        /// What is wrong, and where.
        message: String,
    },
}

impl ClassifierError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn data(path: impl std::fmt::Display, message: impl Into<String>) -> Self {
        Self::Data {
            path: path.to_string(),
            message: message.into(),
        }
    }
}

/// Shorthand.
pub type Result<T, E = ClassifierError> = std::result::Result<T, E>;
