//! Wrong model folders and wrong inputs get errors that name the tensor, key or shape.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use gigapath_models::{Precision, SlideEncoder, TileEncoder};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/reference")
}

fn tile_weights() -> HashMap<String, Tensor> {
    let path = fixtures().join("tile_encoder/pytorch_model.bin");
    candle_core::pickle::read_all(&path)
        .unwrap()
        .into_iter()
        .collect()
}

/// A tile model folder with the given config and weights (as safetensors).
fn tile_folder(config: &str, weights: &HashMap<String, Tensor>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    candle_core::safetensors::save(weights, dir.path().join("model.safetensors")).unwrap();
    dir
}

fn fixture_config() -> String {
    std::fs::read_to_string(fixtures().join("tile_encoder/config.json")).unwrap()
}

fn error_of<T>(r: gigapath_models::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn safetensors_folder_loads_like_the_pth_one() {
    let weights = tile_weights();
    assert_eq!(weights.len(), 4 + 2 * 14 + 2, "timm key count for depth 2");
    let dir = tile_folder(&fixture_config(), &weights);
    let a = TileEncoder::load(dir.path(), &Precision::cpu()).unwrap();
    let b = TileEncoder::load(&fixtures().join("tile_encoder"), &Precision::cpu()).unwrap();
    let x = Tensor::randn(0f32, 1., (1, 3, 224, 224), &Device::Cpu).unwrap();
    let (ya, yb) = (a.embed(&x).unwrap(), b.embed(&x).unwrap());
    let diff: f32 = (ya - yb)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(diff, 0.0);
}

#[test]
fn a_missing_tile_tensor_is_named_with_its_full_key() {
    let mut weights = tile_weights();
    weights.remove("blocks.1.mlp.fc2.weight").unwrap();
    let dir = tile_folder(&fixture_config(), &weights);
    let err = error_of(TileEncoder::load(dir.path(), &Precision::cpu()));
    assert!(err.contains("blocks.1.mlp.fc2.weight"), "{err}");
    assert!(
        err.contains("model.safetensors"),
        "the file is named too: {err}"
    );
}

#[test]
fn a_config_that_does_not_match_the_weights_names_key_and_shapes() {
    // mlp_ratio 4 instead of 5.33334: fc1 would be [384, 96], the checkpoint has [512, 96].
    let config = fixture_config().replace("5.33334", "4.0");
    let dir = tile_folder(&config, &tile_weights());
    let err = error_of(TileEncoder::load(dir.path(), &Precision::cpu()));
    assert!(err.contains("blocks.0.mlp.fc1.weight"), "{err}");
    assert!(
        err.contains("[384, 96]") && err.contains("[512, 96]"),
        "{err}"
    );
}

#[test]
fn unsupported_tile_architectures_are_refused_by_name() {
    let config = fixture_config().replace("vit_giant_patch14_dinov2", "vit_base_patch16_224");
    let dir = tile_folder(&config, &tile_weights());
    let err = error_of(TileEncoder::load(dir.path(), &Precision::cpu()));
    assert!(
        err.contains("vit_base_patch16_224") && err.contains("config.json"),
        "{err}"
    );
}

#[test]
fn tile_inputs_of_the_wrong_shape_are_refused() {
    let model = TileEncoder::load(&fixtures().join("tile_encoder"), &Precision::cpu()).unwrap();
    let x = Tensor::zeros((2, 3, 256, 256), DType::F32, &Device::Cpu).unwrap();
    let err = error_of(model.embed(&x));
    assert!(
        err.contains("[2, 3, 256, 256]") && err.contains("[B, 3, 224, 224]"),
        "{err}"
    );
}

#[test]
fn a_missing_slide_tensor_is_named() {
    let src = fixtures().join("slide_encoder");
    let mut weights: HashMap<String, Tensor> =
        candle_core::pickle::read_all_with_key(src.join("slide_encoder.pth"), Some("model"))
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(
        weights.len(),
        3 + 2 * 20 + 4,
        "official key count for depth 2"
    );
    weights
        .remove("encoder.layers.1.self_attn.inner_attn_ln.bias")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    candle_core::safetensors::save(&weights, dir.path().join("model.safetensors")).unwrap();
    let err = error_of(SlideEncoder::load(dir.path(), &Precision::cpu()));
    assert!(
        err.contains("encoder.layers.1.self_attn.inner_attn_ln.bias"),
        "{err}"
    );
}

#[test]
fn slide_config_without_a_file_is_the_official_one_and_mismatches_are_named() {
    // The fixture weights are a small model; without its config.json the official 768-d config
    // is used, and the first tensor that disagrees is named with both shapes.
    let src = fixtures().join("slide_encoder");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        src.join("slide_encoder.pth"),
        dir.path().join("slide_encoder.pth"),
    )
    .unwrap();
    let err = error_of(SlideEncoder::load(dir.path(), &Precision::cpu()));
    assert!(err.contains("shape mismatch for"), "{err}");
    assert!(
        err.contains("[768, 1536]") || err.contains("[1, 1, 768]") || err.contains("768"),
        "{err}"
    );
}

#[test]
fn slide_inputs_are_checked() {
    let model = SlideEncoder::load(&fixtures().join("slide_encoder"), &Precision::cpu()).unwrap();
    let dev = Device::Cpu;
    let features = Tensor::zeros((3, 64), DType::F32, &dev).unwrap();
    let coords = Tensor::new(&[[0f32, 0.], [256., 0.], [256_000., 512.]], &dev).unwrap();
    let err = error_of(model.encode(&features, &coords, 256.0));
    assert!(
        err.contains("tile 2") && err.contains("outside the 1000 x 1000 position grid"),
        "{err}"
    );

    let coords = Tensor::new(&[[0f32, 0.], [256., 0.], [512., -1.]], &dev).unwrap();
    let err = error_of(model.encode(&features, &coords, 256.0));
    assert!(err.contains("tile 2"), "negative coordinates: {err}");

    let wrong = Tensor::zeros((3, 65), DType::F32, &dev).unwrap();
    let ok_coords = Tensor::new(&[[0f32, 0.], [256., 0.], [512., 0.]], &dev).unwrap();
    let err = error_of(model.encode(&wrong, &ok_coords, 256.0));
    assert!(err.contains("[3, 65]") && err.contains("[3, 64]"), "{err}");

    let err = error_of(model.encode(
        &features,
        &Tensor::zeros((3, 3), DType::F32, &dev).unwrap(),
        256.0,
    ));
    assert!(err.contains("coords has shape [3, 3]"), "{err}");
}
