//! Whole-slide images for gigapath: opening slides through OpenSlide, finding their resolution,
//! segmenting tissue, cutting the 0.5 um/px tile grid, and streaming normalised tile batches to
//! the tile encoder. Also writes synthetic pyramidal slides with real H&E texture for tests.
//!
//! Not for: model math (`gigapath-models`) or storage (`gigapath-store`).
//!
//! The data flow, in module order:
//! [`slide`] (open, describe, read RGB) -> [`mpp`] (resolution and its source) ->
//! [`thumbnail`] (a downsampled view for segmentation) -> [`tissue`] (mask) ->
//! [`grid`] (tile plan and kept tiles) -> [`gridfile`] / [`outputs`] (files on disk) ->
//! [`stream`] (parallel, bounded tile batches) -> [`transform`] (crop + normalise).
//! [`artifacts`] (pen, debris, out of focus) refines the mask and the kept tiles.
//! [`render`] draws the mask and overlay pictures; [`slide_writer`] writes synthetic test slides.

pub mod artifacts;
pub mod error;
pub mod geojson;
pub mod grid;
pub mod gridfile;
pub mod mpp;
pub mod outputs;
pub mod render;
pub mod slide;
pub mod slide_writer;
pub mod stream;
pub mod thumbnail;
pub mod tissue;
pub mod transform;

pub use error::{Result, WsiError};
pub use grid::{tile_slide, TilePlan, TileRef, Tiling, TilingOptions};
pub use mpp::{Mpp, MppSource};
pub use slide::{Slide, SlideInfo};
pub use stream::{BatchData, BatchFormat, SkippedTile, StreamConfig, TileBatch, TileStream};
pub use tissue::TissueMethod;
