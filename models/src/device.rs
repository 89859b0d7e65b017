//! Device and precision as the command line spells them: `cpu`, `cuda`, `cuda:N`; `f32`, `bf16`,
//! `f16`. One code path serves CPU and CUDA; only these strings differ.

use candle_core::{DType, Device};

use crate::{Error, Result};

/// Parses `cpu`, `cuda` (device 0) or `cuda:N`.
///
/// CUDA needs the crate's `cuda` feature; without it the error says so instead of falling back.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    let ordinal = match spec.as_str() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" | "gpu" => 0,
        s => match s.strip_prefix("cuda:") {
            Some(n) => n
                .parse::<usize>()
                .map_err(|_| Error::input(format!("device {spec:?}: expected cuda:N")))?,
            None => {
                return Err(Error::input(format!(
                    "device {spec:?}: expected cpu, cuda or cuda:N"
                )))
            }
        },
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::input(format!(
            "device {spec:?}: this build has no CUDA support (build with `--features cuda`)"
        )));
    }
    Ok(Device::new_cuda(ordinal)?)
}

/// Parses `f32`, `bf16` or `f16` for weights and activations on `device`.
///
/// Half precision is refused on CPU: candle's CPU matmul has no bf16 kernel and its f16 one is
/// slower than f32, so there is nothing to gain and results would drift for no reason.
pub fn parse_dtype(spec: &str, device: &Device) -> Result<DType> {
    let dtype = match spec.trim().to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "fp16" | "float16" => DType::F16,
        other => {
            return Err(Error::input(format!(
                "dtype {other:?}: expected f32, bf16 or f16"
            )))
        }
    };
    if device.is_cpu() && dtype != DType::F32 {
        return Err(Error::input(format!(
            "dtype {spec}: only f32 is supported on CPU (half precision needs --device cuda)"
        )));
    }
    Ok(dtype)
}

/// A device and the dtype the model weights and activations use on it.
#[derive(Debug, Clone)]
pub struct Precision {
    /// Where the model runs.
    pub device: Device,
    /// Weight and activation dtype; LayerNorm, softmax statistics and branch weights stay f32.
    pub dtype: DType,
}

impl Precision {
    /// f32 on CPU: the exact configuration the parity fixtures are checked in.
    pub fn cpu() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }

    /// Parses a `--device` / `--dtype` pair.
    pub fn parse(device: &str, dtype: &str) -> Result<Self> {
        let device = parse_device(device)?;
        let dtype = parse_dtype(dtype, &device)?;
        Ok(Self { device, dtype })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_nonsense() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("CPU").unwrap().is_cpu());
        let err = parse_device("tpu").unwrap_err().to_string();
        assert!(err.contains("expected cpu, cuda or cuda:N"), "{err}");
        assert!(parse_device("cuda:x").is_err());
    }

    #[test]
    fn half_precision_is_cuda_only() {
        assert_eq!(parse_dtype("f32", &Device::Cpu).unwrap(), DType::F32);
        let err = parse_dtype("bf16", &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("only f32 is supported on CPU"), "{err}");
        assert!(parse_dtype("f64", &Device::Cpu).is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        let err = parse_device("cuda:0").unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }
}
