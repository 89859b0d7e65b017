//! Free space on the disk that holds the data dir, and full-disk errors that say so.
//!
//! The embedded vector store (qdrant-edge 0.7.2) panics inside its flush when a write hits a
//! full disk, and its memory-mapped segment files are sparse, so a page written on a full disk
//! can kill the process with SIGBUS. It is therefore never allowed to get there: every write
//! first checks that the file system keeps at least `store.min_free_mb` free after it
//! ([`ensure_free`]), and is refused with an error that names the disk otherwise. Feature files
//! are plain writes: an `ENOSPC` there is reported the same way ([`full_disk`]) and their
//! temporary file removed.
//!
//! Both are [`StoreError::Io`] errors of kind [`std::io::ErrorKind::StorageFull`]: an
//! infrastructure fault (retried, never blamed on the slide).

use std::io;
use std::path::Path;

use crate::error::{Result, StoreError};

/// Default `store.min_free_mb`: one 32 MB write-ahead-log segment for each collection, the
/// segment files an optimisation rewrites, and margin.
pub const DEFAULT_MIN_FREE_MB: u64 = 256;

const MB: f64 = (1u64 << 20) as f64;

/// Bytes available to this (unprivileged) process, and the size of the file system, at `path`.
#[cfg(unix)]
pub fn space(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    // SAFETY: an all-zero `statvfs` is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is NUL-terminated and outlives the call; `st` is writable.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let unit = st.f_frsize as u64;
    Ok((
        (st.f_bavail as u64).saturating_mul(unit),
        (st.f_blocks as u64).saturating_mul(unit),
    ))
}

#[cfg(not(unix))]
pub fn space(_path: &Path) -> io::Result<(u64, u64)> {
    Ok((u64::MAX, u64::MAX))
}

/// Refuses a write of about `needed` bytes under `path` that would leave less than `min_free`
/// bytes on its file system (`min_free` 0: no check).
pub fn ensure_free(path: &Path, needed: u64, min_free: u64) -> Result<()> {
    if min_free == 0 {
        return Ok(());
    }
    let (available, total) =
        space(path).map_err(|e| StoreError::io("check free space of", path, e))?;
    if available >= needed.saturating_add(min_free) {
        return Ok(());
    }
    Err(StoreError::io(
        "disk full: refused to write to",
        path,
        io::Error::new(
            io::ErrorKind::StorageFull,
            format!(
                "the file system holding it has {:.1} MB free of {:.0} MB, and a write of about \
                 {:.1} MB must leave {:.0} MB free (store.min_free_mb); nothing was written, free \
                 space and retry",
                available as f64 / MB,
                total as f64 / MB,
                needed as f64 / MB,
                min_free as f64 / MB
            ),
        ),
    ))
}

/// Whether `err` says the disk (or the user's quota) is full.
pub fn is_full(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::StorageFull
        || matches!(err.raw_os_error(), Some(code) if code == libc::ENOSPC || code == libc::EDQUOT)
}

/// The error for an I/O failure `err` of `op` on `path`, saying "disk full" when it is one.
pub fn io_error(op: &'static str, path: &Path, err: io::Error) -> StoreError {
    if !is_full(&err) {
        return StoreError::io(op, path, err);
    }
    full_disk(path, err)
}

/// A write on `path` that failed for lack of space (`ENOSPC` / `EDQUOT`).
pub fn full_disk(path: &Path, err: io::Error) -> StoreError {
    let free = space(path)
        .or_else(|_| space(path.parent().unwrap_or(Path::new("/"))))
        .map(|(available, total)| {
            format!(
                "; the file system holding it has {:.1} MB free of {:.0} MB",
                available as f64 / MB,
                total as f64 / MB
            )
        })
        .unwrap_or_default();
    StoreError::io(
        "disk full: could not write",
        path,
        io::Error::new(
            io::ErrorKind::StorageFull,
            format!("{err}{free}; nothing was kept, free space and retry"),
        ),
    )
}

/// A small real file system for full-disk tests: an ext4 image loop-mounted on a fresh folder,
/// unmounted and removed on drop. Needs root and `mkfs.ext4`; where they are missing,
/// [`LoopDisk::new`] prints why and returns `None` (the test then skips).
#[cfg(test)]
pub(crate) struct LoopDisk {
    dir: tempfile::TempDir,
    _image: tempfile::NamedTempFile,
}

#[cfg(test)]
impl LoopDisk {
    pub(crate) fn new(mb: u64) -> Option<LoopDisk> {
        use std::process::{Command, Stdio};
        let image = tempfile::NamedTempFile::new().ok()?;
        image.as_file().set_len(mb << 20).ok()?;
        let dir = tempfile::tempdir().ok()?;
        let ok = |c: &mut Command| {
            c.stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ok(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(image.path()))
        {
            eprintln!("SKIPPED: mkfs.ext4 is not available to make a small disk");
            return None;
        }
        if !ok(Command::new("mount")
            .args(["-o", "loop"])
            .arg(image.path())
            .arg(dir.path()))
        {
            eprintln!("SKIPPED: cannot loop-mount a small ext4 disk here (needs root)");
            return None;
        }
        Some(LoopDisk { dir, _image: image })
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Takes all but `leave` bytes of the free space with a file (allocated, not sparse).
    pub(crate) fn fill(&self, leave: u64) -> std::path::PathBuf {
        use std::os::fd::AsRawFd;
        let (available, _) = space(self.path()).unwrap();
        let filler = self.path().join("filler");
        let file = std::fs::File::create(&filler).unwrap();
        let len = available.saturating_sub(leave) as libc::off_t;
        // SAFETY: a valid open file descriptor; the range is within off_t.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
        assert_eq!(rc, 0);
        filler
    }
}

#[cfg(test)]
impl Drop for LoopDisk {
    fn drop(&mut self) {
        let unmounted = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_is_measured_and_a_write_past_the_reserve_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (available, total) = space(dir.path()).unwrap();
        assert!(available > 0 && total >= available, "{available} / {total}");
        ensure_free(dir.path(), 1 << 20, 1).unwrap();
        let err = ensure_free(dir.path(), 0, available + (1 << 30)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("disk full") && msg.contains(&dir.path().display().to_string()),
            "{msg}"
        );
        assert!(msg.contains("store.min_free_mb"), "{msg}");
        match err {
            StoreError::Io { err, .. } => assert_eq!(err.kind(), io::ErrorKind::StorageFull),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn enospc_is_recognised() {
        assert!(is_full(&io::Error::from_raw_os_error(libc::ENOSPC)));
        assert!(!is_full(&io::Error::from_raw_os_error(libc::EACCES)));
        let msg = io_error(
            "write",
            Path::new("/"),
            io::Error::from_raw_os_error(libc::ENOSPC),
        )
        .to_string();
        assert!(
            msg.contains("disk full") && msg.contains("MB free"),
            "{msg}"
        );
    }
}
