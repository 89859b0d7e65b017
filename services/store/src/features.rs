//! Per-slide tile feature files: safetensors with the tile encoder's output, so slide-level and
//! alignment work never re-encode tiles.
//!
//! Layout (format `gigapath-features`, version 1), tensors in this order in the data section:
//! - `features`: F16 `[N, D]` (D = 1536 for Prov-GigaPath; any D accepted), row-major, one row
//!   per kept tile in the tiler's order;
//! - `origins`: I64 `[N, 2]`, level-0 pixel origin `(x, y)` of each tile;
//! - `grid`: I32 `[N, 2]`, tile grid coordinates `(gx, gy)`.
//!
//! `__metadata__` (strings): `format`, `format_version`, `slide_id`, `mpp` (of the tiles),
//! `level0_tile_px` (tile side in level-0 pixels), `fingerprints` (JSON object role -> weights).
//!
//! Writing streams: feature rows go to disk batch by batch (only the 24 bytes/tile of coordinates
//! stay in memory), behind a header slot reserved at the start and sized for the largest possible
//! numbers; `finish` fills the slot (JSON padded with spaces, as the safetensors format allows).
//! The file is written under a temporary name in the destination folder, fsynced, hashed and then
//! renamed, and the folder fsynced: no partial file is ever visible under the final name, and a
//! writer dropped without `finish` (error, panic, a full disk: reported as "disk full" with the
//! space left) removes its temporary file. Readers are any
//! safetensors reader; [`FeatureFile::read`] adds the checks this format needs.
//!
//! Not here: computing features (models / pipeline) or choosing tiles (wsi).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Cursor, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use half::f16;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::catalog::FeatureFileRecord;
use crate::disk;
use crate::error::{Result, StoreError};

/// `format` in a feature file's metadata: files without it are not ours.
pub const FORMAT: &str = "gigapath-features";
/// `format_version` this version writes and reads.
pub const FORMAT_VERSION: u32 = 1;

const FEATURES: &str = "features";
const ORIGINS: &str = "origins";
const GRID: &str = "grid";

/// A header larger than this is not ours (guards against reading garbage as a length).
const MAX_HEADER_BYTES: u64 = 1 << 20;

/// What a feature file says about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FeatureMetadata {
    /// The slide the tiles were cut from.
    pub slide_id: String,
    /// Microns per pixel of the tiles the features were computed from (0.5 for Prov-GigaPath);
    /// not the slide's level-0 mpp. Stored under the metadata key `mpp`.
    #[serde(rename = "mpp")]
    pub tile_mpp: f64,
    /// Tile side in level-0 pixels (tile px x tile mpp / level-0 mpp).
    pub level0_tile_px: u32,
    /// Weights that produced the features, by role (at least `tile`).
    pub fingerprints: BTreeMap<String, String>,
}

impl FeatureMetadata {
    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |reason: &str| Err(StoreError::feature_file(path, reason));
        if self.slide_id.is_empty() {
            return bad("metadata slide_id is empty");
        }
        if !(self.tile_mpp.is_finite() && self.tile_mpp > 0.0) {
            return bad("metadata mpp must be a positive number");
        }
        if self.level0_tile_px == 0 {
            return bad("metadata level0_tile_px must be positive");
        }
        Ok(())
    }

    fn to_strings(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("format_version".into(), FORMAT_VERSION.to_string()),
            ("slide_id".into(), self.slide_id.clone()),
            ("mpp".into(), self.tile_mpp.to_string()),
            ("level0_tile_px".into(), self.level0_tile_px.to_string()),
            (
                "fingerprints".into(),
                serde_json::to_string(&self.fingerprints).unwrap_or_else(|_| "{}".into()),
            ),
        ])
    }

    fn from_strings(map: &BTreeMap<String, String>, path: &Path) -> Result<Self> {
        let get = |key: &str| {
            map.get(key)
                .ok_or_else(|| StoreError::feature_file(path, format!("metadata has no `{key}`")))
        };
        let format = get("format")?;
        if format != FORMAT {
            return Err(StoreError::feature_file(
                path,
                format!("metadata format is `{format}`, expected `{FORMAT}`"),
            ));
        }
        let version = get("format_version")?;
        if version.parse::<u32>().ok() != Some(FORMAT_VERSION) {
            return Err(StoreError::feature_file(
                path,
                format!("format_version `{version}` is not supported (this build reads {FORMAT_VERSION})"),
            ));
        }
        let parse_err = |key: &str, value: &str| {
            StoreError::feature_file(path, format!("metadata `{key}` = `{value}` is not valid"))
        };
        let mpp = get("mpp")?;
        let tile_px = get("level0_tile_px")?;
        let fingerprints = get("fingerprints")?;
        let meta = FeatureMetadata {
            slide_id: get("slide_id")?.clone(),
            tile_mpp: mpp.parse().map_err(|_| parse_err("mpp", mpp))?,
            level0_tile_px: tile_px
                .parse()
                .map_err(|_| parse_err("level0_tile_px", tile_px))?,
            fingerprints: serde_json::from_str(fingerprints)
                .map_err(|_| parse_err("fingerprints", fingerprints))?,
        };
        meta.validate(path)?;
        Ok(meta)
    }
}

