//! The seeded generator of prompt sampling, and of the training split and data order in
//! `gigapath-train`: the workspace's one [`gigapath_rng::SplitMix64`], re-exported where those
//! crates have always found it.

pub use gigapath_rng::SplitMix64;
