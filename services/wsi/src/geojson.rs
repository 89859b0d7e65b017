//! Tissue masks as GeoJSON that QuPath opens, edits and exports, and corrected masks read back.
//!
//! Out (`mask.geojson` beside the other tiling outputs): a `FeatureCollection` of `Polygon`
//! annotations in level-0 pixel coordinates (up to one view pixel past the slide's right and
//! bottom edges), one per connected piece, holes as inner rings,
//! traced along the edges of the segmentation view's pixels. `properties.classification.name`
//! is `Tissue`, or the artifact the region was left out as (`Pen mark`, `Debris`,
//! `Out of focus`), with its overlay colour.
//!
//! In (`gigapath tile --mask-geojson FILE`, or a `SLIDE_ID.geojson` at ingest): a
//! `FeatureCollection`, a list of features, one feature or one geometry; `Polygon` and
//! `MultiPolygon` geometries (others are ignored) in level-0 pixels. A feature classified as one
//! of the artifact names above, or as a class starting with `Exclude`, `Ignore` or `Artifact`,
//! is left out; every other feature is tissue. A view pixel is tissue when its centre lies in a
//! tissue polygon (even-odd rule, so holes are holes) and in no left-out one; tiles are then kept
//! by the usual tissue-fraction rule.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::{json, Value};

use crate::artifacts::{ArtifactKind, ArtifactMap};
use crate::error::{Result, WsiError};
use crate::render::TISSUE_RGB;
use crate::tissue::TissueMask;

/// Class name of tissue polygons.
pub const TISSUE_CLASS: &str = "Tissue";
/// Largest GeoJSON file read (bytes).
const MAX_GEOJSON_BYTES: u64 = 256 << 20;

/// A closed ring of vertices (the first not repeated), in view-pixel corner coordinates.
type Ring = Vec<(i64, i64)>;
/// A polygon read from GeoJSON: its rings of level-0 points (outer first, then holes).
type Polygon = Vec<Vec<(f64, f64)>>;

/// Rings around the set pixels of `bits` (`w` x `h`), along pixel edges: outer rings run one
/// way, holes the other; pieces touching only at a corner are separate rings. Collinear
/// vertices are dropped.
pub fn trace_rings(bits: &[u8], w: usize, h: usize) -> Vec<Ring> {
    let set = |x: i64, y: i64| {
        x >= 0
            && y >= 0
            && (x as usize) < w
            && (y as usize) < h
            && bits[y as usize * w + x as usize] != 0
    };
    // Directed boundary edges with the set pixel on the same side of every edge.
    let mut out: HashMap<(i64, i64), Vec<(i64, i64)>> = HashMap::new();
    let mut add = |a: (i64, i64), b: (i64, i64)| out.entry(a).or_default().push(b);
    for y in 0..h as i64 {
        for x in 0..w as i64 {
            if !set(x, y) {
                continue;
            }
            if !set(x, y - 1) {
                add((x + 1, y), (x, y));
            }
            if !set(x - 1, y) {
                add((x, y), (x, y + 1));
            }
            if !set(x, y + 1) {
                add((x, y + 1), (x + 1, y + 1));
            }
            if !set(x + 1, y) {
                add((x + 1, y + 1), (x + 1, y));
            }
        }
    }
    let mut starts: Vec<(i64, i64)> = out.keys().copied().collect();
    starts.sort_unstable();
    let mut rings = Vec::new();
    for start in starts {
        while out.get(&start).is_some_and(|v| !v.is_empty()) {
            let mut ring = vec![start];
            let mut at = start;
            let mut dir: Option<(i64, i64)> = None;
            while let Some(next) = out.get_mut(&at).filter(|n| !n.is_empty()) {
                // At a corner shared by two diagonal pixels, stay with the pixel the ring came
                // along (the sharpest turn one way), so that rings never cross.
                let pick = match dir {
                    Some((dx, dy)) if next.len() > 1 => next
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, b)| dx * (b.1 - at.1) - dy * (b.0 - at.0))
                        .map_or(0, |(i, _)| i),
                    _ => 0,
                };
                let b = next.swap_remove(pick);
                dir = Some((b.0 - at.0, b.1 - at.1));
                at = b;
                if at == start {
                    break;
                }
                ring.push(at);
            }
            rings.push(drop_collinear(ring));
        }
    }
    rings
}

