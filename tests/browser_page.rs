//! The web page end to end in headless Chromium: a small synthetic cohort goes through the real
//! binary (models init, synth cohort, ingest, train, reembed), `gigapath serve` serves it, and
//! `tests/browser/page.mjs` (Playwright driving Debian's chromium) uses the page at `/` like a
//! person: a report search, a slide search whose thumbnails must load, a click on the first
//! slide, its zero-shot panel, a prompt heatmap. Every request that leaves the server is blocked
//! and must not happen (the page works offline). Screenshots land in
//! `<target>/test-output/browser/` (the paths are printed).
//!
//! Needs Chromium, Node.js and `tests/browser/node_modules` (`scripts/setup.sh` and `.ci/run`
//! install them); without them the test fails and says how to get them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::{gigapath, ingest_cohort, repo, run, small_cohort};

/// Chromium's path, or a failure that says how to install what is missing.
fn prerequisites() -> PathBuf {
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let mut missing = Vec::new();
    if !chromium.is_file() {
        missing.push(format!(
            "Chromium at {} (Debian: `apt-get install -y chromium`; or set CHROMIUM=/path/to/chromium)",
            chromium.display()
        ));
    }
    let node = Command::new("node").arg("--version").output();
    if !matches!(&node, Ok(o) if o.status.success()) {
        missing.push("Node.js >= 18 (Debian: `apt-get install -y nodejs npm`)".into());
    }
    if !repo()
        .join("tests/browser/node_modules/playwright-core/package.json")
        .is_file()
    {
        missing.push("playwright-core (`npm ci --prefix tests/browser`)".into());
    }
    assert!(
        missing.is_empty(),
        "the browser test needs:\n  - {}\n`scripts/setup.sh` (and `.ci/run`) install them.",
        missing.join("\n  - ")
    );
    chromium
}

