//! Artifacts that look like tissue to a threshold but must not be embedded: marker ink, dark
//! debris and out-of-focus regions (folds, bubbles, a tilted scan), after the rules of HistoQC
//! and TRIDENT. Off unless asked for ([`ArtifactOptions::enabled`]), so that a default tiling
//! stays the Prov-GigaPath reference's.
//!
//! The rules, on the segmentation view (RGB 0-255; `V` = max/255, `S` = (max-min)/max,
//! `H` = hue in degrees):
//! - **pen, blue**: `H` in [190, 250], `S` >= 0.45 and blue >= red + 40 (hematoxylin is purple:
//!   its hue is 260-330 and its red about its blue);
//! - **pen, green**: `H` in [70, 170], `S` >= 0.2, green above red and blue (H&E has no green);
//! - **dark**: `V` < 0.22 (every channel under 56; clusters of nuclei are lighter once
//!   averaged): a dark piece at least a tile's area is black marker
//!   (**pen**), a smaller one of at least 16 x 16 um **debris**; both grow by the averaging
//!   radius plus one pixel (their dark core is narrower than they are);
//! - colours are judged on the view averaged over about 12 um (ink over tissue by its mean
//!   colour), coloured ink also on the view itself (thin strokes); coloured pen grows by one pixel
//!   on a view coarser than 6 um/px;
//! - **out of focus**, per kept tile: the variance of the Laplacian of the grey centre quarter of
//!   the tile, read at 0.5 um/px (128 x 128 px), over its tissue pixels (grey under 215), under
//!   [`DEFAULT_BLUR_THRESHOLD`]; a patch less than half tissue is not judged.
//!
//! Pen and debris pixels are removed from the tissue mask before tiles are kept; out-of-focus
//! tiles are then dropped. Everything removed is kept in an [`ArtifactMap`] for the overlay
//! picture and the GeoJSON.

use rayon::prelude::*;
use serde::Serialize;

use crate::grid::{TilePlan, TileRef, TILE_PX};
use crate::slide::Slide;
use crate::thumbnail::RgbImage;
use crate::tissue::TissueMask;

/// Variance of the Laplacian (grey levels^2) under which a tile is out of focus.
pub const DEFAULT_BLUR_THRESHOLD: f64 = 50.0;
/// Side of the patch the blur measure reads, in pixels at 0.5 um/px.
const BLUR_PATCH_PX: u32 = 128;

/// Which artifact rules run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArtifactOptions {
    /// Master switch (`tiling.artifacts`); the rules below only run when it is on.
    pub enabled: bool,
    /// Remove marker ink (blue, green, black).
    pub pen: bool,
    /// Remove small dark flecks (debris).
    pub debris: bool,
    /// Drop out-of-focus tiles.
    pub blur: bool,
    /// Variance of the Laplacian under which a tile is out of focus.
    pub blur_threshold: f64,
}

impl Default for ArtifactOptions {
    fn default() -> Self {
        ArtifactOptions {
            enabled: false,
            pen: true,
            debris: true,
            blur: true,
            blur_threshold: DEFAULT_BLUR_THRESHOLD,
        }
    }
}

impl ArtifactOptions {
    /// Every rule on.
    pub fn all() -> ArtifactOptions {
        ArtifactOptions {
            enabled: true,
            ..ArtifactOptions::default()
        }
    }
}

/// What a view pixel was excluded as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[repr(u8)]
pub enum ArtifactKind {
    /// Marker ink.
    Pen = 1,
    /// A dark fleck smaller than a tile.
    Debris = 2,
    /// A kept tile too blurred to embed.
    OutOfFocus = 3,
}

impl ArtifactKind {
    /// Every kind, in code order.
    pub const ALL: [ArtifactKind; 3] = [
        ArtifactKind::Pen,
        ArtifactKind::Debris,
        ArtifactKind::OutOfFocus,
    ];

    /// The label written into GeoJSON `classification.name`.
    pub fn name(self) -> &'static str {
        match self {
            ArtifactKind::Pen => "Pen mark",
            ArtifactKind::Debris => "Debris",
            ArtifactKind::OutOfFocus => "Out of focus",
        }
    }

    /// Its colour in the overlay picture and in QuPath.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            ArtifactKind::Pen => [255, 140, 0],
            ArtifactKind::Debris => [220, 30, 30],
            ArtifactKind::OutOfFocus => [0, 200, 230],
        }
    }
}

