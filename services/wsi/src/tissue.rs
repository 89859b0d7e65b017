//! Tissue segmentation on a downsampled view of the slide.
//!
//! Two methods, chosen by the user:
//! - [`TissueMethod::Otsu`], the Prov-GigaPath reference: Otsu's threshold on the RGB-mean
//!   luminance; tissue is darker than the threshold. Nothing else, to stay identical to it.
//!   One guard the reference lacks: when the two Otsu classes are less than
//!   [`MIN_OTSU_CONTRAST`] grey levels apart the view is glass only (Otsu would split scanner
//!   noise) and the mask is empty.
//! - [`TissueMethod::Saturation`], CLAM-like: HSV saturation, median blur, threshold,
//!   morphological close, then removal of small tissue specks and filling of small holes. Robust
//!   to pale tissue and to dark pen marks or dust on glass (grey, unsaturated).
//!
//! Sizes are in pixels of the mask; [`SegmentParams::for_mask_scale`] scales the defaults, which
//! are set for 16 mask pixels per 256 px tile at 0.5 um/px (8 um per mask pixel).

use std::str::FromStr;

use serde::Serialize;

use crate::thumbnail::RgbImage;

/// The least gap between the Otsu class means (grey levels) for the view to count as tissue.
pub const MIN_OTSU_CONTRAST: f64 = 15.0;

/// How tissue is told from glass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TissueMethod {
    /// Otsu's threshold on the luminance, as the Prov-GigaPath reference.
    Otsu,
    /// CLAM-like: HSV saturation with blur, close and clean-up.
    Saturation,
}

impl FromStr for TissueMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "otsu" => Ok(TissueMethod::Otsu),
            "saturation" | "sat" | "clam" => Ok(TissueMethod::Saturation),
            _ => Err(format!(
                "unknown tissue method {s:?} (expected otsu or saturation)"
            )),
        }
    }
}

impl std::fmt::Display for TissueMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TissueMethod::Otsu => "otsu",
            TissueMethod::Saturation => "saturation",
        })
    }
}

/// Segmentation settings, in mask pixels.
#[derive(Debug, Clone, Serialize)]
pub struct SegmentParams {
    /// How tissue is told from glass.
    pub method: TissueMethod,
    /// Saturation (0-255, OpenCV's HSV scale) above which a pixel is tissue (CLAM: 8).
    pub saturation_threshold: u8,
    /// Median blur kernel side (odd; CLAM: 7).
    pub median_px: u32,
    /// Morphological close kernel side (CLAM: 4).
    pub close_px: u32,
    /// Tissue pieces smaller than this (mask pixels) are dropped.
    pub min_tissue_px: u64,
    /// Holes inside tissue smaller than this (mask pixels) are filled.
    pub max_hole_px: u64,
}

impl SegmentParams {
    /// Defaults for a mask with `mask_px_per_tile` pixels per tile side (16 is the reference
    /// scale: 8 um per mask pixel at 0.5 um/px).
    pub fn for_mask_scale(method: TissueMethod, mask_px_per_tile: u32) -> SegmentParams {
        let s = mask_px_per_tile as f64 / 16.0;
        let tile_area = (mask_px_per_tile * mask_px_per_tile) as u64;
        SegmentParams {
            method,
            saturation_threshold: 8,
            median_px: (((7.0 * s).round() as u32) | 1).max(3),
            close_px: ((4.0 * s).round() as u32).max(1),
            // Half a tile (64 x 64 um): specks of dust or debris, not tissue worth a tile.
            min_tissue_px: tile_area / 2,
            max_hole_px: tile_area / 2,
        }
    }
}

/// A binary tissue mask over the downsampled view (1 = tissue).
#[derive(Debug, Clone)]
pub struct TissueMask {
    /// Width in mask (view) pixels.
    pub width: u32,
    /// Height in mask (view) pixels.
    pub height: u32,
    /// Row-major, `width * height`: 1 tissue, 0 glass.
    pub data: Vec<u8>,
    /// The Otsu luminance threshold, when that method ran.
    pub otsu_threshold: Option<u8>,
}

impl TissueMask {
    /// Whether mask pixel (`x`, `y`) is tissue; panics outside the mask.
    pub fn get(&self, x: u32, y: u32) -> bool {
        self.data[y as usize * self.width as usize + x as usize] != 0
    }

