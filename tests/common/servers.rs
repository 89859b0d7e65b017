//! Servers that the server-path tests start for themselves, so that they can kill and restart
//! them: Qdrant (one node or a cluster, `../shared/qdrant/start.sh` on a free base port) and a
//! throwaway PostgreSQL (`scripts/start-test-postgres.sh`, restarted with `pg_ctl` as that script
//! runs it). Each `start` returns `None` after printing why when the server cannot be had here,
//! and the test then says SKIPPED and passes. Also: an HTTP helper over the service's client, and child cleanup.

use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::repo;

/// One HTTP/1.1 exchange on loopback (`Connection: close`, through the service's own client,
/// [`gigapath_api::client`]): status and JSON body (`Null` when the body is not JSON). `key`
/// goes in `X-Api-Key`. A refused connection is status 0.
pub fn http(
    base: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    key: Option<&str>,
) -> (u16, Value) {
    let addr = base.trim_start_matches("http://").trim_end_matches('/');
    let Some(addr) = addr.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
        return (0, Value::Null);
    };
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let mut headers = Vec::new();
    if let Some(k) = key {
        headers.push(("X-Api-Key", k));
    }
    if body.is_some() {
        headers.push(("Content-Type", "application/json"));
    }
    let sent = gigapath_api::client::exchange(
        addr,
        method,
        path,
        &headers,
        Some(payload.as_bytes()),
        Duration::from_secs(60),
    );
    match sent {
        Ok(r) => (
            r.status,
            serde_json::from_slice(&r.body).unwrap_or(Value::Null),
        ),
        Err(_) => (0, Value::Null),
    }
}

