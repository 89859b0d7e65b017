//! Per-step metrics of a run: one JSON object per line in `metrics.jsonl`, flushed as each step
//! ends. A resumed run first cuts the file back to its checkpoint's step, so the curve holds
//! every step exactly once however often the run was killed.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// File name in the run folder.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Recall@1/5/10 in one retrieval direction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Recall {
    /// Share of queries whose match ranks first, in [0, 1].
    pub r1: f64,
    /// Share whose match is in the top 5.
    pub r5: f64,
    /// Share whose match is in the top 10.
    pub r10: f64,
}

/// Validation metrics at a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValMetrics {
    /// CLIP loss over the validation pairs (in batches of `optim.batch_size`).
    pub loss: f64,
    /// Validation pairs.
    pub pairs: usize,
    /// Slide -> report retrieval.
    pub slide_to_report: Recall,
    /// Report -> slide retrieval.
    pub report_to_slide: Recall,
}

/// One optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// 1-based: the step just finished.
    pub step: u64,
    /// Epoch of the step's first micro-batch (0-based).
    pub epoch: u64,
    /// Mean CLIP loss of the step's micro-batches.
    pub loss: f64,
    /// Learning rate of the heads at the step.
    pub lr: f64,
    /// Learning rate of fine-tuned encoder layers at the step.
    pub encoder_lr: f64,
    /// `exp(logit_scale)` after the step.
    pub logit_scale: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Seconds since this process started training.
    pub elapsed_s: f64,
    /// Validation metrics, on steps where validation ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val: Option<ValMetrics>,
}

/// Reads the records of steps `<= up_to` (a torn last line from a kill is dropped).
pub fn read(path: &Path, up_to: u64) -> Result<Vec<StepRecord>> {
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<StepRecord>(l).ok())
        .filter(|r| r.step <= up_to)
        .collect())
}

/// The metrics file, open for appending.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Rewrites the file with `history` (the steps a checkpoint covers), then appends.
    pub fn open(path: &Path, history: &[StepRecord]) -> Result<Self> {
        let mut text = String::new();
        for r in history {
            text.push_str(&serde_json::to_string(r).expect("plain data serialises"));
            text.push('\n');
        }
        crate::checkpoint::write_text(path, &text)?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| TrainError::io(path, e))?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends one record and flushes it.
    pub fn write(&mut self, r: &StepRecord) -> Result<()> {
        let line = serde_json::to_string(r).expect("plain data serialises");
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .map_err(|e| TrainError::io(&self.path, e))
    }
}
