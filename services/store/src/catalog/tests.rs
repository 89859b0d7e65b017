//! Catalog tests, written once and run on SQLite (always) and Postgres (when
//! `GIGAPATH_TEST_POSTGRES_URL` is set; `scripts/start-test-postgres.sh` starts a throwaway one).
//! Each Postgres test works in its own schema, so tests run in parallel without seeing each other.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::time::Duration;

use serde_json::json;
use sqlx::postgres::PgConnectOptions;

use super::jobs::kinds;
use super::*;

/// A second job kind, to check that kind filters filter.
const OTHER_KIND: &str = "embed_report";

type ReopenFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Catalog>>>;

struct TestDb {
    catalog: Catalog,
    /// Opens another handle (another pool: as another process would).
    reopen: Box<dyn Fn() -> ReopenFuture>,
    _dir: Option<tempfile::TempDir>,
}

async fn sqlite() -> TestDb {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::config::sqlite_url(&dir.path().join("sub/catalog.sqlite"));
    let catalog = Catalog::connect(&url).await.unwrap();
    TestDb {
        catalog,
        reopen: Box::new(move || {
            let url = url.clone();
            Box::pin(async move { Catalog::connect(&url).await.unwrap() }) as ReopenFuture
        }),
        _dir: Some(dir),
    }
}

async fn postgres(test: &str) -> Option<TestDb> {
    let Ok(url) = std::env::var("GIGAPATH_TEST_POSTGRES_URL") else {
        eprintln!(
            "SKIPPED postgres {test}: set GIGAPATH_TEST_POSTGRES_URL \
             (scripts/start-test-postgres.sh prints it)"
        );
        return None;
    };
    let schema = format!(
        "t_{test}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let admin = sqlx::PgPool::connect(&url)
        .await
        .expect("GIGAPATH_TEST_POSTGRES_URL unreachable");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let open = move || {
        let url = url.clone();
        let schema = schema.clone();
        Box::pin(async move {
            let options = PgConnectOptions::from_str(&url)
                .unwrap()
                .options([("search_path", schema.as_str())]);
            Catalog::connect_postgres(options, "test".into())
                .await
                .unwrap()
        }) as ReopenFuture
    };
    let catalog = open().await;
    Some(TestDb {
        catalog,
        reopen: Box::new(open),
        _dir: None,
    })
}

/// Defines `<name>_sqlite` and `<name>_postgres` tests running `async fn <name>(&TestDb)`.
macro_rules! both_dialects {
    ($($name:ident),* $(,)?) => {
        mod sqlite_tests {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let db = super::sqlite().await;
                    super::$name(&db).await;
                }
            )*
        }
        mod postgres_tests {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    if let Some(db) = super::postgres(stringify!($name)).await {
                        assert_eq!(db.catalog.backend_name(), "postgres");
                        super::$name(&db).await;
                    }
                }
            )*
        }
    };
}

both_dialects!(
    slides_upsert_and_states,
    reports_link_to_slides,
    feature_files_and_training_pairs,
    fingerprints_are_recorded,
    queue_is_idempotent_per_subject_and_fingerprint,
    claims_follow_the_lease_protocol,
    expired_leases_are_reclaimed_then_given_up,
    complete_slide_job_is_atomic,
    training_runs,
    concurrent_claims_take_each_job_once,
    crashed_attempts_park_the_job_with_their_record,
    operators_cancel_and_retry_jobs,
    infrastructure_errors_are_not_counted_as_attempts,
    slide_reset_forgets_the_embedding_and_keeps_the_record,
);

fn slide(id: &str, cohort: &str) -> NewSlide {
    NewSlide {
        id: id.into(),
        path: format!("/slides/{id}.svs"),
        cohort: Some(cohort.into()),
        site: Some("lung".into()),
        labels: BTreeMap::from([("subtype".into(), "LUAD".into())]),
        mpp: Some(0.2527),
    }
}

fn embedded(id: &str, fingerprint: &str) -> EmbeddedSlide {
    EmbeddedSlide {
        slide_id: id.into(),
        tile_count: 12_345,
        fingerprint: fingerprint.into(),
        fingerprints: BTreeMap::from([("tile".into(), "t1".into()), ("slide".into(), "s1".into())]),
        collection: "slides".into(),
    }
}

fn new_job(subject: &str, fingerprint: &str) -> NewJob {
    NewJob {
        kind: kinds::EMBED_SLIDE.into(),
        subject: subject.into(),
        fingerprint: fingerprint.into(),
        payload: json!({ "path": format!("/slides/{subject}.svs") }),
        retry_failed: false,
    }
}

fn opts(lease_ms: u64) -> ClaimOptions {
    ClaimOptions {
        lease: Duration::from_millis(lease_ms),
        kind: None,
        max_attempts: 3,
    }
}

