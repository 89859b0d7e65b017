//! Writing a tiling to its output directory, all or nothing.
//!
//! Files are first written into a staging folder inside the output directory and renamed into
//! place only when every one of them is complete; on any failure the staging folder is removed
//! (and the output directory too, if this call created it and it is still empty).

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::artifacts::ArtifactSummary;
use crate::error::{Result, WsiError};
use crate::geojson;
use crate::grid::{TileRef, Tiling};
use crate::gridfile::{self, GridFile};
use crate::mpp::MppSource;
use crate::render;
use crate::slide::Slide;
use crate::stream::SkippedTile;

/// The one-line JSON summary `gigapath tile` prints, also saved as `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct TileSummary {
    /// The slide file.
    pub slide: PathBuf,
    /// OpenSlide's format name ([`crate::slide::SlideInfo::vendor`]).
    pub vendor: String,
    /// Tiles kept.
    pub tiles: usize,
    /// True level-0 mpp (mean of x and y).
    pub mpp: f64,
    /// Where `mpp` came from.
    pub mpp_source: MppSource,
    /// The nominal level-0 mpp it was snapped to (equal to `mpp` when unsnapped).
    pub nominal_mpp: f64,
    /// Tile side at level 0, in level-0 pixels.
    pub level0_tile_px: u32,
    /// True micrometres per pixel of the 256 px tiles the encoder sees.
    pub tile_mpp: f64,
    /// Pyramid level the tiles are read from.
    pub read_level: usize,
    /// Tile side read at that level, in its pixels.
    pub read_px: u32,
    /// Whether read tiles are resized to 256 px.
    pub resampled: bool,
    /// Whole tiles across.
    pub grid_width: u32,
    /// Whole tiles down.
    pub grid_height: u32,
    /// The segmentation method (`otsu`, `saturation`).
    pub tissue_method: String,
    /// The tissue fraction a tile had to exceed to be kept.
    pub tissue_threshold: f64,
    /// Share of the slide's area the mask calls tissue.
    pub tissue_area_fraction: f64,
    /// What the artifact rules removed (absent when they are off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifacts: Option<ArtifactSummary>,
    /// The corrected mask the tiles were kept by, when one was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask_geojson: Option<PathBuf>,
    /// The folder the files were written to.
    pub output: PathBuf,
}

/// The grid file contents of a tiling.
pub fn grid_file(slide: &Slide, tiling: &Tiling) -> GridFile {
    GridFile {
        slide: slide.path().display().to_string(),
        plan: tiling.plan.clone(),
        tissue_method: tiling.method.to_string(),
        tissue_threshold: tiling.tissue_threshold,
        tiles: tiling.tiles.clone(),
    }
}

/// Writes `tiles.safetensors`, `tiles.csv`, `mask.png`, `thumbnail.png`, `overlay.png`,
/// `mask.geojson` (tissue and left-out regions for QuPath) and `summary.json` into `dir`.
pub fn write_tiling(dir: &Path, slide: &Slide, tiling: &Tiling) -> Result<TileSummary> {
    let p = &tiling.plan;
    let summary = TileSummary {
        slide: slide.path().to_path_buf(),
        vendor: slide.info().vendor.clone(),
        tiles: tiling.tiles.len(),
        mpp: p.mpp,
        mpp_source: p.mpp_source,
        nominal_mpp: p.nominal_mpp,
        level0_tile_px: p.level0_tile_px,
        tile_mpp: p.tile_mpp,
        read_level: p.read_level,
        read_px: p.read_px,
        resampled: p.resampled,
        grid_width: p.grid_width,
        grid_height: p.grid_height,
        tissue_method: tiling.method.to_string(),
        tissue_threshold: tiling.tissue_threshold,
        tissue_area_fraction: tiling.mask.tissue_fraction(),
        artifacts: tiling.artifact_summary.clone(),
        mask_geojson: tiling.mask_geojson.clone(),
        output: dir.to_path_buf(),
    };
    // Everything is encoded in memory first: nothing touches the disk until it all succeeded.
    let files: Vec<(&str, Vec<u8>)> = vec![
        (
            "tiles.safetensors",
            gridfile::grid_safetensors(&grid_file(slide, tiling))?,
        ),
        ("tiles.csv", gridfile::grid_csv(&tiling.tiles).into_bytes()),
        ("mask.png", render::mask_png(tiling)?),
        ("thumbnail.png", render::thumbnail_png(&tiling.view)?),
        ("overlay.png", render::overlay_png(tiling)?),
        (
            "mask.geojson",
            serde_json::to_vec(&geojson::mask_geojson(
                &tiling.mask,
                &tiling.artifacts,
                tiling.view_downsample,
            ))
            .expect("GeoJSON serialises"),
        ),
        (
            "summary.json",
            serde_json::to_vec_pretty(&summary).expect("summary serialises"),
        ),
    ];
    write_all_or_nothing(dir, &files)?;
    Ok(summary)
}

/// Records the kept tiles that could not be read beside a tiling in `dir`: `skipped_tiles.csv`
/// (`index,gx,gy,x0_level0,y0_level0,error`) and the count as `skipped_tiles` in
/// `summary.json` (when there is one).
pub fn write_skipped_tiles(dir: &Path, tiles: &[TileRef], skipped: &[SkippedTile]) -> Result<()> {
    let mut csv = String::from("index,gx,gy,x0_level0,y0_level0,error\n");
    for s in skipped {
        let Some(t) = tiles.get(s.index) else {
            continue;
        };
        let error = s.error.replace('"', "'");
        csv.push_str(&format!(
            "{},{},{},{},{},\"{error}\"\n",
            s.index, t.gx, t.gy, t.x0, t.y0
        ));
    }
    let mut files = vec![("skipped_tiles.csv", csv.into_bytes())];
    let summary_path = dir.join("summary.json");
    if let Ok(text) = std::fs::read(&summary_path) {
        if let Ok(serde_json::Value::Object(mut summary)) = serde_json::from_slice(&text) {
            summary.insert("skipped_tiles".into(), skipped.len().into());
            let bytes = serde_json::to_vec_pretty(&summary).map_err(|e| {
                WsiError::format(&summary_path, format!("cannot serialise summary: {e}"))
            })?;
            files.push(("summary.json", bytes));
        }
    }
    write_all_or_nothing(dir, &files)
}

/// Writes `files` into `dir` so that either all appear or none does.
pub fn write_all_or_nothing(dir: &Path, files: &[(&str, Vec<u8>)]) -> Result<()> {
    let created = !dir.exists();
    if dir.exists() && !dir.is_dir() {
        return Err(WsiError::io(dir, "exists and is not a directory"));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| WsiError::io(dir, format!("cannot create output directory: {e}")))?;
    let staging = dir.join(format!(".staging-{}", std::process::id()));
    let result = (|| {
        std::fs::create_dir_all(&staging)
            .map_err(|e| WsiError::io(dir, format!("cannot write to output directory: {e}")))?;
        for (name, bytes) in files {
            let path = staging.join(name);
            std::fs::write(&path, bytes).map_err(|e| WsiError::io(dir.join(name), e))?;
        }
        for (name, _) in files {
            std::fs::rename(staging.join(name), dir.join(name))
                .map_err(|e| WsiError::io(dir.join(name), e))?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&staging);
    if result.is_err() && created {
        let _ = std::fs::remove_dir(dir);
    }
    result
}
