//! Fingerprints of model folders: which weights produced an embedding.
//!
//! A fingerprint is the first 16 hex digits of a SHA-256 over the folder's config and weight
//! files (names and bytes, in name order). Changing a weight or a config value changes it;
//! copying or moving the folder does not. Stored with every feature file, vector point and
//! catalog row, so that embeddings from different weights are never mixed.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{PipelineError, Result};

/// Files that define a model's behaviour (the rest of a folder, e.g. READMEs, is ignored).
const MODEL_FILES: &[&str] = &[
    "config.json",
    "model.safetensors",
    "pytorch_model.bin",
    "slide_encoder.pth",
    // The slide encoder's files in a release folder shared with the tile encoder.
    "slide_encoder.safetensors",
    "slide_config.json",
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "alignment.safetensors",
    "alignment.json",
];

/// The fingerprint of the model folder (or single file) `path`.
pub fn model_fingerprint(path: &Path) -> Result<String> {
    let mut files: Vec<std::path::PathBuf> = if path.is_dir() {
        MODEL_FILES
            .iter()
            .map(|f| path.join(f))
            .filter(|p| p.is_file())
            .collect()
    } else {
        vec![path.to_path_buf()]
    };
    files.sort();
    if files.is_empty() || !files.iter().all(|f| f.exists()) {
        return Err(PipelineError::io(
            path,
            "no model files (config.json, weights) found",
        ));
    }
    // Hashing full-size weights takes seconds, and one process asks for the same folder several
    // times (fingerprints, each encoder's load; a release folder serves two roles): the digest
    // is kept per file set, keyed by each file's identity (path, size, mtime, inode), so a
    // changed file is hashed again.
    let key = identities(&files)?;
    let cache = FINGERPRINTS.get_or_init(Default::default);
    if let Some(fp) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(fp.clone());
    }
    let fp = hash_files(&files)?;
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, fp.clone());
    Ok(fp)
}

type FileIdentity = (std::path::PathBuf, u64, Option<std::time::SystemTime>, u64);

static FINGERPRINTS: std::sync::OnceLock<
    std::sync::Mutex<std::collections::HashMap<Vec<FileIdentity>, String>>,
> = std::sync::OnceLock::new();

fn identities(files: &[std::path::PathBuf]) -> Result<Vec<FileIdentity>> {
    use std::os::unix::fs::MetadataExt;
    files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).map_err(|e| PipelineError::io(f, e))?;
            let abs = std::fs::canonicalize(f).map_err(|e| PipelineError::io(f, e))?;
            Ok((abs, m.len(), m.modified().ok(), m.ino()))
        })
        .collect()
}

fn hash_files(files: &[std::path::PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        h.update(
            f.file_name()
                .map(|n| n.as_encoded_bytes())
                .unwrap_or_default(),
        );
        let mut file = std::fs::File::open(f).map_err(|e| PipelineError::io(f, e))?;
        loop {
            let n = file.read(&mut buf).map_err(|e| PipelineError::io(f, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    let digest = h.finalize();
    Ok(digest.iter().take(8).map(|b| format!("{b:02x}")).collect())
}

/// Hex SHA-256 of a whole file.
pub fn file_sha256(path: &Path) -> Result<String> {
    let mut h = Sha256::new();
    let mut file = std::fs::File::open(path).map_err(|e| PipelineError::io(path, e))?;
    std::io::copy(&mut file, &mut h).map_err(|e| PipelineError::io(path, e))?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_follows_content_not_location() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for d in [a.path(), b.path()] {
            std::fs::write(d.join("config.json"), "{\"x\": 1}").unwrap();
            std::fs::write(d.join("model.safetensors"), [1u8, 2, 3]).unwrap();
            std::fs::write(d.join("README.md"), format!("{}", d.display())).unwrap();
        }
        let fa = model_fingerprint(a.path()).unwrap();
        assert_eq!(fa.len(), 16);
        assert_eq!(fa, model_fingerprint(b.path()).unwrap());
        std::fs::write(b.path().join("model.safetensors"), [1u8, 2, 4]).unwrap();
        assert_ne!(fa, model_fingerprint(b.path()).unwrap());
        // A rewrite of the same size is seen: the cache's key changes with the mtime.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(b.path().join("model.safetensors"), [1u8, 2, 3]).unwrap();
        assert_eq!(fa, model_fingerprint(b.path()).unwrap());
        // (file times move in kernel ticks of a few ms)
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(b.path().join("model.safetensors"), [9u8, 2, 3]).unwrap();
        assert_ne!(fa, model_fingerprint(b.path()).unwrap());
        assert!(model_fingerprint(&a.path().join("nothing")).is_err());
    }
}
