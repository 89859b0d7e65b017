//! `gigapath models init`: small random model folders for tests and the demo.
//! `gigapath models fetch`: the Prov-GigaPath release from the Hugging Face hub, opt-in, with the
//! user's token, verified and resumable.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use gigapath_models::init::{
    init_slide_encoder, init_tile_encoder, SlideSize, TileSize, SMALL, TINY,
};
use sha2::{Digest, Sha256};

#[derive(Subcommand)]
pub enum ModelsCommand {
    /// Write `DIR/tile` and `DIR/slide`: a small tile encoder (timm ViT) and a matching small
    /// LongNet slide encoder with seeded random weights. They run the real code paths; they are
    /// not trained models (the real, gated weights: `gigapath models fetch`).
    Init(InitArgs),
    /// Download a released model from the Hugging Face hub into one folder (opt-in; nothing
    /// else in gigapath downloads weights). `prov-gigapath` is the gated
    /// `prov-gigapath/prov-gigapath` repository: accept its licence on the model page, then set
    /// `HF_TOKEN` (or `HUGGING_FACE_HUB_TOKEN`) to an access token. Sizes and SHA-256 are checked
    /// against the hub's metadata; an interrupted download resumes from `FILE.part`. The folder
    /// then serves both encoders: `models.weights = DIR`.
    Fetch(FetchArgs),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Preset {
    /// Tile: 96-d, 2 blocks, 3 heads. Slide: 128-d, 2 layers, 16 heads.
    Tiny,
    /// Tile: 192-d, 4 blocks, 3 heads. Slide: 256-d, 4 layers, 16 heads.
    Small,
}

impl Preset {
    /// The preset's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
        }
    }

    /// Tile and slide encoder sizes.
    pub fn sizes(self) -> (TileSize, SlideSize) {
        match self {
            Preset::Tiny => TINY,
            Preset::Small => SMALL,
        }
    }
}

#[derive(Args)]
pub struct InitArgs {
    /// Output folder (gets `tile/` and `slide/`).
    #[arg(long, short)]
    pub output: PathBuf,
    #[arg(long, value_enum, default_value = "tiny")]
    pub preset: Preset,
    /// Seed of the weights (same seed, same bytes, same fingerprint).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args)]
pub struct FetchArgs {
    /// `prov-gigapath` (the tile and slide encoders), or a hub repository `OWNER/NAME`.
    pub model: String,
    /// Folder to download into (created; files already there and verified are kept).
    #[arg(long)]
    pub to: PathBuf,
    /// Branch, tag or commit of the repository.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Hub base URL (a mirror, or a local server in tests).
    #[arg(long, env = "HF_ENDPOINT", default_value = "https://huggingface.co")]
    pub endpoint: String,
}

pub fn run(cmd: ModelsCommand) -> Result<()> {
    match cmd {
        ModelsCommand::Init(a) => init(a),
        ModelsCommand::Fetch(a) => fetch(a),
    }
}

fn init(args: InitArgs) -> Result<()> {
    let (tile, slide) = args.preset.sizes();
    let (tile_dir, slide_dir) = (args.output.join("tile"), args.output.join("slide"));
    init_tile_encoder(&tile_dir, tile, args.seed)?;
    init_slide_encoder(&slide_dir, slide, args.seed.wrapping_add(1))?;
    println!(
        "{}",
        serde_json::json!({"tile_encoder": tile_dir, "slide_encoder": slide_dir, "seed": args.seed})
    );
    Ok(())
}

/// Hub repository of each model name `models fetch` knows.
const KNOWN_MODELS: &[(&str, &str)] = &[("prov-gigapath", "prov-gigapath/prov-gigapath")];

/// The files of the release gigapath reads: the tile encoder's timm config and weights (one of
/// the two weight files: safetensors when the repository has it) and the slide encoder.
const RELEASE_FILES: &[&[&str]] = &[
    &["config.json"],
    &["model.safetensors", "pytorch_model.bin"],
    &["slide_encoder.pth"],
];

/// One file of a hub repository, as `api/models/{repo}/revision/{rev}?blobs=true` lists it.
#[derive(Debug, serde::Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    lfs: Option<Lfs>,
}

#[derive(Debug, serde::Deserialize)]
struct Lfs {
    sha256: String,
    size: u64,
}

#[derive(Debug, serde::Deserialize)]
struct RepoInfo {
    #[serde(default)]
    siblings: Vec<Sibling>,
}

/// What a downloaded file must be.
struct Expected {
    name: String,
    size: u64,
    /// The LFS object's SHA-256 (large files); small files are checked by size.
    sha256: Option<String>,
}

/// The user's token from the environment, if any.
fn hf_token() -> Option<String> {
    ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .map(|t| t.trim().to_string())
        .find(|t| !t.is_empty())
}