/// What [`FeatureFileWriter::finish`] wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureFileInfo {
    /// Its final path.
    pub path: PathBuf,
    /// File size in bytes.
    pub size_bytes: u64,
    /// Hex SHA-256 of the whole file.
    pub sha256: String,
    /// Tiles (rows) written.
    pub tile_count: u64,
}

impl FeatureFileInfo {
    /// The catalog row for this file.
    pub fn record(&self, slide_id: &str, tile_fingerprint: &str) -> FeatureFileRecord {
        FeatureFileRecord {
            slide_id: slide_id.to_string(),
            tile_fingerprint: tile_fingerprint.to_string(),
            path: self.path.to_string_lossy().into_owned(),
            sha256: self.sha256.clone(),
            size_bytes: i64::try_from(self.size_bytes).unwrap_or(i64::MAX),
            tile_count: i64::try_from(self.tile_count).unwrap_or(i64::MAX),
            created_at: 0,
        }
    }
}

/// Where the feature file of `slide_id` for tile weights `tile_fingerprint` lives under
/// `features_dir`: `<features_dir>/<tile fp>/<slide id, made file-safe>-<hash>.safetensors`.
/// The hash keeps ids that differ only in unsafe characters apart.
pub fn feature_path(features_dir: &Path, slide_id: &str, tile_fingerprint: &str) -> PathBuf {
    // Only [A-Za-z0-9_-]: no separators, no dots (so no `..`), no hidden files.
    let safe = |s: &str, max: usize| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(max)
            .collect()
    };
    let hash = Sha256::digest(slide_id.as_bytes());
    let short: String = hash[..4].iter().map(|b| format!("{b:02x}")).collect();
    features_dir
        .join(format!("tile-{}", safe(tile_fingerprint, 64)))
        .join(format!("{}-{short}.safetensors", safe(slide_id, 120)))
}

/// Streams one slide's features to a new feature file; see the module docs.
pub struct FeatureFileWriter {
    final_path: PathBuf,
    /// Removed on drop unless persisted by `finish`.
    tmp: tempfile::NamedTempFile,
    out: BufWriter<File>,
    dim: usize,
    rows: u64,
    origins: Vec<[i64; 2]>,
    grid: Vec<[i32; 2]>,
    header_slot: usize,
    metadata: FeatureMetadata,
}