async fn slides_upsert_and_states(db: &TestDb) {
    let c = &db.catalog;
    c.health().await.unwrap();
    c.upsert_slide(&slide("s1", "TCGA-LUAD")).await.unwrap();
    c.upsert_slide(&slide("s2", "TCGA-LUSC")).await.unwrap();
    let s1 = c.slide("s1").await.unwrap().unwrap();
    assert_eq!(s1.state, SlideState::Registered);
    assert_eq!(s1.mpp, Some(0.2527));
    assert_eq!(s1.labels["subtype"], "LUAD");
    assert!(c.slide("nope").await.unwrap().is_none());

    c.mark_slide_embedded(&embedded("s1", "fp-A"))
        .await
        .unwrap();
    // Re-registering (new path) keeps the embedding.
    let mut moved = slide("s1", "TCGA-LUAD");
    moved.path = "/new/place/s1.svs".into();
    c.upsert_slide(&moved).await.unwrap();
    let s1 = c.slide("s1").await.unwrap().unwrap();
    assert_eq!(s1.path, "/new/place/s1.svs");
    assert_eq!(s1.state, SlideState::Embedded);
    assert_eq!(s1.fingerprint.as_deref(), Some("fp-A"));
    assert_eq!(s1.tile_count, Some(12_345));
    assert_eq!(s1.fingerprints["tile"], "t1");

    c.mark_slide_failed("s2", "no tissue found at level 2")
        .await
        .unwrap();
    let s2 = c.slide("s2").await.unwrap().unwrap();
    assert_eq!(s2.state, SlideState::Failed);
    assert_eq!(s2.error.as_deref(), Some("no tissue found at level 2"));
    assert!(matches!(
        c.mark_slide_failed("ghost", "x").await.unwrap_err(),
        StoreError::UnknownSlide(_)
    ));
    assert!(matches!(
        c.mark_slide_embedded(&embedded("ghost", "fp"))
            .await
            .unwrap_err(),
        StoreError::UnknownSlide(_)
    ));

    let counts = c.slide_counts().await.unwrap();
    assert_eq!(counts[&SlideState::Embedded], 1);
    assert_eq!(counts[&SlideState::Failed], 1);
    assert_eq!(counts[&SlideState::Registered], 0);
    let failed = c.list_slides(Some(SlideState::Failed)).await.unwrap();
    assert_eq!(
        failed.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        ["s2"]
    );
    assert_eq!(c.list_slides(None).await.unwrap().len(), 2);

    let mut bad = slide("", "x");
    bad.id = " ".into();
    assert!(matches!(
        c.upsert_slide(&bad).await.unwrap_err(),
        StoreError::InvalidRequest(_)
    ));
}

async fn reports_link_to_slides(db: &TestDb) {
    let c = &db.catalog;
    c.upsert_slide(&slide("s1", "A")).await.unwrap();
    let report = NewReport {
        id: "r1".into(),
        slide_id: "s1".into(),
        text: "Adenocarcinoma, acinar predominant.".into(),
        labels: BTreeMap::from([("subtype".into(), "LUAD".into())]),
    };
    c.upsert_report(&report).await.unwrap();
    let orphan = NewReport {
        id: "r2".into(),
        slide_id: "missing-slide".into(),
        ..report.clone()
    };
    match c.upsert_report(&orphan).await.unwrap_err() {
        StoreError::UnknownSlide(id) => assert_eq!(id, "missing-slide"),
        other => panic!("{other}"),
    }
    assert!(c.report("r2").await.unwrap().is_none());
    let empty = NewReport {
        text: "  ".into(),
        ..report.clone()
    };
    assert!(matches!(
        c.upsert_report(&empty).await.unwrap_err(),
        StoreError::InvalidRequest(_)
    ));

    c.mark_report_embedded("r1", "reports", "fp-A")
        .await
        .unwrap();
    assert_eq!(
        c.report("r1")
            .await
            .unwrap()
            .unwrap()
            .fingerprint
            .as_deref(),
        Some("fp-A")
    );
    // Same text again: still embedded. New text: must be re-embedded.
    c.upsert_report(&report).await.unwrap();
    assert_eq!(
        c.report("r1")
            .await
            .unwrap()
            .unwrap()
            .fingerprint
            .as_deref(),
        Some("fp-A")
    );
    let changed = NewReport {
        text: "Squamous cell carcinoma.".into(),
        ..report.clone()
    };
    c.upsert_report(&changed).await.unwrap();
    let r1 = c.report("r1").await.unwrap().unwrap();
    assert_eq!(r1.text, "Squamous cell carcinoma.");
    assert_eq!(r1.fingerprint, None);
    assert_eq!(c.list_reports(Some("s1")).await.unwrap().len(), 1);
    assert_eq!(c.list_reports(Some("other")).await.unwrap().len(), 0);
    assert!(c
        .mark_report_embedded("nope", "reports", "fp")
        .await
        .is_err());
}

async fn feature_files_and_training_pairs(db: &TestDb) {
    let c = &db.catalog;
    for id in ["s1", "s2", "s3"] {
        c.upsert_slide(&slide(id, "A")).await.unwrap();
    }
    for (rid, sid) in [("r1", "s1"), ("r2", "s1"), ("r3", "s2"), ("r4", "s3")] {
        c.upsert_report(&NewReport {
            id: rid.into(),
            slide_id: sid.into(),
            text: format!("report {rid}"),
            labels: BTreeMap::from([("grade".into(), "2".into())]),
        })
        .await
        .unwrap();
    }
    let file = |sid: &str, fp: &str| FeatureFileRecord {
        slide_id: sid.into(),
        tile_fingerprint: fp.into(),
        path: format!("/data/features/{fp}/{sid}.safetensors"),
        sha256: "ab".repeat(32),
        size_bytes: 1000,
        tile_count: 10,
        created_at: 0,
    };
    c.record_feature_file(&file("s1", "tile-A")).await.unwrap();
    c.record_feature_file(&file("s2", "tile-A")).await.unwrap();
    c.record_feature_file(&file("s3", "tile-B")).await.unwrap();
    // Re-recording replaces.
    let mut again = file("s1", "tile-A");
    again.tile_count = 11;
    c.record_feature_file(&again).await.unwrap();
    assert_eq!(
        c.feature_file("s1", "tile-A")
            .await
            .unwrap()
            .unwrap()
            .tile_count,
        11
    );
    assert!(c.feature_file("s1", "tile-B").await.unwrap().is_none());
    assert!(matches!(
        c.record_feature_file(&file("ghost", "tile-A"))
            .await
            .unwrap_err(),
        StoreError::UnknownSlide(_)
    ));
    assert_eq!(c.list_feature_files().await.unwrap().len(), 3);

    let pairs = c.training_pairs("tile-A").await.unwrap();
    let ids: Vec<(&str, &str)> = pairs
        .iter()
        .map(|p| (p.slide_id.as_str(), p.report_id.as_str()))
        .collect();
    assert_eq!(ids, [("s1", "r1"), ("s1", "r2"), ("s2", "r3")]);
    assert_eq!(
        pairs[0].feature_path,
        "/data/features/tile-A/s1.safetensors"
    );
    assert_eq!(pairs[0].labels["subtype"], "LUAD");
    assert_eq!(pairs[0].labels["grade"], "2");
    assert_eq!(pairs[2].text, "report r3");
    assert_eq!(c.training_pairs("tile-B").await.unwrap().len(), 1);
}