/// Waits for `done`, failing the test with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Children are killed when the test ends, however it ends.
#[derive(Default)]
pub struct Procs(pub Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A folder of process logs, printed (last lines of each) when the test fails.
pub struct PrintLogs(pub PathBuf);

impl Drop for PrintLogs {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for entry in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(25).collect();
            eprintln!("--- {}:", entry.path().display());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// A base port with the `nodes` x {REST, gRPC, p2p} ports of start.sh free (base + 10 i + 0..3).
pub fn free_base(nodes: usize) -> u16 {
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as u64);
    for attempt in 0..200u64 {
        let base = 20_000 + ((seed.wrapping_mul(7919) + attempt * 131) % 30_000) as u16;
        let free = (0..nodes).all(|i| {
            (0..3).all(|k| TcpListener::bind(("127.0.0.1", base + 10 * i as u16 + k)).is_ok())
        });
        if free {
            return base;
        }
    }
    panic!("no free port range for Qdrant");
}

/// Qdrant nodes from `../shared/qdrant/start.sh`, stopped (and their storage removed) on drop.
pub struct Qdrant {
    /// QDRANT_DIR: `node<i>/` holds each node's storage, log and pid.
    pub dir: PathBuf,
    pub base: u16,
    pub nodes: usize,
    /// Nodes this test started again (its own children).
    restarted: Vec<Child>,
}

impl Qdrant {
    /// `start.sh --nodes N --port <free base>`; `None` (with the reason printed) when
    /// `../shared/qdrant` is absent or the server does not start.
    pub fn start(nodes: usize) -> Option<Qdrant> {
        let script = repo().join("../shared/qdrant/start.sh");
        if !script.is_file() {
            eprintln!("no {}: no Qdrant server here", script.display());
            return None;
        }
        let base = free_base(nodes);
        let out = Command::new("bash")
            .arg(&script)
            .args(["--nodes", &nodes.to_string(), "--port", &base.to_string()])
            .stdin(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "start.sh --nodes {nodes} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let dir = stdout
            .split_whitespace()
            .find_map(|w| w.strip_prefix("QDRANT_DIR="))
            .map(PathBuf::from)?;
        Some(Qdrant {
            dir,
            base,
            nodes,
            restarted: Vec::new(),
        })
    }

    pub fn rest(&self, node: usize) -> String {
        format!("http://127.0.0.1:{}", self.base + 10 * node as u16)
    }

    pub fn grpc(&self, node: usize) -> String {
        format!("http://127.0.0.1:{}", self.base + 10 * node as u16 + 1)
    }

    fn node_dir(&self, node: usize) -> PathBuf {
        self.dir.join(format!("node{node}"))
    }

    pub fn pid(&self, node: usize) -> String {
        std::fs::read_to_string(self.node_dir(node).join("pid"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// `kill -9` of one node (no shutdown: storage as a crash leaves it), waited until its
    /// REST port is closed.
    pub fn kill(&self, node: usize) {
        let pid = self.pid(node);
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
        let rest = self.base + 10 * node as u16;
        wait_for(
            "the killed node's port to close",
            Duration::from_secs(20),
            || TcpStream::connect(("127.0.0.1", rest)).is_err(),
        );
    }

    /// Starts a killed node again on its own storage and ports, with the environment and
    /// arguments that start.sh gave it (cluster nodes rejoin through their stored Raft state),
    /// and waits until it is ready.
    pub fn restart(&mut self, node: usize) {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"));
        let bin = cache.join("gigapath-qdrant/qdrant-1.18.3");
        let n = self.node_dir(node);
        let (rest, grpc, p2p) = (
            self.base + 10 * node as u16,
            self.base + 10 * node as u16 + 1,
            self.base + 10 * node as u16 + 2,
        );
        let mut cmd = Command::new(bin);
        cmd.current_dir(&n)
            .env("QDRANT__SERVICE__HOST", "127.0.0.1")
            .env("QDRANT__SERVICE__HTTP_PORT", rest.to_string())
            .env("QDRANT__SERVICE__GRPC_PORT", grpc.to_string())
            .env("QDRANT__CLUSTER__ENABLED", (self.nodes > 1).to_string())
            .env("QDRANT__CLUSTER__P2P__PORT", p2p.to_string())
            .env("QDRANT__TELEMETRY_DISABLED", "true")
            .env("QDRANT__STORAGE__STORAGE_PATH", n.join("storage"))
            .env("QDRANT__STORAGE__SNAPSHOTS_PATH", n.join("snapshots"))
            .env("QDRANT__LOG_LEVEL", "WARN");
        if self.nodes > 1 {
            cmd.args(["--uri", &format!("http://127.0.0.1:{p2p}")]);
            if node > 0 {
                cmd.args([
                    "--bootstrap",
                    &format!("http://127.0.0.1:{}", self.base + 2),
                ]);
            }
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(n.join("log"))
            .unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        std::fs::write(n.join("pid"), child.id().to_string()).unwrap();
        self.restarted.push(child);
        let url = self.rest(node);
        wait_for("the restarted Qdrant node", Duration::from_secs(60), || {
            http(&url, "GET", "/readyz", None, None).0 == 200
        });
    }

    /// Exact point count of `collection` asked of one node.
    pub fn count(&self, node: usize, collection: &str) -> Option<u64> {
        let (code, v) = http(
            &self.rest(node),
            "POST",
            &format!("/collections/{collection}/points/count"),
            Some(&serde_json::json!({"exact": true})),
            None,
        );
        (code == 200)
            .then(|| v["result"]["count"].as_u64())
            .flatten()
    }
}

impl Drop for Qdrant {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo().join("../shared/qdrant/start.sh"))
            .arg("--stop")
            .arg(&self.dir)
            .output();
        for c in &mut self.restarted {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn as_owner(program: &Path) -> Command {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// The PostgreSQL server binaries (as scripts/start-test-postgres.sh finds them).
fn pg_bindir() -> Option<PathBuf> {
    if let Ok(o) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        if dir.join("initdb").is_file() {
            return Some(dir);
        }
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|d| d.join("initdb").is_file())
        .collect();
    dirs.sort();
    dirs.pop()
}

/// A throwaway PostgreSQL cluster of this test (scripts/start-test-postgres.sh), removed on drop.
pub struct Postgres {
    /// `postgres://postgres@127.0.0.1:PORT/gigapath_test`
    pub url: String,
    pub dir: PathBuf,
    port: u16,
    bindir: PathBuf,
}

impl Postgres {
    /// `None` (with the reason printed) without the PostgreSQL server binaries.
    pub fn start() -> Option<Postgres> {
        let Some(bindir) = pg_bindir() else {
            eprintln!("no PostgreSQL server binaries (initdb, pg_ctl) here");
            return None;
        };
        let out = Command::new("bash")
            .arg(repo().join("scripts/start-test-postgres.sh"))
            .stdin(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "start-test-postgres.sh failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let var = |name: &str| {
            stdout
                .split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")).map(str::to_string))
        };
        let url = var("GIGAPATH_TEST_POSTGRES_URL")?;
        let dir = PathBuf::from(var("GIGAPATH_TEST_POSTGRES_DIR")?);
        let port = url.rsplit_once(':')?.1.split('/').next()?.parse().ok()?;
        Some(Postgres {
            url,
            dir,
            port,
            bindir,
        })
    }

    /// Stops the server at once (`pg_ctl -m immediate`: connections cut, as in a crash).
    pub fn stop_server(&self) {
        let out = as_owner(&self.bindir.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts it again on the same data and port, as the script does.
    pub fn start_server(&self) {
        let d = self.dir.display();
        let out = as_owner(&self.bindir.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-w", "-t", "60", "-o"])
            .arg(format!(
                "-p {} -k {d} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
                self.port
            ))
            .arg("start")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// One number from a SQL query.
    pub fn number(&self, query: &str) -> u64 {
        let out = Command::new("psql")
            .args([&self.url, "-tAc", query])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{query}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo().join("scripts/start-test-postgres.sh"))
            .arg("--stop")
            .arg(&self.dir)
            .output();
    }
}
