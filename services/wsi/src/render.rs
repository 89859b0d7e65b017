//! Pictures for people to check a tiling by eye: the mask, the thumbnail, and the thumbnail with
//! the tissue tinted and the kept tiles outlined.

use image::{imageops::FilterType, ImageBuffer, Luma, Rgb};

use crate::artifacts::ArtifactKind;
use crate::error::{Result, WsiError};
use crate::grid::Tiling;
use crate::thumbnail::RgbImage;

/// Longest side of the thumbnail and overlay pictures.
pub const MAX_PICTURE_PX: u32 = 2048;
/// Small views are enlarged (by whole factors, nearest) to at least this longest side.
pub const MIN_PICTURE_PX: u32 = 1024;

/// PNG bytes of the mask (white tissue on black), at the mask's own resolution.
pub fn mask_png(tiling: &Tiling) -> Result<Vec<u8>> {
    let m = &tiling.mask;
    let img: ImageBuffer<Luma<u8>, Vec<u8>> =
        ImageBuffer::from_raw(m.width, m.height, m.data.iter().map(|&v| v * 255).collect())
            .expect("mask buffer matches its size");
    encode_png(img.into())
}

/// PNG bytes of the downsampled view, at most [`MAX_PICTURE_PX`] on its longest side.
pub fn thumbnail_png(view: &RgbImage) -> Result<Vec<u8>> {
    encode_png(fit(to_image(view)).into())
}

/// Tint of tissue in the overlay picture.
pub const TISSUE_RGB: [u8; 3] = [40, 200, 60];

/// PNG bytes of the view with tissue tinted green, each artifact kind in its own colour
/// ([`ArtifactKind::rgb`]: pen orange, debris red, out of focus cyan) and kept tiles outlined
/// in blue.
pub fn overlay_png(tiling: &Tiling) -> Result<Vec<u8>> {
    let mut img = to_image(&tiling.view);
    let tint = |px: &mut Rgb<u8>, rgb: [u8; 3]| {
        for (c, t) in px.0.iter_mut().zip(rgb) {
            *c = ((*c as u32 * 3 + t as u32 * 2) / 5) as u8;
        }
    };
    for ((px, &m), &a) in img
        .pixels_mut()
        .zip(&tiling.mask.data)
        .zip(&tiling.artifacts.data)
    {
        if let Some(kind) = ArtifactKind::ALL.into_iter().find(|k| *k as u8 == a) {
            tint(px, kind.rgb());
        } else if m != 0 {
            tint(px, TISSUE_RGB);
        }
    }
    let img = fit(img);
    let scale = img.width() as f64 / tiling.view.width as f64;
    let tile_side = tiling.mask_px_per_tile as f64 * scale;
    let mut img = img;
    // Outlines are only legible when a tile spans a few pixels of the picture.
    if tile_side >= 5.0 {
        for t in &tiling.tiles {
            let x0 = (t.gx as f64 * tile_side).round() as i64;
            let y0 = (t.gy as f64 * tile_side).round() as i64;
            let x1 = ((t.gx + 1) as f64 * tile_side).round() as i64 - 1;
            let y1 = ((t.gy + 1) as f64 * tile_side).round() as i64 - 1;
            outline(&mut img, x0, y0, x1, y1, Rgb([20, 40, 200]));
        }
    }
    encode_png(img.into())
}

fn to_image(view: &RgbImage) -> ImageBuffer<Rgb<u8>, Vec<u8>> {
    ImageBuffer::from_raw(view.width, view.height, view.pixels.clone())
        .expect("view buffer matches its size")
}

fn fit(img: ImageBuffer<Rgb<u8>, Vec<u8>>) -> ImageBuffer<Rgb<u8>, Vec<u8>> {
    let (w, h) = img.dimensions();
    let longest = w.max(h);
    if longest < MIN_PICTURE_PX {
        let k = MIN_PICTURE_PX.div_ceil(longest.max(1));
        return image::imageops::resize(&img, w * k, h * k, FilterType::Nearest);
    }
    if longest <= MAX_PICTURE_PX {
        return img;
    }
    let s = MAX_PICTURE_PX as f64 / longest as f64;
    let (nw, nh) = (
        ((w as f64 * s).round() as u32).max(1),
        ((h as f64 * s).round() as u32).max(1),
    );
    image::imageops::resize(&img, nw, nh, FilterType::Triangle)
}

fn outline(
    img: &mut ImageBuffer<Rgb<u8>, Vec<u8>>,
    x0: i64,
    y0: i64,
    x1: i64,
    y1: i64,
    c: Rgb<u8>,
) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let mut put = |x: i64, y: i64| {
        if x >= 0 && y >= 0 && x < w && y < h {
            img.put_pixel(x as u32, y as u32, c);
        }
    };
    for x in x0..=x1 {
        put(x, y0);
        put(x, y1);
    }
    for y in y0..=y1 {
        put(x0, y);
        put(x1, y);
    }
}

fn encode_png(img: image::DynamicImage) -> Result<Vec<u8>> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png)
        .map_err(|e| WsiError::format("<png>", format!("PNG encoding failed: {e}")))?;
    Ok(bytes.into_inner())
}
