//! Which files to ingest: slide files given directly or found in folders (recursively), each with
//! its slide id (the file name without extension).
//!
//! The walk follows symbolic links but visits every folder once (by device and inode), so link
//! loops end; it stops with an error past [`Limits`] (folder depth, entries read). With slide
//! roots (the HTTP service's `serve.slide_roots`), every folder entered and every file found
//! must resolve under a root. Every file must be a regular file whose path is UTF-8 and whose
//! id follows [`check_slide_id`]; problems are gathered and reported together before anything
//! is registered.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{PipelineError, Result};

/// Extensions OpenSlide reads (lower case).
pub const SLIDE_EXTENSIONS: &[&str] = &[
    "svs", "tif", "tiff", "ndpi", "vms", "vmu", "scn", "mrxs", "svslide", "bif",
];

/// Longest slide id (characters); the HTTP service's limit too.
pub const MAX_ID_CHARS: usize = 512;

/// Bounds of a folder walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Folders nested deeper than this under a given folder are an error.
    pub max_depth: usize,
    /// Entries read in all folders of one discovery (files and folders alike).
    pub max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_depth: 32,
            max_entries: 1_000_000,
        }
    }
}

/// Why discovery stopped.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    /// A folder or file (maybe reached through a symbolic link) resolves outside the roots.
    #[error("slide path `{}` is outside the configured slide roots", path.display())]
    OutsideRoots {
        /// The path as given or found (before resolving).
        path: PathBuf,
    },
    /// Anything else (an unreadable folder, too many entries, ...).
    #[error(transparent)]
    Other(#[from] PipelineError),
}

impl From<DiscoverError> for PipelineError {
    fn from(e: DiscoverError) -> Self {
        match e {
            DiscoverError::OutsideRoots { .. } => PipelineError::Input(e.to_string()),
            DiscoverError::Other(e) => e,
        }
    }
}

