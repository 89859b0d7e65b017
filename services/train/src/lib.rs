//! Alignment training for gigapath: CLIP-style runs over the catalog's slide-report pairs, their
//! checkpoints, re-embedding the stores with a checkpoint, and zero-shot / retrieval evaluation.
//!
//! Not for: the model math (`gigapath_models::align`), prompt sets and metrics
//! (`gigapath-zeroshot`), or ingest (`gigapath-pipeline`, whose `Pipeline` this crate drives).
//!
//! - [`config`]: the run config (TOML, every default printable, validated once).
//! - [`data`]: pairs, the train / validation split by patient or slide, the batch order.
//! - [`trainer`]: a run - cached frozen parts, AdamW ([`optim`]), validation, checkpoints
//!   ([`checkpoint`]), per-step metrics ([`runlog`]), the curve ([`plot`]), exact resume.
//! - [`reembed`](mod@reembed): recompute `joint` (and `slide`) vectors of every stored slide and report
//!   with a checkpoint, under its fingerprint.
//! - [`eval`]: cross-modal retrieval, zero-shot classification and MI-Zero robustness.
//!
//! Files of a run: `DATA_DIR/alignment/<run_id>/` with `run.toml`, `split.json`,
//! `metrics.jsonl`, `curve.png`, `latest` and `step-<N>/` checkpoints (see [`checkpoint`]).

pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod optim;
pub mod plot;
pub mod reembed;
pub mod runlog;
pub mod trainer;

pub use config::RunConfig;
pub use error::{Result, TrainError};
pub use eval::{evaluate, EvalReport, EvalRequest, EvalSplit};
pub use reembed::{reembed, ReembedSummary};
pub use trainer::{train, RunOutcome, Silent, TrainProgress, TrainRequest};
