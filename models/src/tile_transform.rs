//! The Prov-GigaPath tile transform: u8 RGB tile -> normalised `pixel_values` for the tile encoder.
//!
//! Official pipeline: Resize shorter side to 256 (bicubic) -> CenterCrop 224 -> ToTensor ->
//! Normalize(ImageNet mean, std). Tiles are cut at 256 px, where the resize is the identity, so
//! only tiles whose shorter side is 256 are accepted: resampling belongs to the tiler, which knows
//! the slide's mpp (a 512 px read at 40x is resized to 256 there, once).

use crate::{Error, Result};

/// Side the shorter edge is resized to before the crop.
pub const RESIZE_PX: usize = 256;
/// Side of the centre crop the tile encoder sees.
pub const CROP_PX: usize = 224;
/// ImageNet channel means (RGB), as torchvision's `Normalize` takes them.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (RGB).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// One tile, `rgb` interleaved u8 `[h, w, 3]` (row-major), to `pixel_values` f32 `[3, 224, 224]`.
///
/// The arithmetic is torchvision's in f32 (`x / 255`, then `(x - mean) / std`), so results match
/// PyTorch bit for bit. The shorter side must be 256 (see the module docs).
pub fn normalize_center_crop(rgb: &[u8], h: usize, w: usize) -> Result<Vec<f32>> {
    let mut out = vec![0f32; 3 * CROP_PX * CROP_PX];
    normalize_center_crop_into(rgb, h, w, &mut out)?;
    Ok(out)
}

/// [`normalize_center_crop`] writing into `out` (length `3 * 224 * 224`), for batch buffers.
pub fn normalize_center_crop_into(rgb: &[u8], h: usize, w: usize, out: &mut [f32]) -> Result<()> {
    if rgb.len() != h * w * 3 {
        return Err(Error::input(format!(
            "tile buffer has {} bytes, expected {h} x {w} x 3 = {}",
            rgb.len(),
            h * w * 3
        )));
    }
    if h.min(w) != RESIZE_PX {
        return Err(Error::input(format!(
            "tile is {h} x {w} px; the tile transform needs a shorter side of {RESIZE_PX} \
             (resample to 256 px at 0.5 mpp when tiling)"
        )));
    }
    if out.len() != 3 * CROP_PX * CROP_PX {
        return Err(Error::input(format!(
            "output buffer has {} values, expected 3 x {CROP_PX} x {CROP_PX}",
            out.len()
        )));
    }
    // torchvision's center_crop offsets: int(round((size - crop) / 2)), round half to even.
    let top = (((h - CROP_PX) as f64) / 2.0).round_ties_even() as usize;
    let left = (((w - CROP_PX) as f64) / 2.0).round_ties_even() as usize;
    let plane = CROP_PX * CROP_PX;
    for y in 0..CROP_PX {
        let row = &rgb[((top + y) * w + left) * 3..][..CROP_PX * 3];
        for (x, px) in row.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + y * CROP_PX + x] =
                    (px[c] as f32 / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
            }
        }
    }
    Ok(())
}

/// A batch of tiles, u8 `[b, h, w, 3]`, to `pixel_values` f32 `[b, 3, 224, 224]` (flat).
pub fn tiles_to_pixel_values(tiles: &[u8], b: usize, h: usize, w: usize) -> Result<Vec<f32>> {
    if tiles.len() != b * h * w * 3 {
        return Err(Error::input(format!(
            "tile batch has {} bytes, expected {b} x {h} x {w} x 3",
            tiles.len()
        )));
    }
    let per_out = 3 * CROP_PX * CROP_PX;
    let mut out = vec![0f32; b * per_out];
    if b == 0 {
        return Ok(out);
    }
    for (tile, dst) in tiles
        .chunks_exact(h * w * 3)
        .zip(out.chunks_exact_mut(per_out))
    {
        normalize_center_crop_into(tile, h, w, dst)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crops_the_centre_and_normalises_per_channel() {
        // Each pixel encodes its own coordinates, so the crop offset is visible in the output.
        let (h, w) = (256, 256);
        let mut rgb = vec![0u8; h * w * 3];
        for y in 0..h {
            for x in 0..w {
                let p = &mut rgb[(y * w + x) * 3..][..3];
                p.copy_from_slice(&[y as u8, x as u8, 200]);
            }
        }
        let out = normalize_center_crop(&rgb, h, w).unwrap();
        let plane = CROP_PX * CROP_PX;
        let r00 = (16f32 / 255.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0];
        assert_eq!(out[0], r00, "top-left of the crop is source row 16");
        let g_last = (239f32 / 255.0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1];
        assert_eq!(
            out[plane + CROP_PX - 1],
            g_last,
            "right edge is source column 239"
        );
        let b = (200f32 / 255.0 - IMAGENET_MEAN[2]) / IMAGENET_STD[2];
        assert_eq!(out[2 * plane + 5 * CROP_PX + 7], b);
    }

    #[test]
    fn non_square_tiles_with_shorter_side_256_crop_like_torchvision() {
        // (257 - 224) / 2 = 16.5 rounds to even: 16.
        let (h, w) = (256, 257);
        let mut rgb = vec![0u8; h * w * 3];
        for y in 0..h {
            for x in 0..w {
                rgb[(y * w + x) * 3] = x as u8;
            }
        }
        let out = normalize_center_crop(&rgb, h, w).unwrap();
        assert_eq!(out[0], (16f32 / 255.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]);
    }

    #[test]
    fn other_sizes_are_refused_with_the_reason() {
        let err = normalize_center_crop(&vec![0u8; 512 * 512 * 3], 512, 512).unwrap_err();
        assert!(err.to_string().contains("shorter side of 256"), "{err}");
        let err = normalize_center_crop(&[0u8; 10], 256, 256).unwrap_err();
        assert!(err.to_string().contains("expected 256 x 256 x 3"), "{err}");
    }
}