async fn fingerprints_are_recorded(db: &TestDb) {
    let c = &db.catalog;
    let model = ModelRecord {
        fingerprint: "sha256:tile1".into(),
        role: "tile".into(),
        source: "/weights/prov-gigapath/pytorch_model.bin".into(),
        details: json!({ "arch": "vit_giant_patch14_dinov2" }),
    };
    c.record_model(&model).await.unwrap();
    c.record_model(&ModelRecord {
        source: "elsewhere".into(),
        ..model.clone()
    })
    .await
    .unwrap();
    assert_eq!(c.models().await.unwrap(), vec![model]);

    for id in ["s1", "s2", "s3"] {
        c.upsert_slide(&slide(id, "A")).await.unwrap();
    }
    c.mark_slide_embedded(&embedded("s1", "fp-A"))
        .await
        .unwrap();
    c.mark_slide_embedded(&embedded("s2", "fp-A"))
        .await
        .unwrap();
    c.mark_slide_embedded(&embedded("s3", "fp-B"))
        .await
        .unwrap();
    let counts = c.embedding_fingerprints("slides").await.unwrap();
    assert_eq!(
        counts,
        BTreeMap::from([("fp-A".into(), 2), ("fp-B".into(), 1)])
    );
    // Re-embedding replaces the fingerprint of the point, it does not add one.
    c.mark_slide_embedded(&embedded("s3", "fp-A"))
        .await
        .unwrap();
    assert_eq!(
        c.embedding_fingerprints("slides").await.unwrap(),
        BTreeMap::from([("fp-A".into(), 3)])
    );
    c.forget_embedding("slides", "s3").await.unwrap();
    assert_eq!(
        c.embedding_fingerprints("slides").await.unwrap(),
        BTreeMap::from([("fp-A".into(), 2)])
    );
}

async fn queue_is_idempotent_per_subject_and_fingerprint(db: &TestDb) {
    let c = &db.catalog;
    let first = c.queue_job(&new_job("s1", "fp-A")).await.unwrap();
    let QueueOutcome::Queued { id } = first else {
        panic!("{first:?}")
    };
    assert_eq!(
        c.queue_job(&new_job("s1", "fp-A")).await.unwrap(),
        QueueOutcome::Pending { id }
    );
    // New weights: a new job.
    assert!(matches!(
        c.queue_job(&new_job("s1", "fp-B")).await.unwrap(),
        QueueOutcome::Queued { id: other } if other != id
    ));
    assert!(matches!(
        c.queue_job(&NewJob {
            subject: " ".into(),
            ..new_job("x", "fp")
        })
        .await
        .unwrap_err(),
        StoreError::InvalidRequest(_)
    ));

    let job = c.claim_job("w1", &opts(60_000)).await.unwrap().unwrap();
    assert_eq!(job.id, id, "oldest first");
    assert_eq!(
        c.queue_job(&new_job("s1", "fp-A")).await.unwrap(),
        QueueOutcome::Pending { id }
    );
    c.complete_job(id, "w1").await.unwrap();
    assert_eq!(
        c.queue_job(&new_job("s1", "fp-A")).await.unwrap(),
        QueueOutcome::AlreadyDone { id }
    );

    let job = c.claim_job("w1", &opts(60_000)).await.unwrap().unwrap();
    c.fail_job(job.id, "w1", "corrupt TIFF: bad strip offset")
        .await
        .unwrap();
    let outcome = c.queue_job(&new_job("s1", "fp-B")).await.unwrap();
    assert_eq!(
        outcome,
        QueueOutcome::PreviouslyFailed {
            id: job.id,
            error: Some("corrupt TIFF: bad strip offset".into())
        }
    );
    let retry = NewJob {
        retry_failed: true,
        payload: json!({ "path": "/moved/s1.svs" }),
        ..new_job("s1", "fp-B")
    };
    assert_eq!(
        c.queue_job(&retry).await.unwrap(),
        QueueOutcome::Requeued { id: job.id }
    );
    let again = c.claim_job("w2", &opts(60_000)).await.unwrap().unwrap();
    assert_eq!(again.id, job.id);
    assert_eq!(again.attempts, 1, "a retry starts a fresh attempt count");
    assert_eq!(again.payload, json!({ "path": "/moved/s1.svs" }));
    assert_eq!(again.error, None);
}

