//! Store configuration: where data lives and which backends hold it.
//!
//! Data, not code: a `[store]`-style TOML table that the CLI reads, merges with flags and
//! environment, validates once and can print (`StoreConfig::default().to_toml()`).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};

/// Name of the SQLite catalog file inside the data dir (when no catalog URL is configured).
pub const CATALOG_FILE: &str = "catalog.sqlite";

/// Where the store keeps its data and which backends hold it: the `[store]` table of the
/// configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Root of everything stored on this machine: `vectors/`, `features/`, `catalog.sqlite`.
    pub data_dir: PathBuf,
    /// Where the vectors live.
    pub vectors: VectorBackendConfig,
    /// `sqlite://PATH` or `postgres://USER:PASS@HOST/DB`. Unset: SQLite in the data dir.
    pub catalog_url: Option<String>,
    /// Vector dimensions of the collections (checked against an existing store at open).
    pub dims: Dims,
    /// The embedded vector store refuses a write that would leave less than this many MiB
    /// free on the data dir's file system (its engine cannot survive a full disk); 0 disables
    /// the check.
    pub min_free_mb: u64,
    /// Compression of the `tiles` collection (one vector per tile, 10^8+ in an archive):
    /// `int8` (scalar quantization in RAM, original vectors on disk, searches rescored with
    /// them) or `none` (float32 vectors in RAM). Fixed when the collection is created.
    pub tile_quantization: Quantization,
}

/// Vector compression of a collection ([`StoreConfig::tile_quantization`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quantization {
    /// Scalar int8 quantization kept in RAM, original vectors on disk, rescoring on.
    #[default]
    Int8,
    /// Plain float32 vectors in RAM.
    None,
}

/// Which vector store holds the collections (`backend = "embedded"` or `"qdrant"`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "snake_case", deny_unknown_fields)]
pub enum VectorBackendConfig {
    /// In-process qdrant-edge shards under `DATA_DIR/vectors/<collection>`: one machine.
    Embedded,
    /// A Qdrant server or cluster over gRPC (usually port 6334).
    Qdrant {
        /// The server's gRPC endpoint, `http://HOST:PORT` or `https://HOST:PORT`.
        url: String,
        /// Key sent with every request; `None` for a server without authentication.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        api_key: Option<String>,
        /// Shards of each collection this creates (a cluster spreads them over its nodes).
        /// Fixed when the collection is created; default 1.
        #[serde(default = "one")]
        shard_number: i64,
        /// Copies of each shard, on distinct nodes of a cluster: 2 keeps every point readable
        /// and writable with one node down. At most the number of nodes; default 1.
        #[serde(default = "one")]
        replication_factor: i64,
        /// Replicas that must apply a write before it returns: 1 keeps writes going with a
        /// replica down. At most `replication_factor`; default 1.
        #[serde(default = "one")]
        write_consistency_factor: i64,
    },
}

fn one() -> i64 {
    1
}

/// Largest shard or replica count accepted (a typo guard; Qdrant clusters are far smaller).
const MAX_SHARDS: i64 = 1024;

impl VectorBackendConfig {
    /// A Qdrant server at `url` with the default layout (1 shard, 1 replica).
    pub fn qdrant(url: impl Into<String>, api_key: Option<String>) -> Self {
        VectorBackendConfig::Qdrant {
            url: url.into(),
            api_key,
            shard_number: 1,
            replication_factor: 1,
            write_consistency_factor: 1,
        }
    }
}

/// The API key never reaches logs or `--show` output through `Debug`.
impl fmt::Debug for VectorBackendConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VectorBackendConfig::Embedded => f.write_str("Embedded"),
            VectorBackendConfig::Qdrant {
                url,
                api_key,
                shard_number,
                replication_factor,
                write_consistency_factor,
            } => f
                .debug_struct("Qdrant")
                .field("url", url)
                .field("api_key", &api_key.as_ref().map(|_| "<redacted>"))
                .field("shard_number", shard_number)
                .field("replication_factor", replication_factor)
                .field("write_consistency_factor", write_consistency_factor)
                .finish(),
        }
    }
}

/// Vector dimensions of the collections, one per named vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Dims {
    /// Aligned slide / text embedding (`joint` vectors of `slides` and `reports`).
    pub joint: usize,
    /// Raw slide-encoder output (`slide` vector of `slides`).
    pub slide: usize,
    /// Raw text-encoder output (`text` vector of `reports`): 384 for all-MiniLM-L6-v2, 768 for
    /// PubMedBERT-base.
    pub text: usize,
    /// Tile-encoder output (`tile` vector of `tiles`): 1536 for Prov-GigaPath. Writers and
    /// queries take it from the tile features they hold.
    pub tile: usize,
}

