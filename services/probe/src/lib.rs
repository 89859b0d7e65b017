//! Learning from labels on what gigapath already stores: few-shot and supervised heads next to
//! zero-shot.
//!
//! - [`data`]: labelled slides from the catalog (report columns) or a CSV, with their stored
//!   `slide` or `joint` vectors and patients; mutation status is a two-class label like any other.
//! - [`heads`]: logistic-regression linear probe (L2, candle autograd), k-nearest neighbours and
//!   prototypes (cosine) on slide vectors.
//! - [`abmil`]: gated attention MIL on the tile feature files, with per-tile attention.
//! - [`split`]: stratified k-fold grouped by patient, few-shot draws.
//! - [`eval`]: cross-validation, metrics with bootstrap intervals (the metrics themselves are
//!   `gigapath_zeroshot::metrics`), few-shot curves.
//! - [`artefact`]: a trained head as `DATA_DIR/probes/<name>/` (safetensors + manifest).
//! - [`train`]: train a named head on a data dir; apply one to stored slides.
//! - [`report`]: zero-shot, few-shot and supervised side by side.
//!
//! Not for: computing embeddings (`gigapath-pipeline`), zero-shot prompts
//! (`gigapath-zeroshot`), HTTP (`gigapath-api`).

pub mod abmil;
pub mod artefact;
pub mod data;
pub mod error;
pub mod eval;
pub mod heads;
pub mod report;
pub mod split;
pub mod train;

pub use artefact::{HeadModel, Input, Manifest, StoredHead};
pub use data::{load_dataset, Dataset, EmbeddingInfo, LabelSource};
pub use error::{ProbeError, Result};
pub use eval::{
    cross_validate, few_shot_curve, score, CvConfig, CvResult, FewShotConfig, FewShotPoint,
    MetricCi, Scores,
};
pub use heads::{HeadKind, SlideHead};
pub use report::{Comparison, ZeroShotRow};
pub use train::{classify, probes_dir, train_head, Classification, TrainHeadRequest};
