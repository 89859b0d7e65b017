//! The real `gigapath` binary on real slide files: `slide info`, `tile`, `synth`, and every bad
//! input of issue #2 (clear one-line error naming the file, non-zero exit, no panic, nothing
//! half-written).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn gigapath(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gigapath"))
        .args(args)
        .env("GIGAPATH_LOG", "warn")
        .output()
        .expect("gigapath runs")
}

fn data(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data")
        .join(name)
        .display()
        .to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failed run: exit 1, one `error:` line that contains every `needles` (case-insensitive), no panic.
fn assert_clean_failure(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "exit status; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line in {err:?}"));
    for n in needles {
        assert!(
            line.to_lowercase().contains(&n.to_lowercase()),
            "{n:?} not in {line:?}"
        );
    }
    assert!(
        o.stdout.is_empty(),
        "stdout on failure: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}

fn synth(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let p = path.to_str().unwrap();
    let mut args = vec![
        "synth", "slide", "-o", p, "--width", "2048", "--height", "1536", "--levels", "1,4",
    ];
    args.extend_from_slice(extra);
    let o = gigapath(&args);
    assert!(o.status.success(), "synth failed: {}", stderr(&o));
    path
}

#[test]
fn slide_info_describes_the_bundled_aperio_slide() {
    let o = gigapath(&["slide", "info", &data("default.svs"), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["vendor"], "aperio");
    assert_eq!(v["levels"][0]["width"], 2220);
    assert_eq!(v["levels"][0]["height"], 2967);
    assert_eq!(v["mpp"]["x"], 0.499);
    assert_eq!(v["mpp"]["source"], "openslide");
    assert_eq!(v["objective_power"], 20.0);
    let names: Vec<&str> = v["associated_images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["label", "macro", "thumbnail"]);

    let o = gigapath(&["slide", "info", &data("default.svs")]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("mpp:        0.499 x 0.499 um/px (from openslide properties"),
        "{text}"
    );
    assert!(text.contains("level 0: 2220 x 2967 px"), "{text}");
}

#[test]
fn tile_writes_the_grid_the_pictures_and_a_one_line_summary() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = gigapath(&[
        "tile",
        &data("default.svs"),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(stdout.lines().count(), 1, "one line: {stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["mpp"], 0.499);
    assert_eq!(v["level0_tile_px"], 256);
    assert_eq!(v["grid_width"], 8); // floor(2220 / 256)
    assert_eq!(v["grid_height"], 11); // floor(2967 / 256)
    let tiles = v["tiles"].as_u64().unwrap();
    // The tissue strip covers about a third of the slide: 88 whole tiles in all.
    assert!((30..=60).contains(&tiles), "{tiles} tiles");
    for f in ["mask.png", "overlay.png", "thumbnail.png"] {
        let bytes = std::fs::read(out.join(f)).unwrap();
        assert_eq!(&bytes[1..4], b"PNG", "{f} is a PNG");
    }
    let csv = std::fs::read_to_string(out.join("tiles.csv")).unwrap();
    assert_eq!(csv.lines().count() as u64, tiles + 1);
}

#[test]
fn bad_slides_get_a_one_line_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let empty = d.join("empty.svs");
    std::fs::write(&empty, b"").unwrap();
    let text = d.join("notes.svs");
    std::fs::write(&text, "this is a pathology report, not a slide\n").unwrap();
    let full = std::fs::read(data("default.svs")).unwrap();
    let truncated = d.join("truncated.svs");
    std::fs::write(&truncated, &full[..full.len() / 2]).unwrap();

    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            d.join("missing.svs").display().to_string(),
            vec!["missing.svs", "no such file"],
        ),
        (d.display().to_string(), vec!["directory"]),
        (empty.display().to_string(), vec!["empty.svs", "empty file"]),
        (
            text.display().to_string(),
            vec!["notes.svs", "not a slide format"],
        ),
        (truncated.display().to_string(), vec!["truncated.svs"]),
        (data("unopenable.tiff"), vec!["unopenable.tiff"]),
        (data("unreadable.svs"), vec!["unreadable.svs"]),
    ];
    for (slide, needles) in &cases {
        let out = d.join("never-written");
        let o = gigapath(&["tile", slide, "--output", out.to_str().unwrap()]);
        assert_clean_failure(&o, needles);
        assert!(!out.exists(), "{slide}: output left behind");
        // `slide info` fails the same way, except on slides that open but whose pixels don't decode.
        if !slide.ends_with("unreadable.svs") && !slide.ends_with("truncated.svs") {
            assert_clean_failure(&gigapath(&["slide", "info", slide]), needles);
        }
    }
}

#[test]
fn mpp_comes_from_the_user_only_when_the_slide_has_none_and_must_be_sane() {
    let dir = tempfile::tempdir().unwrap();
    let slide = synth(dir.path(), "nompp.tiff", &["--metadata", "none"]);
    let s = slide.to_str().unwrap();
    let out = dir.path().join("t");
    let o = gigapath(&["tile", s, "-o", out.to_str().unwrap()]);
    assert_clean_failure(&o, &["nompp.tiff", "--mpp"]);
    assert!(!out.exists());
    for bad in ["0", "-0.5", "NaN", "inf"] {
        let o = gigapath(&["tile", s, "--mpp", bad, "-o", out.to_str().unwrap()]);
        assert_clean_failure(&o, &["invalid mpp"]);
        assert!(!out.exists());
    }
    let o = gigapath(&["tile", s, "--mpp", "0.5", "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["mpp_source"], "user");
    assert!(v["tiles"].as_u64().unwrap() > 0);

    // A slide with TIFF resolution tags needs no --mpp.
    let tagged = synth(
        dir.path(),
        "tagged.tiff",
        &["--metadata", "tiff-resolution", "--mpp", "0.25"],
    );
    let o = gigapath(&["slide", "info", tagged.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["vendor"], "generic-tiff");
    assert_eq!(v["mpp"]["source"], "tiff-resolution");
    assert!((v["mpp"]["x"].as_f64().unwrap() - 0.25).abs() < 1e-4);
}

#[test]
fn unwritable_output_and_bad_thresholds_fail_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let under_file = file.join("out");
    let o = gigapath(&[
        "tile",
        &data("default.svs"),
        "-o",
        under_file.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, &["a-file"]);
    assert_eq!(std::fs::read(&file).unwrap(), b"x");

    let out = dir.path().join("o");
    for t in ["1.5", "-0.1", "NaN"] {
        let o = gigapath(&[
            "tile",
            &data("default.svs"),
            "--tissue-threshold",
            t,
            "-o",
            out.to_str().unwrap(),
        ]);
        assert_clean_failure(&o, &["tissue threshold"]);
        assert!(!out.exists());
    }
    let o = gigapath(&["tile", &data("default.svs"), "--method", "magic"]);
    assert_eq!(o.status.code(), Some(2), "clap usage error");
    assert!(stderr(&o).contains("unknown tissue method"));
}