impl Default for Dims {
    fn default() -> Self {
        Dims {
            joint: 512,
            slide: 768,
            text: 384,
            tile: 1536,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            data_dir: PathBuf::from("data"),
            vectors: VectorBackendConfig::Embedded,
            catalog_url: None,
            dims: Dims::default(),
            min_free_mb: crate::disk::DEFAULT_MIN_FREE_MB,
            tile_quantization: Quantization::default(),
        }
    }
}

/// Largest vector we accept; guards against a typo like `joint = 5120000`.
const MAX_DIM: usize = 65_536;

impl StoreConfig {
    /// A config rooted at `data_dir` with every other field at its default.
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        StoreConfig {
            data_dir: data_dir.into(),
            ..StoreConfig::default()
        }
    }

    /// Parses a `[store]` table (missing keys at their defaults) and validates it.
    pub fn from_toml(text: &str) -> Result<Self> {
        let cfg: StoreConfig =
            toml::from_str(text).map_err(|e| StoreError::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// TOML with every field spelled out; the API key and a catalog password are replaced by
    /// `<redacted>` / `***`.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.catalog_url = shown.catalog_url.as_deref().map(redact_url);
        if let VectorBackendConfig::Qdrant { api_key, .. } = &mut shown.vectors {
            if api_key.is_some() {
                *api_key = Some("<redacted>".into());
            }
        }
        // Serialising a plain struct of strings and integers cannot fail.
        toml::to_string_pretty(&shown).unwrap_or_default()
    }

    /// Checks what serde cannot: a non-empty data dir, dims in range, a well-formed Qdrant
    /// URL and layout, a parseable catalog URL.
    pub fn validate(&self) -> Result<()> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(StoreError::Config("data_dir is empty".into()));
        }
        for (name, dim) in [
            ("joint", self.dims.joint),
            ("slide", self.dims.slide),
            ("text", self.dims.text),
            ("tile", self.dims.tile),
        ] {
            if dim == 0 || dim > MAX_DIM {
                return Err(StoreError::Config(format!(
                    "dims.{name} = {dim}: must be between 1 and {MAX_DIM}"
                )));
            }
        }
        if let VectorBackendConfig::Qdrant {
            url,
            api_key,
            shard_number,
            replication_factor,
            write_consistency_factor,
        } = &self.vectors
        {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(StoreError::Config(format!(
                    "vectors.url `{url}`: expected http://HOST:PORT or https://HOST:PORT \
                     (the gRPC port, 6334 by default)"
                )));
            }
            if api_key.as_deref() == Some("") {
                return Err(StoreError::Config(
                    "vectors.api_key is empty: remove it or set a key".into(),
                ));
            }
            for (key, n) in [
                ("shard_number", shard_number),
                ("replication_factor", replication_factor),
                ("write_consistency_factor", write_consistency_factor),
            ] {
                if !(1..=MAX_SHARDS).contains(n) {
                    return Err(StoreError::Config(format!(
                        "vectors.{key} = {n}: must be between 1 and {MAX_SHARDS}"
                    )));
                }
            }
            if write_consistency_factor > replication_factor {
                return Err(StoreError::Config(format!(
                    "vectors.write_consistency_factor = {write_consistency_factor} is over \
                     vectors.replication_factor = {replication_factor}: a write cannot wait \
                     for more replicas than there are"
                )));
            }
        }
        if let Some(url) = &self.catalog_url {
            CatalogUrl::parse(url)?;
        }
        Ok(())
    }

    /// `<data dir>/vectors`: the embedded vector store's shards.
    pub fn vectors_dir(&self) -> PathBuf {
        self.data_dir.join("vectors")
    }

    /// `<data dir>/features`: the tile feature files.
    pub fn features_dir(&self) -> PathBuf {
        self.data_dir.join("features")
    }

    /// The catalog URL in force: the configured one, or SQLite in the data dir.
    pub fn catalog_url(&self) -> String {
        match &self.catalog_url {
            Some(url) => url.clone(),
            None => sqlite_url(&self.data_dir.join(CATALOG_FILE)),
        }
    }
}

/// `sqlite://` URL for a file path (created if missing when the catalog connects).
pub fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

/// Which SQL dialect a catalog URL selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CatalogUrl {
    Sqlite,
    Postgres,
}