/// Per view pixel: 0, or the [`ArtifactKind`] code it was excluded as.
#[derive(Debug, Clone)]
pub struct ArtifactMap {
    /// Width in view pixels.
    pub width: u32,
    /// Height in view pixels.
    pub height: u32,
    /// Row-major codes, `width * height`.
    pub data: Vec<u8>,
}

impl ArtifactMap {
    /// A map of `width x height` view pixels with nothing excluded.
    pub fn empty(width: u32, height: u32) -> ArtifactMap {
        ArtifactMap {
            width,
            height,
            data: vec![0; width as usize * height as usize],
        }
    }

    /// View pixels labelled `kind`.
    pub fn count(&self, kind: ArtifactKind) -> usize {
        self.data.iter().filter(|&&v| v == kind as u8).count()
    }
}

/// What the artifact rules removed, for the summary.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ArtifactSummary {
    /// Share of the slide's area labelled pen, in [0, 1].
    pub pen_area_fraction: f64,
    /// Share of the slide's area labelled debris, in [0, 1].
    pub debris_area_fraction: f64,
    /// Tiles dropped as out of focus.
    pub out_of_focus_tiles: usize,
}

fn hsv(p: &[u8]) -> (f64, f64, f64) {
    let (r, g, b) = (p[0] as f64, p[1] as f64, p[2] as f64);
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let d = max - min;
    let s = if max > 0.0 { d / max } else { 0.0 };
    let h = if d == 0.0 {
        0.0
    } else if max == r {
        60.0 * ((g - b) / d).rem_euclid(6.0)
    } else if max == g {
        60.0 * ((b - r) / d + 2.0)
    } else {
        60.0 * ((r - g) / d + 4.0)
    };
    (h, s, max / 255.0)
}

/// Whether a view pixel is coloured (blue or green) marker ink.
pub fn is_coloured_ink(p: &[u8]) -> bool {
    let (h, s, _) = hsv(p);
    let blue = (190.0..=250.0).contains(&h) && s >= 0.45 && p[2] as i32 >= p[0] as i32 + 40;
    let green = (70.0..=170.0).contains(&h) && s >= 0.2 && p[1] > p[0] && p[1] > p[2];
    blue || green
}

/// Whether a view pixel is dark enough to be black ink or debris.
pub fn is_dark(p: &[u8]) -> bool {
    p[0] < 56 && p[1] < 56 && p[2] < 56
}

/// Removes the labelled pixels of `map` from `mask`.
pub fn exclude(mask: &mut TissueMask, map: &ArtifactMap) {
    for (m, &a) in mask.data.iter_mut().zip(&map.data) {
        if a != 0 {
            *m = 0;
        }
    }
}

/// Labels pen and debris pixels of `view` (`mask_px_per_tile` view pixels per tile side) and
/// removes them from `mask`.
pub fn exclude_on_view(
    view: &RgbImage,
    mask: &mut TissueMask,
    mask_px_per_tile: u32,
    opts: &ArtifactOptions,
) -> ArtifactMap {
    let map = label_view(view, mask_px_per_tile, opts);
    exclude(mask, &map);
    map
}

/// Labels pen and debris pixels of `view` (`mask_px_per_tile` view pixels per tile side).
pub fn label_view(view: &RgbImage, mask_px_per_tile: u32, opts: &ArtifactOptions) -> ArtifactMap {
    let (w, h) = (view.width as usize, view.height as usize);
    let mut map = ArtifactMap::empty(view.width, view.height);
    if !opts.enabled || !(opts.pen || opts.debris) {
        return map;
    }
    // Colours are judged on the view averaged over about 12 um, so that clusters of nuclei
    // (dark at a few microns) are not taken for dirt, and ink over tissue is judged by its
    // mean colour; coloured ink also pixel by pixel (thin strokes on glass).
    let view_um = 128.0 / mask_px_per_tile as f64;
    let r = ((6.0 / view_um).round() as usize).min(4);
    let smooth = box_mean(&view.pixels, w, h, r);
    let mut pen: Vec<u8> = if opts.pen {
        smooth
            .chunks_exact(3)
            .zip(view.pixels.chunks_exact(3))
            .map(|(s, p)| (is_coloured_ink(s) || is_coloured_ink(p)) as u8)
            .collect()
    } else {
        vec![0; w * h]
    };
    let dark: Vec<u8> = smooth.chunks_exact(3).map(|p| is_dark(p) as u8).collect();
    let mut black = vec![0u8; w * h];
    let mut debris = vec![0u8; w * h];
    let tile_area = (mask_px_per_tile as usize).pow(2);
    let min_debris_px = ((MIN_DEBRIS_UM / view_um).powi(2).round() as usize).max(2);
    for component in components(&dark, w, h) {
        let is_pen = component.len() >= tile_area;
        if is_pen && opts.pen {
            component.iter().for_each(|&i| black[i] = 1);
        } else if !is_pen && opts.debris && component.len() >= min_debris_px {
            component.iter().for_each(|&i| debris[i] = 1);
        }
    }
    // The averaged view puts the edge of a coloured stroke where ink and tissue mix half and
    // half; on a coarse view the rim pixels mix them too and are taken. A black stroke's edge
    // (under 56 of 255) lies inside it by up to the averaging radius: it grows by that.
    if view_um > 6.0 {
        pen = grow(&pen, w, h);
    }
    for _ in 0..=r {
        black = grow(&black, w, h);
        debris = grow(&debris, w, h);
    }
    for (i, &d) in debris.iter().enumerate() {
        if d != 0 {
            map.data[i] = ArtifactKind::Debris as u8;
        }
    }
    for (p, b) in pen.iter_mut().zip(&black) {
        *p |= b;
    }
    for (i, &p) in pen.iter().enumerate() {
        if p != 0 {
            map.data[i] = ArtifactKind::Pen as u8;
        }
    }
    map
}

