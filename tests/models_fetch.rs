//! `gigapath models fetch` against a local stand-in for the Hugging Face hub on 127.0.0.1 (no
//! test touches the internet): metadata, token, redirects, resume from a `.part` file, size and
//! hash checks, and the gated-repository message.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

const TOKEN: &str = "hf_test_token_123";
const REPO: &str = "prov-gigapath/prov-gigapath";

/// What the stand-in hub serves and how it misbehaves.
#[derive(Clone, Default)]
struct Behaviour {
    /// 403 to every request (a gated repository whose licence was not accepted).
    forbid: bool,
    /// Serve the weights with one byte flipped (the listed sha256 no longer matches).
    corrupt: bool,
    /// List a size one byte larger than the file.
    wrong_size: bool,
}

struct Hub {
    url: String,
    /// Every request: (path, Range header, Authorization header).
    log: Arc<Log>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Release files: a small config and two "large" (LFS) files.
fn files() -> Vec<(&'static str, Vec<u8>, bool)> {
    let weights: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let slide: Vec<u8> = (0..50_000u32).map(|i| (i * 13 % 241) as u8).collect();
    vec![
        (
            "config.json",
            br#"{"architecture": "vit_giant_patch14_dinov2"}"#.to_vec(),
            false,
        ),
        ("pytorch_model.bin", weights, true),
        ("slide_encoder.pth", slide, true),
    ]
}

fn start_hub(b: Behaviour) -> Hub {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (b, log) = (b.clone(), log2.clone());
            std::thread::spawn(move || serve(stream, &b, &log));
        }
    });
    Hub { url, log }
}

type Log = Mutex<Vec<(String, Option<String>, Option<String>)>>;

fn serve(mut stream: TcpStream, b: &Behaviour, log: &Log) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let (mut range, mut auth) = (None, None);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap_or((&h, ""));
        match k.to_ascii_lowercase().as_str() {
            "range" => range = Some(v.trim().to_string()),
            "authorization" => auth = Some(v.trim().to_string()),
            _ => {}
        }
    }
    log.lock()
        .unwrap()
        .push((path.clone(), range.clone(), auth.clone()));
    let respond = |stream: &mut TcpStream, status: &str, headers: &[String], body: &[u8]| {
        let mut head = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for h in headers {
            head.push_str(h);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(body);
    };
    if b.forbid {
        return respond(&mut stream, "403 Forbidden", &[], b"gated");
    }
    if auth.as_deref() != Some(&format!("Bearer {TOKEN}")) {
        return respond(&mut stream, "401 Unauthorized", &[], b"no token");
    }
    let files = files();
    if path == format!("/api/models/{REPO}/revision/main?blobs=true") {
        let siblings: Vec<serde_json::Value> = files
            .iter()
            .map(|(name, bytes, lfs)| {
                let size = bytes.len() as u64 + u64::from(b.wrong_size && *lfs);
                match lfs {
                    true => serde_json::json!({"rfilename": name, "size": size,
                        "lfs": {"sha256": sha256_hex(bytes), "size": size, "pointerSize": 134}}),
                    false => serde_json::json!({"rfilename": name, "size": size}),
                }
            })
            .chain([serde_json::json!({"rfilename": "README.md", "size": 10})])
            .collect();
        let body = serde_json::json!({"id": REPO, "siblings": siblings}).to_string();
        return respond(&mut stream, "200 OK", &[], body.as_bytes());
    }
    // LFS files redirect to a "CDN" path on the same host, as the hub does.
    let resolve = format!("/{REPO}/resolve/main/");
    if let Some(name) = path.strip_prefix(&resolve) {
        if files.iter().any(|(n, _, lfs)| *n == name && *lfs) {
            let to = format!("Location: /cdn/{name}");
            return respond(&mut stream, "302 Found", &[to], b"");
        }
    }
    let name = path
        .strip_prefix(&resolve)
        .or_else(|| path.strip_prefix("/cdn/"))
        .unwrap_or("");
    let Some((_, bytes, _)) = files.iter().find(|(n, _, _)| *n == name) else {
        return respond(&mut stream, "404 Not Found", &[], b"");
    };
    let mut bytes = bytes.clone();
    if b.corrupt && name == "pytorch_model.bin" {
        bytes[1234] ^= 0xff;
    }
    let from = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse::<usize>().ok());
    match from {
        Some(from) if from < bytes.len() => {
            let cr = format!(
                "Content-Range: bytes {from}-{}/{}",
                bytes.len() - 1,
                bytes.len()
            );
            respond(&mut stream, "206 Partial Content", &[cr], &bytes[from..])
        }
        _ => respond(&mut stream, "200 OK", &[], &bytes),
    }
}