    /// Fraction of the mask that is tissue.
    pub fn tissue_fraction(&self) -> f64 {
        self.data.iter().filter(|&&v| v != 0).count() as f64 / self.data.len().max(1) as f64
    }
}

/// Segments `view` with `params`.
pub fn segment(view: &RgbImage, params: &SegmentParams) -> TissueMask {
    segment_ignoring(view, params, None)
}

/// [`segment`], with the view pixels set in `ignore` (artifacts: ink, debris) left out of the
/// Otsu threshold's statistics, so that a dark pen stroke does not move it.
pub fn segment_ignoring(
    view: &RgbImage,
    params: &SegmentParams,
    ignore: Option<&[u8]>,
) -> TissueMask {
    match params.method {
        TissueMethod::Otsu => segment_otsu(view, ignore),
        TissueMethod::Saturation => segment_saturation(view, params),
    }
}

fn segment_otsu(view: &RgbImage, ignore: Option<&[u8]>) -> TissueMask {
    let lum: Vec<u8> = view
        .pixels
        .chunks_exact(3)
        .map(|p| ((p[0] as u32 + p[1] as u32 + p[2] as u32 + 1) / 3) as u8)
        .collect();
    let (t, contrast) = match ignore {
        Some(ignore) => {
            let kept: Vec<u8> = lum
                .iter()
                .zip(ignore)
                .filter(|(_, &i)| i == 0)
                .map(|(&l, _)| l)
                .collect();
            otsu(&kept)
        }
        None => otsu(&lum),
    };
    let data = if contrast < MIN_OTSU_CONTRAST {
        vec![0; lum.len()]
    } else {
        lum.iter().map(|&l| (l < t) as u8).collect()
    };
    TissueMask {
        width: view.width,
        height: view.height,
        data,
        otsu_threshold: Some(t),
    }
}

/// Otsu's threshold `t` of 8-bit values (dark class `< t`, bright class `>= t`) and the gap
/// between the two class means.
pub fn otsu(values: &[u8]) -> (u8, f64) {
    let mut hist = [0u64; 256];
    for &v in values {
        hist[v as usize] += 1;
    }
    let total = values.len() as f64;
    let sum_all: f64 = hist
        .iter()
        .enumerate()
        .map(|(v, &n)| v as f64 * n as f64)
        .sum();
    let (mut best_t, mut best_var, mut best_gap) = (0u8, -1.0f64, 0.0f64);
    let (mut n_dark, mut sum_dark) = (0.0f64, 0.0f64);
    for t in 1..256usize {
        n_dark += hist[t - 1] as f64;
        sum_dark += (t - 1) as f64 * hist[t - 1] as f64;
        let n_bright = total - n_dark;
        if n_dark == 0.0 || n_bright == 0.0 {
            continue;
        }
        let (m_dark, m_bright) = (sum_dark / n_dark, (sum_all - sum_dark) / n_bright);
        let var = n_dark * n_bright * (m_dark - m_bright).powi(2);
        if var > best_var {
            (best_t, best_var, best_gap) = (t as u8, var, m_bright - m_dark);
        }
    }
    (best_t, best_gap)
}

fn segment_saturation(view: &RgbImage, p: &SegmentParams) -> TissueMask {
    let (w, h) = (view.width as usize, view.height as usize);
    let sat: Vec<u8> = view
        .pixels
        .chunks_exact(3)
        .map(|px| {
            let max = px.iter().copied().max().unwrap_or(0) as u32;
            let min = px.iter().copied().min().unwrap_or(0) as u32;
            (255 * (max - min) + max / 2).checked_div(max).unwrap_or(0) as u8
        })
        .collect();
    let blurred = median_filter(&sat, w, h, p.median_px as usize);
    let mut mask: Vec<u8> = blurred
        .iter()
        .map(|&s| (s > p.saturation_threshold) as u8)
        .collect();
    mask = dilate(&mask, w, h, p.close_px as usize);
    mask = erode(&mask, w, h, p.close_px as usize);
    remove_small_components(&mut mask, w, h, 1, p.min_tissue_px, true);
    remove_small_components(&mut mask, w, h, 0, p.max_hole_px, false);
    TissueMask {
        width: view.width,
        height: view.height,
        data: mask,
        otsu_threshold: None,
    }
}