struct Hub {
    agent: ureq::Agent,
    endpoint: String,
    repo: String,
    revision: String,
    token: Option<String>,
}

impl Hub {
    fn get(&self, url: &str, range_from: u64) -> Result<ureq::http::Response<ureq::Body>> {
        let mut req = self.agent.get(url);
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        if range_from > 0 {
            req = req.header("Range", format!("bytes={range_from}-"));
        }
        let resp = req.call().with_context(|| format!("GET {url}"))?;
        let status = resp.status().as_u16();
        if status < 400 {
            return Ok(resp);
        }
        let page = format!("{}/{}", self.endpoint, self.repo);
        let token_hint = match &self.token {
            Some(_) => "the token in HF_TOKEN / HUGGING_FACE_HUB_TOKEN was refused or has no access",
            None => "no token is set: export HF_TOKEN (or HUGGING_FACE_HUB_TOKEN) with an access token from https://huggingface.co/settings/tokens",
        };
        Err(match status {
            401 | 403 => anyhow!(
                "GET {url}: {status} {}: {} is gated; accept its licence on the model page \
                 {page} (logged in as the token's user), and {token_hint}",
                if status == 401 {
                    "Unauthorized"
                } else {
                    "Forbidden"
                },
                self.repo
            ),
            404 => anyhow!(
                "GET {url}: 404 Not Found: no repository {} at revision {} (or the file is not \
                 in it){}",
                self.repo,
                self.revision,
                if self.token.is_none() {
                    "; gated repositories also answer 404 without a token"
                } else {
                    ""
                }
            ),
            416 => anyhow!("GET {url}: 416 Range Not Satisfiable"),
            _ => anyhow!("GET {url}: HTTP {status}"),
        })
    }

    /// The release files and their sizes / hashes, from the hub's metadata.
    fn expected(&self) -> Result<Vec<Expected>> {
        let url = format!(
            "{}/api/models/{}/revision/{}?blobs=true",
            self.endpoint, self.repo, self.revision
        );
        let mut resp = self.get(&url, 0)?;
        let text = resp
            .body_mut()
            .read_to_string()
            .with_context(|| format!("reading {url}"))?;
        let info: RepoInfo = serde_json::from_str(&text)
            .with_context(|| format!("{url}: not the hub's repository metadata"))?;
        let mut out = Vec::new();
        for choices in RELEASE_FILES {
            let Some(s) = choices
                .iter()
                .find_map(|name| info.siblings.iter().find(|s| s.rfilename == *name))
            else {
                bail!(
                    "{} has none of {} (files: {})",
                    self.repo,
                    choices.join(", "),
                    info.siblings
                        .iter()
                        .map(|s| s.rfilename.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            };
            let (size, sha256) = match &s.lfs {
                Some(l) => (l.size, Some(l.sha256.to_ascii_lowercase())),
                None => (
                    s.size
                        .ok_or_else(|| anyhow!("{url}: no size for {}", s.rfilename))?,
                    None,
                ),
            };
            out.push(Expected {
                name: s.rfilename.clone(),
                size,
                sha256,
            });
        }
        Ok(out)
    }

    /// Downloads one file into `dir/NAME.part` (resuming what is there), verifies it, renames it.
    fn download(&self, dir: &Path, file: &Expected) -> Result<()> {
        let dest = dir.join(&file.name);
        if dest.is_file() {
            let (len, sha) = hash_file(&dest)?;
            if len == file.size && file.sha256.as_ref().is_none_or(|want| *want == sha) {
                eprintln!("{}: already there, verified", file.name);
                return Ok(());
            }
            eprintln!(
                "{}: present but differs from the hub's; downloading again",
                file.name
            );
        }
        let part = dir.join(format!("{}.part", file.name));
        let mut have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        if have > file.size {
            have = 0; // not the same file: start over
        }
        let url = format!(
            "{}/{}/resolve/{}/{}",
            self.endpoint, self.repo, self.revision, file.name
        );
        let mut hasher = Sha256::new();
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&part)
            .with_context(|| format!("opening {}", part.display()))?;
        if have > 0 && have < file.size {
            let resp = self.get(&url, have)?;
            let resumes = resp.status().as_u16() == 206
                && resp
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with(&format!("bytes {have}-")));
            if resumes {
                // Hash what is there, then append the rest.
                let mut head = (&mut out).take(have);
                std::io::copy(&mut head, &mut hasher)
                    .with_context(|| format!("reading {}", part.display()))?;
                out.set_len(have)?;
                out.seek(std::io::SeekFrom::Start(have))?;
                eprintln!("{}: resuming at {have} of {} bytes", file.name, file.size);
                self.receive(resp, &mut out, &mut hasher, have, file, &part)?;
            } else {
                // The server ignored the range: take the whole body from the start.
                out.set_len(0)?;
                out.seek(std::io::SeekFrom::Start(0))?;
                self.receive(resp, &mut out, &mut hasher, 0, file, &part)?;
            }
        } else if have == file.size {
            std::io::copy(&mut out, &mut hasher)
                .with_context(|| format!("reading {}", part.display()))?;
        } else {
            out.set_len(0)?;
            let resp = self.get(&url, 0)?;
            self.receive(resp, &mut out, &mut hasher, 0, file, &part)?;
        }
        out.sync_all()
            .with_context(|| format!("writing {}", part.display()))?;
        drop(out);
        let got = std::fs::metadata(&part)?.len();
        let sha: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if got != file.size {
            let _ = std::fs::remove_file(&part);
            bail!(
                "{}: size mismatch: the hub lists {} bytes, the download has {got} (removed; run \
                 the command again)",
                file.name,
                file.size
            );
        }
        if let Some(want) = &file.sha256 {
            if *want != sha {
                let _ = std::fs::remove_file(&part);
                bail!(
                    "{}: sha256 mismatch: the hub lists {want}, the download is {sha} (removed; \
                     run the command again)",
                    file.name
                );
            }
        }
        std::fs::rename(&part, &dest)
            .with_context(|| format!("renaming {} to {}", part.display(), dest.display()))?;
        Ok(())
    }