async fn claims_follow_the_lease_protocol(db: &TestDb) {
    let c = &db.catalog;
    assert!(
        c.claim_job("w1", &opts(60_000)).await.unwrap().is_none(),
        "empty queue"
    );
    let a = c.queue_job(&new_job("a", "fp")).await.unwrap().id();
    let b = c.queue_job(&new_job("b", "fp")).await.unwrap().id();
    let r = c
        .queue_job(&NewJob {
            kind: OTHER_KIND.into(),
            ..new_job("r", "fp")
        })
        .await
        .unwrap()
        .id();

    let only_reports = ClaimOptions {
        kind: Some(OTHER_KIND.into()),
        ..opts(60_000)
    };
    let job = c.claim_job("w1", &only_reports).await.unwrap().unwrap();
    assert_eq!(job.id, r);
    assert_eq!(job.state, JobState::Running);
    assert_eq!(job.worker.as_deref(), Some("w1"));
    assert_eq!(job.attempts, 1);
    assert!(c.claim_job("w1", &only_reports).await.unwrap().is_none());

    let ja = c.claim_job("w1", &opts(60_000)).await.unwrap().unwrap();
    let jb = c.claim_job("w2", &opts(60_000)).await.unwrap().unwrap();
    assert_eq!((ja.id, jb.id), (a, b));
    assert_eq!(ja.subject, "a");
    assert_eq!(ja.payload["path"], "/slides/a.svs");
    let lease_a = ja.lease_expires_at_ms.unwrap();
    assert!(
        lease_a > ja.created_at_ms - 60_000,
        "database clock is epoch ms"
    );

    // Only the holder may renew, complete or fail.
    match c.complete_job(a, "w2").await.unwrap_err() {
        StoreError::LeaseLost { job_id, worker } => {
            assert_eq!((job_id, worker.as_str()), (a, "w2"))
        }
        other => panic!("{other}"),
    }
    assert!(matches!(
        c.fail_job(a, "w2", "x").await.unwrap_err(),
        StoreError::LeaseLost { .. }
    ));
    assert!(matches!(
        c.renew_lease(a, "w2", Duration::from_secs(5))
            .await
            .unwrap_err(),
        StoreError::LeaseLost { .. }
    ));
    assert!(matches!(
        c.complete_job(9_999, "w1").await.unwrap_err(),
        StoreError::UnknownJob(9_999)
    ));

    c.renew_lease(a, "w1", Duration::from_secs(3_600))
        .await
        .unwrap();
    let renewed = c
        .job(a)
        .await
        .unwrap()
        .unwrap()
        .lease_expires_at_ms
        .unwrap();
    assert!(renewed > lease_a + 3_000_000, "{renewed} vs {lease_a}");

    let counts = c.job_counts().await.unwrap();
    assert_eq!(
        counts,
        JobCounts {
            queued: 0,
            running: 3,
            done: 0,
            failed: 0,
            cancelled: 0,
            stale: 0
        }
    );
    c.complete_job(a, "w1").await.unwrap();
    assert!(matches!(
        c.complete_job(a, "w1").await.unwrap_err(),
        StoreError::LeaseLost { .. }
    ));
    c.fail_job(b, "w2", "slide has no mpp").await.unwrap();
    c.release_job(r, "w1").await.unwrap();
    let released = c.job(r).await.unwrap().unwrap();
    assert_eq!(
        (released.state, released.attempts, released.worker),
        (JobState::Queued, 0, None)
    );

    let counts = c.job_counts().await.unwrap();
    assert_eq!(
        (counts.queued, counts.running, counts.done, counts.failed),
        (1, 0, 1, 1)
    );
    assert_eq!(counts.total(), 3);
    let failed = c.list_jobs(Some(JobState::Failed), 10).await.unwrap();
    assert_eq!(failed[0].error.as_deref(), Some("slide has no mpp"));

    assert_eq!(c.retry_failed_jobs(Some(OTHER_KIND)).await.unwrap(), 0);
    assert_eq!(c.retry_failed_jobs(None).await.unwrap(), 1);
    let counts = c.job_counts().await.unwrap();
    assert_eq!((counts.queued, counts.failed), (2, 0));

    assert!(matches!(
        c.claim_job(" ", &opts(1_000)).await.unwrap_err(),
        StoreError::InvalidRequest(_)
    ));
    assert!(c.claim_job("w", &opts(0)).await.is_err());
}

async fn expired_leases_are_reclaimed_then_given_up(db: &TestDb) {
    let c = &db.catalog;
    let id = c
        .queue_job(&new_job("killer-slide", "fp"))
        .await
        .unwrap()
        .id();
    let lease = 300;
    let options = ClaimOptions {
        max_attempts: 2,
        ..opts(lease)
    };
    let first = c.claim_job("dead-worker", &options).await.unwrap().unwrap();
    assert!(
        c.claim_job("w2", &options).await.unwrap().is_none(),
        "lease still valid"
    );

    tokio::time::sleep(Duration::from_millis(lease * 2)).await;
    assert_eq!(c.job_counts().await.unwrap().stale, 1);
    let second = c.claim_job("w2", &options).await.unwrap().unwrap();
    assert_eq!(second.id, first.id);
    assert_eq!(second.attempts, 2);
    assert_eq!(second.worker.as_deref(), Some("w2"));
    // The dead worker wakes up: its result is refused.
    assert!(matches!(
        c.complete_job(id, "dead-worker").await.unwrap_err(),
        StoreError::LeaseLost { .. }
    ));

    // w2 dies too: after max_attempts expiries the job fails with the reason instead of looping.
    tokio::time::sleep(Duration::from_millis(lease * 2)).await;
    assert!(c.claim_job("w3", &options).await.unwrap().is_none());
    let job = c.job(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Failed);
    let error = job.error.unwrap();
    assert!(
        error.contains("gave up after 2 attempts") && error.contains("w2"),
        "{error}"
    );

    // Retried on request only.
    assert_eq!(c.retry_failed_jobs(None).await.unwrap(), 1);
    let third = c.claim_job("w3", &options).await.unwrap().unwrap();
    assert_eq!((third.id, third.attempts), (id, 1));
}

