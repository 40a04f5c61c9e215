//! Choosing the device a model runs on (`--device cpu|cuda|cuda:N|auto`, mistral.rs's and
//! vLLM's spelling) and asking it how much memory is free, which sizes the KV cache.
//!
//! A build without the `cuda` feature refuses CUDA devices with a sentence that says how to get
//! them; `auto` then means the CPU.

use candle_core::Device;

use crate::ModelError;

/// Where to run: parsed from `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The first GPU when this build has CUDA and a GPU answers, otherwise the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// The CUDA device with this ordinal.
    Cuda(usize),
}

impl DeviceSpec {
    /// Parses `auto`, `cpu`, `cuda` (ordinal 0) or `cuda:N`.
    pub fn parse(s: &str) -> Result<Self, ModelError> {
        let bad = |why: String| ModelError::InvalidInput(format!("--device {s:?}: {why}"));
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            o => match o.strip_prefix("cuda:") {
                Some(n) => n.parse().map(Self::Cuda).map_err(|_| {
                    bad(format!(
                        "{n:?} is not a device ordinal; use cuda:0, cuda:1, ..."
                    ))
                }),
                None => Err(bad("use cpu, cuda, cuda:N or auto".into())),
            },
        }
    }

    /// Opens the device. `Auto` falls back to the CPU when there is no usable GPU; an explicit
    /// CUDA device that cannot be opened is an error naming it.
    pub fn open(self) -> Result<Device, ModelError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => Ok(open_cuda(0).unwrap_or(Device::Cpu)),
            Self::Cuda(n) => open_cuda(n),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device, ModelError> {
    Device::new_cuda(ordinal).map_err(|e| {
        ModelError::InvalidInput(format!("--device cuda:{ordinal} cannot be opened: {e}"))
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Device, ModelError> {
    Err(ModelError::InvalidInput(format!(
        "--device cuda:{ordinal}: this switchyard was built without CUDA support; rebuild with \
         `cargo build --release --features cuda` or use --device cpu"
    )))
}

/// Free and total bytes of a GPU device; `None` for the CPU (whose memory the caller reads from
/// the operating system).
pub fn gpu_memory(device: &Device) -> Result<Option<(usize, usize)>, ModelError> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => Ok(Some(switchyard_kernels::cuda::memory_info(device)?)),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_spellings_and_names_bad_ones() {
        assert_eq!(DeviceSpec::parse("cpu").unwrap(), DeviceSpec::Cpu);
        assert_eq!(DeviceSpec::parse("AUTO").unwrap(), DeviceSpec::Auto);
        assert_eq!(DeviceSpec::parse("cuda").unwrap(), DeviceSpec::Cuda(0));
        assert_eq!(DeviceSpec::parse("cuda:3").unwrap(), DeviceSpec::Cuda(3));
        let e = DeviceSpec::parse("cuda:x").unwrap_err().to_string();
        assert!(e.contains("--device") && e.contains("\"x\""), "{e}");
        let e = DeviceSpec::parse("tpu").unwrap_err().to_string();
        assert!(e.contains("cpu, cuda, cuda:N or auto"), "{e}");
    }

    #[test]
    fn cpu_and_auto_open_without_a_gpu() {
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
        // `auto` is the CPU unless this build has CUDA and a GPU.
        let d = DeviceSpec::Auto.open().unwrap();
        assert!(d.is_cpu() || cfg!(feature = "cuda"));
        assert_eq!(gpu_memory(&Device::Cpu).unwrap(), None);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        let e = DeviceSpec::Cuda(1).open().unwrap_err().to_string();
        assert!(e.contains("cuda:1") && e.contains("--features cuda"), "{e}");
    }
}
