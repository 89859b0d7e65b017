//! Checkpoint folders of a run: `DATA_DIR/alignment/<run_id>/step-<N>/`, and the `latest`
//! pointer file beside them.
//!
//! A checkpoint is what `Alignment::load` reads (`alignment.safetensors` + `alignment.json`)
//! plus what a resume needs and what a reader wants to know: `run.toml` (the run config),
//! `split.json`, `fingerprints.json` (base weights and the checkpoint's own fingerprint),
//! `optimizer.safetensors` (AdamW moments) and `trainer_state.json` (step, epoch, seed). A folder
//! is written beside its final name and renamed into place, and `latest` is replaced atomically
//! after it, so a kill at any moment leaves the previous checkpoint intact and pointed to.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use gigapath_models::align::{self, AlignmentConfig};
use serde::{Deserialize, Serialize};

use crate::data::Split;
use crate::error::{Result, TrainError};
use crate::optim::AdamW;

/// The pointer file naming the newest complete checkpoint folder.
pub const LATEST: &str = "latest";
/// The run config inside a checkpoint and in the run folder.
pub const RUN_CONFIG: &str = "run.toml";
/// The run's train / validation split ([`Split`]) inside a checkpoint.
pub const SPLIT: &str = "split.json";
/// Base and alignment weight fingerprints (role -> fingerprint) inside a checkpoint.
pub const FINGERPRINTS: &str = "fingerprints.json";
/// AdamW's moment estimates inside a checkpoint.
pub const OPTIMIZER: &str = "optimizer.safetensors";
/// The [`TrainerState`] inside a checkpoint.
pub const STATE: &str = "trainer_state.json";

/// Where a run stopped, for an exact resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// The run.
    pub run_id: String,
    /// Optimizer steps done.
    pub step: u64,
    /// Micro-batches drawn (`step x grad_accum_steps`).
    pub micro_batches: u64,
    /// Epoch of the next micro-batch.
    pub epoch: u64,
    /// AdamW's bias-correction count.
    pub optimizer_t: u64,
    /// The run seed; with `micro_batches` it fixes every later batch (see `data::BatchOrder`).
    pub seed: u64,
    /// Training pairs the order is drawn over.
    pub train_pairs: usize,
}

/// Everything one checkpoint holds.
pub struct CheckpointContents<'a> {
    /// The alignment model's architecture.
    pub alignment: &'a AlignmentConfig,
    /// Its trainable weights.
    pub varmap: &'a VarMap,
    /// The optimizer, for its moment estimates.
    pub optimizer: &'a AdamW,
    /// Where the run is.
    pub state: &'a TrainerState,
    /// The run config, as TOML.
    pub run_toml: &'a str,
    /// The train / validation split.
    pub split: &'a Split,
    /// Base weights (`tile`, `slide`, `text`).
    pub base_fingerprints: &'a BTreeMap<String, String>,
}

/// Name of the folder of step `step`.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step}")
}

/// Writes `run_dir/step-<N>/` and points `latest` at it; returns the folder and the
/// checkpoint's fingerprint (the one stored embeddings will carry).
pub fn write(run_dir: &Path, c: &CheckpointContents) -> Result<(PathBuf, String)> {
    let name = step_dir_name(c.state.step);
    let final_dir = run_dir.join(&name);
    let staging = run_dir.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let result = (|| -> Result<String> {
        align::save_checkpoint(&staging, c.alignment, c.varmap)?;
        let fingerprint = gigapath_pipeline::fingerprint::model_fingerprint(&staging)?;
        write_text(&staging.join(RUN_CONFIG), c.run_toml)?;
        write_json(&staging.join(SPLIT), c.split)?;
        let mut fps = c.base_fingerprints.clone();
        fps.insert("alignment".into(), fingerprint.clone());
        write_json(&staging.join(FINGERPRINTS), &fps)?;
        write_json(&staging.join(STATE), c.state)?;
        let state = c.optimizer.state();
        candle_core::safetensors::save(&state, staging.join(OPTIMIZER))?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(|e| TrainError::io(&final_dir, e))?;
        }
        std::fs::rename(&staging, &final_dir).map_err(|e| TrainError::io(&final_dir, e))?;
        write_text(&run_dir.join(LATEST), &format!("{name}\n"))?;
        Ok(fingerprint)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    Ok((final_dir, result?))
}

/// The folder `latest` points to, `None` when the run has no checkpoint yet.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    let pointer = run_dir.join(LATEST);
    if !pointer.is_file() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&pointer).map_err(|e| TrainError::io(&pointer, e))?;
    let dir = run_dir.join(name.trim());
    if !dir.join(align::CONFIG_FILE).is_file() {
        return Err(TrainError::checkpoint(
            &dir,
            format!(
                "`latest` points here but it holds no {}",
                align::CONFIG_FILE
            ),
        ));
    }
    Ok(Some(dir))
}

/// A checkpoint folder given on the command line: the folder itself, or a run folder (its
/// `latest`).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(align::CONFIG_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    latest(path)?.ok_or_else(|| {
        TrainError::checkpoint(
            path,
            "neither a checkpoint (no alignment.json) nor a run folder with a `latest` checkpoint",
        )
    })
}

/// Removes staging folders a killed run left, and step folders beyond the newest `keep_last`
/// (0 keeps all; the one `latest` names is always kept).
pub fn tidy(run_dir: &Path, keep_last: usize) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return Ok(());
    };
    let latest = latest(run_dir).ok().flatten();
    let mut steps: Vec<(u64, PathBuf)> = Vec::new();
    for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with(".step-") && name.contains(".partial-") {
            let _ = std::fs::remove_dir_all(&path);
        } else if let Some(n) = name.strip_prefix("step-").and_then(|n| n.parse().ok()) {
            steps.push((n, path));
        }
    }
    if keep_last > 0 && steps.len() > keep_last {
        steps.sort();
        for (_, path) in &steps[..steps.len() - keep_last] {
            if Some(path) != latest.as_ref() {
                let _ = std::fs::remove_dir_all(path);
            }
        }
    }
    Ok(())
}

/// `trainer_state.json` of a checkpoint.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    read_json(&dir.join(STATE))
}

/// `split.json` of a checkpoint or run folder.
pub fn read_split(dir: &Path) -> Result<Split> {
    read_json(&dir.join(SPLIT))
}

/// `fingerprints.json` of a checkpoint.
pub fn read_fingerprints(dir: &Path) -> Result<BTreeMap<String, String>> {
    read_json(&dir.join(FINGERPRINTS))
}

/// The AdamW moments of a checkpoint.
pub fn read_optimizer(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let path = dir.join(OPTIMIZER);
    candle_core::safetensors::load(&path, device)
        .map_err(|e| TrainError::checkpoint(dir, format!("{OPTIMIZER}: {e}")))
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| TrainError::io(path, format!("malformed JSON: {e}")))
}

pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("plain data serialises");
    write_text(path, &text)
}

/// Writes a file through a temporary name, so readers never see half of it.
pub(crate) fn write_text(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, text).map_err(|e| TrainError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
}
