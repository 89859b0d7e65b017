//! Which files to ingest: slide files given directly or found in folders (recursively), each with
//! its slide id (the file name without extension).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{PipelineError, Result};

/// Extensions OpenSlide reads (lower case).
pub const SLIDE_EXTENSIONS: &[&str] = &[
    "svs", "tif", "tiff", "ndpi", "vms", "vmu", "scn", "mrxs", "svslide", "bif",
];

fn is_slide(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| SLIDE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The slide id of a file: its name without the extension.
pub fn slide_id(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Slide files under `inputs` (files as given, folders searched recursively for slide
/// extensions), by slide id. Two different files with one id are an error: ids key everything.
pub fn find_slides(inputs: &[PathBuf]) -> Result<BTreeMap<String, PathBuf>> {
    let mut found = BTreeMap::new();
    for input in inputs {
        let meta = std::fs::metadata(input).map_err(|e| PipelineError::io(input, e))?;
        let mut files = Vec::new();
        if meta.is_dir() {
            walk(input, &mut files)?;
            if files.is_empty() {
                tracing::warn!(
                    "{}: no slide files ({}) in this folder",
                    input.display(),
                    SLIDE_EXTENSIONS.join(", ")
                );
            }
        } else {
            files.push(input.clone());
        }
        for f in files {
            let id = slide_id(&f);
            if id.is_empty() {
                return Err(PipelineError::Input(format!(
                    "{}: no file name to make a slide id from",
                    f.display()
                )));
            }
            let abs = std::fs::canonicalize(&f).map_err(|e| PipelineError::io(&f, e))?;
            if let Some(other) = found.insert(id.clone(), abs.clone()) {
                if other != abs {
                    return Err(PipelineError::Input(format!(
                        "two slides share the id `{id}`: {} and {} (ids are file names without extension)",
                        other.display(),
                        abs.display()
                    )));
                }
            }
        }
    }
    Ok(found)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| PipelineError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if is_slide(&p) {
            out.push(p);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_slides_recursively_and_rejects_id_clashes() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        for f in ["a/one.svs", "a/b/two.TIFF", "a/notes.txt", "three.ndpi"] {
            std::fs::write(d.path().join(f), b"x").unwrap();
        }
        let found = find_slides(&[d.path().join("a"), d.path().join("three.ndpi")]).unwrap();
        assert_eq!(found.keys().collect::<Vec<_>>(), ["one", "three", "two"]);
        std::fs::write(d.path().join("a/b/one.tif"), b"x").unwrap();
        let err = find_slides(&[d.path().join("a")]).unwrap_err().to_string();
        assert!(err.contains("share the id `one`"), "{err}");
        assert!(find_slides(&[d.path().join("missing")]).is_err());
    }
}