impl FeatureFileWriter {
    /// Starts a file that will appear at `path` on `finish` (parent folders are created).
    pub fn create(path: impl AsRef<Path>, dim: usize, metadata: FeatureMetadata) -> Result<Self> {
        let final_path = path.as_ref().to_path_buf();
        metadata.validate(&final_path)?;
        if dim == 0 {
            return Err(StoreError::feature_file(&final_path, "feature dim is 0"));
        }
        let dir = match final_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir).map_err(|e| disk::io_error("create folder", &dir, e))?;
        let tmp = tempfile::Builder::new()
            .prefix(".features-")
            .suffix(".tmp")
            .tempfile_in(&dir)
            .map_err(|e| disk::io_error("create temporary file in", &dir, e))?;
        let file = tmp
            .as_file()
            .try_clone()
            .map_err(|e| StoreError::io("open", tmp.path(), e))?;
        // Upper bound of the header: every number at its widest.
        let widest = header_json(&metadata, u64::MAX, dim as u64, [u64::MAX; 3]).len();
        let header_slot = widest.div_ceil(8) * 8;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.seek(SeekFrom::Start(8 + header_slot as u64))
            .map_err(|e| disk::io_error("write", tmp.path(), e))?;
        Ok(FeatureFileWriter {
            final_path,
            tmp,
            out,
            dim,
            rows: 0,
            origins: Vec::new(),
            grid: Vec::new(),
            header_slot,
            metadata,
        })
    }

    /// Appends tiles: `features` is `[n, dim]` row-major, with one grid and one origin per row.
    pub fn append(
        &mut self,
        features: &[f32],
        grid_xy: &[[i32; 2]],
        origins_level0: &[[i64; 2]],
    ) -> Result<()> {
        let n = self.check_batch(features.len(), grid_xy.len(), origins_level0.len())?;
        let mut bytes = Vec::with_capacity(features.len() * 2);
        for (i, &x) in features.iter().enumerate() {
            let h = f16::from_f32(x);
            if !h.is_finite() {
                return Err(self.bad_value(i, x));
            }
            bytes.extend_from_slice(&h.to_le_bytes());
        }
        self.write_rows(&bytes, n, grid_xy, origins_level0)
    }

    /// Like [`append`](Self::append) for features already in f16.
    pub fn append_f16(
        &mut self,
        features: &[f16],
        grid_xy: &[[i32; 2]],
        origins_level0: &[[i64; 2]],
    ) -> Result<()> {
        let n = self.check_batch(features.len(), grid_xy.len(), origins_level0.len())?;
        let mut bytes = Vec::with_capacity(features.len() * 2);
        for (i, h) in features.iter().enumerate() {
            if !h.is_finite() {
                return Err(self.bad_value(i, h.to_f32()));
            }
            bytes.extend_from_slice(&h.to_le_bytes());
        }
        self.write_rows(&bytes, n, grid_xy, origins_level0)
    }

    /// Tile rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    fn check_batch(&self, values: usize, grid: usize, origins: usize) -> Result<usize> {
        if !values.is_multiple_of(self.dim) {
            return Err(StoreError::feature_file(
                &self.final_path,
                format!(
                    "batch of {values} values is not a multiple of dim {}",
                    self.dim
                ),
            ));
        }
        let n = values / self.dim;
        if grid != n || origins != n {
            return Err(StoreError::feature_file(
                &self.final_path,
                format!("batch has {n} feature rows but {grid} grid and {origins} origin entries"),
            ));
        }
        Ok(n)
    }

    fn bad_value(&self, index: usize, value: f32) -> StoreError {
        StoreError::feature_file(
            &self.final_path,
            format!(
                "feature row {} column {} is {value}: not finite in f16 (|x| <= 65504)",
                self.rows + (index / self.dim) as u64,
                index % self.dim
            ),
        )
    }

    fn write_rows(
        &mut self,
        bytes: &[u8],
        n: usize,
        grid_xy: &[[i32; 2]],
        origins_level0: &[[i64; 2]],
    ) -> Result<()> {
        self.out
            .write_all(bytes)
            .map_err(|e| disk::io_error("write", self.tmp.path(), e))?;
        self.grid.extend_from_slice(grid_xy);
        self.origins.extend_from_slice(origins_level0);
        self.rows += n as u64;
        Ok(())
    }

    /// Completes the file and moves it to its final name; returns its size and SHA-256.
    pub fn finish(mut self) -> Result<FeatureFileInfo> {
        if self.rows == 0 {
            return Err(StoreError::feature_file(
                &self.final_path,
                "no tiles were appended (a feature file needs at least one)",
            ));
        }
        let tmp_path = self.tmp.path().to_path_buf();
        let io = |e| disk::io_error("write", &tmp_path, e);
        let features_bytes = self.rows * self.dim as u64 * 2;
        let origins_end = features_bytes + self.rows * 16;
        let grid_end = origins_end + self.rows * 8;
        for o in &self.origins {
            self.out.write_all(&o[0].to_le_bytes()).map_err(io)?;
            self.out.write_all(&o[1].to_le_bytes()).map_err(io)?;
        }
        for g in &self.grid {
            self.out.write_all(&g[0].to_le_bytes()).map_err(io)?;
            self.out.write_all(&g[1].to_le_bytes()).map_err(io)?;
        }
        let header = header_json(
            &self.metadata,
            self.rows,
            self.dim as u64,
            [features_bytes, origins_end, grid_end],
        );
        debug_assert!(header.len() <= self.header_slot);
        let mut slot = header.into_bytes();
        slot.resize(self.header_slot, b' ');
        self.out.seek(SeekFrom::Start(0)).map_err(io)?;
        self.out
            .write_all(&(self.header_slot as u64).to_le_bytes())
            .map_err(io)?;
        self.out.write_all(&slot).map_err(io)?;
        self.out.flush().map_err(io)?;
        self.out.get_ref().sync_all().map_err(io)?;

        let (size_bytes, sha256) = hash_file(&tmp_path)?;
        let final_path = self.final_path.clone();
        self.tmp
            .persist(&final_path)
            .map_err(|e| disk::io_error("rename temporary file to", &final_path, e.error))?;
        sync_parent(&final_path)?;
        Ok(FeatureFileInfo {
            path: final_path,
            size_bytes,
            sha256,
            tile_count: self.rows,
        })
    }
}

/// The safetensors header for `rows` tiles: `ends` are the end offsets of features, origins, grid.
fn header_json(meta: &FeatureMetadata, rows: u64, dim: u64, ends: [u64; 3]) -> String {
    let tensor = |dtype: &str, cols: u64, start: u64, end: u64| json!({ "dtype": dtype, "shape": [rows, cols], "data_offsets": [start, end] });
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!(meta.to_strings()));
    header.insert(FEATURES.into(), tensor("F16", dim, 0, ends[0]));
    header.insert(ORIGINS.into(), tensor("I64", 2, ends[0], ends[1]));
    header.insert(GRID.into(), tensor("I32", 2, ends[1], ends[2]));
    Value::Object(header).to_string()
}

