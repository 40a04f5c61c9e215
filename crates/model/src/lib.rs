//! hy_v3 (Tencent Hy3) and related MoE transformers on candle: configuration in both HF
//! dialects, checkpoint loading (safetensors, sharded, hf-hub), the layers, a contiguous KV
//! cache for incremental decoding, and a random-weight test-model generator.
#![deny(missing_docs)]

pub mod config;
pub mod device;
pub mod gguf;
pub mod hy_v3;
pub mod isq;
pub mod kv_cache;
pub mod paged_cache;
pub mod parallel;
pub mod plan;
pub mod presets;
pub mod test_model;
pub mod weights;

use std::path::PathBuf;

pub use config::{ActivationScheme, LayerKind, ModelConfig, Quantization, WeightScales};
pub use device::{gpu_memory, DeviceSpec};
pub use hy_v3::{
    HyV3Model, LoadOptions, Logits, MoeLayer, MoeWeights, MtpOut, MtpSeq, PagedSeq,
    SharedExpertWeights,
};
pub use isq::{IsqType, QUANTIZE_FLAG};
pub use kv_cache::KvCache;
pub use paged_cache::{KvDtype, PagedKvCache};
pub use parallel::{CommError, Communicator, InProcessComm, InProcessGroup, Shard};
pub use weights::{resolve_config, resolve_model, Checkpoint, ScaleGrid, Weights};

/// Everything that can go wrong loading or running a model; messages name the file, tensor
/// or field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// File involved.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A config field is missing or has an unusable value.
    #[error("config field `{field}`: {message}")]
    Config {
        /// Field name.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A config error inside a named file.
    #[error("{path}: {inner}")]
    ConfigFile {
        /// The config file.
        path: PathBuf,
        /// The error.
        inner: Box<ModelError>,
    },
    /// `model_type` is not one this engine runs.
    #[error("unsupported model_type {found:?}; supported: {supported}")]
    UnsupportedModelType {
        /// What the config says.
        found: String,
        /// What is supported.
        supported: String,
    },
    /// A required tensor is not in the checkpoint.
    #[error("tensor `{name}` is missing from the checkpoint in {dir}")]
    MissingTensor {
        /// Expected name.
        name: String,
        /// Model folder.
        dir: PathBuf,
    },
    /// A tensor has a different shape from what the config implies.
    #[error(
        "tensor `{name}` in {path} has shape {found:?}, expected {expected:?} from config.json"
    )]
    ShapeMismatch {
        /// Tensor name.
        name: String,
        /// Shape the config implies.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
        /// File holding it.
        path: PathBuf,
    },
    /// A tensor's dtype cannot be used.
    #[error(
        "tensor `{name}` in {path} has dtype {dtype}; supported: F32, F16, BF16, and F8_E4M3 with a weight_scale"
    )]
    UnsupportedDtype {
        /// Tensor name.
        name: String,
        /// Its dtype.
        dtype: String,
        /// File holding it.
        path: PathBuf,
    },
    /// An FP8 tensor's scales are missing or unusable.
    #[error("tensor `{name}` in {path} {message}")]
    Quantization {
        /// The quantized tensor.
        name: String,
        /// File holding it.
        path: PathBuf,
        /// What is wrong, naming the scale tensor.
        message: String,
    },
    /// A checkpoint file is unreadable, corrupt or inconsistent.
    #[error("{path}: {message}")]
    Checkpoint {
        /// File involved.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// `--model` could not be resolved to files.
    #[error("model {spec:?}: {message}")]
    ModelNotFound {
        /// What the user passed.
        spec: String,
        /// Why it failed.
        message: String,
    },
    /// Bad input to the forward pass.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The model cannot be split over the requested number of ranks as planned.
    #[error("cannot split the model: {message}")]
    Sharding {
        /// The config field (or load setting, e.g. `device`) at fault.
        field: String,
        /// What is wrong, naming the field and the `--tensor-parallel-size` flag.
        message: String,
    },
    /// A load setting cannot be used as given (e.g. quantization on a GPU).
    #[error("{flag}: {message}")]
    LoadOption {
        /// The command-line flag (or `LoadOptions` field) at fault.
        flag: String,
        /// What is wrong.
        message: String,
    },
    /// A collective of a tensor-parallel forward pass failed.
    #[error(transparent)]
    Comm(#[from] crate::parallel::CommError),
    /// A tensor operation failed.
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
    /// An op-layer call failed.
    #[error(transparent)]
    Kernel(#[from] switchyard_kernels::KernelError),
}

impl ModelError {
    /// Attaches the config file's path to a config error.
    pub fn in_file(self, path: &std::path::Path) -> Self {
        match self {
            e @ (ModelError::Config { .. } | ModelError::UnsupportedModelType { .. }) => {
                ModelError::ConfigFile {
                    path: path.to_path_buf(),
                    inner: Box::new(e),
                }
            }
            e => e,
        }
    }
}