fn is_slide(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| SLIDE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The slide id of a file: its name without the extension (lossy for a non-UTF-8 name, which
/// discovery refuses).
pub fn slide_id(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    // OME-TIFF's double extension (`X.ome.tif`, `X.ome.tiff`) names slide `X`.
    let tiff = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("tif") || e.eq_ignore_ascii_case("tiff"));
    match stem.len().checked_sub(4) {
        Some(cut) if tiff && cut > 0 && stem.is_char_boundary(cut) => {
            if stem[cut..].eq_ignore_ascii_case(".ome") {
                stem[..cut].to_string()
            } else {
                stem
            }
        }
        _ => stem,
    }
}

/// The rules every slide id follows, wherever it comes from (file names, HTTP paths): ids
/// become folder and file names, so no `/`, `\` or NUL, not `.` or `..`, not empty, at most
/// [`MAX_ID_CHARS`] characters. `Err` says what is wrong.
pub fn check_slide_id(id: &str) -> std::result::Result<(), String> {
    if id.is_empty() {
        Err("is empty".into())
    } else if id.chars().count() > MAX_ID_CHARS {
        Err(format!("is longer than {MAX_ID_CHARS} characters"))
    } else if id == "." || id == ".." {
        Err("may not be `.` or `..`".into())
    } else if id.contains(['/', '\\', '\0']) {
        Err("may not contain `/`, `\\` or NUL".into())
    } else {
        Ok(())
    }
}

/// Slide files under `inputs` (files as given, folders searched recursively for slide
/// extensions), by slide id, with the default [`Limits`] and no roots.
pub fn find_slides(inputs: &[PathBuf]) -> Result<BTreeMap<String, PathBuf>> {
    Ok(find_slides_within(inputs, None, &Limits::default())?)
}

/// Slide files under `inputs` by slide id (canonical paths). Two different files with one id
/// are an error: ids key everything. With `roots`, anything resolving outside them is
/// [`DiscoverError::OutsideRoots`].
pub fn find_slides_within(
    inputs: &[PathBuf],
    roots: Option<&[PathBuf]>,
    limits: &Limits,
) -> std::result::Result<BTreeMap<String, PathBuf>, DiscoverError> {
    let roots = roots.map(|r| {
        r.iter()
            .filter_map(|p| std::fs::canonicalize(p).ok())
            .collect::<Vec<_>>()
    });
    let mut walker = Walker {
        roots,
        limits,
        visited: HashSet::new(),
        entries: 0,
        files: Vec::new(),
    };
    for input in inputs {
        let meta = std::fs::metadata(input).map_err(|e| unreadable(input, e))?;
        if meta.is_dir() {
            let before = walker.files.len();
            walker.dir(input, 0)?;
            if walker.files.len() == before {
                tracing::warn!(
                    "{}: no slide files ({}) in this folder",
                    input.display(),
                    SLIDE_EXTENSIONS.join(", ")
                );
            }
        } else {
            walker.files.push(input.clone());
        }
    }
    let mut found = BTreeMap::new();
    let mut problems = Vec::new();
    for f in std::mem::take(&mut walker.files) {
        let Some((id, abs)) = walker.file(&f, &mut problems)? else {
            continue;
        };
        if let Some(other) = found.insert(id.clone(), abs.clone()) {
            if other != abs {
                return Err(PipelineError::Input(format!(
                    "two slides share the id `{id}`: {} and {} (ids are file names without extension)",
                    other.display(),
                    abs.display()
                ))
                .into());
            }
        }
    }
    if !problems.is_empty() {
        const SHOWN: usize = 20;
        let mut msg = format!(
            "{} slide file(s) cannot be ingested (nothing was registered):",
            problems.len()
        );
        for p in problems.iter().take(SHOWN) {
            msg += &format!("\n  {p}");
        }
        if problems.len() > SHOWN {
            msg += &format!("\n  ... and {} more", problems.len() - SHOWN);
        }
        return Err(PipelineError::Input(msg).into());
    }
    Ok(found)
}

/// Where `path` leads, symbolic links followed: its canonical path when it exists; when it does
/// not (a missing file, a dangling link), where it would be: links are followed as far as they
/// go and the missing rest is taken literally. `None` when that cannot be told (a `..` after a
/// missing component, more than 40 links, a relative path without a working directory). So the
/// answer depends on where a path points, never on whether its target exists.
pub fn resolve_or_predict(path: &Path) -> Option<PathBuf> {
    use std::ffi::OsString;
    if let Ok(p) = std::fs::canonicalize(path) {
        return Some(p);
    }
    let mut out = if path.is_absolute() {
        PathBuf::from("/")
    } else {
        std::env::current_dir().ok()?
    };
    // Components still to walk, the next one last.
    let mut pending: Vec<OsString> = path
        .components()
        .rev()
        .map(|c| c.as_os_str().to_owned())
        .collect();
    let (mut links, mut missing) = (0, false);
    while let Some(c) = pending.pop() {
        if c == "." {
            continue;
        }
        if c == "/" {
            out = PathBuf::from("/");
        } else if c == ".." {
            if missing {
                return None;
            }
            out.pop();
        } else {
            let next = out.join(&c);
            if missing {
                out = next;
                continue;
            }
            match std::fs::symlink_metadata(&next) {
                Ok(m) if m.file_type().is_symlink() => {
                    links += 1;
                    if links > 40 {
                        return None;
                    }
                    let target = std::fs::read_link(&next).ok()?;
                    pending.extend(target.components().rev().map(|c| c.as_os_str().to_owned()));
                }
                Ok(_) => out = next,
                Err(_) => {
                    missing = true;
                    out = next;
                }
            }
        }
    }
    Some(out)
}

/// A path that cannot be read: an input error naming it (not a fault of ours).
fn unreadable(path: &Path, e: std::io::Error) -> DiscoverError {
    PipelineError::Input(format!("{}: {e}", path.display())).into()
}

struct Walker<'a> {
    /// Canonical roots (`None`: anywhere).
    roots: Option<Vec<PathBuf>>,
    limits: &'a Limits,
    /// (device, inode) of every folder entered.
    visited: HashSet<(u64, u64)>,
    entries: usize,
    files: Vec<PathBuf>,
}