fn drop_collinear(ring: Ring) -> Ring {
    let n = ring.len();
    if n < 4 {
        return ring;
    }
    (0..n)
        .filter(|&i| {
            let (a, b, c) = (ring[(i + n - 1) % n], ring[i], ring[(i + 1) % n]);
            (b.0 - a.0) * (c.1 - b.1) - (b.1 - a.1) * (c.0 - b.0) != 0
        })
        .map(|i| ring[i])
        .collect()
}

/// Twice the signed area of a ring.
fn signed_area2(ring: &Ring) -> i64 {
    let n = ring.len();
    (0..n)
        .map(|i| {
            let (a, b) = (ring[i], ring[(i + 1) % n]);
            a.0 * b.1 - b.0 * a.1
        })
        .sum()
}

fn ring_contains(ring: &[(f64, f64)], x: f64, y: f64) -> bool {
    let mut inside = false;
    let n = ring.len();
    for i in 0..n {
        let (a, b) = (ring[i], ring[(i + 1) % n]);
        if (a.1 > y) != (b.1 > y) && x < a.0 + (y - a.1) / (b.1 - a.1) * (b.0 - a.0) {
            inside = !inside;
        }
    }
    inside
}

/// Polygons (outer ring, then its holes) of the set pixels of `bits`.
fn polygons(bits: &[u8], w: usize, h: usize) -> Vec<Vec<Ring>> {
    let rings = trace_rings(bits, w, h);
    let (outer, holes): (Vec<Ring>, Vec<Ring>) =
        rings.into_iter().partition(|r| signed_area2(r) < 0);
    let as_f =
        |r: &Ring| -> Vec<(f64, f64)> { r.iter().map(|&(x, y)| (x as f64, y as f64)).collect() };
    let outer_f: Vec<Vec<(f64, f64)>> = outer.iter().map(as_f).collect();
    let mut polys: Vec<Vec<Ring>> = outer.into_iter().map(|r| vec![r]).collect();
    for hole in holes {
        // A hole belongs to the smallest outer ring around a point just inside it.
        let (x, y) = (hole[0].0 as f64 + 0.5, hole[0].1 as f64 - 0.5);
        let probe = [(x, y), (x - 1.0, y), (x, y + 1.0), (x - 1.0, y + 1.0)];
        let owner = (0..polys.len())
            .filter(|&i| {
                probe
                    .iter()
                    .any(|&(px, py)| ring_contains(&outer_f[i], px, py))
            })
            .min_by_key(|&i| signed_area2(&polys[i][0]).abs());
        if let Some(i) = owner {
            polys[i].push(hole);
        }
    }
    polys
}

fn feature(rings: &[Ring], downsample: f64, name: &str, rgb: [u8; 3]) -> Value {
    let coords: Vec<Value> = rings
        .iter()
        .map(|r| {
            let mut pts: Vec<Value> = r
                .iter()
                .map(|&(x, y)| {
                    // Not clipped to the slide: the view's last pixel may reach past its edge,
                    // and reading the polygon back must find that pixel's centre inside.
                    let lx = (x as f64 * downsample * 1000.0).round() / 1000.0;
                    let ly = (y as f64 * downsample * 1000.0).round() / 1000.0;
                    json!([lx, ly])
                })
                .collect();
            if let Some(first) = pts.first().cloned() {
                pts.push(first);
            }
            Value::Array(pts)
        })
        .collect();
    json!({
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": coords},
        "properties": {
            "objectType": "annotation",
            "classification": {"name": name, "color": rgb},
        }
    })
}

/// The GeoJSON of a tissue mask and the artifacts left out, in level-0 pixels
/// (`view_downsample` level-0 pixels per view pixel; the last view pixel may reach up to one
/// view pixel past the slide's edge).
pub fn mask_geojson(mask: &TissueMask, artifacts: &ArtifactMap, view_downsample: f64) -> Value {
    let (w, h) = (mask.width as usize, mask.height as usize);
    let mut features = Vec::new();
    for poly in polygons(&mask.data, w, h) {
        features.push(feature(&poly, view_downsample, TISSUE_CLASS, TISSUE_RGB));
    }
    for kind in ArtifactKind::ALL {
        let bits: Vec<u8> = artifacts
            .data
            .iter()
            .map(|&a| (a == kind as u8) as u8)
            .collect();
        if bits.iter().all(|&b| b == 0) {
            continue;
        }
        for poly in polygons(&bits, w, h) {
            features.push(feature(&poly, view_downsample, kind.name(), kind.rgb()));
        }
    }
    json!({"type": "FeatureCollection", "features": features})
}

