//! Tile points: every tile's feature vector in the `tiles` collection, for region search.
//!
//! Written at ingest right after a slide's point ([`write_at_ingest`], `[ingest] index_tiles`),
//! and for data dirs ingested before by `gigapath index tiles` ([`index_feature_file`]). The
//! vectors are the feature file's f16 rows widened to f32; the payload is the slide id, the
//! grid cell, the level-0 box, the tissue fraction and the slide's labels; the fingerprint is
//! the tile encoder's. Point ids come from (slide id, grid x, grid y), so writing a slide again
//! overwrites its tiles; a slide's earlier tiles are deleted first, so a re-tiled slide leaves
//! none behind. Upserts go in batches of [`BATCH`] points (a slide holds up to 100k tiles).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::AtomicBool;

use gigapath_store::vector::{CollectionSpec, Point, TilePoint, SLIDES, TILES};
use gigapath_store::{Dims, FeatureFile, Store, StoreError};
use half::f16;
use serde_json::Value;

use crate::error::{PipelineError, Result};
use crate::pipeline::Pipeline;

/// Tile points per upsert (1536-d: about 1.6 MB of floats a batch).
pub const BATCH: usize = 256;

/// The `tiles` collection of a store whose tile features are `dim` wide.
pub fn tiles_spec(store: &Store, dim: usize) -> CollectionSpec {
    let dims = Dims {
        tile: dim,
        ..store.config.dims
    };
    CollectionSpec::tiles(&dims, store.config.tile_quantization)
}

/// Width of the tile encoder in `dir` from its timm `config.json` (`model_args.embed_dim`,
/// else `num_features`); 1536 (Prov-GigaPath) when the folder has no config.
pub fn tile_dim_from_config(dir: &Path) -> Result<usize> {
    let cfg = dir.join("config.json");
    if !cfg.is_file() {
        return Ok(1536);
    }
    let text = std::fs::read_to_string(&cfg).map_err(|e| PipelineError::io(&cfg, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| PipelineError::io(&cfg, format!("malformed JSON: {e}")))?;
    let dim = v
        .pointer("/model_args/embed_dim")
        .or_else(|| v.get("num_features"))
        .and_then(Value::as_u64);
    Ok(dim.map_or(1536, |d| d as usize))
}

/// One tile: grid cell, level-0 origin, tissue fraction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TileRow {
    /// Grid column.
    pub gx: u32,
    /// Grid row.
    pub gy: u32,
    /// Level-0 x of the tile's top-left pixel.
    pub x: i64,
    /// Level-0 y of the tile's top-left pixel.
    pub y: i64,
    /// Tissue fraction of the tile, when the tiling is known.
    pub tissue: Option<f32>,
}

/// What goes into a slide's tile points besides the rows.
pub struct SlideTiles<'a> {
    /// The slide.
    pub slide_id: &'a str,
    /// The tile encoder's fingerprint (the guard of the `tiles` collection).
    pub fingerprint: &'a str,
    /// The slide's labels, copied to every tile point.
    pub labels: BTreeMap<String, String>,
    /// Level-0 side of a tile in pixels.
    pub tile_px: u32,
    /// Feature width D.
    pub dim: usize,
}

