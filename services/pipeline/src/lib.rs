//! Ingest for gigapath: slides to tile features to slide embeddings, reports to text embeddings,
//! all into the store, resumable after any crash and shareable between workers.
//!
//! Not for: the model math (`gigapath-models`), reading slides (`gigapath-wsi`) or how things are
//! stored (`gigapath-store`); this crate only drives them.
//!
//! - [`config`]: the TOML configuration of everything, layered and validated once.
//! - [`discover`]: slide files and their ids; [`reports`]: reading report files row by row.
//! - [`identity`]: which file an id stands for; forgetting a slide's embedding.
//! - [`encoders`]: the encoders and their weight fingerprints ([`fingerprint`]).
//! - [`slide_job`]: one slide end to end; [`ingest`]: runs, the job queue and the worker loop.

pub mod config;
pub mod discover;
pub mod encoders;
pub mod error;
pub mod fingerprint;
pub mod identity;
pub mod ingest;
pub mod pipeline;
pub mod queue;
pub mod reports;
pub mod slide_job;
pub mod status;
pub mod tile_points;

pub use config::Config;
pub use error::{PipelineError, Result};
pub use gigapath_store::catalog::kinds::EMBED_SLIDE;
pub use ingest::{IngestRequest, IngestSummary, RunSummary};
pub use pipeline::{Pipeline, Progress, Quiet};
pub use slide_job::{SlideJob, Timings};
pub use status::Status;