/// Side of the smallest dark fleck taken for debris, microns.
const MIN_DEBRIS_UM: f64 = 16.0;

/// Mean of each RGB pixel's neighbourhood of up to (2r+1)^2 pixels (cut at the edges), by a
/// horizontal then a vertical running sum: O(1) per pixel whatever `r`.
fn box_mean(rgb: &[u8], w: usize, h: usize, r: usize) -> Vec<u8> {
    if r == 0 {
        return rgb.to_vec();
    }
    // Horizontal sums (and counts) of each row, per channel.
    let mut rows = vec![0u32; rgb.len()];
    let mut row_n = vec![0u32; w];
    for (x, n) in row_n.iter_mut().enumerate() {
        *n = ((x + r + 1).min(w) - x.saturating_sub(r)) as u32;
    }
    for y in 0..h {
        let line = &rgb[y * w * 3..(y + 1) * w * 3];
        let out = &mut rows[y * w * 3..(y + 1) * w * 3];
        let mut acc = [0u32; 3];
        for x in 0..r.min(w) {
            (0..3).for_each(|c| acc[c] += line[x * 3 + c] as u32);
        }
        for x in 0..w {
            if x + r < w {
                (0..3).for_each(|c| acc[c] += line[(x + r) * 3 + c] as u32);
            }
            if x > r {
                (0..3).for_each(|c| acc[c] -= line[(x - r - 1) * 3 + c] as u32);
            }
            out[x * 3..x * 3 + 3].copy_from_slice(&acc);
        }
    }
    let mut out = vec![0u8; rgb.len()];
    let mut acc = vec![0u32; w * 3];
    for y in 0..r.min(h) {
        acc.iter_mut()
            .zip(&rows[y * w * 3..(y + 1) * w * 3])
            .for_each(|(a, v)| *a += v);
    }
    for y in 0..h {
        if y + r < h {
            let add = &rows[(y + r) * w * 3..(y + r + 1) * w * 3];
            acc.iter_mut().zip(add).for_each(|(a, v)| *a += v);
        }
        if y > r {
            let sub = &rows[(y - r - 1) * w * 3..(y - r) * w * 3];
            acc.iter_mut().zip(sub).for_each(|(a, v)| *a -= v);
        }
        let col_n = ((y + r + 1).min(h) - y.saturating_sub(r)) as u32;
        for x in 0..w {
            let n = row_n[x] * col_n;
            for c in 0..3 {
                out[(y * w + x) * 3 + c] = ((acc[x * 3 + c] + n / 2) / n) as u8;
            }
        }
    }
    out
}

