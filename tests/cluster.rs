//! A 3-node Qdrant cluster (issue 15), started by this test from `../shared/qdrant/start.sh
//! --nodes 3` on free ports: `[store.vectors]` asks for 3 shards, 2 replicas of each and a write
//! consistency factor of 1, and the collections are created with exactly that. A small cohort is
//! ingested, one node is killed (`kill -9`), and with it down the service still answers a report
//! search by text, and an ingest of more slides (and every report) still succeeds with nothing
//! lost: exact counts asked of each surviving node. The node is then started again on its
//! storage (the environment and arguments start.sh gave it), rejoins, and answers the same
//! counts. The cluster is stopped at the end (`start.sh --stop`).
//!
//! Skipped (with a message) where `../shared/qdrant` is absent.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::servers::{free_base, http, wait_for, Procs, Qdrant};
use common::{gigapath, run, small_cohort};
use serde_json::{json, Value};

const KEY: &str = "cluster-admin-key-0123456789";

fn ingest(root: &Path, inputs: &[std::path::PathBuf], reports: bool) {
    let mut cmd = gigapath();
    cmd.arg("ingest")
        .arg("--data-dir")
        .arg(root.join("data"))
        .arg("--config")
        .arg(root.join("cluster.toml"))
        .args(inputs);
    if reports {
        cmd.arg("--reports").arg(root.join("cohort/reports.jsonl"));
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "ingest: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn status(root: &Path) -> Value {
    let data = root.join("data").display().to_string();
    let config = root.join("cluster.toml").display().to_string();
    let out = run(&["status", "--json", "--data-dir", &data, "--config", &config]);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every replica of every shard of `collection` is active (asked of `node`).
fn all_replicas_active(q: &Qdrant, node: usize, collection: &str) -> bool {
    let (code, v) = http(
        &q.rest(node),
        "GET",
        &format!("/collections/{collection}/cluster"),
        None,
        None,
    );
    if code != 200 {
        return false;
    }
    let r = &v["result"];
    let shards: Vec<&Value> = ["local_shards", "remote_shards"]
        .iter()
        .flat_map(|k| r[*k].as_array().into_iter().flatten())
        .collect();
    shards.len() == 6 && shards.iter().all(|s| s["state"] == "Active")
}

#[test]
fn a_replicated_cluster_survives_a_dead_node_and_takes_it_back() {
    let Some(mut q) = Qdrant::start(3) else {
        eprintln!("SKIPPED cluster test: no Qdrant server (../shared/qdrant/start.sh)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let port = free_base(1);
    let base = format!("http://127.0.0.1:{port}");
    small_cohort(
        root,
        3,
        1000,
        "cluster.toml",
        &format!(
            "[store.vectors]\nbackend = \"qdrant\"\nurl = \"{}\"\nshard_number = 3\n\
             replication_factor = 2\nwrite_consistency_factor = 1\n[ingest]\nbatch_size = 8\n\
             store_retry_seconds = 60\n[serve]\nbind = \"127.0.0.1:{port}\"\n\
             api_keys = [\"{KEY}\"]\nrun_worker = false\n",
            q.grpc(0)
        ),
    );
    let mut files: Vec<_> = std::fs::read_dir(root.join("cohort/slides"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 9);

    // Six slides on the healthy cluster; the collections carry the configured layout.
    ingest(root, &files[..6], false);
    for collection in ["slides", "reports"] {
        let (code, info) = http(
            &q.rest(1),
            "GET",
            &format!("/collections/{collection}"),
            None,
            None,
        );
        assert_eq!(code, 200, "{info}");
        let params = &info["result"]["config"]["params"];
        assert_eq!(params["shard_number"], 3, "{collection}: {params}");
        assert_eq!(params["replication_factor"], 2, "{collection}: {params}");
        assert_eq!(
            params["write_consistency_factor"], 1,
            "{collection}: {params}"
        );
        assert!(all_replicas_active(&q, 0, collection), "{collection}");
    }
    assert_eq!(q.count(1, "slides"), Some(6));

    let mut procs = Procs::default();
    procs.0.push(
        gigapath()
            .arg("serve")
            .arg("--data-dir")
            .arg(root.join("data"))
            .arg("--config")
            .arg(root.join("cluster.toml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(root.join("serve.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for("the service", Duration::from_secs(60), || {
        http(&base, "GET", "/readyz", None, None).0 == 200
    });

    // One node dies. The rest of the cohort and every report go in with it down.
    q.kill(2);
    ingest(root, &files[6..], true);
    for node in [0, 1] {
        assert_eq!(q.count(node, "slides"), Some(9), "node {node}");
        assert_eq!(q.count(node, "reports"), Some(9), "node {node}");
    }
    let s = status(root);
    assert_eq!(s["slides"]["embedded"], 9, "{s}");
    assert_eq!(s["jobs"]["failed"], 0, "{s}");

    // The service answers a report search by text, from the surviving replicas.
    let reports = std::fs::read_to_string(root.join("cohort/reports.jsonl")).unwrap();
    let first: Value = serde_json::from_str(reports.lines().next().unwrap()).unwrap();
    let (code, hits) = http(
        &base,
        "POST",
        "/v1/search/reports",
        Some(&json!({"query": first["report_text"], "k": 3})),
        Some(KEY),
    );
    assert_eq!(
        code,
        200,
        "{hits} {}",
        std::fs::read_to_string(root.join("serve.log")).unwrap_or_default()
    );
    assert_eq!(
        hits["results"][0]["payload"]["slide_id"], first["slide_id"],
        "{hits}"
    );

    // The node comes back on its storage, catches up, and counts the same.
    q.restart(2);
    wait_for(
        "every replica active again",
        Duration::from_secs(60),
        || all_replicas_active(&q, 2, "slides") && all_replicas_active(&q, 2, "reports"),
    );
    for node in 0..3 {
        assert_eq!(q.count(node, "slides"), Some(9), "node {node}");
        assert_eq!(q.count(node, "reports"), Some(9), "node {node}");
    }
    drop(procs);
    drop(q);
}