/// Median of the `k` x `k` window around each pixel (edges replicated), by a sliding histogram
/// along each row (Huang), so the cost is O(k) per pixel rather than O(k^2 log k).
pub fn median_filter(src: &[u8], w: usize, h: usize, k: usize) -> Vec<u8> {
    let r = (k / 2) as isize;
    let at = |x: isize, y: isize| {
        let x = x.clamp(0, w as isize - 1) as usize;
        let y = y.clamp(0, h as isize - 1) as usize;
        src[y * w + x]
    };
    let half = (k * k / 2) as u32;
    let mut out = vec![0u8; w * h];
    for y in 0..h as isize {
        let mut hist = [0u32; 256];
        for dy in -r..=r {
            for dx in -r..=r {
                hist[at(dx, y + dy) as usize] += 1;
            }
        }
        // `below` = number of window values < `m`; the median is the m with below <= half < below + hist[m].
        let (mut m, mut below) = (0usize, 0u32);
        for x in 0..w as isize {
            if x > 0 {
                for dy in -r..=r {
                    let old = at(x - 1 - r, y + dy) as usize;
                    let new = at(x + r, y + dy) as usize;
                    hist[old] -= 1;
                    hist[new] += 1;
                    below -= (old < m) as u32;
                    below += (new < m) as u32;
                }
            }
            while below > half {
                m -= 1;
                below -= hist[m];
            }
            while below + hist[m] <= half {
                below += hist[m];
                m += 1;
            }
            out[y as usize * w + x as usize] = m as u8;
        }
    }
    out
}

fn morph(src: &[u8], w: usize, h: usize, k: usize, dilate: bool) -> Vec<u8> {
    if k <= 1 {
        return src.to_vec();
    }
    // OpenCV's anchor for a k-wide kernel: the window is [x - k/2, x + k - 1 - k/2].
    let (lo, hi) = ((k / 2) as isize, (k - 1 - k / 2) as isize);
    let pass = |src: &[u8], horizontal: bool| {
        let mut out = vec![0u8; w * h];
        for y in 0..h as isize {
            for x in 0..w as isize {
                let mut acc = if dilate { 0u8 } else { 1u8 };
                for d in -lo..=hi {
                    let (sx, sy) = if horizontal { (x + d, y) } else { (x, y + d) };
                    // Outside the image counts as neither (it never changes the result).
                    if sx < 0 || sy < 0 || sx >= w as isize || sy >= h as isize {
                        continue;
                    }
                    let v = src[sy as usize * w + sx as usize];
                    acc = if dilate { acc.max(v) } else { acc.min(v) };
                }
                out[y as usize * w + x as usize] = acc;
            }
        }
        out
    };
    pass(&pass(src, true), false)
}

fn dilate(src: &[u8], w: usize, h: usize, k: usize) -> Vec<u8> {
    morph(src, w, h, k, true)
}

fn erode(src: &[u8], w: usize, h: usize, k: usize) -> Vec<u8> {
    morph(src, w, h, k, false)
}

