//! Zero-shot classification with prompt sets, model-free: what `gigapath eval` and the HTTP
//! service share.
//!
//! - [`prompts`]: the prompt folder (`templates.toml`, `subtype-*.toml`, `mutation-*.toml`),
//!   loaded and validated once; errors name the file and key.
//! - [`classify`]: class embeddings (mean of L2-normalised prompt embeddings over names x
//!   templates, renormalised), probabilities = softmax(logit_scale x cosine) or TITAN's
//!   softmax over raw cosines, mutation probabilities (mutated vs wild-type phrasing).
//! - [`metrics`]: balanced accuracy, weighted F1, macro one-vs-rest AUROC, confusion matrix,
//!   recall@k.
//! - [`robustness`](mod@robustness): MI-Zero's protocol, 50 sampled prompt sets, median and spread.
//!
//! Not for: running a text encoder. Callers pass an [`Embed`] function (texts -> joint-space
//! vectors), so this crate has no model, tensor library or I/O beyond reading prompt files.
//!
//! ```
//! use gigapath_zeroshot::{ClassPrompts, SubtypeSet, Temperature};
//! let set = SubtypeSet::inline(
//!     "toy",
//!     vec![
//!         ClassPrompts { label: "A".into(), names: vec!["alpha".into()] },
//!         ClassPrompts { label: "B".into(), names: vec!["beta".into()] },
//!     ],
//!     vec!["an image of CLASSNAME.".into()],
//! )?;
//! // A stand-in encoder; real callers wrap a text encoder and the alignment's text head.
//! let mut embed = |texts: &[String]| -> Result<Vec<Vec<f32>>, String> {
//!     Ok(texts.iter().map(|t| if t.contains("alpha") { vec![1.0, 0.0] } else { vec![0.0, 1.0] }).collect())
//! };
//! let classes = set.class_embeddings(&mut embed)?;
//! let p = classes.classify(&[0.9, 0.1], Temperature::LogitScale(100.0))?;
//! assert_eq!(p.label, "A");
//! # Ok::<(), gigapath_zeroshot::ZeroShotError>(())
//! ```

pub mod classify;
pub mod error;
pub mod metrics;
pub mod prompts;
pub mod rng;
pub mod robustness;

pub use classify::{
    cosine, ClassEmbeddings, Embed, GeneEmbeddings, Prediction, Temperature, TextEmbeddings,
};
pub use error::{Result, ZeroShotError};
pub use metrics::{recall_at_k, ClassificationReport};
pub use prompts::{ClassPrompts, GenePrompts, MutationSet, PromptLibrary, SubtypeSet};
pub use robustness::{robustness, sample_prompt_sets, RobustnessConfig, RobustnessReport};