fn hash_file(path: &Path) -> Result<(u64, String)> {
    let file = File::open(path).map_err(|e| StoreError::io("read back", path, e))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| StoreError::io("read back", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    let hex = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((size, hex))
}

/// Makes the rename durable (the directory entry), not just the file contents.
fn sync_parent(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| disk::io_error("sync folder", dir, e))?;
    }
    Ok(())
}

/// A feature file read into memory.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureFile {
    /// What the file says about itself.
    pub metadata: FeatureMetadata,
    /// Feature width D.
    pub dim: usize,
    /// `[N]` tile grid coordinates `(gx, gy)`.
    pub grid_xy: Vec<[i32; 2]>,
    /// `[N]` level-0 pixel origins `(x, y)`.
    pub origins_level0: Vec<[i64; 2]>,
    features: Vec<f16>,
}

#[derive(Deserialize)]
struct TensorEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// Parsed header: metadata strings and the three tensors.
struct Header {
    data_start: u64,
    metadata: BTreeMap<String, String>,
    tensors: BTreeMap<String, TensorEntry>,
}

/// The three tensors of a feature file, checked against each other and against the data
/// section: dtypes, 2-D shapes of `n` rows, contiguous data offsets that add up to the file.
struct Layout<'h> {
    /// Tiles (rows).
    n: u64,
    /// Feature width.
    dim: u64,
    features: &'h TensorEntry,
    origins: &'h TensorEntry,
    grid: &'h TensorEntry,
}

impl<'h> Layout<'h> {
    fn check(header: &'h Header, file_len: u64, path: &Path) -> Result<Layout<'h>> {
        let bad = |reason: String| StoreError::feature_file(path, reason);

        let tensor = |name: &str, dtype: &str| -> Result<&TensorEntry> {
            let t = header
                .tensors
                .get(name)
                .ok_or_else(|| bad(format!("no `{name}` tensor")))?;
            if t.dtype != dtype {
                return Err(bad(format!("`{name}` is {}, expected {dtype}", t.dtype)));
            }
            if t.shape.len() != 2 {
                return Err(bad(format!(
                    "`{name}` has shape {:?}, expected 2-D",
                    t.shape
                )));
            }
            Ok(t)
        };
        let features = tensor(FEATURES, "F16")?;
        let origins = tensor(ORIGINS, "I64")?;
        let grid = tensor(GRID, "I32")?;
        if let Some(extra) = header
            .tensors
            .keys()
            .find(|k| ![FEATURES, ORIGINS, GRID].contains(&k.as_str()))
        {
            return Err(bad(format!("unexpected tensor `{extra}`")));
        }
        let n = features.shape[0];
        let dim = features.shape[1];
        if n == 0 || dim == 0 {
            return Err(bad(format!("`features` has shape {:?}", features.shape)));
        }
        for (name, t) in [(ORIGINS, origins), (GRID, grid)] {
            if t.shape != [n, 2] {
                return Err(bad(format!(
                    "`{name}` has shape {:?} but `features` has {n} rows: expected [{n}, 2]",
                    t.shape
                )));
            }
        }
        let data_len = file_len - header.data_start;
        // Checked: the shapes are the file's numbers, and a product that wraps would pass the
        // offset checks with tiny sizes and then ask for a huge buffer (found with the `files`
        // fuzz target).
        let bytes = |cols: u64, width: u64| n.checked_mul(cols)?.checked_mul(width);
        let (Some(feature_bytes), Some(origin_bytes), Some(grid_bytes)) =
            (bytes(dim, 2), bytes(2, 8), bytes(2, 4))
        else {
            return Err(bad(format!(
                "`features` has shape {:?}: more bytes than a file can hold",
                features.shape
            )));
        };
        let sizes = [feature_bytes, origin_bytes, grid_bytes];
        let mut spans = [(FEATURES, features), (ORIGINS, origins), (GRID, grid)];
        spans.sort_by_key(|(_, t)| t.data_offsets[0]);
        let mut expected_start = 0;
        for (name, t) in spans {
            let [start, end] = t.data_offsets;
            let size = match name {
                FEATURES => sizes[0],
                ORIGINS => sizes[1],
                _ => sizes[2],
            };
            if start != expected_start || end < start || end - start != size {
                return Err(bad(format!(
                    "`{name}` data_offsets {:?} do not match its shape (expected {size} bytes \
                         from {expected_start})",
                    t.data_offsets
                )));
            }
            expected_start = end;
        }
        if expected_start != data_len {
            return Err(bad(format!(
                    "data section is {data_len} bytes but the tensors take {expected_start}: truncated \
                     or trailing bytes"
                )));
        }
        Ok(Layout {
            n,
            dim,
            features,
            origins,
            grid,
        })
    }
}

/// Little-endian `[T; 2]` pairs from raw bytes (`T` of `N` bytes).
fn pairs<T, const N: usize>(bytes: &[u8], from_le: fn([u8; N]) -> T) -> Vec<[T; 2]> {
    bytes
        .chunks_exact(2 * N)
        .map(|c| {
            let half = |h: &[u8]| from_le(h.try_into().unwrap_or([0; N]));
            [half(&c[..N]), half(&c[N..])]
        })
        .collect()
}

fn read_header<R: Read>(file: &mut R, path: &Path, file_len: u64) -> Result<Header> {
    let bad = |reason: String| StoreError::feature_file(path, reason);
    if file_len < 8 {
        return Err(bad(format!(
            "{file_len} bytes: too short to be safetensors"
        )));
    }
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|e| StoreError::io("read", path, e))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
        return Err(bad(format!(
            "header length {header_len} does not fit the file ({file_len} bytes): not a \
             safetensors file, or truncated"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| StoreError::io("read", path, e))?;
    let mut object: serde_json::Map<String, Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("header is not a JSON object: {e}")))?;
    let metadata = match object.remove("__metadata__") {
        Some(v) => serde_json::from_value(v)
            .map_err(|e| bad(format!("__metadata__ is not a map of strings: {e}")))?,
        None => return Err(bad("no __metadata__ (not a gigapath feature file)".into())),
    };
    let tensors = object
        .into_iter()
        .map(|(name, v)| {
            serde_json::from_value::<TensorEntry>(v)
                .map(|t| (name.clone(), t))
                .map_err(|e| bad(format!("tensor `{name}` entry: {e}")))
        })
        .collect::<Result<_>>()?;
    Ok(Header {
        data_start: 8 + header_len,
        metadata,
        tensors,
    })
}

