//! `curve.png`: the loss and validation curves of a run, drawn pixel by pixel with the `image`
//! crate (a plotting library would be a large dependency for two panels of lines).
//!
//! Top panel: training loss per step (blue) and validation loss (orange dots and line), y from 0
//! to the largest loss. Bottom panel: validation recall@1 and @5, report -> slide (green, dark
//! green) and slide -> report (purple, dark purple), y from 0 to 1. Axis ticks carry numbers in
//! a 3x5 pixel font.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::error::{Result, TrainError};
use crate::runlog::StepRecord;

const W: u32 = 900;
const H: u32 = 620;
const LEFT: i32 = 60;
const RIGHT: i32 = 20;
const PANEL_H: i32 = 250;
const TOP1: i32 = 30;
const TOP2: i32 = TOP1 + PANEL_H + 50;

const BG: Rgb<u8> = Rgb([255, 255, 255]);
const AXIS: Rgb<u8> = Rgb([60, 60, 60]);
const GRID: Rgb<u8> = Rgb([228, 228, 228]);
const TRAIN: Rgb<u8> = Rgb([31, 119, 180]);
const VAL: Rgb<u8> = Rgb([255, 127, 14]);
const R2S1: Rgb<u8> = Rgb([44, 160, 44]);
const R2S5: Rgb<u8> = Rgb([20, 90, 20]);
const S2R1: Rgb<u8> = Rgb([148, 103, 189]);
const S2R5: Rgb<u8> = Rgb([80, 50, 120]);

/// Draws `history` into a PNG at `path` (written through a temporary file).
pub fn write_curve(path: &Path, history: &[StepRecord]) -> Result<()> {
    let img = draw(history);
    let tmp = path.with_extension("partial.png");
    img.save(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
}

/// The picture, for tests.
pub fn draw(history: &[StepRecord]) -> RgbImage {
    let mut img = RgbImage::from_pixel(W, H, BG);
    let max_step = history.iter().map(|r| r.step).max().unwrap_or(1).max(1) as f64;
    let max_loss = history
        .iter()
        .flat_map(|r| std::iter::once(r.loss).chain(r.val.as_ref().map(|v| v.loss)))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-6);
    let loss_panel = Panel {
        top: TOP1,
        y_max: max_loss,
        x_max: max_step,
    };
    let recall_panel = Panel {
        top: TOP2,
        y_max: 1.0,
        x_max: max_step,
    };
    for p in [&loss_panel, &recall_panel] {
        p.axes(&mut img);
    }
    let train: Vec<(f64, f64)> = history.iter().map(|r| (r.step as f64, r.loss)).collect();
    loss_panel.line(&mut img, &train, TRAIN);
    let val: Vec<(f64, &crate::runlog::ValMetrics)> = history
        .iter()
        .filter_map(|r| r.val.as_ref().map(|v| (r.step as f64, v)))
        .collect();
    let series = |f: &dyn Fn(&crate::runlog::ValMetrics) -> f64| -> Vec<(f64, f64)> {
        val.iter().map(|(s, v)| (*s, f(v))).collect()
    };
    let val_loss = series(&|v| v.loss);
    loss_panel.line(&mut img, &val_loss, VAL);
    loss_panel.dots(&mut img, &val_loss, VAL);
    for (f, colour) in [
        (
            &(|v: &crate::runlog::ValMetrics| v.report_to_slide.r1) as &dyn Fn(&_) -> f64,
            R2S1,
        ),
        (&|v: &crate::runlog::ValMetrics| v.report_to_slide.r5, R2S5),
        (&|v: &crate::runlog::ValMetrics| v.slide_to_report.r1, S2R1),
        (&|v: &crate::runlog::ValMetrics| v.slide_to_report.r5, S2R5),
    ] {
        let s = series(f);
        recall_panel.line(&mut img, &s, colour);
        recall_panel.dots(&mut img, &s, colour);
    }
    // Legend swatches: loss panel (train, val), recall panel (r->s @1, @5, s->r @1, @5).
    for (i, c) in [TRAIN, VAL].iter().enumerate() {
        fill_rect(
            &mut img,
            W as i32 - 120 + i as i32 * 50,
            TOP1 - 18,
            30,
            6,
            *c,
        );
    }
    for (i, c) in [R2S1, R2S5, S2R1, S2R5].iter().enumerate() {
        fill_rect(
            &mut img,
            W as i32 - 220 + i as i32 * 50,
            TOP2 - 18,
            30,
            6,
            *c,
        );
    }
    img
}

struct Panel {
    top: i32,
    y_max: f64,
    x_max: f64,
}

impl Panel {
    fn to_px(&self, x: f64, y: f64) -> (i32, i32) {
        let width = (W as i32 - LEFT - RIGHT) as f64;
        let px = LEFT + (x / self.x_max * width).round() as i32;
        let py = self.top + PANEL_H
            - (y.clamp(0.0, self.y_max) / self.y_max * PANEL_H as f64).round() as i32;
        (px, py)
    }