/// `gigapath serve` on a free port; killed when dropped.
struct Server {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Server {
    fn start(data: &Path, log: PathBuf) -> Server {
        let mut child = gigapath()
            .args(["serve", "--data-dir"])
            .arg(data)
            .args(["--bind", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // The first stdout line says where it listens; the rest is drained so that it never
        // blocks on a full pipe.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        let mut server = Server {
            child,
            url: String::new(),
            log,
        };
        let line = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(Some(Ok(line))) => line,
            other => panic!(
                "gigapath serve printed no address ({other:?}): {}",
                server.stderr()
            ),
        };
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("gigapath serve printed {line:?}: {e}"));
        server.url = v["listening"].as_str().expect("listening").to_string();
        server
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Status code and body of `GET path` (HTTP/1.0, no client library needed).
    fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let host = self.url.trim_start_matches("http://");
        let mut s = TcpStream::connect(host)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let code = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        Ok((code, body.to_string()))
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("gigapath serve exited ({status}): {}", self.stderr());
            }
            match self.get("/readyz") {
                Ok((200, _)) => return,
                r if start.elapsed() > Duration::from_secs(60) => {
                    panic!("/readyz not ready after 60 s ({r:?}): {}", self.stderr())
                }
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `node tests/browser/page.mjs URL OUTDIR`, killed after `limit`.
fn drive_page(chromium: &Path, url: &str, out_dir: &Path, limit: Duration) -> Output {
    let child = Command::new("node")
        .arg(repo().join("tests/browser/page.mjs"))
        .arg(url)
        .arg(out_dir)
        .env("CHROMIUM", chromium)
        .current_dir(repo())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // Only the node process this test started (Chromium dies with its parent's pipe).
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("page.mjs did not finish within {limit:?}");
        }
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_page_searches_opens_a_slide_and_shows_its_zero_shot_panel() {
    let chromium = prerequisites();
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let r = |p: &str| root.join(p).display().to_string();

    // A small cohort through the real binary, trained and re-embedded (joint vectors).
    small_cohort(root, 4, 600, "gigapath.toml", "");
    ingest_cohort(root, "gigapath.toml");
    std::fs::write(
        root.join("run.toml"),
        "[optim]\nsteps = 60\nbatch_size = 4\nwarmup_steps = 5\n[checkpoint]\nevery_steps = 60\n[eval]\nevery_steps = 60\n",
    )
    .unwrap();
    run(&[
        "train",
        "--data-dir",
        &r("data"),
        "--config",
        &r("run.toml"),
        "--run-id",
        "page",
        "--json",
    ]);
    run(&[
        "reembed",
        "--data-dir",
        &r("data"),
        "--alignment",
        &r("data/alignment/page"),
    ]);
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("cohort/manifest.json")).unwrap())
            .unwrap();
    let subtypes: Vec<String> = manifest["spec"]["subtypes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    let t_data = t0.elapsed();

    let mut server = Server::start(&root.join("data"), root.join("serve.log"));
    server.wait_ready();
    let (code, _) = server.get("/").unwrap();
    assert_eq!(code, 200, "GET /");

    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-output/browser");
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir).unwrap();
    let t1 = Instant::now();
    let out = drive_page(&chromium, &server.url, &out_dir, Duration::from_secs(240));
    let t_page = t1.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Option<Value> = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok());
    assert!(
        out.status.success(),
        "page.mjs failed ({}): {}\nstderr: {stderr}\nscreenshot: {}\nserver log:\n{}",
        out.status,
        report
            .as_ref()
            .map(|v| v.to_string())
            .unwrap_or_else(|| stdout.to_string()),
        out_dir.join("failure.png").display(),
        server.stderr()
    );
    drop(server);
    let v = report.unwrap_or_else(|| panic!("no JSON from page.mjs: {stdout}"));
    let ctx = || serde_json::to_string_pretty(&v).unwrap();

    // Offline and clean: nothing left the server, nothing failed, no script errors.
    for key in [
        "blocked_requests",
        "failed_requests",
        "http_errors",
        "page_errors",
        "console_errors",
    ] {
        assert!(
            strings(&v[key]).is_empty(),
            "{key}: {:?}\n{}",
            strings(&v[key]),
            ctx()
        );
    }
    assert_eq!(v["index_status"], 200);
    // ... and all that under the page's Content-Security-Policy (violations are console errors).
    assert!(
        v["index_csp"].as_str().is_some_and(
            |c| c.contains("default-src 'self'") && c.contains("frame-ancestors 'none'")
        ),
        "GET / without its Content-Security-Policy\n{}",
        ctx()
    );

    // Report search: every result card shows its report text.
    let reports = v["reports"]["cards"].as_array().unwrap();
    assert!(!reports.is_empty(), "no report results\n{}", ctx());
    assert_eq!(
        reports.len() as u64,
        v["reports"]["api_results"].as_u64().unwrap()
    );
    assert!(reports
        .iter()
        .all(|c| c["report"].as_str().is_some_and(|t| !t.is_empty())));

    // Slide search: cards with scores, and thumbnails that actually loaded.
    let cards = v["slides"]["cards"].as_array().unwrap();
    assert!(!cards.is_empty(), "no slide results\n{}", ctx());
    assert_eq!(
        cards.len() as u64,
        v["slides"]["api_results"].as_u64().unwrap()
    );
    assert!(cards.iter().all(|c| c["score"]
        .as_str()
        .is_some_and(|s| s.parse::<f32>().is_ok())));
    let thumbs = v["thumbnails"].as_array().unwrap();
    assert_eq!(thumbs.len(), cards.len());
    for t in thumbs {
        assert!(
            t["naturalWidth"].as_u64().unwrap_or(0) > 0,
            "thumbnail did not load: {t}"
        );
    }

    // The slide view: title, overlay picture, and the prompt set that fits its labels.
    let first = cards[0]["slide"].as_str().unwrap();
    assert_eq!(v["slide"]["title"], first);
    assert!(
        v["overlay"]["naturalWidth"].as_u64().unwrap_or(0) > 0,
        "overlay did not load\n{}",
        ctx()
    );
    assert_eq!(
        v["slide"]["prompt_set"],
        "rcc",
        "the page should preselect the kidney set\n{}",
        ctx()
    );

    // The zero-shot panel: probabilities over the cohort's subtypes summing to 1, shown as such.
    let zs = &v["zero_shot"];
    assert!(zs["error"].is_null(), "zero-shot panel error\n{}", ctx());
    let probs = zs["api"]["probabilities"]
        .as_object()
        .expect("probabilities");
    let mut labels: Vec<&String> = probs.keys().collect();
    labels.sort();
    let mut expected: Vec<&String> = subtypes.iter().collect();
    expected.sort();
    assert_eq!(labels, expected, "{}", ctx());
    let sum: f64 = probs.values().map(|p| p.as_f64().unwrap()).sum();
    assert!((sum - 1.0).abs() < 1e-3, "probabilities sum to {sum}");
    let predicted = zs["predicted"].as_str().expect("predicted class shown");
    assert!(
        subtypes.iter().any(|s| s == predicted),
        "predicted {predicted}"
    );
    assert_eq!(zs["api"]["predicted"], predicted);
    let rows = zs["rows"].as_array().unwrap();
    assert_eq!(rows.len(), subtypes.len());
    let shown: f64 = rows.iter().map(|r| r["percent"].as_f64().unwrap()).sum();
    assert!((shown - 100.0).abs() < 0.5, "the panel shows {shown}%");

    // The heatmap, drawn over the overlay.
    let hm = &v["heatmap"];
    assert!(
        hm["message"]
            .as_str()
            .is_some_and(|m| m.contains("similarity")),
        "heatmap: {hm}"
    );
    assert!(
        hm["painted_pixels"].as_u64().unwrap_or(0) > 0,
        "heatmap painted nothing: {hm}"
    );

    for s in strings(&v["screenshots"]) {
        assert!(Path::new(&s).is_file(), "{s}");
        println!("screenshot: {s}");
    }
    println!(
        "browser test: data {:.1} s, page {:.1} s; {} slide results, {first} predicted {predicted} ({})",
        t_data.as_secs_f64(),
        t_page.as_secs_f64(),
        cards.len(),
        rows.iter()
            .map(|r| format!("{} {}%", r["label"].as_str().unwrap_or("?"), r["percent"]))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