/// What a feature's class makes it.
fn excluded_kind(name: Option<&str>) -> Option<Option<ArtifactKind>> {
    let name = name?.trim();
    if let Some(k) = ArtifactKind::ALL
        .into_iter()
        .find(|k| k.name().eq_ignore_ascii_case(name))
    {
        return Some(Some(k));
    }
    let lower = name.to_ascii_lowercase();
    ["exclude", "ignore", "artifact"]
        .iter()
        .any(|p| lower.starts_with(p))
        .then_some(None)
}

/// Polygons of a geometry, each a list of rings of level-0 points.
fn geometry_polygons(geom: &Value, path: &Path) -> Result<Vec<Polygon>> {
    let bad = |msg: String| WsiError::format(path, msg);
    let ring = |v: &Value| -> Result<Vec<(f64, f64)>> {
        let pts = v
            .as_array()
            .ok_or_else(|| bad("a polygon ring is not a list of points".into()))?;
        pts.iter()
            .map(|p| {
                let xy = p.as_array().filter(|a| a.len() >= 2);
                let num = |i: usize| xy.and_then(|a| a[i].as_f64()).filter(|v| v.is_finite());
                match (num(0), num(1)) {
                    (Some(x), Some(y)) => Ok((x, y)),
                    _ => Err(bad(format!("a point is not [x, y] finite numbers: {p}"))),
                }
            })
            .collect()
    };
    let polygon = |v: &Value| -> Result<Polygon> {
        v.as_array()
            .ok_or_else(|| bad("polygon coordinates are not a list of rings".into()))?
            .iter()
            .map(ring)
            .collect()
    };
    let coords = &geom["coordinates"];
    match geom["type"].as_str() {
        Some("Polygon") => Ok(vec![polygon(coords)?]),
        Some("MultiPolygon") => coords
            .as_array()
            .ok_or_else(|| bad("MultiPolygon coordinates are not a list".into()))?
            .iter()
            .map(polygon)
            .collect(),
        _ => Ok(Vec::new()),
    }
}

/// Sets (or clears) the view pixels whose centre lies inside `rings` (even-odd), the rings in
/// level-0 pixels and `downsample` level-0 pixels per view pixel.
fn fill(
    bits: &mut [u8],
    w: usize,
    h: usize,
    rings: &[Vec<(f64, f64)>],
    downsample: f64,
    value: u8,
) {
    // Crossings of each pixel-centre row with the polygon's edges, in view pixels.
    let mut rows: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for ring in rings {
        let n = ring.len();
        for i in 0..n {
            let (a, b) = (ring[i], ring[(i + 1) % n]);
            let (ay, by) = (a.1 / downsample, b.1 / downsample);
            let (lo, hi) = (ay.min(by), ay.max(by));
            // Rows whose centre y + 0.5 is in [lo, hi).
            let first = (lo - 0.5).ceil().max(0.0);
            let last = ((hi - 0.5).ceil() - 1.0).min(h as f64 - 1.0);
            let mut y = first;
            while y <= last {
                let cy = y + 0.5;
                let t = (cy - ay) / (by - ay);
                let x = (a.0 + t * (b.0 - a.0)) / downsample;
                rows.entry(y as usize).or_default().push(x);
                y += 1.0;
            }
        }
    }
    for (y, mut xs) in rows {
        xs.sort_by(f64::total_cmp);
        for pair in xs.chunks_exact(2) {
            // Pixels whose centre x + 0.5 is in [x0, x1).
            let x0 = (pair[0] - 0.5).ceil().max(0.0) as usize;
            let x1 = ((pair[1] - 0.5).ceil().max(0.0) as usize).min(w);
            for x in x0..x1 {
                bits[y * w + x] = value;
            }
        }
    }
}