impl Walker<'_> {
    /// `path` (resolved: `abs`) must lie under a root, when there are roots.
    fn check_roots(&self, path: &Path, abs: &Path) -> std::result::Result<(), DiscoverError> {
        match &self.roots {
            Some(roots) if !roots.iter().any(|r| abs.starts_with(r)) => {
                Err(DiscoverError::OutsideRoots {
                    path: path.to_path_buf(),
                })
            }
            _ => Ok(()),
        }
    }

    fn dir(&mut self, dir: &Path, depth: usize) -> std::result::Result<(), DiscoverError> {
        let meta = std::fs::metadata(dir).map_err(|e| unreadable(dir, e))?;
        if !self.visited.insert((meta.dev(), meta.ino())) {
            return Ok(()); // a link back to a folder already walked (a loop, or a second way in)
        }
        let abs = std::fs::canonicalize(dir).map_err(|e| unreadable(dir, e))?;
        self.check_roots(dir, &abs)?;
        if depth > self.limits.max_depth {
            return Err(PipelineError::Input(format!(
                "{}: folders nested more than {} deep; give a folder nearer the slides",
                dir.display(),
                self.limits.max_depth
            ))
            .into());
        }
        let mut entries = Vec::new();
        for e in std::fs::read_dir(dir).map_err(|e| unreadable(dir, e))? {
            self.entries += 1;
            if self.entries > self.limits.max_entries {
                return Err(PipelineError::Input(format!(
                    "more than {} files and folders under the given folders (stopped in {}); \
                     ingest fewer at a time",
                    self.limits.max_entries,
                    dir.display()
                ))
                .into());
            }
            entries.push(e.map_err(|e| unreadable(dir, e))?.path());
        }
        entries.sort();
        for p in entries {
            // Under roots, a link must point inside them, whatever it is and whether its target
            // exists or not (one answer: no probing outside through planted links).
            if self.roots.is_some()
                && std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink())
            {
                match resolve_or_predict(&p) {
                    Some(target) => self.check_roots(&p, &target)?,
                    None => return Err(DiscoverError::OutsideRoots { path: p }),
                }
            }
            // Follows links; a broken link with a slide extension is reported with the files.
            match std::fs::metadata(&p) {
                Ok(m) if m.is_dir() => self.dir(&p, depth + 1)?,
                _ if is_slide(&p) => self.files.push(p),
                _ => {}
            }
        }
        Ok(())
    }

    /// The id and canonical path of a slide file, or a problem noted in `problems`.
    fn file(
        &self,
        f: &Path,
        problems: &mut Vec<String>,
    ) -> std::result::Result<Option<(String, PathBuf)>, DiscoverError> {
        let shown = f.display();
        if f.to_str().is_none() {
            problems.push(format!(
                "{shown}: the path is not valid UTF-8; rename it (slide paths and ids must be UTF-8)"
            ));
            return Ok(None);
        }
        let id = slide_id(f);
        if let Err(why) = check_slide_id(&id) {
            problems.push(format!(
                "{shown}: the slide id `{}` (its file name without extension) {why}; rename the file",
                id.escape_debug()
            ));
            return Ok(None);
        }
        let abs = match std::fs::canonicalize(f) {
            Ok(abs) => abs,
            Err(e) => {
                problems.push(format!("{shown}: {e}"));
                return Ok(None);
            }
        };
        self.check_roots(f, &abs)?;
        if !std::fs::metadata(&abs).is_ok_and(|m| m.is_file()) {
            problems.push(format!("{shown}: not a regular file"));
            return Ok(None);
        }
        if abs.to_str().is_none() {
            problems.push(format!(
                "{shown}: resolves to {}, which is not valid UTF-8; rename it",
                abs.display()
            ));
            return Ok(None);
        }
        Ok(Some((id, abs)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn ome_tiff_double_extensions_name_the_slide_without_ome() {
        for (file, id) in [
            ("a/S-1.ome.tiff", "S-1"),
            ("S-1.OME.TIF", "S-1"),
            ("S-1.ome.svs", "S-1.ome"),
            ("S-1.tiff", "S-1"),
            (".ome.tiff", ".ome"),
            ("x.y.tif", "x.y"),
        ] {
            assert_eq!(slide_id(Path::new(file)), id, "{file}");
        }
    }

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

    /// Runs `f` on a thread and fails the test if it takes longer than `secs` (the old walk
    /// never returned on a link loop).
    fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(secs))
            .expect("discovery did not finish (a symlink loop walked for ever?)")
    }

    #[test]
    fn symlink_loops_end_and_each_folder_is_walked_once() {
        let d = tempfile::tempdir().unwrap();
        let top = d.path().join("top");
        std::fs::create_dir_all(top.join("sub")).unwrap();
        std::fs::write(top.join("sub/one.svs"), b"x").unwrap();
        symlink(".", top.join("a")).unwrap();
        symlink(".", top.join("b")).unwrap();
        symlink("..", top.join("sub/up")).unwrap();
        let found = within(20, move || find_slides(&[top]).map_err(|e| e.to_string())).unwrap();
        assert_eq!(found.keys().collect::<Vec<_>>(), ["one"]);
    }

    #[test]
    fn walks_past_their_bounds_are_clear_errors() {
        let d = tempfile::tempdir().unwrap();
        let deep = d.path().join("deep");
        let mut p = deep.clone();
        for i in 0..6 {
            p = p.join(format!("d{i}"));
        }
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("x.svs"), b"x").unwrap();
        let small = Limits {
            max_depth: 4,
            max_entries: 1000,
        };
        let err = find_slides_within(std::slice::from_ref(&deep), None, &small)
            .unwrap_err()
            .to_string();
        assert!(err.contains("nested more than 4 deep"), "{err}");
        let wide = d.path().join("wide");
        std::fs::create_dir_all(&wide).unwrap();
        for i in 0..30 {
            std::fs::write(wide.join(format!("s{i}.svs")), b"x").unwrap();
        }
        let few = Limits {
            max_depth: 4,
            max_entries: 10,
        };
        let err = find_slides_within(std::slice::from_ref(&wide), None, &few)
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than 10 files and folders"), "{err}");
        assert_eq!(find_slides(&[wide]).unwrap().len(), 30);
    }

    #[test]
    fn links_out_of_the_roots_are_refused_at_any_depth() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        let outside = d.path().join("outside");
        std::fs::create_dir_all(root.join("cases/deeper")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(root.join("cases/in.svs"), b"x").unwrap();
        std::fs::write(outside.join("secret.svs"), b"x").unwrap();
        let roots = vec![root.clone()];
        let cases = root.join("cases");
        let ok = find_slides_within(
            std::slice::from_ref(&cases),
            Some(roots.as_slice()),
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(ok.keys().collect::<Vec<_>>(), ["in"]);
        // A linked folder, then a linked file, deeper in the tree.
        symlink(&outside, root.join("cases/deeper/elsewhere")).unwrap();
        let err = find_slides_within(
            std::slice::from_ref(&cases),
            Some(roots.as_slice()),
            &Limits::default(),
        )
        .unwrap_err();
        assert!(
            matches!(&err, DiscoverError::OutsideRoots { path } if path.ends_with("deeper/elsewhere")),
            "{err}"
        );
        std::fs::remove_file(root.join("cases/deeper/elsewhere")).unwrap();
        symlink(outside.join("secret.svs"), root.join("cases/deeper/s.svs")).unwrap();
        let err = find_slides_within(
            std::slice::from_ref(&cases),
            Some(roots.as_slice()),
            &Limits::default(),
        )
        .unwrap_err();
        assert!(matches!(err, DiscoverError::OutsideRoots { .. }), "{err}");
        // Without roots (the command line), links are followed.
        assert_eq!(find_slides(std::slice::from_ref(&cases)).unwrap().len(), 2);
        // Under roots, any link out is refused whether its target exists or not, whatever it
        // names (no probing of what exists outside).
        std::fs::remove_file(root.join("cases/deeper/s.svs")).unwrap();
        let walk = || {
            find_slides_within(
                std::slice::from_ref(&cases),
                Some(roots.as_slice()),
                &Limits::default(),
            )
        };
        for (name, target) in [
            ("gone.svs", outside.join("missing.svs")),
            ("notes", outside.join("secret.svs")),
            ("gone-dir", outside.join("no/such/dir")),
        ] {
            symlink(&target, root.join("cases").join(name)).unwrap();
            let err = walk().unwrap_err();
            assert!(
                matches!(&err, DiscoverError::OutsideRoots { path } if path.ends_with(name)),
                "{name}: {err}"
            );
            std::fs::remove_file(root.join("cases").join(name)).unwrap();
        }
        // A dangling link that stays inside is an ordinary missing file.
        symlink(root.join("cases/nothing.svs"), root.join("cases/later.svs")).unwrap();
        let err = walk().unwrap_err();
        assert!(
            matches!(err, DiscoverError::Other(_)) && err.to_string().contains("later.svs"),
            "{err}"
        );
    }

    #[test]
    fn predicted_paths_follow_links_past_missing_targets() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().canonicalize().unwrap();
        std::fs::create_dir_all(base.join("a")).unwrap();
        symlink(base.join("x/y"), base.join("l")).unwrap();
        symlink("a", base.join("rel")).unwrap();
        assert_eq!(resolve_or_predict(&base.join("a")), Some(base.join("a")));
        assert_eq!(
            resolve_or_predict(&base.join("l/z.svs")),
            Some(base.join("x/y/z.svs"))
        );
        assert_eq!(
            resolve_or_predict(&base.join("rel/../rel/f.svs")),
            Some(base.join("a/f.svs"))
        );
        assert_eq!(resolve_or_predict(&base.join("nope/../f")), None);
        symlink(base.join("l2"), base.join("l1")).unwrap();
        symlink(base.join("l1"), base.join("l2")).unwrap();
        assert_eq!(resolve_or_predict(&base.join("l1/f")), None);
    }

    #[test]
    fn bad_names_are_refused_together_naming_each_file() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("names");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("good.svs"), b"x").unwrap();
        std::fs::write(dir.join("..svs"), b"x").unwrap();
        std::fs::write(dir.join("...svs"), b"x").unwrap();
        std::fs::write(dir.join(OsStr::from_bytes(b"caf\xe9.svs")), b"x").unwrap();
        std::fs::write(dir.join(OsStr::from_bytes(b"caf\xe8.svs")), b"x").unwrap();
        let err = find_slides(std::slice::from_ref(&dir))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("4 slide file(s) cannot be ingested"),
            "{err}"
        );
        assert!(
            err.contains("..svs: the slide id `.` (its file name without extension) may not be"),
            "{err}"
        );
        assert!(err.contains("...svs: the slide id `..`"), "{err}");
        assert!(
            err.contains("caf\u{fffd}.svs: the path is not valid UTF-8"),
            "{err}"
        );
        assert!(!err.contains("good.svs"), "{err}");
        // A FIFO named like a slide would block the reader: not a regular file.
        let fifo = d.path().join("pipe.svs");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            let err = find_slides(&[fifo]).unwrap_err().to_string();
            assert!(err.contains("pipe.svs: not a regular file"), "{err}");
        }
        assert!(check_slide_id("SYN-0001").is_ok());
        assert!(check_slide_id(&"é".repeat(512)).is_ok());
        for bad in ["", ".", "..", "a/b", "a\\b", "a\0b", &"é".repeat(513)] {
            assert!(check_slide_id(bad).is_err(), "{bad:?}");
        }
    }
}