    fn axes(&self, img: &mut RgbImage) {
        let right = W as i32 - RIGHT;
        for i in 0..=4 {
            let y = self.y_max * i as f64 / 4.0;
            let (_, py) = self.to_px(0.0, y);
            line(img, LEFT, py, right, py, if i == 0 { AXIS } else { GRID });
            text(img, 4, py - 2, &format_tick(y), AXIS);
        }
        line(img, LEFT, self.top, LEFT, self.top + PANEL_H, AXIS);
        for i in 0..=5 {
            let x = self.x_max * i as f64 / 5.0;
            let (px, py) = self.to_px(x, 0.0);
            line(img, px, py, px, py + 4, AXIS);
            let label = format!("{}", x.round() as u64);
            text(img, px - label.len() as i32 * 2, py + 8, &label, AXIS);
        }
    }

    fn line(&self, img: &mut RgbImage, pts: &[(f64, f64)], c: Rgb<u8>) {
        for w in pts.windows(2) {
            let (a, b) = (self.to_px(w[0].0, w[0].1), self.to_px(w[1].0, w[1].1));
            line(img, a.0, a.1, b.0, b.1, c);
            line(img, a.0, a.1 + 1, b.0, b.1 + 1, c);
        }
    }

    fn dots(&self, img: &mut RgbImage, pts: &[(f64, f64)], c: Rgb<u8>) {
        for &(x, y) in pts {
            let (px, py) = self.to_px(x, y);
            fill_rect(img, px - 2, py - 2, 5, 5, c);
        }
    }
}

fn format_tick(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn put(img: &mut RgbImage, x: i32, y: i32, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn fill_rect(img: &mut RgbImage, x: i32, y: i32, w: i32, h: i32, c: Rgb<u8>) {
    for dy in 0..h {
        for dx in 0..w {
            put(img, x + dx, y + dy, c);
        }
    }
}

/// Bresenham.
fn line(img: &mut RgbImage, mut x0: i32, mut y0: i32, x1: i32, y1: i32, c: Rgb<u8>) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let mut err = dx + dy;
    loop {
        put(img, x0, y0, c);
        if x0 == x1 && y0 == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x0 += sx;
        }
        if e2 <= dx {
            err += dx;
            y0 += sy;
        }
    }
}

/// Digits and `.` in a 3x5 font, drawn at scale 2.
fn text(img: &mut RgbImage, x: i32, y: i32, s: &str, c: Rgb<u8>) {
    const GLYPHS: [(char, [u8; 5]); 11] = [
        ('0', [0b111, 0b101, 0b101, 0b101, 0b111]),
        ('1', [0b010, 0b110, 0b010, 0b010, 0b111]),
        ('2', [0b111, 0b001, 0b111, 0b100, 0b111]),
        ('3', [0b111, 0b001, 0b111, 0b001, 0b111]),
        ('4', [0b101, 0b101, 0b111, 0b001, 0b001]),
        ('5', [0b111, 0b100, 0b111, 0b001, 0b111]),
        ('6', [0b111, 0b100, 0b111, 0b101, 0b111]),
        ('7', [0b111, 0b001, 0b010, 0b010, 0b010]),
        ('8', [0b111, 0b101, 0b111, 0b101, 0b111]),
        ('9', [0b111, 0b101, 0b111, 0b001, 0b111]),
        ('.', [0b000, 0b000, 0b000, 0b000, 0b010]),
    ];
    let mut cx = x;
    for ch in s.chars() {
        if let Some((_, rows)) = GLYPHS.iter().find(|(g, _)| *g == ch) {
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..3 {
                    if bits & (0b100 >> col) != 0 {
                        fill_rect(img, cx + col * 2, y + r as i32 * 2 - 4, 2, 2, c);
                    }
                }
            }
        }
        cx += 8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runlog::{Recall, ValMetrics};

    #[test]
    fn the_curve_shows_the_losses_where_they_are() {
        let history: Vec<StepRecord> = (1..=100)
            .map(|s| StepRecord {
                step: s,
                epoch: 0,
                loss: 4.0 - 3.0 * s as f64 / 100.0,
                lr: 1e-3,
                encoder_lr: 0.0,
                logit_scale: 14.3,
                grad_norm: 1.0,
                elapsed_s: 0.0,
                val: (s % 25 == 0).then_some(ValMetrics {
                    loss: 3.0,
                    pairs: 10,
                    slide_to_report: Recall {
                        r1: 0.5,
                        r5: 0.9,
                        r10: 1.0,
                    },
                    report_to_slide: Recall {
                        r1: 0.4,
                        r5: 0.8,
                        r10: 1.0,
                    },
                }),
            })
            .collect();
        let img = draw(&history);
        let loss = Panel {
            top: TOP1,
            y_max: 4.0 - 0.03,
            x_max: 100.0,
        };
        // The training loss passes through its last point (step 100, loss 1.0).
        let (x, y) = loss.to_px(100.0, 1.0);
        let near = (-2..=2)
            .flat_map(|d| (-2..=2).map(move |e| (d, e)))
            .any(|(d, e)| img.get_pixel((x + d) as u32, (y + e) as u32) == &TRAIN);
        assert!(near, "no training-loss pixel near the last point");
        let recall = Panel {
            top: TOP2,
            y_max: 1.0,
            x_max: 100.0,
        };
        let (x, y) = recall.to_px(50.0, 0.8);
        assert_eq!(
            img.get_pixel(x as u32, y as u32),
            &R2S5,
            "report->slide r@5 dot at step 50"
        );
        let d = tempfile::tempdir().unwrap();
        write_curve(&d.path().join("curve.png"), &history).unwrap();
        assert!(image::open(d.path().join("curve.png")).is_ok());
    }
}
