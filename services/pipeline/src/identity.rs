//! A slide id stands for one file's content. Ingest records the content identity of every slide
//! file ([`ContentId`]: size, modification time, and a SHA-256 of the size and the first and
//! last MiB) and refuses a *different* file under an id it knows, naming both paths, unless told
//! to replace it ([`Pipeline::check_sources`] reads, [`replace_sources`] refuses or forgets,
//! [`bind_sources`] records). The same file moved or copied elsewhere (same size and hash) is the
//! same slide. [`forget_slide`] removes what embedding a
//! slide produced, consistently: catalog state, jobs, points, feature files, tiling pictures
//! (`DELETE /v1/slides/{id}` and replacing).

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use gigapath_store::catalog::{ResetOutcome, SlideReset};
use gigapath_store::vector::{REPORTS, SLIDES};
use gigapath_store::Store;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::discover::check_slide_id;
use crate::error::{PipelineError, Result};
use crate::pipeline::Pipeline;
use gigapath_store::catalog::kinds::EMBED_SLIDE;

/// Bytes hashed at each end of a file.
const END_BYTES: u64 = 1 << 20;

/// The content identity of a slide file. Two files are the same slide when size and `sha256`
/// agree; `mtime_ns` only spares re-hashing an unchanged file at its known path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentId {
    /// File size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// SHA-256 of the size (8 bytes, little-endian), the first MiB and the last MiB.
    pub sha256: String,
}

impl ContentId {
    /// Reads the identity of the file at `path` (at most 2 MiB of it).
    pub fn of(path: &Path) -> Result<ContentId> {
        let (size, mtime_ns) = stat(path)?;
        Ok(ContentId {
            size,
            mtime_ns,
            sha256: ends_sha256(path, size)?,
        })
    }