impl CatalogUrl {
    pub(crate) fn parse(url: &str) -> Result<Self> {
        if url.starts_with("sqlite:") {
            Ok(CatalogUrl::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(CatalogUrl::Postgres)
        } else {
            Err(StoreError::Config(format!(
                "catalog_url `{}`: expected sqlite://PATH or postgres://USER@HOST/DB",
                redact_url(url)
            )))
        }
    }
}

/// A URL with its password (if any) replaced, for error messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match (authority.rfind('@'), authority.find(':')) {
        (Some(at), Some(colon)) if colon < at => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &authority[..colon],
            &rest[at..]
        ),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_through_toml() {
        let text = StoreConfig::default().to_toml();
        assert!(text.contains("backend = \"embedded\""), "{text}");
        assert!(text.contains("joint = 512"), "{text}");
        let back = StoreConfig::from_toml(&text).unwrap();
        assert_eq!(back, StoreConfig::default());
    }

    #[test]
    fn qdrant_backend_parses_and_key_is_redacted() {
        let cfg = StoreConfig::from_toml(
            "data_dir = \"/srv/g\"\ncatalog_url = \"postgres://u:secret@db/g\"\n\
             [vectors]\nbackend = \"qdrant\"\nurl = \"http://qdrant:6334\"\napi_key = \"k3y\"\n\
             [dims]\njoint = 256\n",
        )
        .unwrap();
        assert_eq!(
            cfg.dims,
            Dims {
                joint: 256,
                slide: 768,
                text: 384,
                tile: 1536,
            }
        );
        assert_eq!(
            cfg.vectors,
            VectorBackendConfig::qdrant("http://qdrant:6334", Some("k3y".into()))
        );
        assert!(!format!("{cfg:?}").contains("k3y"));
        assert!(!cfg.to_toml().contains("k3y"));
        assert!(!cfg.to_toml().contains("secret"), "{}", cfg.to_toml());
        assert_eq!(cfg.catalog_url(), "postgres://u:secret@db/g");
    }

    #[test]
    fn bad_values_are_named() {
        let err = StoreConfig::from_toml("[dims]\njoint = 0\n").unwrap_err();
        assert!(err.to_string().contains("dims.joint"), "{err}");
        let err = StoreConfig::from_toml("catalog_url = \"mysql://x\"\n").unwrap_err();
        assert!(err.to_string().contains("catalog_url"), "{err}");
        let err =
            StoreConfig::from_toml("[vectors]\nbackend = \"qdrant\"\nurl = \"qdrant:6334\"\n")
                .unwrap_err();
        assert!(err.to_string().contains("vectors.url"), "{err}");
        let qdrant = "[vectors]\nbackend = \"qdrant\"\nurl = \"http://q:6334\"\n";
        for (extra, named) in [
            ("shard_number = 0", "vectors.shard_number"),
            ("replication_factor = 0", "vectors.replication_factor"),
            (
                "write_consistency_factor = 5000",
                "vectors.write_consistency_factor",
            ),
            (
                "replication_factor = 2\nwrite_consistency_factor = 3",
                "is over vectors.replication_factor = 2",
            ),
            ("shard_number = -1", "vectors.shard_number = -1"),
        ] {
            let err = StoreConfig::from_toml(&format!("{qdrant}{extra}\n")).unwrap_err();
            assert!(err.to_string().contains(named), "{extra}: {err}");
        }
        let err = StoreConfig::from_toml("datadir = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("datadir"), "{err}");
    }

    #[test]
    fn cluster_layout_is_read_and_defaults_to_one() {
        let cfg = StoreConfig::from_toml(
            "[vectors]\nbackend = \"qdrant\"\nurl = \"http://q:6334\"\nshard_number = 3\n\
             replication_factor = 2\n",
        )
        .unwrap();
        assert_eq!(
            cfg.vectors,
            VectorBackendConfig::Qdrant {
                url: "http://q:6334".into(),
                api_key: None,
                shard_number: 3,
                replication_factor: 2,
                write_consistency_factor: 1,
            }
        );
        assert!(cfg.to_toml().contains("replication_factor = 2"));
        let plain =
            StoreConfig::from_toml("[vectors]\nbackend = \"qdrant\"\nurl = \"http://q:6334\"\n")
                .unwrap();
        assert_eq!(
            plain.vectors,
            VectorBackendConfig::qdrant("http://q:6334", None)
        );
    }

    #[test]
    fn tile_dims_and_quantization() {
        assert_eq!(StoreConfig::default().tile_quantization, Quantization::Int8);
        let cfg =
            StoreConfig::from_toml("tile_quantization = \"none\"\n[dims]\ntile = 32\n").unwrap();
        assert_eq!(
            (cfg.tile_quantization, cfg.dims.tile),
            (Quantization::None, 32)
        );
        let err = StoreConfig::from_toml("[dims]\ntile = 0\n").unwrap_err();
        assert!(err.to_string().contains("dims.tile"), "{err}");
        let err = StoreConfig::from_toml("tile_quantization = \"pq\"\n").unwrap_err();
        assert!(err.to_string().contains("tile_quantization"), "{err}");
    }

    #[test]
    fn default_catalog_is_sqlite_in_data_dir() {
        let cfg = StoreConfig::with_data_dir("/tmp/d");
        assert_eq!(cfg.catalog_url(), "sqlite:///tmp/d/catalog.sqlite");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://me:pw@host:5432/db"),
            "postgres://me:***@host:5432/db"
        );
        assert_eq!(redact_url("postgres://host/db"), "postgres://host/db");
    }
}