async fn complete_slide_job_is_atomic(db: &TestDb) {
    let c = &db.catalog;
    c.upsert_slide(&slide("s1", "A")).await.unwrap();
    let id = c.queue_job(&new_job("s1", "fp-A")).await.unwrap().id();
    let job = c.claim_job("w1", &opts(60_000)).await.unwrap().unwrap();

    // Wrong worker: nothing recorded at all.
    assert!(matches!(
        c.complete_slide_job(id, "w2", &embedded("s1", "fp-A"))
            .await
            .unwrap_err(),
        StoreError::LeaseLost { .. }
    ));
    assert_eq!(
        c.slide("s1").await.unwrap().unwrap().state,
        SlideState::Registered
    );
    assert!(c.embedding_fingerprints("slides").await.unwrap().is_empty());

    // Unknown slide: the job stays running (the transaction rolled back).
    assert!(matches!(
        c.complete_slide_job(job.id, "w1", &embedded("ghost", "fp-A"))
            .await
            .unwrap_err(),
        StoreError::UnknownSlide(_)
    ));
    assert_eq!(c.job(id).await.unwrap().unwrap().state, JobState::Running);

    c.complete_slide_job(job.id, "w1", &embedded("s1", "fp-A"))
        .await
        .unwrap();
    assert_eq!(c.job(id).await.unwrap().unwrap().state, JobState::Done);
    let s1 = c.slide("s1").await.unwrap().unwrap();
    assert_eq!(
        (s1.state, s1.fingerprint.as_deref()),
        (SlideState::Embedded, Some("fp-A"))
    );
    assert_eq!(
        c.embedding_fingerprints("slides").await.unwrap(),
        BTreeMap::from([("fp-A".into(), 1)])
    );
}

async fn training_runs(db: &TestDb) {
    let c = &db.catalog;
    let config = json!({ "lr": 1e-4, "batch": 32, "seed": 7 });
    let run = c.start_run("run-1", &config).await.unwrap();
    assert_eq!(
        (run.status, run.config.clone()),
        (RunStatus::Running, config.clone())
    );
    c.update_run(
        "run-1",
        RunStatus::Stopped,
        &json!({ "step": 120, "loss": 2.5 }),
        Some("/ckpt/120"),
        None,
        None,
    )
    .await
    .unwrap();
    // Resume keeps metrics and checkpoint.
    let resumed = c
        .start_run("run-1", &json!({ "ignored": true }))
        .await
        .unwrap();
    assert_eq!(resumed.status, RunStatus::Running);
    assert_eq!(resumed.config, config);
    assert_eq!(resumed.checkpoint.as_deref(), Some("/ckpt/120"));
    assert_eq!(resumed.metrics["step"], 120);
    c.update_run(
        "run-1",
        RunStatus::Done,
        &json!({ "val_recall_at_5": 0.81 }),
        Some("/ckpt/final"),
        Some("sha256:heads"),
        None,
    )
    .await
    .unwrap();
    let done = c.run("run-1").await.unwrap().unwrap();
    assert_eq!(done.status, RunStatus::Done);
    assert_eq!(done.fingerprint.as_deref(), Some("sha256:heads"));
    assert_eq!(done.metrics["val_recall_at_5"], 0.81);
    assert!(matches!(
        c.update_run("nope", RunStatus::Done, &json!({}), None, None, None)
            .await
            .unwrap_err(),
        StoreError::UnknownRun(_)
    ));
    c.start_run("run-2", &json!({})).await.unwrap();
    assert_eq!(c.list_runs().await.unwrap().len(), 2);
}

/// Several handles (pools) and tasks claim concurrently: every job is claimed exactly once.
async fn concurrent_claims_take_each_job_once(db: &TestDb) {
    const JOBS: usize = 60;
    let mut ids = BTreeSet::new();
    for i in 0..JOBS {
        ids.insert(
            db.catalog
                .queue_job(&new_job(&format!("s{i:03}"), "fp"))
                .await
                .unwrap()
                .id(),
        );
    }
    let mut handles = vec![db.catalog.clone()];
    for _ in 0..2 {
        handles.push((db.reopen)().await);
    }
    let mut tasks = Vec::new();
    for (h, catalog) in handles.iter().enumerate() {
        for t in 0..3 {
            let catalog = catalog.clone();
            let worker = format!("w{h}-{t}");
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                while let Some(job) = catalog.claim_job(&worker, &opts(60_000)).await.unwrap() {
                    assert_eq!(job.worker.as_deref(), Some(worker.as_str()));
                    catalog.complete_job(job.id, &worker).await.unwrap();
                    mine.push(job.id);
                }
                mine
            }));
        }
    }
    let mut claimed = Vec::new();
    let mut busy_tasks = 0;
    for task in tasks {
        let mine = task.await.unwrap();
        busy_tasks += usize::from(!mine.is_empty());
        claimed.extend(mine);
    }
    claimed.sort_unstable();
    let expected: Vec<i64> = ids.into_iter().collect();
    assert_eq!(claimed, expected, "each job claimed exactly once");
    assert!(
        busy_tasks >= 2,
        "claims were spread over workers ({busy_tasks})"
    );
    let counts = db.catalog.job_counts().await.unwrap();
    assert_eq!(
        (counts.done, counts.queued, counts.running),
        (JOBS as u64, 0, 0)
    );
}