    fn to_text(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

fn stat(path: &Path) -> Result<(u64, i64)> {
    let m = std::fs::metadata(path).map_err(|e| PipelineError::io(path, e))?;
    Ok((
        m.len(),
        m.mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(m.mtime_nsec()),
    ))
}

fn ends_sha256(path: &Path, size: u64) -> Result<String> {
    let io = |e: std::io::Error| PipelineError::io(path, e);
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    h.update(size.to_le_bytes());
    let mut buf = vec![0u8; END_BYTES.min(size) as usize];
    f.read_exact(&mut buf).map_err(io)?;
    h.update(&buf);
    if size > END_BYTES {
        let start = (size - END_BYTES).max(END_BYTES);
        let mut tail = vec![0u8; (size - start) as usize];
        f.seek(SeekFrom::Start(start)).map_err(io)?;
        f.read_exact(&mut tail).map_err(io)?;
        h.update(&tail);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// How a found file relates to what the catalog knows under its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Known {
    /// A new id.
    New,
    /// The same content (maybe at another path).
    Same,
    /// Another file's content is known under this id.
    Different {
        /// The path recorded for the id.
        known_path: String,
    },
}

/// A slide file found for ingest, with its identity.
#[derive(Debug, Clone)]
pub struct Source {
    /// The slide id the file gets ([`crate::discover::slide_id`]).
    pub id: String,
    /// The file.
    pub path: PathBuf,
    /// Its content identity.
    pub content: ContentId,
    /// How it relates to what the catalog knows under `id`.
    pub known: Known,
}

impl Source {
    /// The refusal of a different file under a known id, naming both paths.
    pub fn conflict(&self) -> Option<String> {
        match &self.known {
            Known::Different { known_path } => Some(format!(
                "slide id `{}` already stands for {known_path}; {} is a different file (other \
                 size or content); rename it, or pass --replace (HTTP: \"replace\": true) to \
                 re-embed `{}` from it",
                self.id,
                self.path.display(),
                self.id
            )),
            _ => None,
        }
    }
}

/// The conflicts of `sources` as one error, if any.
pub fn conflicts(sources: &[Source]) -> Option<String> {
    let all: Vec<String> = sources.iter().filter_map(Source::conflict).collect();
    match all.len() {
        0 => None,
        1 => Some(all[0].clone()),
        n => Some(format!(
            "{n} conflicting slide files:\n  {}",
            all.join("\n  ")
        )),
    }
}

impl Pipeline {
    /// Reads the identity of every slide in `slides` (id -> path) and compares it with what the
    /// catalog knows under the id. Reads only; see [`bind_sources`] for the writes.
    pub fn check_sources(&self, slides: &BTreeMap<String, PathBuf>) -> Result<Vec<Source>> {
        let mut out = Vec::with_capacity(slides.len());
        for (id, path) in slides {
            let record = self.block_on(self.store.catalog.slide(id))?;
            let known_content = self
                .block_on(self.store.catalog.slide_content(id))?
                .and_then(|t| serde_json::from_str::<ContentId>(&t).ok());
            let (size, mtime_ns) = stat(path)?;
            let Some(record) = record else {
                out.push(Source {
                    id: id.clone(),
                    path: path.clone(),
                    content: ContentId::of(path)?,
                    known: Known::New,
                });
                continue;
            };
            let same_path = Path::new(&record.path) == path.as_path();
            let (content, same) = match known_content {
                // Unchanged at its known path: no need to read it.
                Some(k) if same_path && k.size == size && k.mtime_ns == mtime_ns => (k, true),
                Some(k) => {
                    let c = ContentId::of(path)?;
                    let same = k.size == c.size && k.sha256 == c.sha256;
                    (c, same)
                }
                // Registered before identities were recorded: the same path, or a file at the
                // known path with the same content.
                None => {
                    let c = ContentId::of(path)?;
                    let same = same_path
                        || ContentId::of(Path::new(&record.path))
                            .is_ok_and(|k| k.size == c.size && k.sha256 == c.sha256);
                    (c, same)
                }
            };
            out.push(Source {
                id: id.clone(),
                path: path.clone(),
                content,
                known: if same {
                    Known::Same
                } else {
                    Known::Different {
                        known_path: record.path,
                    }
                },
            });
        }
        Ok(out)
    }
}

/// Before registering `sources`: with `replace`, forgets the embedding of every id that now
/// stands for a different file (its reports stay); without it, refuses any such id. Returns
/// the ids replaced.
pub async fn replace_sources(
    store: &Store,
    sources: &[Source],
    replace: bool,
) -> Result<Vec<String>> {
    if !replace {
        if let Some(msg) = conflicts(sources) {
            return Err(PipelineError::Input(msg));
        }
        return Ok(Vec::new());
    }
    let mut replaced = Vec::new();
    for s in sources {
        if let Known::Different { known_path } = &s.known {
            match forget_slide(store, &s.id, false).await? {
                Forgotten::Busy { job_id } => {
                    return Err(PipelineError::Input(format!(
                        "slide `{}` is being embedded right now (job {job_id}); replace it once \
                         that is done",
                        s.id
                    )))
                }
                Forgotten::Unknown | Forgotten::Done { .. } => {}
            }
            tracing::info!("{}: replacing {known_path} with {}", s.id, s.path.display());
            replaced.push(s.id.clone());
        }
    }
    Ok(replaced)
}

/// After registering `sources`: records each file's content identity under its id.
pub async fn bind_sources(store: &Store, sources: &[Source]) -> Result<()> {
    for s in sources {
        store
            .catalog
            .set_slide_content(&s.id, &s.content.to_text())
            .await?;
    }
    Ok(())
}

/// What [`forget_slide`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forgotten {
    /// No such slide.
    Unknown,
    /// A worker is embedding it now: nothing was changed.
    Busy {
        /// That job.
        job_id: i64,
    },
    /// Its embedding is gone; `reports` report points were removed with it.
    Done {
        /// Report points removed (0 unless asked to remove them).
        reports: usize,
    },
}

/// Removes everything embedding slide `id` produced, so that catalog, jobs, points and files
/// agree: the catalog first (state back to `registered`, jobs, embedding and feature-file rows,
/// in one transaction), then its point (and its reports' points with `with_reports`), its feature
/// files under every tile encoder, and its tiling pictures. The record (path, content identity,
/// labels, reports) stays, so ingesting it again embeds it anew. Safe to repeat after a failure.
pub async fn forget_slide(store: &Store, id: &str, with_reports: bool) -> Result<Forgotten> {
    check_slide_id(id)
        .map_err(|why| PipelineError::Input(format!("slide id `{}` {why}", id.escape_debug())))?;
    let reset = store
        .catalog
        .reset_slide(&SlideReset {
            slide_id: id,
            job_kind: EMBED_SLIDE,
            slide_collection: SLIDES,
            report_collection: with_reports.then_some(REPORTS),
        })
        .await?;
    let reports = match reset {
        ResetOutcome::Unknown => return Ok(Forgotten::Unknown),
        ResetOutcome::Busy { job_id } => return Ok(Forgotten::Busy { job_id }),
        ResetOutcome::Reset { reports, .. } => reports,
    };
    store.vectors.delete(SLIDES, &[id.to_string()]).await?;
    crate::tile_points::forget_tiles(store, id).await?;
    if with_reports {
        store.vectors.delete(REPORTS, &reports).await?;
    }
    // Feature files: this id's file under every tile encoder's folder (recorded or left by an
    // interrupted run); only paths the store itself names, never a path read from a row.
    let features = store.config.features_dir();
    let name = store.feature_path(id, "any");
    if let (Ok(dirs), Some(name)) = (std::fs::read_dir(&features), name.file_name()) {
        for d in dirs
            .filter_map(|d| d.ok())
            .filter(|d| d.file_type().is_ok_and(|t| t.is_dir()))
        {
            remove(&d.path().join(name), false)?;
        }
    }
    remove(&store.config.data_dir.join("tiles").join(id), true)?;
    Ok(Forgotten::Done {
        reports: if with_reports { reports.len() } else { 0 },
    })
}

fn remove(path: &Path, dir: bool) -> Result<()> {
    let r = if dir {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(PipelineError::io(path, e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ids_tell_files_apart_by_size_and_both_ends() {
        let d = tempfile::tempdir().unwrap();
        let big = vec![7u8; 3 << 20];
        let write = |name: &str, bytes: &[u8]| {
            let p = d.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            ContentId::of(&p).unwrap()
        };
        let a = write("a.svs", &big);
        let copy = write("copy.svs", &big);
        assert_eq!((a.size, &a.sha256), (copy.size, &copy.sha256));
        let mut tail = big.clone();
        *tail.last_mut().unwrap() = 8;
        assert_ne!(write("tail.svs", &tail).sha256, a.sha256);
        let mut head = big.clone();
        head[0] = 8;
        assert_ne!(write("head.svs", &head).sha256, a.sha256);
        assert_ne!(write("short.svs", &big[1..]).sha256, a.sha256);
        assert_eq!(write("empty.svs", b"").size, 0);
        assert_ne!(
            write("small.svs", b"xy").sha256,
            write("small2.svs", b"xz").sha256
        );
    }
}
