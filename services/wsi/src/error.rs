//! The one error type of the crate. Every variant names the file (or the value) and the problem,
//! so that the CLI can print it on one line.

use std::path::PathBuf;

/// Errors from reading, segmenting, tiling or writing slides.
#[derive(Debug, thiserror::Error)]
pub enum WsiError {
    /// The slide path does not exist.
    #[error("{}: no such file", .0.display())]
    MissingFile(PathBuf),
    /// The slide path is a folder.
    #[error("{}: is a directory, not a slide file", .0.display())]
    IsDirectory(PathBuf),
    /// The slide file has no bytes.
    #[error("{}: empty file (0 bytes), not a slide", .0.display())]
    EmptyFile(PathBuf),
    /// OpenSlide does not recognise the file's format.
    #[error("{}: not a slide format OpenSlide can read (SVS, NDPI, MRXS, SCN, tiled TIFF, ...), or a truncated one", .0.display())]
    Unsupported(PathBuf),
    /// OpenSlide recognised the file but failed to open it or read a region of it.
    #[error("{}: OpenSlide cannot read this slide: {msg}", path.display())]
    Unreadable {
        /// The slide file.
        path: PathBuf,
        /// OpenSlide's error.
        msg: String,
    },
    /// Neither the slide nor the caller gives a level-0 resolution.
    #[error(
        "{}: the slide records no microns-per-pixel (no OpenSlide mpp property, no TIFF resolution tags); \
         pass --mpp with the level-0 resolution in um/px (e.g. 0.25 for 40x, 0.5 for 20x)",
        .0.display()
    )]
    NoMpp(PathBuf),
    /// A resolution (micrometres per pixel) that is not finite and in (0, 100].
    #[error("invalid mpp {0}: must be a finite number of microns per pixel in (0, 100]")]
    InvalidMpp(f64),
    /// An option out of its range (batch size, tissue threshold, ...).
    #[error("invalid {name} {value}: {why}")]
    InvalidParameter {
        /// The option, in words (`"batch size"`).
        name: &'static str,
        /// The value given, as text.
        value: String,
        /// The range or rule it breaks.
        why: &'static str,
    },
    /// The slide is smaller than one tile at level 0.
    #[error("{}: slide too small for one {tile_px} px tile at level 0 ({width} x {height} px)", path.display())]
    TooSmall {
        /// The slide file.
        path: PathBuf,
        /// Level-0 width, pixels.
        width: u64,
        /// Level-0 height, pixels.
        height: u64,
        /// Tile side at level 0, pixels.
        tile_px: u32,
    },
    /// A plan that would read absurd numbers of pixels (a wrong mpp, a forged header): refused
    /// before any pixel work, naming the limit.
    #[error("{}: refusing to tile: {reason}", path.display())]
    AbsurdPlan {
        /// The slide file.
        path: PathBuf,
        /// Which limit the plan exceeds.
        reason: String,
    },
    /// More stored tiles could not be decoded than the slide may lose.
    #[error(
        "{}: cannot read {bad} of {total} kept tiles, over the {max_fraction} allowed \
         (tiling.max_bad_tile_fraction); first: {first}",
        path.display()
    )]
    TooManyBadTiles {
        /// The slide file.
        path: PathBuf,
        /// Kept tiles that could not be read.
        bad: usize,
        /// Kept tiles in all.
        total: usize,
        /// The largest share of bad tiles allowed, in [0, 1].
        max_fraction: f64,
        /// The first bad tile's error.
        first: String,
    },
    /// An I/O error on a file this crate reads or writes ([`WsiError::io`]).
    #[error("{}: {msg}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error, in its own words.
        msg: String,
    },
    /// A malformed file other than a slide OpenSlide reads ([`WsiError::format`]).
    #[error("{}: {msg}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
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
