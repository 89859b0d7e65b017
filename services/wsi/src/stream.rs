//! Kept tiles as batches for the tile encoder, read in parallel and delivered in order, with a
//! fixed bound on memory whatever the number of tiles.
//!
//! Each reader thread opens its own OpenSlide handle (every handle has its own cache, so threads
//! do not contend on one) and claims whole batches by index. A reader may run at most `window`
//! batches ahead of the consumer, so at most `window` batches exist at once: with the defaults
//! (batch 64, window 2 x threads) a 100,000-tile slide never holds more than a few hundred MB.
//!
//! A tile whose pixels cannot be decoded (a damaged JPEG) is skipped, not fatal, up to
//! [`StreamConfig::max_bad_tile_fraction`] of the kept tiles: the batch carries the tiles it
//! lacks ([`TileBatch::skipped`]) and the stream fails with [`WsiError::TooManyBadTiles`] once
//! more are lost. OpenSlide 3.4 makes a decoding error sticky (every later read of that handle
//! fails with it), so the reader opens a fresh handle after each failed read and tries the tile
//! once more on it before calling it bad.

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
    /// Tiles per batch (the last one may hold fewer).
    pub batch_size: usize,
    /// Reader threads (0 = all cores).
    pub threads: usize,
    /// What a batch's pixels look like.
    pub format: BatchFormat,
    /// Batches that may exist at once (0 = twice the threads).
    pub window: usize,
    /// Share of the kept tiles that may be unreadable and skipped, in [0, 1); the stream fails
    /// once more are (0: the first unreadable tile fails it).
    pub max_bad_tile_fraction: f64,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            batch_size: 64,
            threads: 0,
            format: BatchFormat::Normalized,
            window: 0,
            max_bad_tile_fraction: 0.0,
        }
    }
}

/// A batch's pixels.
#[derive(Debug)]
pub enum BatchData {
    /// [`BatchFormat::Normalized`]: `[n, 3, 224, 224]` f32, row-major.
    Normalized(Vec<f32>),
    /// [`BatchFormat::Rgb`]: `[n, 256, 256, 3]` u8, row-major.
    Rgb(Vec<u8>),
}

/// A kept tile that could not be read, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct SkippedTile {
    /// Index in the kept tiles.
    pub index: usize,
    /// The read error, as text.
    pub error: String,
}

/// Consecutive kept tiles `start .. start + len`; `data` holds those not in `skipped`, in order.
#[derive(Debug)]
pub struct TileBatch {
    /// Index of the first tile of the range, in the kept tiles.
    pub start: usize,
    /// Tiles in the range, skipped ones included.
    pub len: usize,
    /// Pixels of the tiles read, `n` = `len` minus the skipped.
    pub data: BatchData,
    /// Tiles of the range that could not be read (ascending); empty on a healthy slide.
    pub skipped: Vec<SkippedTile>,
}

impl TileBatch {
    /// Indices (in the kept tiles) of the tiles `data` holds, in order.
    pub fn read_indices(&self) -> impl Iterator<Item = usize> + '_ {
        (self.start..self.start + self.len).filter(|i| !self.skipped.iter().any(|s| s.index == *i))
    }

    /// Number of tiles `data` holds.
    pub fn read_len(&self) -> usize {
        self.len - self.skipped.len()
    }
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