/// Replaces the tile points of a slide: deletes its earlier ones, then upserts `rows` with
/// their features (`features` is `[rows.len(), dim]` row-major) in batches. Store errors that
/// are outages are retried ([`Pipeline::retrying`]). Returns the number of points written.
pub fn write_slide_tiles(
    pipeline: &Pipeline,
    slide: &SlideTiles<'_>,
    rows: &[TileRow],
    features: &[f16],
    cancelled: Option<&AtomicBool>,
) -> Result<u64> {
    if features.len() != rows.len() * slide.dim {
        return Err(PipelineError::Input(format!(
            "{}: {} feature values for {} tiles of width {}",
            slide.slide_id,
            features.len(),
            rows.len(),
            slide.dim
        )));
    }
    let store = &pipeline.store;
    let spec = tiles_spec(store, slide.dim);
    pipeline.retrying("opening the tiles collection", cancelled, || {
        store.vectors.ensure_collection(&spec)
    })?;
    let of_slide = gigapath_store::vector::PayloadFilter::none().eq("slide_id", slide.slide_id);
    pipeline.retrying(
        "deleting the slide's earlier tile points",
        cancelled,
        || store.vectors.delete_by_filter(TILES, &of_slide),
    )?;
    let mut written = 0u64;
    for (chunk, feats) in rows.chunks(BATCH).zip(features.chunks(BATCH * slide.dim)) {
        let points: Vec<Point> = chunk
            .iter()
            .zip(feats.chunks(slide.dim))
            .filter_map(|(row, f)| tile_point(slide, row, f))
            .collect();
        let n = points.len() as u64;
        pipeline.retrying("storing tile points", cancelled, || {
            store.vectors.upsert(TILES, points.clone())
        })?;
        written += n;
    }
    Ok(written)
}

/// The point of one tile; `None` for an all-zero feature row (no direction for cosine).
fn tile_point(slide: &SlideTiles<'_>, row: &TileRow, features: &[f16]) -> Option<Point> {
    let tile: Vec<f32> = features.iter().map(|h| h.to_f32()).collect();
    if tile.iter().all(|&x| x == 0.0) {
        return None;
    }
    Some(
        TilePoint {
            slide_id: slide.slide_id.to_string(),
            gx: row.gx,
            gy: row.gy,
            x: row.x,
            y: row.y,
            w: slide.tile_px,
            h: slide.tile_px,
            tissue: row.tissue,
            labels: slide.labels.clone(),
            fingerprint: slide.fingerprint.to_string(),
            tile,
        }
        .into_point(),
    )
}

/// The ingest step: after slide `point` (a `slides` point, whose payload holds the labels) is
/// stored, writes the tile points of the `cells` whose features are `features`, taking origins
/// and tissue fractions from `tiling`. Does nothing when `[ingest] index_tiles` is off.
pub fn write_at_ingest(
    pipeline: &Pipeline,
    point: &Point,
    tile_fingerprint: &str,
    features: &[f16],
    cells: &[[u32; 2]],
    tiling: &gigapath_wsi::Tiling,
    cancelled: &AtomicBool,
) -> Result<()> {
    if !pipeline.config.ingest.index_tiles || cells.is_empty() {
        return Ok(());
    }
    let start = std::time::Instant::now();
    let by_cell: HashMap<(u32, u32), &gigapath_wsi::TileRef> =
        tiling.tiles.iter().map(|t| ((t.gx, t.gy), t)).collect();
    let tile_px = tiling.plan.level0_tile_px;
    let rows: Vec<TileRow> = cells
        .iter()
        .map(|&[gx, gy]| match by_cell.get(&(gx, gy)) {
            Some(t) => TileRow {
                gx,
                gy,
                x: t.x0 as i64,
                y: t.y0 as i64,
                tissue: Some(t.tissue),
            },
            None => TileRow {
                gx,
                gy,
                x: i64::from(gx) * i64::from(tile_px),
                y: i64::from(gy) * i64::from(tile_px),
                tissue: None,
            },
        })
        .collect();
    let slide = SlideTiles {
        slide_id: &point.id,
        fingerprint: tile_fingerprint,
        labels: labels_of(&point.payload),
        tile_px,
        dim: features.len() / cells.len(),
    };
    let n = write_slide_tiles(pipeline, &slide, &rows, features, Some(cancelled))?;
    tracing::info!(
        "{}: {n} tile points in {:.2} s",
        point.id,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// String labels of a stored payload's `labels` map.
pub fn labels_of(payload: &serde_json::Map<String, Value>) -> BTreeMap<String, String> {
    match payload.get("labels") {
        Some(Value::Object(map)) => map
            .iter()
            .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// Tissue fractions by grid cell from a slide's `tiles.csv` (written at tiling); empty when
/// the file is missing or unreadable (the fraction is then left out of the payload).
pub fn tissue_from_csv(path: &Path) -> HashMap<(u32, u32), f32> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return HashMap::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            let [gx, gy, _, _, tissue] = f.as_slice() else {
                return None;
            };
            Some(((gx.parse().ok()?, gy.parse().ok()?), tissue.parse().ok()?))
        })
        .collect()
}

/// How a backfill of one slide went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Indexed {
    /// The tiles were written (this many).
    Written(u64),
    /// The collection already held exactly this slide's tiles under this tile encoder.
    AlreadyThere(u64),
}

