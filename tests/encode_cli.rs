//! `gigapath encode {tile,slide,text}` run as a user would, reproducing the reference fixtures.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/reference")
}

fn gigapath(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gigapath"))
        .args(args)
        .env("GIGAPATH_LOG", "warn")
        .output()
        .expect("running gigapath")
}

fn ok(args: &[&str]) -> Output {
    let out = gigapath(args);
    assert!(
        out.status.success(),
        "gigapath {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn fails(args: &[&str]) -> String {
    let out = gigapath(args);
    assert_eq!(out.status.code(), Some(1), "gigapath {args:?} should fail");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn embedding(path: &Path) -> Tensor {
    let t = load(path)
        .remove("embedding")
        .expect("`embedding` in the output");
    assert_eq!(t.dtype(), DType::F32);
    t
}

fn assert_close(name: &str, got: &Tensor, expected: &Tensor) {
    assert_eq!(got.dims(), expected.dims(), "{name}");
    let d = (got.to_dtype(DType::F64).unwrap() - expected.to_dtype(DType::F64).unwrap()).unwrap();
    let norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let rel = norm(&d) / norm(&expected.to_dtype(DType::F64).unwrap());
    assert!(rel <= 1e-5, "{name}: relative error {rel:e}");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn encode_tile_reproduces_the_timm_cls_from_u8_tiles_and_from_pixel_values() {
    let dir = fixtures().join("tile_encoder");
    let expected = load(&dir.join("expected.safetensors"));
    let tmp = tempfile::tempdir().unwrap();

    let out = tmp.path().join("from_tiles.safetensors");
    let stdout = ok(&[
        "encode",
        "tile",
        "--model",
        s(&dir),
        "--input",
        s(&dir.join("inputs.safetensors")),
        "--output",
        s(&out),
        "--batch-size",
        "3",
    ])
    .stdout;
    let summary: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    assert_eq!(summary["shape"], serde_json::json!([4, 96]));
    assert_close("tiles", &embedding(&out), &expected["cls"]);

    // The same from pixel_values.
    let pixels = tmp.path().join("pixels.safetensors");
    let map = HashMap::from([("pixel_values".to_string(), expected["pixel_values"].clone())]);
    candle_core::safetensors::save(&map, &pixels).unwrap();
    let out = tmp.path().join("from_pixels.safetensors");
    ok(&[
        "encode",
        "tile",
        "--model",
        s(&dir),
        "--input",
        s(&pixels),
        "--output",
        s(&out),
    ]);
    assert_close("pixel_values", &embedding(&out), &expected["cls"]);
}

#[test]
fn encode_slide_reproduces_every_output_mode() {
    let dir = fixtures().join("slide_encoder");
    let input = dir.join("inputs.safetensors");
    let expected = load(&dir.join("expected.safetensors"));
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, &[&str]); 4] = [
        ("cls", &["--pool", "cls"]),
        ("pool", &["--pool", "mean"]),
        ("all_layers_cls", &["--all-layers"]),
        (
            "all_layers_pool",
            &["--pool", "mean", "--all-layers", "--tile-size", "256"],
        ),
    ];
    for (name, flags) in cases {
        let out = tmp.path().join(format!("{name}.safetensors"));
        let mut args = vec![
            "encode",
            "slide",
            "--model",
            s(&dir),
            "--input",
            s(&input),
            "--output",
            s(&out),
        ];
        args.extend_from_slice(flags);
        ok(&args);
        assert_close(name, &embedding(&out), &expected[name]);
    }
}

#[test]
fn encode_text_reproduces_the_bert_cls_and_minilm() {
    let dir = fixtures().join("text_bert_mlm");
    let expected = load(&dir.join("expected.safetensors"));
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bert.safetensors");
    ok(&[
        "encode",
        "text",
        "--model",
        s(&dir),
        "--input",
        s(&dir.join("inputs.json")),
        "--output",
        s(&out),
        "--pool",
        "cls",
    ]);
    assert_close("text_bert_mlm/cls", &embedding(&out), &expected["cls"]);

    let minilm = std::env::var_os("GIGAPATH_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/weights/all-MiniLM-L6-v2")
        });
    assert!(
        minilm.join("model.safetensors").is_file(),
        "all-MiniLM-L6-v2 not found in {}: run scripts/fetch-minilm.sh",
        minilm.display()
    );
    let fixture = fixtures().join("text_minilm");
    let texts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("inputs.json")).unwrap())
            .unwrap();
    let texts: Vec<&str> = texts["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let out = tmp.path().join("minilm.safetensors");
    let mut args = vec![
        "encode",
        "text",
        "--model",
        s(&minilm),
        "--output",
        s(&out),
        "--normalize",
    ];
    for t in &texts {
        args.extend(["--text", t]);
    }
    ok(&args);
    let expected = load(&fixture.join("expected.safetensors"));
    assert_close(
        "text_minilm",
        &embedding(&out),
        &expected["mean_pooled_normalized"],
    );
}

#[test]
fn bad_inputs_fail_with_a_message_naming_the_problem_and_leave_no_output() {
    let tile = fixtures().join("tile_encoder");
    let slide = fixtures().join("slide_encoder");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");

    // A slide input given to the tile encoder: neither `tiles` nor `pixel_values`.
    let err = fails(&[
        "encode",
        "tile",
        "--model",
        s(&tile),
        "--input",
        s(&slide.join("inputs.safetensors")),
        "--output",
        s(&out),
    ]);
    assert!(
        err.starts_with("error: ") && err.contains("`tiles`") && err.contains("`features`"),
        "{err}"
    );

    // Tiles of the wrong dtype.
    let bad = tmp.path().join("bad_tiles.safetensors");
    let map = HashMap::from([(
        "tiles".to_string(),
        Tensor::zeros((1, 256, 256, 3), DType::F32, &Device::Cpu).unwrap(),
    )]);
    candle_core::safetensors::save(&map, &bad).unwrap();
    let err = fails(&[
        "encode",
        "tile",
        "--model",
        s(&tile),
        "--input",
        s(&bad),
        "--output",
        s(&out),
    ]);
    assert!(err.contains("expected u8 [B, H, W, 3]"), "{err}");

    // Features of the wrong width for the slide encoder.
    let wrong = tmp.path().join("wrong.safetensors");
    let map = HashMap::from([
        (
            "features".to_string(),
            Tensor::zeros((2, 63), DType::F32, &Device::Cpu).unwrap(),
        ),
        (
            "coords".to_string(),
            Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
        ),
    ]);
    candle_core::safetensors::save(&map, &wrong).unwrap();
    let err = fails(&[
        "encode",
        "slide",
        "--model",
        s(&slide),
        "--input",
        s(&wrong),
        "--output",
        s(&out),
    ]);
    assert!(err.contains("[2, 63]") && err.contains("[2, 64]"), "{err}");

    // A checkpoint without the weights the config asks for: the tile model's folder as a slide model.
    let err = fails(&[
        "encode",
        "slide",
        "--model",
        s(&tile),
        "--input",
        s(&slide.join("inputs.safetensors")),
        "--output",
        s(&out),
    ]);
    assert!(err.contains("loading slide encoder"), "{err}");

    // A model folder that does not exist.
    let err = fails(&[
        "encode",
        "text",
        "--model",
        "/nonexistent/model",
        "--text",
        "x",
        "--output",
        s(&out),
    ]);
    assert!(err.contains("/nonexistent/model"), "{err}");

    assert!(!out.exists(), "no output file after failures");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}