/// Reads one tile through `slide`; after a failed read the handle is replaced by a fresh one
/// (OpenSlide's errors are sticky) and the tile tried once more. `Ok(Err(msg))`: the tile is
/// unreadable; `Err`: the slide itself is (it cannot be opened again).
fn read_tile_tolerant(
    slide: &mut Slide,
    plan: &TilePlan,
    tile: &TileRef,
) -> Result<std::result::Result<Vec<u8>, String>> {
    let mut last = String::new();
    for _ in 0..2 {
        match read_tile_rgb(slide, plan, tile) {
            Ok(rgb) => return Ok(Ok(rgb)),
            Err(WsiError::Unreadable { msg, .. }) => {
                last = msg;
                let path = slide.path().to_path_buf();
                *slide = Slide::open(&path, None)?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Err(last))
}

fn read_batch(
    slide: &mut Slide,
    plan: &TilePlan,
    tiles: &[TileRef],
    start: usize,
    format: BatchFormat,
) -> Result<(BatchData, Vec<SkippedTile>)> {
    let mut skipped = Vec::new();
    // One tile at a time into the batch buffer, so a batch holds at most its own pixels.
    let mut data = match format {
        BatchFormat::Rgb => BatchData::Rgb(Vec::with_capacity(tiles.len() * RGB_TILE_LEN)),
        BatchFormat::Normalized => {
            BatchData::Normalized(Vec::with_capacity(tiles.len() * NORMALIZED_LEN))
        }
    };
    for (i, t) in tiles.iter().enumerate() {
        match read_tile_tolerant(slide, plan, t)? {
            Ok(rgb) => match &mut data {
                BatchData::Rgb(out) => out.extend_from_slice(&rgb),
                BatchData::Normalized(out) => {
                    let at = out.len();
                    out.resize(at + NORMALIZED_LEN, 0.0);
                    transform::crop_normalize(&rgb, &mut out[at..]);
                }
            },
            Err(error) => skipped.push(SkippedTile {
                index: start + i,
                error,
            }),
        }
    }
    Ok((data, skipped))
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

type BatchResult = Result<(BatchData, Vec<SkippedTile>)>;

/// An ordered iterator of tile batches read by background threads.
pub struct TileStream {
    rx: Option<Receiver<(usize, BatchResult)>>,
    gate: Arc<Gate>,
    workers: Vec<JoinHandle<()>>,
    pending: BTreeMap<usize, BatchResult>,
    next: usize,
    total_batches: usize,
    n_tiles: usize,
    batch_size: usize,
    failed: bool,
    path: std::path::PathBuf,
    max_bad_tile_fraction: f64,
    skipped: Vec<SkippedTile>,
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
        let f = config.max_bad_tile_fraction;
        if !(f.is_finite() && (0.0..1.0).contains(&f)) {
            return Err(WsiError::InvalidParameter {
                name: "max bad tile fraction",
                value: f.to_string(),
                why: "must be in [0, 1)",
            });
        }
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
            let mut slide = match first.take() {
                Some(s) => s,
                None => Slide::open(path, None)?,
            };
            let (tx, gate, tiles, plan) = (tx.clone(), gate.clone(), tiles.clone(), plan.clone());
            let (bs, format) = (config.batch_size, config.format);
            workers.push(std::thread::spawn(move || {
                while let Some(b) = gate.claim(total_batches) {
                    let chunk = &tiles[b * bs..((b + 1) * bs).min(tiles.len())];
                    let data = read_batch(&mut slide, &plan, chunk, b * bs, format);
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
            path: path.to_path_buf(),
            max_bad_tile_fraction: f,
            skipped: Vec::new(),
        })
    }

    /// Number of batches the stream will yield.
    pub fn total_batches(&self) -> usize {
        self.total_batches
    }

    /// The tiles skipped so far as unreadable, in order.
    pub fn skipped(&self) -> &[SkippedTile] {
        &self.skipped
    }

    /// Most tiles that may be skipped before the stream fails.
    pub fn max_bad_tiles(&self) -> usize {
        (self.max_bad_tile_fraction * self.n_tiles as f64).floor() as usize
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
            Ok((data, skipped)) => {
                self.skipped.extend(skipped.iter().cloned());
                if self.skipped.len() > self.max_bad_tiles() {
                    self.failed = true;
                    self.gate.cancel();
                    return Some(Err(WsiError::TooManyBadTiles {
                        path: self.path.clone(),
                        bad: self.skipped.len(),
                        total: self.n_tiles,
                        max_fraction: self.max_bad_tile_fraction,
                        first: self.skipped[0].error.clone(),
                    }));
                }
                Some(Ok(TileBatch {
                    start,
                    len: self.batch_size.min(self.n_tiles - start),
                    data,
                    skipped,
                }))
            }
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