impl FeatureFile {
    /// Reads and checks a feature file: format and version, dtypes, shapes (`[N, D]`, `[N, 2]`,
    /// `[N, 2]` with one N), offsets covering the data exactly, finite features.
    pub fn read(path: impl AsRef<Path>) -> Result<FeatureFile> {
        let path = path.as_ref();
        let mut file = File::open(path).map_err(|e| StoreError::io("open", path, e))?;
        let file_len = file
            .metadata()
            .map_err(|e| StoreError::io("stat", path, e))?
            .len();
        Self::read_from(&mut file, file_len, path)
    }

    /// [`FeatureFile::read`] of a file already in memory (same checks); `path` only names it in
    /// errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<FeatureFile> {
        Self::read_from(&mut Cursor::new(bytes), bytes.len() as u64, path)
    }

    fn read_from<R: Read + Seek>(file: &mut R, file_len: u64, path: &Path) -> Result<FeatureFile> {
        let header = read_header(file, path, file_len)?;
        let metadata = FeatureMetadata::from_strings(&header.metadata, path)?;
        let Layout {
            n,
            dim,
            features,
            origins,
            grid,
        } = Layout::check(&header, file_len, path)?;
        let bad = |reason: String| StoreError::feature_file(path, reason);
        let read_span = |file: &mut R, t: &TensorEntry| -> Result<Vec<u8>> {
            let mut buf = vec![0u8; (t.data_offsets[1] - t.data_offsets[0]) as usize];
            file.seek(SeekFrom::Start(header.data_start + t.data_offsets[0]))
                .and_then(|_| file.read_exact(&mut buf))
                .map_err(|e| StoreError::io("read", path, e))?;
            Ok(buf)
        };
        let origins_level0 = pairs(&read_span(file, origins)?, i64::from_le_bytes);
        let grid_xy = pairs(&read_span(file, grid)?, i32::from_le_bytes);
        let feature_values = read_features(
            file,
            path,
            header.data_start + features.data_offsets[0],
            n * dim,
        )?;
        if let Some(i) = feature_values.iter().position(|h| !h.is_finite()) {
            return Err(bad(format!(
                "feature row {} column {} is not finite",
                i as u64 / dim,
                i as u64 % dim
            )));
        }
        Ok(FeatureFile {
            metadata,
            dim: dim as usize,
            grid_xy,
            origins_level0,
            features: feature_values,
        })
    }

    /// Only the metadata and tile count (reads the header, not the data).
    pub fn read_metadata(path: impl AsRef<Path>) -> Result<(FeatureMetadata, u64)> {
        let path = path.as_ref();
        let mut file = File::open(path).map_err(|e| StoreError::io("open", path, e))?;
        let file_len = file
            .metadata()
            .map_err(|e| StoreError::io("stat", path, e))?
            .len();
        Self::metadata_from(&mut file, file_len, path)
    }

    /// [`FeatureFile::read_metadata`] of a file already in memory; `path` only names it in
    /// errors.
    pub fn metadata_from_bytes(bytes: &[u8], path: &Path) -> Result<(FeatureMetadata, u64)> {
        Self::metadata_from(&mut Cursor::new(bytes), bytes.len() as u64, path)
    }

    fn metadata_from<R: Read>(
        file: &mut R,
        file_len: u64,
        path: &Path,
    ) -> Result<(FeatureMetadata, u64)> {
        let header = read_header(file, path, file_len)?;
        let metadata = FeatureMetadata::from_strings(&header.metadata, path)?;
        let rows = header
            .tensors
            .get(FEATURES)
            .and_then(|t| t.shape.first().copied())
            .ok_or_else(|| StoreError::feature_file(path, "no `features` tensor"))?;
        Ok((metadata, rows))
    }

    /// Number of tiles N.
    pub fn len(&self) -> usize {
        self.grid_xy.len()
    }

    /// No tiles (never true of a file written here: [`FeatureFileWriter::finish`] needs one).
    pub fn is_empty(&self) -> bool {
        self.grid_xy.is_empty()
    }

    /// `[N, D]` row-major, as stored.
    pub fn features_f16(&self) -> &[f16] {
        &self.features
    }

    /// `[N, D]` row-major, widened to f32.
    pub fn features_f32(&self) -> Vec<f32> {
        self.features.iter().map(|h| h.to_f32()).collect()
    }

    /// Row `i` (panics past `len()`, like slice indexing).
    pub fn row(&self, i: usize) -> &[f16] {
        &self.features[i * self.dim..(i + 1) * self.dim]
    }
}