#[tokio::test]
async fn bad_urls_and_paths_are_named() {
    let err = Catalog::connect("mysql://localhost/x").await.unwrap_err();
    assert!(err.to_string().contains("catalog_url"), "{err}");
    let err = Catalog::connect("sqlite:///proc/definitely/not/here.sqlite")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("/proc/definitely/not"), "{err}");
}

#[tokio::test]
async fn migrations_are_idempotent_and_sqlite_file_is_in_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let config = crate::config::StoreConfig::with_data_dir(dir.path().join("data"));
    let c = Catalog::open(&config).await.unwrap();
    c.upsert_slide(&slide("s1", "A")).await.unwrap();
    c.close().await;
    let c = Catalog::open(&config).await.unwrap();
    assert_eq!(c.backend_name(), "sqlite");
    assert!(dir.path().join("data/catalog.sqlite").exists());
    assert!(c.slide("s1").await.unwrap().is_some());
}

/// Processes opening a new SQLite catalog at the same moment (an ingest and a `jobs list`) all
/// get a migrated catalog: none fails on the migration another one applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_opens_of_a_sqlite_catalog_all_succeed() {
    for round in 0..10 {
        let dir = tempfile::tempdir().unwrap();
        let url = crate::config::sqlite_url(&dir.path().join("catalog.sqlite"));
        let opens: Vec<_> = (0..6)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { Catalog::connect(&url).await })
            })
            .collect();
        for o in opens {
            let c = o
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            c.upsert_slide(&slide("s1", "A")).await.unwrap();
        }
    }
}

#[test]
fn sql_macro_spells_each_dialect() {
    let q = |d| sql!(d, "SELECT " NOW " FROM jobs LIMIT 1" SKIP_LOCKED);
    let sqlite = q(Dialect::Sqlite);
    let pg = q(Dialect::Postgres);
    assert!(
        sqlite.contains("julianday") && !sqlite.contains("SKIP LOCKED"),
        "{sqlite}"
    );
    assert!(
        pg.contains("clock_timestamp") && pg.contains("FOR UPDATE SKIP LOCKED"),
        "{pg}"
    );
}