    /// Streams a response body into `out` from offset `from`, with a progress bar.
    fn receive(
        &self,
        resp: ureq::http::Response<ureq::Body>,
        out: &mut std::fs::File,
        hasher: &mut Sha256,
        from: u64,
        file: &Expected,
        part: &Path,
    ) -> Result<()> {
        let bar = crate::progress::bar(file.size, &file.name);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:>18} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_position(from);
        let mut body = resp.into_body().into_reader();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = from;
        loop {
            let n = body.read(&mut buf).with_context(|| {
                format!(
                    "downloading {} ({at} bytes kept in {})",
                    file.name,
                    part.display()
                )
            })?;
            if n == 0 {
                break;
            }
            at += n as u64;
            if at > file.size {
                let _ = std::fs::remove_file(part);
                bail!(
                    "{}: size mismatch: the server sent more than the {} bytes the hub lists \
                     (removed; run the command again)",
                    file.name,
                    file.size
                );
            }
            out.write_all(&buf[..n])
                .with_context(|| format!("writing {}", part.display()))?;
            hasher.update(&buf[..n]);
            bar.set_position(at);
        }
        bar.finish_and_clear();
        Ok(())
    }
}

/// Length and hex SHA-256 of a file.
fn hash_file(path: &Path) -> Result<(u64, String)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut h = Sha256::new();
    let n = std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?;
    Ok((n, h.finalize().iter().map(|b| format!("{b:02x}")).collect()))
}

fn fetch(args: FetchArgs) -> Result<()> {
    let repo = KNOWN_MODELS
        .iter()
        .find(|(name, _)| *name == args.model)
        .map(|(_, repo)| repo.to_string())
        .or_else(|| {
            let valid = args.model.split('/').count() == 2
                && !args.model.starts_with('/')
                && !args.model.ends_with('/')
                && !args.model.contains("..");
            valid.then(|| args.model.clone())
        })
        .ok_or_else(|| {
            anyhow!(
                "unknown model {:?}: use prov-gigapath or a hub repository OWNER/NAME",
                args.model
            )
        })?;
    let endpoint = args.endpoint.trim_end_matches('/').to_string();
    if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
        bail!("--endpoint {endpoint:?} is not an http(s) URL");
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .redirect_auth_headers(ureq::config::RedirectAuthHeaders::SameHost)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(120)))
        .user_agent(concat!("gigapath/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    let hub = Hub {
        agent,
        endpoint,
        repo,
        revision: args.revision,
        token: hf_token(),
    };
    let files = hub.expected()?;
    std::fs::create_dir_all(&args.to).with_context(|| format!("creating {}", args.to.display()))?;
    for file in &files {
        hub.download(&args.to, file)?;
    }
    let to = std::fs::canonicalize(&args.to).unwrap_or(args.to.clone());
    println!(
        "{}",
        serde_json::json!({
            "weights": to,
            "repo": hub.repo,
            "revision": hub.revision,
            "files": files.iter().map(|f| serde_json::json!({
                "name": f.name, "size": f.size, "sha256": f.sha256,
            })).collect::<Vec<_>>(),
        })
    );
    eprintln!(
        "both encoders load from this folder: set models.weights = {:?} (or GIGAPATH_WEIGHTS)",
        to.display().to_string()
    );
    Ok(())
}