/// The backfill step for one slide: reads its feature file once and writes its tile points,
/// unless the collection already holds as many of its tiles with that feature file's tile
/// fingerprint (so a re-run after an interruption resumes where it stopped). Labels come from
/// the slide's point in `slides` (else the catalog record), tissue fractions from its tiling.
pub fn index_feature_file(pipeline: &Pipeline, slide_id: &str, path: &Path) -> Result<Indexed> {
    let file = FeatureFile::read(path)?;
    if file.metadata.slide_id != slide_id {
        return Err(PipelineError::Input(format!(
            "{}: the feature file is of slide `{}`, not `{slide_id}`",
            path.display(),
            file.metadata.slide_id
        )));
    }
    let fingerprint = file
        .metadata
        .fingerprints
        .get("tile")
        .cloned()
        .ok_or_else(|| PipelineError::io(path, "no tile fingerprint in its metadata"))?;
    let store = &pipeline.store;
    let spec = tiles_spec(store, file.dim);
    pipeline.retrying("opening the tiles collection", None, || {
        store.vectors.ensure_collection(&spec)
    })?;
    let mine = gigapath_store::vector::PayloadFilter::none()
        .eq("slide_id", slide_id)
        .eq("fingerprint", fingerprint.as_str());
    let stored = pipeline.retrying("counting tile points", None, || {
        store.vectors.count(TILES, &mine)
    })?;
    let n = file.len() as u64;
    if stored == n && n > 0 {
        return Ok(Indexed::AlreadyThere(n));
    }
    let labels = slide_labels(pipeline, slide_id)?;
    let tissue = tissue_from_csv(&pipeline.tiles_dir(slide_id).join("tiles.csv"));
    let rows: Vec<TileRow> = file
        .grid_xy
        .iter()
        .zip(&file.origins_level0)
        .map(|(&[gx, gy], &[x, y])| {
            let (gx, gy) = (gx.max(0) as u32, gy.max(0) as u32);
            TileRow {
                gx,
                gy,
                x,
                y,
                tissue: tissue.get(&(gx, gy)).copied(),
            }
        })
        .collect();
    let slide = SlideTiles {
        slide_id,
        fingerprint: &fingerprint,
        labels,
        tile_px: file.metadata.level0_tile_px,
        dim: file.dim,
    };
    let written = write_slide_tiles(pipeline, &slide, &rows, file.features_f16(), None)?;
    Ok(Indexed::Written(written))
}

/// A slide's labels: its point's payload, else its catalog record.
fn slide_labels(pipeline: &Pipeline, slide_id: &str) -> Result<BTreeMap<String, String>> {
    let store = &pipeline.store;
    let ids = [slide_id.to_string()];
    let points = pipeline.retrying("reading the slide's point", None, || {
        store.vectors.retrieve(SLIDES, &ids, false)
    })?;
    if let Some(p) = points.first() {
        return Ok(labels_of(&p.payload));
    }
    let record = pipeline.retrying("reading the slide's record", None, || {
        store.catalog.slide(slide_id)
    })?;
    Ok(record.map(|r| r.labels).unwrap_or_default())
}

