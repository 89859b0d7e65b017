//! One module per subcommand; each has its clap arguments and a `run` function.

pub mod bench;
pub mod demo;
pub mod encode;
pub mod index;
pub mod ingest;
pub mod jobs;
pub mod models;
pub mod probe;
pub mod search;
pub mod serve;
pub mod slide;
pub mod synth;
pub mod tile;
pub mod train;
