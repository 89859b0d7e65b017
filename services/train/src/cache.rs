//! On-disk cache of the frozen parts of a run: with a frozen encoder, a slide's pooled
//! embedding or a report's pooled text embedding never changes, so it is computed once per data
//! dir and base weights, and every later run (and every resume) reads it back.
//!
//! One safetensors file per (base fingerprints, pooling) under `DATA_DIR/alignment/cache/`;
//! entries are keyed by slide id and feature-file identity, or by a hash of the report text, so
//! a re-ingested slide or an edited report is recomputed. Hidden states (fine-tuned layers) are
//! not cached on disk: they are large and cheap to recompute relative to their size.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use crate::error::Result;

/// A map of named tensors backed by one file.
pub struct PrefixCache {
    path: PathBuf,
    entries: HashMap<String, Tensor>,
    dirty: bool,
}

fn hex(bytes: &[u8], n: usize) -> String {
    bytes[..n].iter().map(|b| format!("{b:02x}")).collect()
}

impl PrefixCache {
    /// The cache of `dir` for `identity` (base fingerprints and pooling, as one string); an
    /// unreadable file counts as empty (it is only a cache).
    pub fn open(dir: &Path, identity: &str, device: &Device) -> Self {
        let key = hex(&Sha256::digest(identity.as_bytes()), 8);
        let path = dir.join(format!("prefix-{key}.safetensors"));
        let entries = if path.is_file() {
            candle_core::safetensors::load(&path, device).unwrap_or_else(|e| {
                tracing::warn!("ignoring unreadable cache {}: {e}", path.display());
                HashMap::new()
            })
        } else {
            HashMap::new()
        };
        PrefixCache {
            path,
            entries,
            dirty: false,
        }
    }

    /// Entry name of a slide's embedding: its id and the identity of its feature file.
    pub fn slide_key(slide_id: &str, feature_path: &str) -> String {
        let meta = std::fs::metadata(feature_path).ok();
        let stamp = format!(
            "{feature_path}|{}|{:?}",
            meta.as_ref().map_or(0, |m| m.len()),
            meta.and_then(|m| m.modified().ok())
        );
        format!(
            "slide.{slide_id}.{}",
            hex(&Sha256::digest(stamp.as_bytes()), 6)
        )
    }

    /// Entry name of a report's embedding: a hash of its text.
    pub fn text_key(text: &str) -> String {
        format!("text.{}", hex(&Sha256::digest(text.as_bytes()), 16))
    }

    /// The entry `key`, `None` when it is not cached.
    pub fn get(&self, key: &str) -> Option<&Tensor> {
        self.entries.get(key)
    }

    /// Adds or replaces entry `key`; written by the next [`PrefixCache::save`].
    pub fn insert(&mut self, key: String, value: Tensor) {
        self.entries.insert(key, value);
        self.dirty = true;
    }

    /// Writes the file if anything was added (through a temporary name).
    pub fn save(&self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| crate::TrainError::io(dir, e))?;
        }
        let tmp = self.path.with_extension("partial");
        candle_core::safetensors::save(&self.entries, &tmp)?;
        std::fs::rename(&tmp, &self.path).map_err(|e| crate::TrainError::io(&self.path, e))
    }
}