/// A worker that dies mid-job (claims, never renews nor finishes) N times: every claim counts
/// as an attempt when it is made, each dead attempt is recorded as the job's last error, and
/// after `max_attempts` the job is parked as failed, reported once by the claim that parked it,
/// never handed out again (also not after a restart expired the leases), and not re-queued by
/// a plain ingest.
async fn crashed_attempts_park_the_job_with_their_record(db: &TestDb) {
    let c = &db.catalog;
    let id = c.queue_job(&new_job("oom-slide", "fp")).await.unwrap().id();
    let other = c
        .queue_job(&new_job("fine-slide", "fp"))
        .await
        .unwrap()
        .id();
    let lease = 200;
    let options = ClaimOptions {
        max_attempts: 3,
        ..opts(lease)
    };
    let queued = c.job(id).await.unwrap().unwrap();
    assert_eq!(
        (
            queued.attempts,
            queued.first_attempt_at_ms,
            queued.last_attempt_at_ms
        ),
        (0, None, None)
    );
    let mut first_at = None;
    let mut last_at = 0;
    for n in 1..=3u32 {
        let claim = c.claim(&format!("w{n}"), &options).await.unwrap();
        assert!(claim.parked.is_empty());
        let job = claim.job.unwrap();
        assert_eq!(
            (job.id, job.attempts, job.state),
            (id, n, JobState::Running)
        );
        // The attempt is on record before any work: a crash now still counts.
        let stored = c.job(id).await.unwrap().unwrap();
        assert_eq!(stored.attempts, n);
        let at = stored.last_attempt_at_ms.unwrap();
        assert!(at >= last_at);
        last_at = at;
        first_at.get_or_insert(stored.first_attempt_at_ms.unwrap());
        assert_eq!(stored.first_attempt_at_ms, first_at);
        if n > 1 {
            let error = stored.error.unwrap();
            assert!(
                error.contains(&format!("attempt {} (worker w{})", n - 1, n - 1))
                    && error.contains("ended without a result"),
                "{error}"
            );
        }
        // The worker dies: no renewal, no completion. Another start expires its lease.
        tokio::time::sleep(Duration::from_millis(lease + 100)).await;
    }
    let claim = c.claim("w4", &options).await.unwrap();
    assert_eq!(claim.parked.len(), 1, "{claim:?}");
    let parked = &claim.parked[0];
    assert_eq!(
        (parked.id, parked.state, parked.attempts),
        (id, JobState::Failed, 3)
    );
    let error = parked.error.clone().unwrap();
    assert!(
        error.contains("gave up after 3 attempts") && error.contains("w3"),
        "{error}"
    );
    assert_eq!(parked.first_attempt_at_ms, first_at);
    assert_eq!(parked.last_attempt_at_ms, Some(last_at));
    // The same claim goes on with the next job.
    assert_eq!(claim.job.map(|j| j.id), Some(other));
    c.complete_job(other, "w4").await.unwrap();

    // Next start: leases expired, nothing to claim, the parked job is not reported again.
    c.expire_running_leases(None).await.unwrap();
    let claim = c.claim("w5", &options).await.unwrap();
    assert!(claim.job.is_none() && claim.parked.is_empty(), "{claim:?}");
    let job = c.job(id).await.unwrap().unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Failed, 3));
    match c.queue_job(&new_job("oom-slide", "fp")).await.unwrap() {
        QueueOutcome::PreviouslyFailed { id: i, error } => {
            assert_eq!(i, id);
            assert!(error.unwrap().contains("gave up after 3 attempts"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.job_counts().await.unwrap().failed, 1);
}

/// `gigapath jobs cancel|retry`: which states each applies to, what a worker holding a
/// cancelled job is told, and that a cancelled job is not re-queued by a plain ingest.
async fn operators_cancel_and_retry_jobs(db: &TestDb) {
    let c = &db.catalog;
    c.upsert_slide(&slide("a", "A")).await.unwrap();
    let a = c.queue_job(&new_job("a", "fp")).await.unwrap().id();
    let b = c.queue_job(&new_job("b", "fp")).await.unwrap().id();
    let d = c.queue_job(&new_job("d", "fp")).await.unwrap().id();
    let options = opts(60_000);
    assert_eq!(c.claim_job("w1", &options).await.unwrap().unwrap().id, a);

    // A queued and a running job are cancelled.
    let cb = c.cancel_job(b).await.unwrap();
    assert_eq!(cb.state, JobState::Cancelled);
    assert_eq!(cb.error.as_deref(), Some("cancelled by an operator"));
    let ca = c.cancel_job(a).await.unwrap();
    assert_eq!(
        (ca.state, ca.lease_expires_at_ms),
        (JobState::Cancelled, None)
    );
    assert!(ca.error.unwrap().contains("while worker w1 held it"));
    // The worker learns it at its next renewal, and its result is refused: nothing recorded.
    assert!(matches!(
        c.renew_lease(a, "w1", Duration::from_secs(60))
            .await
            .unwrap_err(),
        StoreError::LeaseLost { .. }
    ));
    assert!(matches!(
        c.complete_slide_job(a, "w1", &embedded("a", "fp"))
            .await
            .unwrap_err(),
        StoreError::LeaseLost { .. }
    ));
    assert_eq!(
        c.slide("a").await.unwrap().unwrap().state,
        SlideState::Registered
    );
    assert_eq!(c.job(a).await.unwrap().unwrap().state, JobState::Cancelled);
    // Cancelled jobs are not claimed.
    assert_eq!(c.claim_job("w2", &options).await.unwrap().unwrap().id, d);
    assert!(c.claim_job("w2", &options).await.unwrap().is_none());
    c.complete_job(d, "w2").await.unwrap();

    // What does not apply is refused with the job's state; unknown ids are unknown.
    for (result, state) in [
        (c.cancel_job(a).await, "cancelled"),
        (c.cancel_job(d).await, "done"),
        (c.retry_job(d).await, "done"),
    ] {
        match result.unwrap_err() {
            StoreError::JobState { state: s, .. } => assert_eq!(s, state),
            e => panic!("{e}"),
        }
    }
    assert!(matches!(
        c.retry_job(9_999).await.unwrap_err(),
        StoreError::UnknownJob(9_999)
    ));
    assert!(matches!(
        c.cancel_job(9_999).await.unwrap_err(),
        StoreError::UnknownJob(9_999)
    ));
    let counts = c.job_counts().await.unwrap();
    assert_eq!((counts.cancelled, counts.done, counts.total()), (2, 1, 3));
    let listed = c.list_jobs(Some(JobState::Cancelled), 10).await.unwrap();
    assert_eq!(listed.iter().map(|j| j.id).collect::<Vec<_>>(), vec![a, b]);

    // A plain ingest does not undo a cancel; retry does, with a fresh attempt count.
    assert!(matches!(
        c.queue_job(&new_job("b", "fp")).await.unwrap(),
        QueueOutcome::PreviouslyFailed { .. }
    ));
    let ra = c.retry_job(a).await.unwrap();
    assert_eq!(
        (ra.state, ra.attempts, ra.error, ra.worker),
        (JobState::Queued, 0, None, None)
    );
    let again = c.claim_job("w3", &options).await.unwrap().unwrap();
    assert_eq!((again.id, again.attempts), (a, 1));
    assert!(matches!(
        c.queue_job(&NewJob {
            retry_failed: true,
            ..new_job("b", "fp")
        })
        .await
        .unwrap(),
        QueueOutcome::Requeued { .. }
    ));
}

/// An attempt given back after an infrastructure error is not counted (the slide is not to
/// blame); an attempt that ends in a panic is, and parks the job at the limit.
async fn infrastructure_errors_are_not_counted_as_attempts(db: &TestDb) {
    let c = &db.catalog;
    let id = c.queue_job(&new_job("s", "fp")).await.unwrap().id();
    let options = ClaimOptions {
        max_attempts: 2,
        ..opts(60_000)
    };
    for round in 1..=3u32 {
        let job = c.claim_job("w1", &options).await.unwrap().unwrap();
        assert_eq!((job.attempts, job.deferrals), (1, round - 1));
        c.defer_job(id, "w1", "Qdrant server unavailable")
            .await
            .unwrap();
        let job = c.job(id).await.unwrap().unwrap();
        assert_eq!(
            (job.state, job.attempts, job.deferrals),
            (JobState::Queued, 0, round)
        );
        assert_eq!(job.error.as_deref(), Some("Qdrant server unavailable"));
    }
    assert!(matches!(
        c.defer_job(id, "w1", "x").await.unwrap_err(),
        StoreError::LeaseLost { .. }
    ));

    c.claim_job("w1", &options).await.unwrap().unwrap();
    assert_eq!(
        c.abandon_job(id, "w1", "panicked: boom", 2).await.unwrap(),
        JobState::Queued
    );
    c.claim_job("w1", &options).await.unwrap().unwrap();
    assert_eq!(
        c.abandon_job(id, "w1", "panicked: boom", 2).await.unwrap(),
        JobState::Failed
    );
    let job = c.job(id).await.unwrap().unwrap();
    assert_eq!(
        job.error.as_deref(),
        Some("gave up after 2 attempts: panicked: boom")
    );
    assert!(c.claim_job("w1", &options).await.unwrap().is_none());

    // Which store errors count as infrastructure (retried, never the slide's fault).
    let unavailable = StoreError::Unavailable {
        backend: "Qdrant server",
        url: "http://127.0.0.1:1".into(),
        message: "connection refused".into(),
    };
    assert!(unavailable.is_transient());
    assert!(StoreError::Catalog(sqlx::Error::PoolTimedOut).is_transient());
    assert!(!StoreError::UnknownJob(1).is_transient());
    assert!(!StoreError::InvalidRequest("bad".into()).is_transient());
}

/// `reset_slide` (DELETE /v1/slides/{id}, ingest --replace): refused while a worker holds the
/// job; then state, jobs, embeddings and feature-file rows of that slide go in one transaction,
/// the record, its content identity and its reports stay, and the slide can be queued again.
async fn slide_reset_forgets_the_embedding_and_keeps_the_record(db: &TestDb) {
    let c = &db.catalog;
    for id in ["S1", "S2"] {
        c.upsert_slide(&slide(id, "c")).await.unwrap();
    }
    assert_eq!(c.slide_content("S1").await.unwrap(), None);
    c.set_slide_content("S1", r#"{"size":1}"#).await.unwrap();
    assert!(matches!(
        c.set_slide_content("NOPE", "x").await,
        Err(StoreError::UnknownSlide(_))
    ));
    c.upsert_report(&NewReport {
        id: "R1".into(),
        slide_id: "S1".into(),
        text: "a report".into(),
        labels: BTreeMap::new(),
    })
    .await
    .unwrap();
    c.mark_report_embedded("R1", "reports", "fp-text")
        .await
        .unwrap();
    let job = |subject: &str| NewJob {
        kind: "embed_slide".into(),
        subject: subject.into(),
        fingerprint: "fp".into(),
        payload: json!({}),
        retry_failed: false,
    };
    let reset = |id: &'static str| SlideReset {
        slide_id: id,
        job_kind: "embed_slide",
        slide_collection: "slides",
        report_collection: Some("reports"),
    };
    let mut claimed = Vec::new();
    for id in ["S1", "S2"] {
        c.queue_job(&job(id)).await.unwrap();
        claimed.push(
            c.claim_job("w", &ClaimOptions::default())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(
        c.reset_slide(&reset("S1")).await.unwrap(),
        ResetOutcome::Busy {
            job_id: claimed[0].id
        }
    );
    for (j, id) in claimed.iter().zip(["S1", "S2"]) {
        let embedded = EmbeddedSlide {
            slide_id: id.into(),
            tile_count: 5,
            fingerprint: "fp".into(),
            fingerprints: BTreeMap::from([("tile".into(), "t".into())]),
            collection: "slides".into(),
        };
        c.complete_slide_job(j.id, "w", &embedded).await.unwrap();
        c.record_feature_file(&FeatureFileRecord {
            slide_id: id.into(),
            tile_fingerprint: "t".into(),
            path: format!("/features/{id}"),
            sha256: "x".into(),
            size_bytes: 1,
            tile_count: 5,
            created_at: 0,
        })
        .await
        .unwrap();
    }
    assert_eq!(
        c.reset_slide(&reset("S1")).await.unwrap(),
        ResetOutcome::Reset {
            feature_files: vec!["/features/S1".into()],
            reports: vec!["R1".into()],
        }
    );
    let rec = c.slide("S1").await.unwrap().unwrap();
    assert_eq!(rec.state, SlideState::Registered);
    assert_eq!((rec.fingerprint, rec.tile_count), (None, None));
    assert!(rec.fingerprints.is_empty());
    assert_eq!(rec.path, "/slides/S1.svs");
    assert_eq!(rec.labels["subtype"], "LUAD");
    assert_eq!(
        c.slide_content("S1").await.unwrap().as_deref(),
        Some(r#"{"size":1}"#)
    );
    assert!(c.job(claimed[0].id).await.unwrap().is_none());
    assert!(c.feature_file("S1", "t").await.unwrap().is_none());
    assert_eq!(c.report("R1").await.unwrap().unwrap().fingerprint, None);
    assert!(c
        .embedding_fingerprints("reports")
        .await
        .unwrap()
        .is_empty());
    // S2 untouched: the counts agree with one embedded slide.
    assert_eq!(c.embedding_fingerprints("slides").await.unwrap()["fp"], 1);
    assert_eq!(c.slide_counts().await.unwrap()[&SlideState::Embedded], 1);
    assert_eq!(c.job_counts().await.unwrap().done, 1);
    assert!(c.feature_file("S2", "t").await.unwrap().is_some());
    // Queued anew, not "already done".
    assert!(matches!(
        c.queue_job(&job("S1")).await.unwrap(),
        QueueOutcome::Queued { .. }
    ));
    assert_eq!(
        c.reset_slide(&reset("NOPE")).await.unwrap(),
        ResetOutcome::Unknown
    );
}
