//! Text files users hand in: reports, prompt sets, configs.
//!
//! First byte selects (modulo 6); the rest is the file's text (lossy UTF-8, as the readers
//! take `read_to_string`, which refuses invalid UTF-8 before parsing):
//! - 0: a JSONL reports file: `gigapath_pipeline::reports::parse_reports` (what `read_reports`
//!   does after reading the file), rows, per-row errors, duplicate ids;
//! - 1: the same as CSV;
//! - 2: a prompts folder: `PromptLibrary::from_texts` (the loader of `PromptLibrary::load` over
//!   texts): the first part is `templates.toml`, each later part starts with a line
//!   `--- FILE.toml` (`subtype-*.toml`, `mutation-*.toml`); then the set look-ups the API uses;
//! - 3: a `--config` gigapath TOML: `Config::from_toml` (table parse, serde, every
//!   `validate` rule of `Config::load`), and `to_toml` of what was accepted;
//! - 4: the same as the data dir's own `gigapath.toml` (redacted secrets dropped, relative
//!   paths taken from the data dir), and the data dir file written back
//!   (`to_toml`) must read back;
//! - 5: a training run config: `gigapath_train::RunConfig::from_toml` (parse + `validate`), its
//!   heads, pools and run id, and `to_toml` of an accepted config must read back.
#![no_main]

use std::path::Path;

use gigapath_pipeline::config::Config;
use gigapath_pipeline::reports;
use gigapath_train::RunConfig;
use gigapath_zeroshot::PromptLibrary;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match selector % 6 {
        0 | 1 => {
            let csv = selector % 6 == 1;
            let name = if csv { "reports.csv" } else { "reports.jsonl" };
            if let Ok((rows, errors)) = reports::parse_reports(&text, csv, Path::new(name)) {
                assert!(!rows.is_empty() || !errors.is_empty());
                let mut ids = std::collections::HashSet::new();
                for r in &rows {
                    assert!(!r.slide_id.trim().is_empty() && !r.text.trim().is_empty());
                    assert!(r.text.len() <= reports::MAX_REPORT_BYTES);
                    assert!(ids.insert(r.report_id.clone()), "duplicate {}", r.report_id);
                }
            }
        }
        2 => {
            let mut parts = text.split("\n--- ");
            let templates = parts.next().unwrap_or_default();
            let files: Vec<(String, String)> = parts
                .map(|p| {
                    let (name, body) = p.split_once('\n').unwrap_or((p, ""));
                    (name.trim().to_string(), body.to_string())
                })
                .collect();
            let dir = Path::new("prompts");
            if let Ok(lib) = PromptLibrary::from_texts(dir, templates, &files) {
                for set in lib.subtype_sets() {
                    let found = lib
                        .subtype(&set.name)
                        .expect("a loaded set is found by name");
                    assert_eq!(found.name, set.name);
                    for label in set.labels() {
                        assert!(set.class_index(&label).is_some());
                    }
                    assert!(!set.templates.is_empty());
                }
                for set in lib.mutation_sets() {
                    let found = lib
                        .mutation(&set.name)
                        .expect("a loaded set is found by name");
                    assert_eq!(found.name, set.name);
                    let all = set.select(None).expect("all genes");
                    assert_eq!(all.len(), set.genes.len());
                    let names: Vec<String> = set.genes.iter().map(|g| g.gene.clone()).collect();
                    assert_eq!(
                        set.select(Some(&names)).expect("own genes").len(),
                        names.len()
                    );
                }
            }
        }
        3 => {
            if let Ok(cfg) = Config::from_toml(&text, Path::new("config.toml"), None) {
                let _ = cfg.to_toml();
            }
        }
        4 => {
            let data_dir = Path::new("/nonexistent/gigapath-fuzz-data");
            let path = data_dir.join("gigapath.toml");
            if let Ok(cfg) = Config::from_toml(&text, &path, Some(data_dir)) {
                let shown = cfg.to_toml();
                Config::from_toml(&shown, &path, Some(data_dir))
                    .unwrap_or_else(|e| panic!("written config does not read back: {e}\n{shown}"));
            }
        }
        _ => {
            if let Ok(cfg) = RunConfig::from_toml(&text) {
                let _ = cfg.heads();
                let _ = cfg.pools();
                let _ = cfg.run_id();
                let shown = cfg.to_toml();
                let back = RunConfig::from_toml(&shown).unwrap_or_else(|e| {
                    panic!("written run config does not read back: {e}\n{shown}")
                });
                assert_eq!(back.run_id(), cfg.run_id());
            }
        }
    }
});
