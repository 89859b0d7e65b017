//! Kept tiles as batches for the tile encoder, read in parallel and delivered in order, with a
//! fixed bound on memory whatever the number of tiles.
//!
//! Each reader thread opens its own OpenSlide handle (every handle has its own cache, so threads
//! do not contend on one) and claims whole batches by index. A reader may run at most `window`
//! batches ahead of the consumer, so at most `window` batches exist at once: with the defaults
//! (batch 64, window 2 x threads) a 100,000-tile slide never holds more than a few hundred MB.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver};

use crate::error::{Result, WsiError};
use crate::grid::{TilePlan, TileRef};
use crate::slide::Slide;
use crate::transform::{self, NORMALIZED_LEN, RGB_TILE_LEN};

/// What each tile becomes in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchFormat {
    /// f32 [B, 3, 224, 224], center-cropped and ImageNet-normalised: the tile encoder's input.
    Normalized,
    /// u8 [B, 256, 256, 3] RGB tiles at 0.5 um/px, as cut.
    Rgb,
}

/// Reader settings.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    pub batch_size: usize,
    /// Reader threads (0 = all cores).
    pub threads: usize,
    pub format: BatchFormat,
    /// Batches that may exist at once (0 = twice the threads).
    pub window: usize,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            batch_size: 64,
            threads: 0,
            format: BatchFormat::Normalized,
            window: 0,
        }
    }
}

/// A batch's pixels.
#[derive(Debug)]
pub enum BatchData {
    Normalized(Vec<f32>),
    Rgb(Vec<u8>),
}

/// Consecutive kept tiles `start .. start + len`.
#[derive(Debug)]
pub struct TileBatch {
    pub start: usize,
    pub len: usize,
    pub data: BatchData,
}

/// Reads one tile (level-0 origin from `tile`) as 256 x 256 RGB.
pub fn read_tile_rgb(slide: &Slide, plan: &TilePlan, tile: &TileRef) -> Result<Vec<u8>> {
    let rgb = slide.read_rgb(
        plan.read_level,
        tile.x0,
        tile.y0,
        plan.read_px,
        plan.read_px,
    )?;
    Ok(transform::resize_to_tile(rgb, plan.read_px))
}

fn read_batch(
    slide: &Slide,
    plan: &TilePlan,
    tiles: &[TileRef],
    format: BatchFormat,
) -> Result<BatchData> {
    match format {
        BatchFormat::Rgb => {
            let mut out = Vec::with_capacity(tiles.len() * RGB_TILE_LEN);
            for t in tiles {
                out.extend_from_slice(&read_tile_rgb(slide, plan, t)?);
            }
            Ok(BatchData::Rgb(out))
        }
        BatchFormat::Normalized => {
            let mut out = vec![0f32; tiles.len() * NORMALIZED_LEN];
            for (t, dst) in tiles.iter().zip(out.chunks_exact_mut(NORMALIZED_LEN)) {
                transform::crop_normalize(&read_tile_rgb(slide, plan, t)?, dst);
            }
            Ok(BatchData::Normalized(out))
        }
    }
}

/// Claims of batch indices, gated by how far the consumer has got.
struct Gate {
    state: Mutex<(usize, usize)>, // (next batch to claim, batches consumed)
    cond: Condvar,
    window: usize,
    cancelled: AtomicBool,
}

impl Gate {
    /// The next batch index to read, waiting while the window is full; `None` when all are
    /// claimed or the stream was dropped.
    fn claim(&self, total: usize) -> Option<usize> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.cancelled.load(Ordering::Relaxed) || st.0 >= total {
                return None;
            }
            if st.0 < st.1 + self.window {
                st.0 += 1;
                return Some(st.0 - 1);
            }
            st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn consumed_one(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 += 1;
        self.cond.notify_all();
    }

    fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
        self.cond.notify_all();
    }
}

/// An ordered iterator of tile batches read by background threads.
pub struct TileStream {
    rx: Option<Receiver<(usize, Result<BatchData>)>>,
    gate: Arc<Gate>,
    workers: Vec<JoinHandle<()>>,
    pending: BTreeMap<usize, Result<BatchData>>,
    next: usize,
    total_batches: usize,
    n_tiles: usize,
    batch_size: usize,
    failed: bool,
}

impl TileStream {
    /// Starts reading `tiles` of the slide at `path` as planned by `plan`.
    pub fn start(
        path: &Path,
        plan: &TilePlan,
        tiles: Arc<[TileRef]>,
        config: &StreamConfig,
    ) -> Result<TileStream> {
        if config.batch_size == 0 {
            return Err(WsiError::InvalidParameter {
                name: "batch size",
                value: "0".into(),
                why: "must be at least 1",
            });
        }
        let threads = match config.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let window = if config.window == 0 {
            2 * threads
        } else {
            config.window
        };
        let total_batches = tiles.len().div_ceil(config.batch_size);
        // Open once here so that an unreadable slide fails before any thread starts.
        let first = Slide::open(path, None)?;
        let gate = Arc::new(Gate {
            state: Mutex::new((0, 0)),
            cond: Condvar::new(),
            window,
            cancelled: AtomicBool::new(false),
        });
        let (tx, rx) = bounded(window);
        let mut workers = Vec::new();
        let mut first = Some(first);
        for _ in 0..threads.min(total_batches.max(1)) {
            let slide = match first.take() {
                Some(s) => s,
                None => Slide::open(path, None)?,
            };
            let (tx, gate, tiles, plan) = (tx.clone(), gate.clone(), tiles.clone(), plan.clone());
            let (bs, format) = (config.batch_size, config.format);
            workers.push(std::thread::spawn(move || {
                while let Some(b) = gate.claim(total_batches) {
                    let chunk = &tiles[b * bs..((b + 1) * bs).min(tiles.len())];
                    let data = read_batch(&slide, &plan, chunk, format);
                    let failed = data.is_err();
                    if tx.send((b, data)).is_err() || failed {
                        return;
                    }
                }
            }));
        }
        Ok(TileStream {
            rx: Some(rx),
            gate,
            workers,
            pending: BTreeMap::new(),
            next: 0,
            total_batches,
            n_tiles: tiles.len(),
            batch_size: config.batch_size,
            failed: false,
        })
    }

    /// Number of batches the stream will yield.
    pub fn total_batches(&self) -> usize {
        self.total_batches
    }
}

impl Iterator for TileStream {
    type Item = Result<TileBatch>;

    fn next(&mut self) -> Option<Result<TileBatch>> {
        if self.failed || self.next >= self.total_batches {
            return None;
        }
        let rx = self.rx.as_ref()?;
        let data = loop {
            if let Some(d) = self.pending.remove(&self.next) {
                break d;
            }
            match rx.recv() {
                Ok((b, d)) => {
                    self.pending.insert(b, d);
                }
                // All workers ended without delivering this batch: only after a failure.
                Err(_) => {
                    self.failed = true;
                    return None;
                }
            }
        };
        self.gate.consumed_one();
        let start = self.next * self.batch_size;
        self.next += 1;
        match data {
            Ok(data) => Some(Ok(TileBatch {
                start,
                len: self.batch_size.min(self.n_tiles - start),
                data,
            })),
            Err(e) => {
                self.failed = true;
                self.gate.cancel();
                Some(Err(e))
            }
        }
    }
}

impl Drop for TileStream {
    fn drop(&mut self) {
        self.gate.cancel();
        // Dropping the receiver unblocks any worker waiting to send.
        self.rx.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