/// Flips connected components of `value` smaller than `min_px` to the other value.
/// Tissue (`value` 1) uses 8-connectivity; holes (`value` 0) use 4-connectivity and only those
/// not touching the border count (a background touching the border is glass, not a hole).
fn remove_small_components(
    mask: &mut [u8],
    w: usize,
    h: usize,
    value: u8,
    min_px: u64,
    eight_connected: bool,
) {
    if min_px == 0 {
        return;
    }
    let mut seen = vec![false; w * h];
    let mut stack = Vec::new();
    let mut component = Vec::new();
    for start in 0..w * h {
        if seen[start] || mask[start] != value {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        component.clear();
        let mut touches_border = false;
        while let Some(i) = stack.pop() {
            component.push(i);
            let (x, y) = ((i % w) as isize, (i / w) as isize);
            touches_border |= x == 0 || y == 0 || x == w as isize - 1 || y == h as isize - 1;
            for (dx, dy) in NEIGHBOURS {
                if !eight_connected && dx != 0 && dy != 0 {
                    continue;
                }
                let (nx, ny) = (x + dx, y + dy);
                if nx < 0 || ny < 0 || nx >= w as isize || ny >= h as isize {
                    continue;
                }
                let j = ny as usize * w + nx as usize;
                if !seen[j] && mask[j] == value {
                    seen[j] = true;
                    stack.push(j);
                }
            }
        }
        let is_hole_candidate = value == 1 || !touches_border;
        if is_hole_candidate && (component.len() as u64) < min_px {
            for &i in &component {
                mask[i] = 1 - value;
            }
        }
    }
}

const NEIGHBOURS: [(isize, isize); 8] = [
    (-1, -1),
    (0, -1),
    (1, -1),
    (-1, 0),
    (1, 0),
    (-1, 1),
    (0, 1),
    (1, 1),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otsu_splits_two_populations() {
        let mut v = vec![60u8; 300];
        v.extend(vec![230u8; 700]);
        let (t, gap) = otsu(&v);
        assert!(t > 60 && t <= 230, "t = {t}");
        assert!((gap - 170.0).abs() < 1e-9);
    }

    #[test]
    fn glass_only_view_gives_an_empty_otsu_mask() {
        let pixels: Vec<u8> = (0..64 * 64)
            .flat_map(|i| {
                let n = (i * 7 % 5) as u8;
                [240 + n, 241 + n, 239 + n]
            })
            .collect();
        let view = RgbImage {
            width: 64,
            height: 64,
            pixels,
        };
        let mask = segment(
            &view,
            &SegmentParams::for_mask_scale(TissueMethod::Otsu, 16),
        );
        assert_eq!(mask.tissue_fraction(), 0.0);
    }

    #[test]
    fn median_filter_matches_brute_force() {
        let (w, h, k) = (23usize, 17usize, 5usize);
        let src: Vec<u8> = (0..w * h).map(|i| ((i * 7919) % 251) as u8).collect();
        let got = median_filter(&src, w, h, k);
        let r = (k / 2) as isize;
        for y in 0..h as isize {
            for x in 0..w as isize {
                let mut win = Vec::new();
                for dy in -r..=r {
                    for dx in -r..=r {
                        let sx = (x + dx).clamp(0, w as isize - 1) as usize;
                        let sy = (y + dy).clamp(0, h as isize - 1) as usize;
                        win.push(src[sy * w + sx]);
                    }
                }
                win.sort();
                assert_eq!(
                    got[y as usize * w + x as usize],
                    win[win.len() / 2],
                    "at {x},{y}"
                );
            }
        }
    }

    #[test]
    fn small_specks_go_and_small_holes_fill() {
        let (w, h) = (20usize, 20usize);
        let mut m = vec![0u8; w * h];
        // A 10x10 block with a 2x2 hole, and a lone speck.
        for y in 5..15 {
            for x in 5..15 {
                m[y * w + x] = 1;
            }
        }
        m[9 * w + 9] = 0;
        m[9 * w + 10] = 0;
        m[10 * w + 9] = 0;
        m[10 * w + 10] = 0;
        m[w + 1] = 1;
        remove_small_components(&mut m, w, h, 1, 5, true);
        remove_small_components(&mut m, w, h, 0, 5, false);
        assert_eq!(m[w + 1], 0, "speck removed");
        assert_eq!(m[9 * w + 9], 1, "hole filled");
        assert_eq!(m.iter().filter(|&&v| v == 1).count(), 100);
    }

    #[test]
    fn saturation_method_ignores_grey_marks_and_keeps_pink_tissue() {
        let (w, h) = (48u32, 48u32);
        let mut pixels = Vec::new();
        for y in 0..h {
            for x in 0..w {
                let px = if x < 24 && y < 24 {
                    [200, 110, 170] // pink tissue
                } else if x >= 30 && y >= 30 {
                    [60, 60, 62] // a grey pen mark: dark but unsaturated
                } else {
                    [242, 241, 244]
                };
                pixels.extend_from_slice(&px);
            }
        }
        let view = RgbImage {
            width: w,
            height: h,
            pixels,
        };
        let mask = segment(
            &view,
            &SegmentParams::for_mask_scale(TissueMethod::Saturation, 16),
        );
        assert!(mask.get(10, 10));
        assert!(!mask.get(40, 40), "grey mark is not tissue");
        let frac = mask.tissue_fraction();
        assert!((frac - 0.25).abs() < 0.03, "tissue fraction {frac}");
    }
}
