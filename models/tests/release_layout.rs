//! Model folders the way users download them: the Hugging Face release in one folder, configs as
//! timm re-exports write them, legacy `torch.save` files, and the full-size layouts of both
//! released checkpoints (checked against key -> shape manifests, without the weights).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use gigapath_models::slide_encoder::{self, ModelFiles};
use gigapath_models::tile_encoder;
use gigapath_models::{Precision, SlideEncoder, TileEncoder};

fn reference() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/reference")
}

fn full_size() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/full-size")
}

fn error_of<T>(r: gigapath_models::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The release layout: the tile encoder's timm `config.json` and weights, and
/// `slide_encoder.pth`, in one folder (what `huggingface-cli download` writes).
fn release_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let (tile, slide) = (
        reference().join("tile_encoder"),
        reference().join("slide_encoder"),
    );
    for (from, to) in [
        (tile.join("config.json"), "config.json"),
        (tile.join("pytorch_model.bin"), "pytorch_model.bin"),
        (slide.join("slide_encoder.pth"), "slide_encoder.pth"),
    ] {
        std::fs::copy(from, dir.path().join(to)).unwrap();
    }
    dir
}

fn slide_inputs() -> (Tensor, Vec<[u32; 2]>) {
    let x = Tensor::randn(0f32, 1., (5, 64), &Device::Cpu).unwrap();
    (x, vec![[0, 0], [1, 0], [2, 0], [0, 1], [1, 1]])
}

#[test]
fn one_release_folder_serves_both_encoders() {
    let dir = release_folder();
    // Without a slide config the release folder means the official slide config; the fixture's
    // slide encoder is small, so its config goes beside the weights as `slide_config.json`.
    let files = ModelFiles::find(dir.path()).unwrap();
    assert_eq!(files.weights, dir.path().join("slide_encoder.pth"));
    assert_eq!(files.config, None);
    assert!(files.release);
    assert_eq!(files.config().unwrap(), slide_encoder::Config::default());
    let err = error_of(SlideEncoder::load(dir.path(), &Precision::cpu()));
    assert!(
        err.contains("slide_encoder.pth") && err.contains("shape mismatch"),
        "the official 768-d config is used, not the timm config.json: {err}"
    );

    std::fs::copy(
        reference().join("slide_encoder/config.json"),
        dir.path().join("slide_config.json"),
    )
    .unwrap();
    let slide = SlideEncoder::load(dir.path(), &Precision::cpu()).unwrap();
    let own = SlideEncoder::load(&reference().join("slide_encoder"), &Precision::cpu()).unwrap();
    let (x, cells) = slide_inputs();
    let (a, b) = (
        slide.encode_cells(&x, &cells).unwrap(),
        own.encode_cells(&x, &cells).unwrap(),
    );
    assert_eq!(max_abs_diff(&a.pool, &b.pool), 0.0);

    let tile = TileEncoder::load(dir.path(), &Precision::cpu()).unwrap();
    let own = TileEncoder::load(&reference().join("tile_encoder"), &Precision::cpu()).unwrap();
    let px = Tensor::randn(0f32, 1., (1, 3, 224, 224), &Device::Cpu).unwrap();
    assert_eq!(
        max_abs_diff(&tile.embed(&px).unwrap(), &own.embed(&px).unwrap()),
        0.0
    );
}

