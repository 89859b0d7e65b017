//! The grid files `gigapath tile` writes and the pipeline reads back.
//!
//! `tiles.safetensors` (the one the pipeline reads):
//! - `grid` i32 `[N, 2]`: (gx, gy) grid index, the slide encoder's position units;
//! - `origins_level0` i64 `[N, 2]`: (x, y) level-0 pixel origin of each tile;
//! - `tissue_fraction` f32 `[N]`;
//! - metadata `format` = `gigapath-tiles/1`, `slide` (path), `plan` (the [`TilePlan`] as JSON),
//!   `tissue_method`, `tissue_threshold`.
//!
//! `tiles.csv` holds the same rows for people and spreadsheets:
//! `gx,gy,x0_level0,y0_level0,tissue_fraction`. Rows are in sequence order (row-major, y then x).

use std::collections::HashMap;
use std::path::Path;

use safetensors::{tensor::TensorView, Dtype, SafeTensors};

use crate::error::{Result, WsiError};
use crate::grid::{TilePlan, TileRef};

/// Format tag written into every grid file.
pub const GRID_FORMAT: &str = "gigapath-tiles/1";

/// A grid read back from `tiles.safetensors`.
#[derive(Debug, Clone)]
pub struct GridFile {
    /// The slide's path, as written by `gigapath tile`.
    pub slide: String,
    /// How the grid was cut and read.
    pub plan: TilePlan,
    /// The segmentation method, as text (`otsu`, `saturation`).
    pub tissue_method: String,
    /// The tissue fraction a tile had to exceed to be kept.
    pub tissue_threshold: f64,
    /// The kept tiles, in sequence order (row-major, y then x).
    pub tiles: Vec<TileRef>,
}

/// Serialises a grid to safetensors bytes.
pub fn grid_safetensors(grid: &GridFile) -> Result<Vec<u8>> {
    let n = grid.tiles.len();
    let grid_xy: Vec<u8> = grid
        .tiles
        .iter()
        .flat_map(|t| [t.gx as i32, t.gy as i32])
        .flat_map(i32::to_le_bytes)
        .collect();
    let origins: Vec<u8> = grid
        .tiles
        .iter()
        .flat_map(|t| [t.x0 as i64, t.y0 as i64])
        .flat_map(i64::to_le_bytes)
        .collect();
    let tissue: Vec<u8> = grid
        .tiles
        .iter()
        .flat_map(|t| t.tissue.to_le_bytes())
        .collect();
    let view = |dtype, shape, data| {
        TensorView::new(dtype, shape, data)
            .map_err(|e| WsiError::format("tiles.safetensors", e.to_string()))
    };
    let tensors = vec![
        ("grid", view(Dtype::I32, vec![n, 2], &grid_xy)?),
        ("origins_level0", view(Dtype::I64, vec![n, 2], &origins)?),
        ("tissue_fraction", view(Dtype::F32, vec![n], &tissue)?),
    ];
    let plan_json = serde_json::to_string(&grid.plan).expect("plan serialises");
    let metadata = HashMap::from([
        ("format".to_string(), GRID_FORMAT.to_string()),
        ("slide".to_string(), grid.slide.clone()),
        ("plan".to_string(), plan_json),
        ("tissue_method".to_string(), grid.tissue_method.clone()),
        (
            "tissue_threshold".to_string(),
            grid.tissue_threshold.to_string(),
        ),
    ]);
    safetensors::serialize(tensors, Some(metadata))
        .map_err(|e| WsiError::format("tiles.safetensors", e.to_string()))
}

/// The CSV form of the kept tiles.
pub fn grid_csv(tiles: &[TileRef]) -> String {
    let mut s = String::with_capacity(32 * (tiles.len() + 1));
    s.push_str("gx,gy,x0_level0,y0_level0,tissue_fraction\n");
    for t in tiles {
        s.push_str(&format!(
            "{},{},{},{},{:.6}\n",
            t.gx, t.gy, t.x0, t.y0, t.tissue
        ));
    }
    s
}

/// Reads a `tiles.safetensors` written by [`grid_safetensors`].
pub fn read_grid(path: &Path) -> Result<GridFile> {
    let bytes = std::fs::read(path).map_err(|e| WsiError::io(path, e))?;
    parse_grid(&bytes, path)
}

/// Parses the bytes of a `tiles.safetensors` ([`read_grid`] without the file read); `path` only
/// names the file in errors.
pub fn parse_grid(bytes: &[u8], path: &Path) -> Result<GridFile> {
    let bad = |msg: String| WsiError::format(path, msg);
    let st =
        SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(GRID_FORMAT) {
        return Err(bad(format!(
            "not a gigapath grid file (format is not {GRID_FORMAT})"
        )));
    }
    let plan: TilePlan = serde_json::from_str(meta.get("plan").map_or("", String::as_str))
        .map_err(|e| bad(format!("bad plan metadata: {e}")))?;
    let tensor = |name: &str, dtype: Dtype, cols: usize| {
        let t = st
            .tensor(name)
            .map_err(|_| bad(format!("missing tensor {name:?}")))?;
        let shape = t.shape();
        let ok_shape = if cols == 1 {
            shape.len() == 1
        } else {
            shape.len() == 2 && shape[1] == cols
        };
        if t.dtype() != dtype || !ok_shape {
            return Err(bad(format!(
                "tensor {name:?} is {:?} {:?}, expected {dtype:?} [N{}]",
                t.dtype(),
                shape,
                if cols == 1 {
                    String::new()
                } else {
                    format!(", {cols}")
                }
            )));
        }
        Ok((shape[0], t.data().to_vec()))
    };
    let (n, grid) = tensor("grid", Dtype::I32, 2)?;
    let (n2, origins) = tensor("origins_level0", Dtype::I64, 2)?;
    let (n3, tissue) = tensor("tissue_fraction", Dtype::F32, 1)?;
    if n != n2 || n != n3 {
        return Err(bad(format!(
            "row counts differ: grid {n}, origins {n2}, tissue {n3}"
        )));
    }
    let i32_at = |i: usize| i32::from_le_bytes(grid[4 * i..4 * i + 4].try_into().unwrap());
    let i64_at = |i: usize| i64::from_le_bytes(origins[8 * i..8 * i + 8].try_into().unwrap());
    let f32_at = |i: usize| f32::from_le_bytes(tissue[4 * i..4 * i + 4].try_into().unwrap());
    let tiles = (0..n)
        .map(|i| TileRef {
            gx: i32_at(2 * i) as u32,
            gy: i32_at(2 * i + 1) as u32,
            x0: i64_at(2 * i) as u64,
            y0: i64_at(2 * i + 1) as u64,
            tissue: f32_at(i),
        })
        .collect();
    Ok(GridFile {
        slide: meta.get("slide").cloned().unwrap_or_default(),
        plan,
        tissue_method: meta.get("tissue_method").cloned().unwrap_or_default(),
        tissue_threshold: meta
            .get("tissue_threshold")
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN),
        tiles,
    })
}
