//! What learning from labels can fail with. Every variant names the problem in its message,
//! so the CLI prints it as is and the API maps it to a 4xx.

use std::path::PathBuf;

/// Errors of the probe crate.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Fewer than two classes among the labelled slides.
    #[error(
        "label `{label}` has a single class ({class}) among {slides} labelled slides: a head \
         needs at least two classes"
    )]
    SingleClass {
        /// The label column.
        label: String,
        /// The one class present (empty when no slide is labelled).
        class: String,
        /// How many slides carry the label.
        slides: usize,
    },
    /// A class has no slide on the training side of a cross-validation fold.
    #[error(
        "class `{class}` is missing from the training slides of fold {fold} of {folds} \
         ({groups} patient group(s) of that class for {folds} folds): use fewer folds or label \
         more patients"
    )]
    ClassMissingFromFold {
        /// The class.
        class: String,
        /// The fold (1-based).
        fold: usize,
        /// Folds asked for.
        folds: usize,
        /// Patient groups of that class.
        groups: usize,
    },
    /// Fewer labelled slides of a class than a few-shot draw takes.
    #[error(
        "too few slides per class for k = {k}: class `{class}` has {available} training slide(s)"
    )]
    TooFewSlides {
        /// Slides per class asked for.
        k: usize,
        /// The class that lacks them.
        class: String,
        /// How many it has.
        available: usize,
    },
    /// A label value that is not one of the head's classes.
    #[error("unknown label value `{value}` of slide `{slide}`: the classes are {known}")]
    UnknownLabel {
        /// The value.
        value: String,
        /// The slide that carries it.
        slide: String,
        /// The known classes, comma-separated.
        known: String,
    },
    /// A vector of the wrong width.
    #[error("dimension mismatch: {what} has {got} dimensions, expected {expected}")]
    DimensionMismatch {
        /// Which vector.
        what: String,
        /// The width expected (the head's or the first slide's).
        expected: usize,
        /// The width found.
        got: usize,
    },
    /// A slide the request names is not stored.
    #[error("slide `{0}` is not stored (ingest it first)")]
    UnknownSlide(String),
    /// A head name not in the data dir.
    #[error("no probe head named `{name}` in {}", dir.display())]
    UnknownHead {
        /// The name asked for.
        name: String,
        /// The probes folder looked in.
        dir: PathBuf,
    },
    /// Stored embeddings come from other weights than a head was trained on (or mix weights).
    #[error("{0}")]
    Fingerprint(String),
    /// Any other bad input (bad names, options, CSV rows), with its explanation.
    #[error("{0}")]
    Invalid(String),
    /// A file that could not be read or written.
    #[error("{}: {msg}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },
    /// Tensor math failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The optimiser shared with alignment training failed (boxed: the training errors are
    /// large and rare).
    #[error(transparent)]
    Optim(Box<gigapath_train::TrainError>),
    /// The catalog or vector store failed.
    #[error(transparent)]
    Store(#[from] gigapath_store::StoreError),
    /// A metric was asked of inconsistent predictions.
    #[error(transparent)]
    Metrics(#[from] gigapath_zeroshot::ZeroShotError),
}

impl From<gigapath_train::TrainError> for ProbeError {
    fn from(e: gigapath_train::TrainError) -> Self {
        ProbeError::Optim(Box::new(e))
    }
}

impl ProbeError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, e: impl std::fmt::Display) -> Self {
        ProbeError::Io {
            path: path.into(),
            msg: e.to_string(),
        }
    }

    /// Whether the caller can fix it (bad input rather than a broken store or file).
    pub fn is_input(&self) -> bool {
        !matches!(
            self,
            ProbeError::Io { .. }
                | ProbeError::Tensor(_)
                | ProbeError::Optim(_)
                | ProbeError::Store(_)
        )
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, ProbeError>;