#[test]
fn a_release_folder_without_slide_weights_says_so() {
    // The tile encoder's model.safetensors must never be taken for the slide encoder.
    let dir = tempfile::tempdir().unwrap();
    let tile = reference().join("tile_encoder");
    std::fs::copy(tile.join("config.json"), dir.path().join("config.json")).unwrap();
    std::fs::copy(
        tile.join("pytorch_model.bin"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let err = error_of(SlideEncoder::load(dir.path(), &Precision::cpu()));
    assert!(
        err.contains("no slide_encoder.pth") && err.contains("models fetch"),
        "{err}"
    );
}

#[test]
fn a_slide_folder_with_its_own_config_still_loads() {
    let files = ModelFiles::find(&reference().join("slide_encoder")).unwrap();
    assert!(!files.release);
    assert_eq!(files.config().unwrap().embed_dim, 128);
}

/// A tile folder with the reference weights and `config` as its `config.json`.
fn tile_folder(config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    std::fs::copy(
        reference().join("tile_encoder/pytorch_model.bin"),
        dir.path().join("pytorch_model.bin"),
    )
    .unwrap();
    dir
}

fn reference_tile_config() -> serde_json::Value {
    let text = std::fs::read_to_string(reference().join("tile_encoder/config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The reference tile config with `model_args` changed by `edit`.
fn tile_config_with(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> String {
    let mut cfg = reference_tile_config();
    edit(cfg["model_args"].as_object_mut().unwrap());
    cfg.to_string()
}

#[test]
fn timm_reexport_configs_load() {
    // What `save_for_hf` / `push_to_hf_hub` write with current timm.
    let config = tile_config_with(|a| {
        a.insert("img_size".into(), serde_json::json!([224, 224]));
        a.insert("global_pool".into(), "token".into());
        a.insert("class_token".into(), true.into());
        a.insert("dynamic_img_size".into(), false.into());
        a.insert("drop_path_rate".into(), 0.1.into());
        a.insert("pos_embed".into(), "learn".into());
    });
    let dir = tile_folder(&config);
    let model = TileEncoder::load(dir.path(), &Precision::cpu()).unwrap();
    assert_eq!(model.img_size(), 224);
    let own = TileEncoder::load(&reference().join("tile_encoder"), &Precision::cpu()).unwrap();
    let px = Tensor::randn(0f32, 1., (1, 3, 224, 224), &Device::Cpu).unwrap();
    assert_eq!(
        max_abs_diff(&model.embed(&px).unwrap(), &own.embed(&px).unwrap()),
        0.0
    );
}

#[test]
fn config_keys_that_change_the_model_are_refused_by_name() {
    type Edit = Box<dyn Fn(&mut serde_json::Map<String, serde_json::Value>)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|a| {
                a.insert("img_size".into(), serde_json::json!([224, 256]));
            }),
            "img_size [224, 256] is not square",
        ),
        (
            Box::new(|a| {
                a.insert("img_size".into(), "big".into());
            }),
            "img_size \"big\"",
        ),
        (
            Box::new(|a| {
                a.insert("global_pool".into(), "avg".into());
            }),
            "model_args.global_pool = \"avg\" changes the model",
        ),
        (
            Box::new(|a| {
                a.insert("qk_norm".into(), true.into());
            }),
            "model_args.qk_norm = true changes the model",
        ),
        (
            Box::new(|a| {
                a.insert("reg_tokens".into(), 4.into());
            }),
            "model_args.reg_tokens",
        ),
        (
            Box::new(|a| {
                a.insert("rope_theta".into(), 100.into());
            }),
            "model_args.rope_theta = 100 is not a timm VisionTransformer argument",
        ),
    ];
    for (edit, want) in cases {
        let dir = tile_folder(&tile_config_with(edit));
        let err = error_of(TileEncoder::load(dir.path(), &Precision::cpu()));
        assert!(err.contains(want), "want {want:?} in: {err}");
        assert!(err.contains("config.json"), "{err}");
    }
}

/// The first bytes `torch.save(obj, f, _use_new_zipfile_serialization=False)` writes: pickle
/// protocol 2 and torch's magic number 0x1950a86a20f9469cfc6c as a pickled long, then the
/// protocol version 1001 (`pickle.dumps(1001, 2)`).
const LEGACY_HEAD: &[u8] =
    b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.\x80\x02M\xe9\x03.";

#[test]
fn legacy_torch_save_files_are_named_with_the_conversion() {
    let dir = tile_folder(&reference_tile_config().to_string());
    let bin = dir.path().join("pytorch_model.bin");
    let mut bytes = LEGACY_HEAD.to_vec();
    bytes.extend_from_slice(&[0u8; 64]);
    std::fs::write(&bin, bytes).unwrap();
    let err = error_of(TileEncoder::load(dir.path(), &Precision::cpu()));
    assert!(
        err.contains("legacy (non-zip) torch.save checkpoint"),
        "{err}"
    );
    assert!(
        err.contains("_use_new_zipfile_serialization=True") && err.contains("torch.load("),
        "the one line of Python: {err}"
    );
    assert!(err.contains(&bin.display().to_string()), "{err}");

    // A slide checkpoint the same way.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("slide_encoder.pth"), LEGACY_HEAD).unwrap();
    let err = error_of(SlideEncoder::load(dir.path(), &Precision::cpu()));
    assert!(err.contains("legacy (non-zip) torch.save"), "{err}");

    // A plain pickle (`pickle.dump(state_dict, f, 4)`) is named as such.
    std::fs::write(
        dir.path().join("slide_encoder.pth"),
        b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94.",
    )
    .unwrap();
    let err = error_of(SlideEncoder::load(dir.path(), &Precision::cpu()));
    assert!(err.contains("a plain Python pickle"), "{err}");
}

#[test]
fn safetensors_content_under_a_bin_name_loads() {
    // Re-exports sometimes keep the old name; the content decides.
    let dir = tile_folder(&reference_tile_config().to_string());
    let weights = candle_core::pickle::read_all(reference().join("tile_encoder/pytorch_model.bin"))
        .unwrap()
        .into_iter()
        .collect::<std::collections::HashMap<_, _>>();
    candle_core::safetensors::save(&weights, dir.path().join("pytorch_model.bin")).unwrap();
    let model = TileEncoder::load(dir.path(), &Precision::cpu()).unwrap();
    assert_eq!(model.embed_dim(), 96);
}

#[test]
fn a_truncated_safetensors_file_is_named() {
    let dir = tile_folder(&reference_tile_config().to_string());
    let weights = candle_core::pickle::read_all(reference().join("tile_encoder/pytorch_model.bin"))
        .unwrap()
        .into_iter()
        .collect::<std::collections::HashMap<_, _>>();
    let st = dir.path().join("model.safetensors");
    candle_core::safetensors::save(&weights, &st).unwrap();
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() - 100]).unwrap();
    let err = error_of(TileEncoder::load(dir.path(), &Precision::cpu()));
    assert!(
        err.contains("model.safetensors") && err.contains("truncated download?"),
        "{err}"
    );
}

/// A `VarBuilder` backend that records every requested tensor's name and shape and hands back a
/// stride-0 view of one zero: a full-size model is built without its gigabytes.
#[derive(Default)]
struct ShapeRecorder {
    seen: Mutex<BTreeMap<String, Vec<usize>>>,
}

impl SimpleBackend for ShapeRecorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let previous = self
            .seen
            .lock()
            .unwrap()
            .insert(name.to_string(), s.dims().to_vec());
        if let Some(p) = previous {
            assert_eq!(p, s.dims(), "{name} requested with two shapes");
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        panic!("the encoders ask for {name} without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Builds a model over a [`ShapeRecorder`] and returns what it asked for.
fn requested(build: impl FnOnce(VarBuilder<'static>)) -> BTreeMap<String, Vec<usize>> {
    let recorder = std::sync::Arc::new(ShapeRecorder::default());
    struct Shared(std::sync::Arc<ShapeRecorder>);
    impl SimpleBackend for Shared {
        fn get(
            &self,
            s: Shape,
            name: &str,
            h: candle_nn::Init,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            self.0.get(s, name, h, dtype, dev)
        }
        fn get_unchecked(&self, n: &str, d: DType, dev: &Device) -> candle_core::Result<Tensor> {
            self.0.get_unchecked(n, d, dev)
        }
        fn contains_tensor(&self, name: &str) -> bool {
            self.0.contains_tensor(name)
        }
    }
    build(VarBuilder::from_backend(
        Box::new(Shared(recorder.clone())),
        DType::F32,
        Device::Cpu,
    ));
    let seen = recorder.seen.lock().unwrap().clone();
    seen
}

/// A manifest's keys and shapes.
fn manifest(name: &str) -> BTreeMap<String, Vec<usize>> {
    #[derive(serde::Deserialize)]
    struct Manifest {
        keys: BTreeMap<String, Vec<usize>>,
    }
    let text = std::fs::read_to_string(full_size().join(name)).unwrap();
    serde_json::from_str::<Manifest>(&text).unwrap().keys
}

/// Keys in one map and not the other, and keys with different shapes.
fn differences(
    want: &BTreeMap<String, Vec<usize>>,
    got: &BTreeMap<String, Vec<usize>>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (k, shape) in want {
        match got.get(k) {
            None => out.push(format!("not requested: {k} {shape:?}")),
            Some(s) if s != shape => out.push(format!("{k}: file {shape:?}, model {s:?}")),
            Some(_) => {}
        }
    }
    for (k, shape) in got {
        if !want.contains_key(k) {
            out.push(format!("not in the file: {k} {shape:?}"));
        }
    }
    out
}

#[test]
fn the_hub_config_parses_as_shipped() {
    let cfg = tile_encoder::Config::from_file(&full_size().join("hf_config.json")).unwrap();
    let a = &cfg.model_args;
    assert_eq!(cfg.architecture, "vit_giant_patch14_dinov2");
    assert_eq!(
        (a.img_size, a.patch_size, a.embed_dim, a.depth, a.num_heads),
        (224, 16, 1536, 40, 24)
    );
    assert_eq!(a.init_values, Some(1e-5));
    assert_eq!(cfg.mlp_hidden(), 8192, "int(1536 * 5.33334)");
    assert_eq!(cfg.grid(), 14);
}

#[test]
fn the_full_size_tile_encoder_asks_for_exactly_the_released_tensors() {
    let cfg = tile_encoder::Config::from_file(&full_size().join("hf_config.json")).unwrap();
    let got = requested(|vb| {
        TileEncoder::new(&cfg, vb).unwrap();
    });
    let want = manifest("tile_encoder_keys.json");
    assert_eq!(want.len(), 566);
    let diff = differences(&want, &got);
    assert!(diff.is_empty(), "{}", diff.join("\n"));
    let params: usize = got.values().map(|s| s.iter().product::<usize>()).sum();
    assert_eq!(params, 1_134_953_984);
}

#[test]
fn the_full_size_slide_encoder_asks_for_exactly_the_released_tensors() {
    // The release folder's slide config: the official one (no slide config in the hub repo).
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        full_size().join("hf_config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    std::fs::write(dir.path().join("slide_encoder.pth"), b"").unwrap();
    let cfg = ModelFiles::find(dir.path()).unwrap().config().unwrap();
    let got = requested(|vb| {
        SlideEncoder::new(&cfg, vb).unwrap();
    });
    let want = manifest("slide_encoder_keys.json");
    assert_eq!(want.len(), 247);
    let diff = differences(&want, &got);
    assert!(diff.is_empty(), "{}", diff.join("\n"));
    let params: usize = got.values().map(|s| s.iter().product::<usize>()).sum();
    assert_eq!(params, 86_330_880);
}