/// Deletes the tile points of slide `id` (when a slide is forgotten). A store that never had
/// a tiles collection has nothing to delete.
pub async fn forget_tiles(store: &Store, id: &str) -> std::result::Result<(), StoreError> {
    let embedded = matches!(
        store.config.vectors,
        gigapath_store::VectorBackendConfig::Embedded
    );
    if embedded && !store.config.vectors_dir().join(TILES).exists() {
        return Ok(()); // never created: nothing to delete (and no empty shard made for it)
    }
    let spec = tiles_spec(store, store.config.dims.tile);
    match store.vectors.ensure_collection(&spec).await {
        Ok(()) => {}
        // Opened with another width by this process, or stored with another width: the
        // collection is there all the same, and deleting does not depend on the width.
        Err(StoreError::DimensionMismatch { .. }) | Err(StoreError::SchemaMismatch { .. }) => {}
        Err(e) => return Err(e),
    }
    let filter = gigapath_store::vector::PayloadFilter::none().eq("slide_id", id);
    match store.vectors.delete_by_filter(TILES, &filter).await {
        Err(StoreError::UnknownCollection(_)) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tissue_csv_is_read_by_cell() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("tiles.csv");
        std::fs::write(
            &csv,
            "gx,gy,x0_level0,y0_level0,tissue_fraction\n3,4,768,1024,0.812500\nbad\n",
        )
        .unwrap();
        let t = tissue_from_csv(&csv);
        assert_eq!(t.len(), 1);
        assert!((t[&(3, 4)] - 0.8125).abs() < 1e-6);
        assert!(tissue_from_csv(&dir.path().join("none.csv")).is_empty());
    }

    /// Forgetting a slide deletes its tile points and only them; a store that never had a
    /// tiles collection gets none made for it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forget_tiles_deletes_one_slides_tiles() {
        use gigapath_store::vector::PayloadFilter;
        let dir = tempfile::tempdir().unwrap();
        let mut config = gigapath_store::StoreConfig::with_data_dir(dir.path().join("data"));
        config.dims = Dims {
            joint: 4,
            slide: 6,
            text: 3,
            tile: 5,
        };
        let store = Store::open(config).await.unwrap();
        forget_tiles(&store, "a").await.unwrap();
        assert!(!store.config.vectors_dir().join(TILES).exists());

        store
            .vectors
            .ensure_collection(&tiles_spec(&store, 5))
            .await
            .unwrap();
        let points: Vec<Point> = ["a", "b"]
            .iter()
            .flat_map(|slide| {
                (0..3u32).map(move |i| {
                    TilePoint {
                        slide_id: slide.to_string(),
                        gx: i,
                        gy: 0,
                        w: 256,
                        h: 256,
                        fingerprint: "t".into(),
                        tile: vec![1.0, i as f32, 0.5, 0.0, 2.0],
                        ..TilePoint::default()
                    }
                    .into_point()
                })
            })
            .collect();
        store.vectors.upsert(TILES, points).await.unwrap();
        forget_tiles(&store, "a").await.unwrap();
        let of = |s: &str| PayloadFilter::none().eq("slide_id", s);
        assert_eq!(store.vectors.count(TILES, &of("a")).await.unwrap(), 0);
        assert_eq!(store.vectors.count(TILES, &of("b")).await.unwrap(), 3);
    }

    #[test]
    fn tile_dim_comes_from_the_timm_config() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(tile_dim_from_config(dir.path()).unwrap(), 1536);
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"architecture": "x", "model_args": {"embed_dim": 96}}"#,
        )
        .unwrap();
        assert_eq!(tile_dim_from_config(dir.path()).unwrap(), 96);
        std::fs::write(dir.path().join("config.json"), "{").unwrap();
        let err = tile_dim_from_config(dir.path()).unwrap_err().to_string();
        assert!(err.contains("malformed JSON"), "{err}");
    }
}
