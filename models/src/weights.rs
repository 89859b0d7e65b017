//! Opening a checkpoint file as a `VarBuilder`: safetensors (memory-mapped) or a PyTorch zip pickle.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::{Error, Result};

/// The first of `names` that exists in `dir`, or an error listing what was looked for.
pub(crate) fn find_file(dir: &Path, names: &[&str]) -> Result<PathBuf> {
    if !dir.is_dir() {
        return Err(Error::Io {
            path: dir.to_path_buf(),
            cause: std::io::Error::new(std::io::ErrorKind::NotFound, "model folder not found"),
        });
    }
    names
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::Io {
            path: dir.to_path_buf(),
            cause: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("model folder has none of {}", names.join(", ")),
            ),
        })
}

/// Reads and parses a JSON config file.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|cause| Error::Io {
        path: path.to_path_buf(),
        cause,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::config(path, e.to_string()))
}

/// A `VarBuilder` over one checkpoint file, converting every tensor to `dtype` on `device`.
///
/// `.safetensors` files are memory-mapped; anything else is read as a PyTorch zip pickle, taking the
/// state dict under `state_key` (e.g. `"model"` for `{"model": state_dict}`) when the file has one.
pub(crate) fn var_builder(
    path: &Path,
    state_key: Option<&str>,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let wrap = |cause| Error::Weights {
        path: path.to_path_buf(),
        cause,
    };
    if path.extension().is_some_and(|e| e == "safetensors") {
        // Safety: the mmap is only unsound if the file is modified while mapped, which a model
        // folder is not expected to be (the same contract as every candle model loader).
        return unsafe { VarBuilder::from_mmaped_safetensors(&[path], dtype, device) }
            .map_err(wrap);
    }
    let Some(key) = state_key else {
        return VarBuilder::from_pth(path, dtype, device).map_err(wrap);
    };
    // A plain state dict is accepted too: users often re-save `ckpt["model"]` on its own.
    match candle_core::pickle::PthTensors::new(path, Some(key)) {
        Ok(t) if !t.tensor_infos().is_empty() => {
            Ok(VarBuilder::from_backend(Box::new(t), dtype, device.clone()))
        }
        _ => VarBuilder::from_pth(path, dtype, device).map_err(wrap),
    }
}
