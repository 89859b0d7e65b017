//! From the pixels read at the tile level to what the tile encoder sees: resize to 256 px when
//! the level is not at 0.5 um/px, then the official transform (spec section 1): center-crop 224,
//! scale to [0, 1], normalise with the ImageNet mean and std, channels first.
//!
//! For a 256 px tile the official "resize shorter side to 256" is the identity, so only the
//! resampling of off-magnification reads needs a filter: bicubic (Catmull-Rom, a = -0.5, the
//! kernel PIL's bicubic uses), widened when shrinking so that 40x tiles do not alias.

use image::{imageops::FilterType, ImageBuffer, Rgb};

use crate::grid::TILE_PX;

/// Side of the encoder input.
pub const CROP_PX: u32 = 224;
/// ImageNet channel means (timm / torchvision), on the [0, 1] scale.
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (timm / torchvision), on the [0, 1] scale.
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];
/// f32 values per normalised tile: 3 x 224 x 224.
pub const NORMALIZED_LEN: usize = 3 * (CROP_PX * CROP_PX) as usize;
/// Bytes per RGB tile: 256 x 256 x 3.
pub const RGB_TILE_LEN: usize = (TILE_PX * TILE_PX * 3) as usize;

/// Resizes a `side` x `side` RGB read to 256 x 256 (returns it unchanged at 256).
pub fn resize_to_tile(rgb: Vec<u8>, side: u32) -> Vec<u8> {
    if side == TILE_PX {
        return rgb;
    }
    let img: ImageBuffer<Rgb<u8>, Vec<u8>> =
        ImageBuffer::from_raw(side, side, rgb).expect("read buffer matches its size");
    image::imageops::resize(&img, TILE_PX, TILE_PX, FilterType::CatmullRom).into_raw()
}

/// Center-crops a 256 x 256 RGB tile to 224 and writes the normalised CHW floats into `out`
/// (length [`NORMALIZED_LEN`]).
pub fn crop_normalize(rgb256: &[u8], out: &mut [f32]) {
    assert_eq!(rgb256.len(), RGB_TILE_LEN, "tile must be 256 x 256 RGB");
    assert_eq!(out.len(), NORMALIZED_LEN, "output must hold 3 x 224 x 224");
    let off = ((TILE_PX - CROP_PX) / 2) as usize;
    let (side, crop) = (TILE_PX as usize, CROP_PX as usize);
    // One lookup table per channel: 256 values, exact same arithmetic for every pixel.
    let lut: [[f32; 256]; 3] =
        std::array::from_fn(|c| std::array::from_fn(|v| (v as f32 / 255.0 - MEAN[c]) / STD[c]));
    let plane = crop * crop;
    for y in 0..crop {
        let row = &rgb256[((y + off) * side + off) * 3..][..crop * 3];
        for (x, px) in row.chunks_exact(3).enumerate() {
            let o = y * crop + x;
            out[o] = lut[0][px[0] as usize];
            out[plane + o] = lut[1][px[1] as usize];
            out[2 * plane + o] = lut[2][px[2] as usize];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_takes_the_centre_and_normalises_per_channel() {
        let mut rgb = vec![0u8; RGB_TILE_LEN];
        // Pixel (16, 16) is the crop's top-left; (15, 15) is outside it.
        let at = |x: usize, y: usize| (y * 256 + x) * 3;
        rgb[at(16, 16)..at(16, 16) + 3].copy_from_slice(&[255, 128, 0]);
        rgb[at(15, 15)..at(15, 15) + 3].copy_from_slice(&[255, 255, 255]);
        let mut out = vec![0f32; NORMALIZED_LEN];
        crop_normalize(&rgb, &mut out);
        let plane = 224 * 224;
        assert!((out[0] - (1.0 - 0.485) / 0.229).abs() < 1e-6);
        assert!((out[plane] - (128.0 / 255.0 - 0.456) / 0.224).abs() < 1e-6);
        assert!((out[2 * plane] - (0.0 - 0.406) / 0.225).abs() < 1e-6);
        // Everything else is black.
        assert!((out[1] - (0.0 - 0.485) / 0.229).abs() < 1e-6);
    }

    #[test]
    fn halving_a_uniform_read_keeps_its_colour() {
        let rgb = [10u8, 200, 90].repeat(512 * 512);
        let out = resize_to_tile(rgb, 512);
        assert_eq!(out.len(), RGB_TILE_LEN);
        assert!(out.chunks_exact(3).all(|p| p == [10, 200, 90]));
    }
}