/// 8-connected components of the set pixels of `bits`.
fn components(bits: &[u8], w: usize, h: usize) -> Vec<Vec<usize>> {
    let mut seen = vec![false; w * h];
    let mut out = Vec::new();
    let mut stack = Vec::new();
    for start in 0..w * h {
        if seen[start] || bits[start] == 0 {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let mut comp = Vec::new();
        while let Some(i) = stack.pop() {
            comp.push(i);
            let (x, y) = ((i % w) as isize, (i / w) as isize);
            for dy in -1..=1isize {
                for dx in -1..=1isize {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= w as isize || ny >= h as isize {
                        continue;
                    }
                    let j = ny as usize * w + nx as usize;
                    if !seen[j] && bits[j] != 0 {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        out.push(comp);
    }
    out
}

/// `bits` grown by one pixel (3 x 3).
fn grow(bits: &[u8], w: usize, h: usize) -> Vec<u8> {
    let mut out = bits.to_vec();
    for y in 0..h {
        for x in 0..w {
            if bits[y * w + x] == 0 {
                continue;
            }
            for ny in y.saturating_sub(1)..(y + 2).min(h) {
                for nx in x.saturating_sub(1)..(x + 2).min(w) {
                    out[ny * w + nx] = 1;
                }
            }
        }
    }
    out
}

/// Grey level at or above which a pixel counts as glass, not tissue, for the blur measure.
const GLASS_GREY: f64 = 215.0;
/// Least share of tissue pixels in a patch for the blur measure to judge it.
const MIN_TISSUE_SHARE: f64 = 0.5;

/// Variance of the 4-neighbour Laplacian of the grey levels of a `side` x `side` RGB patch,
/// over its tissue pixels (grey under `GLASS_GREY`): glass is flat whatever the focus.
/// `None` when under `MIN_TISSUE_SHARE` of the patch is tissue.
pub fn laplacian_variance(rgb: &[u8], side: usize) -> Option<f64> {
    let grey: Vec<f64> = rgb
        .chunks_exact(3)
        .map(|p| (p[0] as f64 + p[1] as f64 + p[2] as f64) / 3.0)
        .collect();
    let (mut sum, mut sum2, mut n, mut all) = (0.0, 0.0, 0.0, 0.0);
    for y in 1..side.saturating_sub(1) {
        for x in 1..side - 1 {
            let i = y * side + x;
            all += 1.0;
            if grey[i] >= GLASS_GREY {
                continue;
            }
            let l = grey[i - 1] + grey[i + 1] + grey[i - side] + grey[i + side] - 4.0 * grey[i];
            sum += l;
            sum2 += l * l;
            n += 1.0;
        }
    }
    if all == 0.0 || n / all < MIN_TISSUE_SHARE {
        return None;
    }
    let mean = sum / n;
    Some(sum2 / n - mean * mean)
}

/// The blur score of each tile: [`laplacian_variance`] of its centre quarter at 0.5 um/px,
/// read in parallel (one OpenSlide handle per worker); `None` for a tile that cannot be read
/// (the tile stream deals with those).
pub fn blur_scores(slide: &Slide, plan: &TilePlan, tiles: &[TileRef]) -> Vec<Option<f64>> {
    let path = slide.path().to_path_buf();
    // The centre quarter of a tile, in read-level pixels, and where it starts at level 0.
    let side = (plan.read_px / 2).max(1);
    let offset_level0 = (plan.level0_tile_px / 4) as u64;
    tiles
        .par_iter()
        .map_init(
            || Slide::open(&path, None).ok(),
            |handle, t| {
                let fresh = handle.as_ref()?;
                let rgb = fresh
                    .read_rgb(
                        plan.read_level,
                        t.x0 + offset_level0,
                        t.y0 + offset_level0,
                        side,
                        side,
                    )
                    .map_err(|_| *handle = Slide::open(&path, None).ok())
                    .ok()?;
                let patch = if side == BLUR_PATCH_PX {
                    rgb
                } else {
                    let img: image::ImageBuffer<image::Rgb<u8>, Vec<u8>> =
                        image::ImageBuffer::from_raw(side, side, rgb)?;
                    image::imageops::resize(
                        &img,
                        BLUR_PATCH_PX,
                        BLUR_PATCH_PX,
                        image::imageops::FilterType::Triangle,
                    )
                    .into_raw()
                };
                laplacian_variance(&patch, BLUR_PATCH_PX as usize)
            },
        )
        .collect()
}

/// Drops the tiles whose blur score is under the threshold, moving their tissue pixels from
/// `mask` to out of focus in `map`; returns how many were dropped.
pub fn drop_out_of_focus(
    slide: &Slide,
    plan: &TilePlan,
    tiles: &mut Vec<TileRef>,
    mask: &mut TissueMask,
    map: &mut ArtifactMap,
    mask_px_per_tile: u32,
    threshold: f64,
) -> usize {
    debug_assert_eq!(TILE_PX, 2 * BLUR_PATCH_PX);
    let scores = blur_scores(slide, plan, tiles);
    let before = tiles.len();
    let mut keep = scores.iter().map(|s| s.is_none_or(|v| v >= threshold));
    let mut dropped = Vec::new();
    tiles.retain(|t| {
        let k = keep.next().unwrap_or(true);
        if !k {
            dropped.push(*t);
        }
        k
    });
    let m = mask_px_per_tile;
    for t in dropped {
        for y in t.gy * m..((t.gy + 1) * m).min(map.height) {
            for x in t.gx * m..((t.gx + 1) * m).min(map.width) {
                let i = y as usize * map.width as usize + x as usize;
                if mask.data[i] != 0 {
                    mask.data[i] = 0;
                    map.data[i] = ArtifactKind::OutOfFocus as u8;
                }
            }
        }
    }
    before - tiles.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ink_rules_separate_pen_from_h_and_e() {
        // Blue and green ink over glass and over pink stroma.
        for p in [
            [60u8, 96, 220],
            [55, 60, 170],
            [73, 205, 110],
            [66, 128, 80],
        ] {
            assert!(is_coloured_ink(&p), "{p:?}");
        }
        // Hematoxylin-rich epithelium, eosin stroma, pale glass: not ink.
        for p in [
            [128u8, 83, 125],
            [177, 121, 156],
            [110, 70, 150],
            [242, 241, 244],
        ] {
            assert!(!is_coloured_ink(&p), "{p:?}");
        }
        assert!(is_dark(&[44, 34, 28]) && !is_dark(&[80, 50, 70]));
    }

    #[test]
    fn large_dark_pieces_are_pen_small_ones_debris_and_leave_the_mask() {
        let (w, h) = (32u32, 16u32);
        let mut pixels = vec![200u8; (w * h * 3) as usize];
        let mut paint = |x: u32, y: u32| {
            let i = ((y * w + x) * 3) as usize;
            pixels[i..i + 3].copy_from_slice(&[30, 30, 32]);
        };
        // A 10 x 10 dark block (over one 4 x 4 px tile: black pen) and a 2 x 2 fleck (debris;
        // at 32 um per view pixel any fleck of 2 pixels counts).
        for y in 2..12 {
            for x in 2..12 {
                paint(x, y);
            }
        }
        for y in 5..7 {
            for x in 25..27 {
                paint(x, y);
            }
        }
        let view = RgbImage {
            width: w,
            height: h,
            pixels,
        };
        let mut mask = TissueMask {
            width: w,
            height: h,
            data: vec![1; (w * h) as usize],
            otsu_threshold: None,
        };
        let map = exclude_on_view(&view, &mut mask, 4, &ArtifactOptions::all());
        // The pen block grows by one pixel on each side.
        assert_eq!(map.count(ArtifactKind::Pen), 12 * 12);
        // The fleck grows by one pixel too.
        assert_eq!(map.count(ArtifactKind::Debris), 16);
        assert_eq!(mask.data.iter().filter(|&&v| v == 0).count(), 160);
        // Rules off: nothing labelled, the mask untouched.
        let mut mask2 = TissueMask {
            data: vec![1; (w * h) as usize],
            ..mask
        };
        let off = exclude_on_view(&view, &mut mask2, 4, &ArtifactOptions::default());
        assert!(off.data.iter().all(|&v| v == 0) && mask2.data.iter().all(|&v| v == 1));
    }

    #[test]
    fn box_mean_matches_brute_force() {
        let (w, h, r) = (13usize, 9usize, 2usize);
        let rgb: Vec<u8> = (0..w * h * 3).map(|i| ((i * 7919) % 251) as u8).collect();
        let got = box_mean(&rgb, w, h, r);
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    let (mut sum, mut n) = (0u32, 0u32);
                    for ny in y.saturating_sub(r)..(y + r + 1).min(h) {
                        for nx in x.saturating_sub(r)..(x + r + 1).min(w) {
                            sum += rgb[(ny * w + nx) * 3 + c] as u32;
                            n += 1;
                        }
                    }
                    assert_eq!(got[(y * w + x) * 3 + c], ((sum + n / 2) / n) as u8);
                }
            }
        }
    }

    #[test]
    fn laplacian_variance_is_high_on_edges_and_zero_on_flat() {
        let side = 16usize;
        let flat = vec![120u8; side * side * 3];
        assert_eq!(laplacian_variance(&flat, side), Some(0.0));
        // Glass is not judged.
        assert_eq!(
            laplacian_variance(&vec![240u8; side * side * 3], side),
            None
        );
        let checker: Vec<u8> = (0..side * side)
            .flat_map(|i| {
                let v = if (i % side + i / side).is_multiple_of(2) {
                    0
                } else {
                    200
                };
                [v, v, v]
            })
            .collect();
        assert!(laplacian_variance(&checker, side).unwrap() > 10_000.0);
    }
}
