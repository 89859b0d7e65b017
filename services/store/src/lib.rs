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
pub mod disk;
pub mod error;
pub mod features;
pub mod time;
pub mod vector;

pub use catalog::Catalog;
pub use config::{Dims, Quantization, StoreConfig, VectorBackendConfig};
pub use error::{Result, StoreError};
pub use features::{FeatureFile, FeatureFileInfo, FeatureFileWriter, FeatureMetadata};
pub use vector::{open_vector_store, VectorStore};

use std::sync::Arc;

/// Everything a process needs, opened from one configuration: the catalog and the vector store
/// (standard collections ensured). Cheap to clone.
#[derive(Clone)]
pub struct Store {
    /// The configuration it was opened with (validated).
    pub config: StoreConfig,
    /// The SQL catalog: slides, reports, feature files, jobs, training runs.
    pub catalog: Catalog,
    /// The vector store, with the standard collections ensured.
    pub vectors: Arc<dyn VectorStore>,
}

impl Store {
    /// Validates `config`, creates the data dir, connects the catalog (migrating it) and opens
    /// the vector store. With the embedded backend only one process may hold a data dir.
    pub async fn open(config: StoreConfig) -> Result<Store> {
        config.validate()?;
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| StoreError::io("create data dir", &config.data_dir, e))?;
        let catalog = Catalog::open(&config).await?;
        let vectors = open_vector_store(&config).await?;
        Ok(Store {
            config,
            catalog,
            vectors,
        })
    }

    /// Where the feature file of `slide_id` for tile weights `tile_fingerprint` goes.
    pub fn feature_path(&self, slide_id: &str, tile_fingerprint: &str) -> std::path::PathBuf {
        features::feature_path(&self.config.features_dir(), slide_id, tile_fingerprint)
    }

    /// Where a recorded feature file is now: its place under this data dir
    /// ([`Store::feature_path`]) when the file is there, else the path the catalog recorded.
    /// The catalog keeps the path a file was written at, which a moved or copied data dir (or a
    /// relative data dir opened from another working directory) no longer matches.
    pub fn locate_feature_file(
        &self,
        slide_id: &str,
        tile_fingerprint: &str,
        recorded: &str,
    ) -> String {
        let here = self.feature_path(slide_id, tile_fingerprint);
        if here.is_file() {
            here.display().to_string()
        } else {
            recorded.to_string()
        }
    }

    /// [`Catalog::training_pairs`], feature paths located in this data dir.
    pub async fn training_pairs(
        &self,
        tile_fingerprint: &str,
    ) -> Result<Vec<catalog::TrainingPair>> {
        let mut pairs = self.catalog.training_pairs(tile_fingerprint).await?;
        for p in &mut pairs {
            p.feature_path =
                self.locate_feature_file(&p.slide_id, tile_fingerprint, &p.feature_path);
        }
        Ok(pairs)
    }

    /// [`Catalog::feature_file`], its path located in this data dir.
    pub async fn feature_file(
        &self,
        slide_id: &str,
        tile_fingerprint: &str,
    ) -> Result<Option<catalog::FeatureFileRecord>> {
        let record = self
            .catalog
            .feature_file(slide_id, tile_fingerprint)
            .await?;
        Ok(record.map(|mut r| {
            r.path = self.locate_feature_file(slide_id, tile_fingerprint, &r.path);
            r
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_default_store_end_to_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = StoreConfig::with_data_dir(dir.path().join("data"));
        config.dims = Dims {
            joint: 4,
            slide: 6,
            text: 3,
            tile: 5,
        };
        let store = Store::open(config.clone()).await.unwrap();
        assert_eq!(store.catalog.backend_name(), "sqlite");
        assert_eq!(store.vectors.backend_name(), "embedded");
        assert!(dir.path().join("data/catalog.sqlite").exists());
        assert!(dir.path().join("data/vectors/slides").is_dir());
        assert!(dir.path().join("data/vectors/reports").is_dir());

        let point = vector::SlidePoint {
            slide_id: "s1".into(),
            fingerprint: "fp".into(),
            joint: Some(vec![1.0, 0.0, 0.0, 0.0]),
            slide: vec![0.0, 1.0, 0.0, 0.0, 0.0, 0.0],
            ..Default::default()
        };
        store
            .vectors
            .upsert(vector::SLIDES, vec![point.into_point()])
            .await
            .unwrap();
        assert_eq!(
            store
                .vectors
                .count(vector::SLIDES, &vector::PayloadFilter::none())
                .await
                .unwrap(),
            1
        );
        let path = store.feature_path("s1", "tile-fp");
        assert!(path.starts_with(dir.path().join("data/features")));

        // A second process on the same data dir is refused (embedded backend), clearly.
        let err = Store::open(config)
            .await
            .err()
            .expect("second open must fail");
        assert!(
            err.to_string().contains("in use by another process"),
            "{err}"
        );
    }
}
