//! Storage for gigapath: where embeddings, their provenance and the work queue live.
//!
//! - [`vector`]: the vector store behind one trait ([`VectorStore`]): embedded qdrant-edge by
//!   default, a Qdrant server or cluster when configured. Collections `slides` and `reports`,
//!   deterministic point ids, payload filters, and a fingerprint guard that refuses to search
//!   across embeddings from different weights.
//! - [`catalog`]: the SQL catalog ([`Catalog`], SQLite or Postgres): slides, reports, feature
//!   files, model fingerprints, the ingest job queue (claims with leases) and training runs.
//! - [`features`]: per-slide tile feature files (safetensors, f16), written atomically.
//! - [`config`]: [`StoreConfig`], the TOML-friendly configuration of all three.
//!
//! Not for: computing embeddings (`gigapath-models`), reading slides (`gigapath-wsi`), running
//! ingest or serving HTTP (the pipeline and API crates use this one).

pub mod catalog;
pub mod config;
pub mod error;
pub mod features;
pub mod vector;

pub use catalog::Catalog;
pub use config::{Dims, StoreConfig, VectorBackendConfig};
pub use error::{Result, StoreError};
pub use features::{FeatureFile, FeatureFileInfo, FeatureFileWriter, FeatureMetadata};
pub use vector::{open_vector_store, VectorStore};
