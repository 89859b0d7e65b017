//! The service WITH an alignment checkpoint, on a random loopback port over a real embedded store:
//! a tiny synthetic cohort is ingested, an alignment run is trained and the store re-embedded
//! with it (what `gigapath ingest`, `train` and `reembed` do, through the library crates), then
//! text-to-slide search, report search (text, slide -> reports, report -> slides), zero-shot
//! subtyping (prompt set and inline classes) and mutation prompts, prompt sets, prompt heatmaps
//! and the web page are checked on their values, with the bad inputs of issue #6. Finally the
//! same store is served with another checkpoint and with none: every request that would mix
//! embeddings of different weights answers 409 with a message that says what to do.
//!
//! One test binary over one fixture (built once, served by one service for the whole binary):
//! `fixture` builds it; each module checks one part of the service, test by test.

#[path = "../common/mod.rs"]
mod common;

mod bad_inputs;
mod fixture;
mod guard;
mod page;
mod search;
mod zero_shot;