/// Reads a mask GeoJSON (see the module doc) onto a `width` x `height` view of
/// `view_downsample` level-0 pixels per pixel: the tissue mask, and the left-out regions by
/// kind (a class the rules do not name is left out without a kind).
pub fn read_mask(
    path: &Path,
    width: u32,
    height: u32,
    view_downsample: f64,
) -> Result<(TissueMask, ArtifactMap)> {
    let meta = std::fs::metadata(path).map_err(|e| WsiError::io(path, e))?;
    if meta.len() > MAX_GEOJSON_BYTES {
        return Err(WsiError::format(
            path,
            format!(
                "{} bytes, over the {MAX_GEOJSON_BYTES} byte limit of a mask",
                meta.len()
            ),
        ));
    }
    let text = std::fs::read(path).map_err(|e| WsiError::io(path, e))?;
    let doc: Value = serde_json::from_slice(&text)
        .map_err(|e| WsiError::format(path, format!("not JSON: {e}")))?;
    let features: Vec<&Value> = match doc["type"].as_str() {
        Some("FeatureCollection") => doc["features"].as_array().map(|a| a.iter().collect()),
        Some("Feature") => Some(vec![&doc]),
        Some(_) => None,
        None => doc.as_array().map(|a| a.iter().collect()),
    }
    .unwrap_or_default();
    let geometry_only = matches!(doc["type"].as_str(), Some("Polygon" | "MultiPolygon"));
    if features.is_empty() && !geometry_only {
        return Err(WsiError::format(
            path,
            "no features: expected a GeoJSON FeatureCollection of Polygon / MultiPolygon \
             annotations (as QuPath exports them)",
        ));
    }
    let (w, h) = (width as usize, height as usize);
    let mut tissue = vec![0u8; w * h];
    let mut excluded = vec![0u8; w * h];
    let mut artifacts = ArtifactMap::empty(width, height);
    let mut polygons_read = 0usize;
    let items: Vec<(Option<&str>, &Value)> = if geometry_only {
        vec![(None, &doc)]
    } else {
        features
            .iter()
            .map(|f| {
                (
                    f["properties"]["classification"]["name"].as_str(),
                    &f["geometry"],
                )
            })
            .collect()
    };
    for (class, geom) in items {
        let kind = excluded_kind(class);
        for poly in geometry_polygons(geom, path)? {
            polygons_read += 1;
            match kind {
                None => fill(&mut tissue, w, h, &poly, view_downsample, 1),
                Some(k) => {
                    fill(&mut excluded, w, h, &poly, view_downsample, 1);
                    if let Some(k) = k {
                        fill(&mut artifacts.data, w, h, &poly, view_downsample, k as u8);
                    }
                }
            }
        }
    }
    if polygons_read == 0 {
        return Err(WsiError::format(
            path,
            "no Polygon or MultiPolygon geometry in the mask",
        ));
    }
    for (t, e) in tissue.iter_mut().zip(&excluded) {
        if *e != 0 {
            *t = 0;
        }
    }
    for (a, t) in artifacts.data.iter_mut().zip(&tissue) {
        if *t != 0 {
            *a = 0;
        }
    }
    Ok((
        TissueMask {
            width,
            height,
            data: tissue,
            otsu_threshold: None,
        },
        artifacts,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_of_a_block_with_a_hole_and_a_diagonal_neighbour() {
        // 6 x 6: a 4 x 4 block at (0,0) with a hole at (1,1), and a pixel at (4,4) touching
        // the block's corner.
        let (w, h) = (6usize, 6usize);
        let mut bits = vec![0u8; w * h];
        for y in 0..4 {
            for x in 0..4 {
                bits[y * w + x] = 1;
            }
        }
        bits[w + 1] = 0;
        bits[4 * w + 4] = 1;
        let polys = polygons(&bits, w, h);
        assert_eq!(polys.len(), 2);
        let block = polys
            .iter()
            .find(|p| p.len() == 2)
            .expect("block with a hole");
        assert_eq!(block[0].len(), 4, "a square outline: {:?}", block[0]);
        assert_eq!(signed_area2(&block[0]).abs(), 2 * 16);
        assert_eq!(signed_area2(&block[1]).abs(), 2);
        // Filling the traced rings at pixel centres gives the pixels back.
        let mut back = vec![0u8; w * h];
        for poly in &polys {
            let rings: Vec<Vec<(f64, f64)>> = poly
                .iter()
                .map(|r| {
                    r.iter()
                        .map(|&(x, y)| (x as f64 * 3.0, y as f64 * 3.0))
                        .collect()
                })
                .collect();
            fill(&mut back, w, h, &rings, 3.0, 1);
        }
        assert_eq!(back, bits);
    }
}
