//! The one error type of the crate. Every variant names the file (or the value) and the problem,
//! so that the CLI can print it on one line.

use std::path::PathBuf;

/// Errors from reading, segmenting, tiling or writing slides.
#[derive(Debug, thiserror::Error)]
pub enum WsiError {
    #[error("{}: no such file", .0.display())]
    MissingFile(PathBuf),
    #[error("{}: is a directory, not a slide file", .0.display())]
    IsDirectory(PathBuf),
    #[error("{}: empty file (0 bytes), not a slide", .0.display())]
    EmptyFile(PathBuf),
    #[error("{}: not a slide format OpenSlide can read (SVS, NDPI, MRXS, SCN, tiled TIFF, ...), or a truncated one", .0.display())]
    Unsupported(PathBuf),
    #[error("{}: OpenSlide cannot read this slide: {msg}", path.display())]
    Unreadable { path: PathBuf, msg: String },
    #[error(
        "{}: the slide records no microns-per-pixel (no OpenSlide mpp property, no TIFF resolution tags); \
         pass --mpp with the level-0 resolution in um/px (e.g. 0.25 for 40x, 0.5 for 20x)",
        .0.display()
    )]
    NoMpp(PathBuf),
    #[error("invalid mpp {0}: must be a finite number of microns per pixel in (0, 100]")]
    InvalidMpp(f64),
    #[error("invalid {name} {value}: {why}")]
    InvalidParameter {
        name: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("{}: slide too small for one {tile_px} px tile at level 0 ({width} x {height} px)", path.display())]
    TooSmall {
        path: PathBuf,
        width: u64,
        height: u64,
        tile_px: u32,
    },
    /// A plan that would read absurd numbers of pixels (a wrong mpp, a forged header): refused
    /// before any pixel work, naming the limit.
    #[error("{}: refusing to tile: {reason}", path.display())]
    AbsurdPlan { path: PathBuf, reason: String },
    /// More stored tiles could not be decoded than the slide may lose.
    #[error(
        "{}: cannot read {bad} of {total} kept tiles, over the {max_fraction} allowed \
         (tiling.max_bad_tile_fraction); first: {first}",
        path.display()
    )]
    TooManyBadTiles {
        path: PathBuf,
        bad: usize,
        total: usize,
        max_fraction: f64,
        first: String,
    },
    #[error("{}: {msg}", path.display())]
    Io { path: PathBuf, msg: String },
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
}

impl WsiError {
    /// An I/O error on `path`, keeping the OS's own wording ("Permission denied", "No space left").
    pub fn io(path: impl Into<PathBuf>, err: impl std::fmt::Display) -> Self {
        WsiError::Io {
            path: path.into(),
            msg: err.to_string(),
        }
    }

    /// A malformed file (grid file, TIFF) at `path`.
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        WsiError::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

/// Result alias of the crate.
pub type Result<T, E = WsiError> = std::result::Result<T, E>;
