-- gigapath catalog, SQLite dialect. Keep in step with ../postgres/0001_catalog.sql: the Rust code
-- runs the same statements on both (times are BIGINT epoch milliseconds, JSON is TEXT).

-- One row per slide file known to the system.
CREATE TABLE slides (
    id            TEXT PRIMARY KEY,
    path          TEXT NOT NULL,
    cohort        TEXT,
    site          TEXT,
    labels        TEXT NOT NULL DEFAULT '{}',   -- JSON object: label name -> value (e.g. subtype)
    mpp           REAL,                         -- level-0 microns per pixel
    tile_count    BIGINT,                       -- kept tiles of the last successful embedding
    state         TEXT NOT NULL DEFAULT 'registered'
                  CHECK (state IN ('registered', 'embedded', 'failed')),
    error         TEXT,                         -- why the last attempt failed
    fingerprint   TEXT,                         -- guard fingerprint of the stored embedding
    fingerprints  TEXT NOT NULL DEFAULT '{}',   -- JSON object: role (tile, slide, ...) -> weights
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);
CREATE INDEX slides_state ON slides (state);
CREATE INDEX slides_cohort ON slides (cohort);

-- Report texts, each linked to one slide (a training pair).
CREATE TABLE reports (
    id            TEXT PRIMARY KEY,
    slide_id      TEXT NOT NULL REFERENCES slides (id) ON DELETE CASCADE,
    text          TEXT NOT NULL,
    labels        TEXT NOT NULL DEFAULT '{}',
    fingerprint   TEXT,                         -- set once the text is embedded
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);
CREATE INDEX reports_slide ON reports (slide_id);

-- Per-slide tile feature files (safetensors), one per tile-encoder fingerprint.
CREATE TABLE feature_files (
    slide_id         TEXT NOT NULL REFERENCES slides (id) ON DELETE CASCADE,
    tile_fingerprint TEXT NOT NULL,
    path             TEXT NOT NULL,
    sha256           TEXT NOT NULL,
    size_bytes       BIGINT NOT NULL,
    tile_count       BIGINT NOT NULL,
    created_at       BIGINT NOT NULL,
    PRIMARY KEY (slide_id, tile_fingerprint)
);

-- Weights that produced stored embeddings: tile / slide / text / alignment / bundle.
CREATE TABLE models (
    fingerprint   TEXT PRIMARY KEY,
    role          TEXT NOT NULL,
    source        TEXT NOT NULL,                -- path or description of the weights
    details       TEXT NOT NULL DEFAULT '{}',   -- JSON: config, parts of a bundle, ...
    created_at    BIGINT NOT NULL
);

-- Which fingerprint every stored vector-DB point carries.
CREATE TABLE embeddings (
    collection    TEXT NOT NULL,
    object_id     TEXT NOT NULL,
    fingerprint   TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    PRIMARY KEY (collection, object_id)
);
CREATE INDEX embeddings_fingerprint ON embeddings (collection, fingerprint);

-- Work queue shared by ingest processes and workers (claims with leases).
CREATE TABLE jobs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    kind             TEXT NOT NULL,
    subject          TEXT NOT NULL,             -- what the job is about, e.g. a slide id
    fingerprint      TEXT NOT NULL,             -- weights the job embeds with
    payload          TEXT NOT NULL DEFAULT '{}',
    state            TEXT NOT NULL DEFAULT 'queued'
                     CHECK (state IN ('queued', 'running', 'done', 'failed')),
    attempts         BIGINT NOT NULL DEFAULT 0,
    worker           TEXT,
    lease_expires_at BIGINT,
    error            TEXT,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    UNIQUE (kind, subject, fingerprint)
);
CREATE INDEX jobs_claim ON jobs (state, id);

-- Alignment training runs; per-step metrics stay in the run folder (JSONL).
CREATE TABLE training_runs (
    id            TEXT PRIMARY KEY,
    config        TEXT NOT NULL,                -- JSON of the run configuration
    status        TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed', 'stopped')),
    metrics       TEXT NOT NULL DEFAULT '{}',   -- JSON of the run-level metrics
    checkpoint    TEXT,                         -- latest / final checkpoint path
    fingerprint   TEXT,                         -- fingerprint of the trained weights
    error         TEXT,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);