/// Reads `count` little-endian f16 values in chunks (no second full-size byte buffer).
fn read_features<R: Read + Seek>(
    file: &mut R,
    path: &Path,
    offset: u64,
    count: u64,
) -> Result<Vec<f16>> {
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| StoreError::io("read", path, e))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut out = Vec::with_capacity(count as usize);
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = count as usize * 2;
    while left > 0 {
        let take = left.min(chunk.len());
        reader
            .read_exact(&mut chunk[..take])
            .map_err(|e| StoreError::io("read", path, e))?;
        out.extend(
            chunk[..take]
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]])),
        );
        left -= take;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of a feature file whose header is `tensors` (JSON) and whose data is `data`.
    fn raw_file(tensors: &str, data: &[u8]) -> Vec<u8> {
        let header = format!(
            r#"{{"__metadata__":{{"format":"gigapath-features","format_version":"1","slide_id":"S1","mpp":"0.5","level0_tile_px":"256","fingerprints":"{{}}"}},{tensors}}}"#
        );
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    /// Found with the `files` fuzz target (docs/FUZZING.md; its overflow-checked build panicked
    /// "attempt to multiply with overflow"): shapes whose byte sizes wrap around u64 passed the
    /// offset checks in a release build (2^62 rows take "0 bytes") and then asked for a buffer
    /// of 2^63 values. Now an error naming the shape, by path and from bytes.
    #[test]
    fn fuzz_shapes_whose_byte_size_overflows_are_refused() {
        for (n, dim) in [
            (1u64 << 62, 4u64),
            ((1 << 62) + 1, 2),
            (u64::MAX, 1),
            (1, u64::MAX),
        ] {
            let bytes = raw_file(
                &format!(
                    r#""features":{{"dtype":"F16","shape":[{n},{dim}],"data_offsets":[0,0]}},"origins":{{"dtype":"I64","shape":[{n},2],"data_offsets":[0,0]}},"grid":{{"dtype":"I32","shape":[{n},2],"data_offsets":[0,0]}}"#
                ),
                &[],
            );
            let err = FeatureFile::from_bytes(&bytes, Path::new("f.safetensors")).unwrap_err();
            assert!(
                err.to_string().contains("more bytes than a file can hold"),
                "{n} x {dim}: {err}"
            );
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("f.safetensors");
            std::fs::write(&path, &bytes).unwrap();
            let err = FeatureFile::read(&path).unwrap_err();
            assert!(
                err.to_string().contains("more bytes than a file can hold"),
                "{err}"
            );
        }
        // The same layout with sizes that fit still reads.
        let data: Vec<u8> = [0u8; 4]
            .iter()
            .chain(&[0u8; 16])
            .chain(&[0u8; 8])
            .copied()
            .collect();
        let ok = raw_file(
            r#""features":{"dtype":"F16","shape":[1,2],"data_offsets":[0,4]},"origins":{"dtype":"I64","shape":[1,2],"data_offsets":[4,20]},"grid":{"dtype":"I32","shape":[1,2],"data_offsets":[20,28]}"#,
            &data,
        );
        let f = FeatureFile::from_bytes(&ok, Path::new("f.safetensors")).unwrap();
        assert_eq!((f.len(), f.dim), (1, 2));
    }

    fn meta() -> FeatureMetadata {
        FeatureMetadata {
            slide_id: "TCGA-AB-1234".into(),
            tile_mpp: 0.5,
            level0_tile_px: 512,
            fingerprints: BTreeMap::from([("tile".into(), "sha256:abc".into())]),
        }
    }

    /// Tile i has features i*0.01 + j*0.001 (exact-ish in f16), grid (i%7, i/7), origin 512*grid.
    fn batch(start: usize, n: usize, dim: usize) -> (Vec<f32>, Vec<[i32; 2]>, Vec<[i64; 2]>) {
        let mut f = Vec::with_capacity(n * dim);
        let mut g = Vec::new();
        let mut o = Vec::new();
        for i in start..start + n {
            for j in 0..dim {
                f.push((i as f32) * 0.01 - (j as f32) * 0.001);
            }
            g.push([(i % 7) as i32, (i / 7) as i32]);
            o.push([512 * (i % 7) as i64, 512 * (i / 7) as i64 + 100_000_000_000]);
        }
        (f, g, o)
    }

    fn write(path: &Path, batches: &[usize], dim: usize) -> FeatureFileInfo {
        let mut w = FeatureFileWriter::create(path, dim, meta()).unwrap();
        let mut start = 0;
        for &n in batches {
            let (f, g, o) = batch(start, n, dim);
            w.append(&f, &g, &o).unwrap();
            start += n;
        }
        w.finish().unwrap()
    }

    #[test]
    fn round_trip_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/slide.safetensors");
        let info = write(&path, &[5, 1, 17], 24);
        assert_eq!(info.tile_count, 23);
        assert_eq!(info.size_bytes, std::fs::metadata(&path).unwrap().len());
        assert_eq!(info.sha256, hash_file(&path).unwrap().1);

        let file = FeatureFile::read(&path).unwrap();
        assert_eq!(file.metadata, meta());
        assert_eq!(file.len(), 23);
        assert_eq!(file.dim, 24);
        let (f, g, o) = batch(0, 23, 24);
        assert_eq!(file.grid_xy, g);
        assert_eq!(file.origins_level0, o);
        let got = file.features_f32();
        for (a, b) in got.iter().zip(&f) {
            assert!((a - b).abs() <= b.abs() * 1e-3 + 1e-4, "{a} vs {b}");
        }
        assert_eq!(file.row(22)[3], f16::from_f32(f[22 * 24 + 3]));
        let (m, rows) = FeatureFile::read_metadata(&path).unwrap();
        assert_eq!((m, rows), (meta(), 23));
        // Only the final file is left in the folder.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("slide.safetensors")]);
    }

    #[test]
    fn readable_by_the_safetensors_crate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.safetensors");
        write(&path, &[3, 4], 1536);
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let features = st.tensor("features").unwrap();
        assert_eq!(features.dtype(), safetensors::Dtype::F16);
        assert_eq!(features.shape(), &[7, 1536]);
        let grid = st.tensor("grid").unwrap();
        assert_eq!(grid.dtype(), safetensors::Dtype::I32);
        assert_eq!(&grid.data()[8..16], &[1, 0, 0, 0, 0, 0, 0, 0]); // row 1 = (1, 0)
        let (_, md) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let md = md.metadata().clone().unwrap();
        assert_eq!(md["slide_id"], "TCGA-AB-1234");
        assert_eq!(md["format"], FORMAT);
    }

    #[test]
    fn a_file_written_by_the_safetensors_crate_reads() {
        use safetensors::tensor::TensorView;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("foreign.safetensors");
        let n = 3usize;
        let feats: Vec<u8> = (0..n * 4)
            .flat_map(|i| f16::from_f32(i as f32).to_le_bytes())
            .collect();
        let origins: Vec<u8> = (0..n * 2)
            .flat_map(|i| (i as i64 * 10).to_le_bytes())
            .collect();
        let grid: Vec<u8> = (0..n * 2).flat_map(|i| (i as i32).to_le_bytes()).collect();
        let views = vec![
            (
                "features",
                TensorView::new(safetensors::Dtype::F16, vec![n, 4], &feats).unwrap(),
            ),
            (
                "origins",
                TensorView::new(safetensors::Dtype::I64, vec![n, 2], &origins).unwrap(),
            ),
            (
                "grid",
                TensorView::new(safetensors::Dtype::I32, vec![n, 2], &grid).unwrap(),
            ),
        ];
        let md: std::collections::HashMap<String, String> =
            meta().to_strings().into_iter().collect();
        safetensors::serialize_to_file(views, Some(md), &path).unwrap();
        let file = FeatureFile::read(&path).unwrap();
        assert_eq!(file.len(), 3);
        assert_eq!(file.features_f32()[5], 5.0);
        assert_eq!(file.origins_level0[2], [40, 50]);
        assert_eq!(file.grid_xy[1], [2, 3]);
    }

    #[test]
    fn dropped_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.safetensors");
        {
            let mut w = FeatureFileWriter::create(&path, 4, meta()).unwrap();
            let (f, g, o) = batch(0, 2, 4);
            w.append(&f, &g, &o).unwrap();
            // dropped: an error or a panic in the pipeline
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// Issue 13 item 6: a feature file that does not fit fails with "disk full" and the space
    /// left, and leaves no partial file (nor its temporary one) behind.
    #[test]
    fn full_disk_fails_cleanly_without_partial_files() {
        let Some(small) = crate::disk::LoopDisk::new(16) else {
            return;
        };
        let dir = small.path().join("features");
        let path = dir.join("s.safetensors");
        let mut w = FeatureFileWriter::create(&path, 1536, meta()).unwrap();
        let (f, g, o) = batch(0, 256, 1536);
        let failed = (0..100).find_map(|_| w.append(&f, &g, &o).err());
        // The pipeline drops the writer on an error, as here.
        let err = match failed {
            Some(e) => {
                drop(w);
                e
            }
            None => w.finish().map(|_| ()).unwrap_err(),
        };
        let msg = err.to_string();
        assert!(
            msg.contains("disk full") && msg.contains("MB free") && msg.contains(".tmp"),
            "{msg}"
        );
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "a partial file was left"
        );
    }

    #[test]
    fn rewrite_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.safetensors");
        write(&path, &[4], 8);
        let w = FeatureFileWriter::create(&path, 8, meta()).unwrap();
        // While a new file is being written the old one is intact and readable.
        assert_eq!(FeatureFile::read(&path).unwrap().len(), 4);
        drop(w);
        write(&path, &[9], 8);
        assert_eq!(FeatureFile::read(&path).unwrap().len(), 9);
    }

    #[test]
    fn bad_batches_and_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.safetensors");
        let mut w = FeatureFileWriter::create(&path, 4, meta()).unwrap();
        let err = w.append(&[0.0; 7], &[[0, 0]], &[[0, 0]]).unwrap_err();
        assert!(err.to_string().contains("multiple of dim 4"), "{err}");
        let err = w
            .append(&[0.0; 8], &[[0, 0]], &[[0, 0], [1, 1]])
            .unwrap_err();
        assert!(err.to_string().contains("2 feature rows"), "{err}");
        let mut f = vec![0.0; 8];
        f[6] = 1e6;
        let err = w
            .append(&f, &[[0, 0], [1, 0]], &[[0, 0], [1, 1]])
            .unwrap_err();
        assert!(err.to_string().contains("row 1 column 2"), "{err}");
        let err = FeatureFileWriter::create(&path, 4, meta())
            .unwrap()
            .finish()
            .unwrap_err();
        assert!(err.to_string().contains("no tiles"), "{err}");
        let mut m = meta();
        m.tile_mpp = 0.0;
        assert!(FeatureFileWriter::create(&path, 4, m).is_err());
        assert!(!path.exists());
    }

    #[test]
    fn malformed_files_get_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.safetensors");
        write(&good, &[6], 8);
        let bytes = std::fs::read(&good).unwrap();
        let check = |name: &str, data: &[u8], needle: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, data).unwrap();
            let err = FeatureFile::read(&p).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(needle) && msg.contains(name), "{name}: {msg}");
        };
        check("short.safetensors", &bytes[..5], "too short");
        check(
            "truncated.safetensors",
            &bytes[..bytes.len() - 3],
            "truncated",
        );
        let mut trailing = bytes.clone();
        trailing.extend_from_slice(&[0; 4]);
        check("trailing.safetensors", &trailing, "trailing");
        check(
            "garbage.safetensors",
            b"this is not a safetensors file at all",
            "header length",
        );

        // Edit the header JSON in place (same length, so offsets stay valid).
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&bytes[8..8 + header_len])
            .unwrap()
            .to_string();
        let with_header = |h: String| {
            let mut out = bytes.clone();
            let mut hb = h.into_bytes();
            hb.resize(header_len, b' ');
            out[8..8 + header_len].copy_from_slice(&hb);
            out
        };
        check(
            "dtype.safetensors",
            &with_header(header.replacen("\"F16\"", "\"F32\"", 1)),
            "`features` is F32, expected F16",
        );
        check(
            "version.safetensors",
            &with_header(header.replacen(
                "\"format_version\":\"1\"",
                "\"format_version\":\"9\"",
                1,
            )),
            "format_version `9`",
        );
        check(
            "nometa.safetensors",
            &with_header(header.replacen("\"slide_id\"", "\"slide_xx\"", 1)),
            "no `slide_id`",
        );
        check(
            "shape.safetensors",
            &with_header(header.replacen("\"shape\":[6,2]", "\"shape\":[5,2]", 1)),
            "expected [6, 2]",
        );
    }

    #[test]
    fn feature_paths_are_safe_and_distinct() {
        let root = Path::new("/data/features");
        let a = feature_path(root, "../../etc/passwd", "abc");
        assert!(a.starts_with("/data/features/tile-abc"));
        assert!(!a.to_string_lossy().contains(".."));
        assert_ne!(
            feature_path(root, "a/b", "abc"),
            feature_path(root, "a_b", "abc")
        );
        assert_eq!(
            feature_path(root, "x", "abc"),
            feature_path(root, "x", "abc")
        );
    }
}