fn fetch(hub: &Hub, to: &Path, token: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gigapath"));
    cmd.args(["models", "fetch", "prov-gigapath", "--to"])
        .arg(to)
        .args(["--endpoint", &hub.url])
        .env("GIGAPATH_LOG", "warn")
        .env_remove("HF_TOKEN")
        .env_remove("HUGGING_FACE_HUB_TOKEN")
        .env_remove("HF_ENDPOINT");
    for k in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        cmd.env_remove(k);
    }
    if let Some(t) = token {
        cmd.env("HF_TOKEN", t);
    }
    cmd.output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn fetch_downloads_verifies_and_writes_one_release_folder() {
    let hub = start_hub(Behaviour::default());
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("prov-gigapath");
    let out = fetch(&hub, &to, Some(TOKEN));
    assert!(out.status.success(), "{}", stderr(&out));
    for (name, bytes, _) in files() {
        assert_eq!(std::fs::read(to.join(name)).unwrap(), bytes, "{name}");
        assert!(!to.join(format!("{name}.part")).exists());
    }
    assert!(
        !to.join("README.md").exists(),
        "only the files gigapath reads"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["repo"], REPO);
    assert_eq!(report["files"].as_array().unwrap().len(), 3);
    let log = hub.log.lock().unwrap().clone();
    assert!(
        log.iter()
            .all(|(_, _, auth)| auth.as_deref() == Some(&format!("Bearer {TOKEN}"))),
        "the token goes with every request to the hub's host: {log:?}"
    );

    // A second run finds every file verified and downloads nothing.
    let before = hub.log.lock().unwrap().len();
    let out = fetch(&hub, &to, Some(TOKEN));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("already there, verified"));
    let after = hub.log.lock().unwrap().len();
    assert_eq!(after - before, 1, "only the metadata request");
}

#[test]
fn fetch_resumes_a_truncated_part_file() {
    let hub = start_hub(Behaviour::default());
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("w");
    std::fs::create_dir_all(&to).unwrap();
    let weights = files()[1].1.clone();
    std::fs::write(to.join("pytorch_model.bin.part"), &weights[..100_000]).unwrap();
    let out = fetch(&hub, &to, Some(TOKEN));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(to.join("pytorch_model.bin")).unwrap(),
        weights
    );
    assert!(!to.join("pytorch_model.bin.part").exists());
    let log = hub.log.lock().unwrap().clone();
    let ranged: Vec<_> = log
        .iter()
        .filter(|(p, _, _)| p.ends_with("pytorch_model.bin"))
        .map(|(p, r, _)| (p.clone(), r.clone()))
        .collect();
    assert!(
        ranged
            .iter()
            .any(|(p, r)| p.starts_with("/cdn/") && r.as_deref() == Some("bytes=100000-")),
        "the rest was asked for with a Range request, through the redirect: {ranged:?}"
    );
    assert!(
        stderr(&out).contains("resuming at 100000"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn fetch_refuses_a_hash_or_size_mismatch_and_keeps_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(Behaviour {
        corrupt: true,
        ..Behaviour::default()
    });
    let to = dir.path().join("a");
    let out = fetch(&hub, &to, Some(TOKEN));
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("pytorch_model.bin: sha256 mismatch") && !err.contains("panicked"),
        "{err}"
    );
    assert!(!to.join("pytorch_model.bin").exists());
    assert!(!to.join("pytorch_model.bin.part").exists());

    let hub = start_hub(Behaviour {
        wrong_size: true,
        ..Behaviour::default()
    });
    let to = dir.path().join("b");
    let out = fetch(&hub, &to, Some(TOKEN));
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("pytorch_model.bin: size mismatch"), "{err}");
    assert!(!to.join("pytorch_model.bin").exists());
}

#[test]
fn fetch_explains_a_gated_repository() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(Behaviour {
        forbid: true,
        ..Behaviour::default()
    });
    let out = fetch(&hub, &dir.path().join("x"), Some(TOKEN));
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("403") && err.contains("accept its licence") && err.contains(REPO),
        "{err}"
    );

    // Without a token: 401, and the message says which variable to set.
    let hub = start_hub(Behaviour::default());
    let out = fetch(&hub, &dir.path().join("y"), None);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("401") && err.contains("HF_TOKEN"), "{err}");
    assert!(!err.contains(TOKEN));

    let out = Command::new(env!("CARGO_BIN_EXE_gigapath"))
        .args(["models", "fetch", "no-such-model", "--to"])
        .arg(dir.path().join("z"))
        .args(["--endpoint", &hub.url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("unknown model \"no-such-model\""));
}
