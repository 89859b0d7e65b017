//! Parity with the reference implementations on the fixtures in `tests/fixtures/reference`
//! (produced in float64 by timm, the official Prov-GigaPath LongNet, sentence-transformers and
//! Hugging Face `transformers`). Each check prints its relative error and max-abs difference:
//! `cargo test -p gigapath-models --test parity -- --nocapture`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use gigapath_models::text_encoder::{load_tokenizer, TextPool};
use gigapath_models::tile_transform::tiles_to_pixel_values;
use gigapath_models::{Precision, SlideEncoder, TextEncoder, TileEncoder};

const MAX_REL_ERR: f64 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/reference")
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Asserts ||got - expected|| / ||expected|| <= MAX_REL_ERR and prints both error measures.
fn assert_parity(name: &str, got: &Tensor, expected: &Tensor) {
    assert_eq!(got.dims(), expected.dims(), "{name}: shape");
    let g = got.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let e = expected
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap();
    let diff = (&g - &e).unwrap();
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
    let rel = norm(&diff) / norm(&e);
    let max_abs = diff
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    println!("parity {name:<34} rel_err {rel:.3e}  max_abs {max_abs:.3e}");
    assert!(
        rel <= MAX_REL_ERR,
        "{name}: relative error {rel:.3e} > {MAX_REL_ERR:e} (max abs {max_abs:.3e})"
    );
}

#[test]
fn tile_encoder_matches_timm() {
    let dir = fixtures().join("tile_encoder");
    let inputs = load(&dir.join("inputs.safetensors"));
    let expected = load(&dir.join("expected.safetensors"));
    let tiles = &inputs["tiles"];
    let (b, h, w, _) = tiles.dims4().unwrap();
    let bytes: Vec<u8> = tiles.flatten_all().unwrap().to_vec1().unwrap();
    let pixels = Tensor::from_vec(
        tiles_to_pixel_values(&bytes, b, h, w).unwrap(),
        (b, 3, 224, 224),
        &Device::Cpu,
    )
    .unwrap();
    assert_parity(
        "tile_encoder/pixel_values",
        &pixels,
        &expected["pixel_values"],
    );

    let model = TileEncoder::load(&dir, &Precision::cpu()).unwrap();
    let tokens = model.forward_tokens(&expected["pixel_values"]).unwrap();
    assert_parity("tile_encoder/tokens", &tokens, &expected["tokens"]);
    let cls = model.embed(&pixels).unwrap();
    assert_parity("tile_encoder/cls (from u8 tiles)", &cls, &expected["cls"]);
}

#[test]
fn slide_encoder_matches_the_official_longnet() {
    let dir = fixtures().join("slide_encoder");
    let inputs = load(&dir.join("inputs.safetensors"));
    let expected = load(&dir.join("expected.safetensors"));
    let model = SlideEncoder::load(&dir, &Precision::cpu()).unwrap();
    let out = model
        .encode(&inputs["features"], &inputs["coords"], 256.0)
        .unwrap();
    assert_parity("slide_encoder/cls", &out.cls, &expected["cls"]);
    assert_parity("slide_encoder/pool", &out.pool, &expected["pool"]);
    assert_parity(
        "slide_encoder/all_layers_cls",
        &out.all_layers_cls,
        &expected["all_layers_cls"],
    );
    assert_parity(
        "slide_encoder/all_layers_pool",
        &out.all_layers_pool,
        &expected["all_layers_pool"],
    );
}

fn texts(path: &Path) -> Vec<String> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

/// The MiniLM folder fetched by `scripts/fetch-minilm.sh` (or `GIGAPATH_MINILM_DIR`).
fn minilm_dir() -> PathBuf {
    let dir = std::env::var_os("GIGAPATH_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/all-MiniLM-L6-v2"));
    assert!(
        dir.join("model.safetensors").is_file(),
        "all-MiniLM-L6-v2 not found in {}: run scripts/fetch-minilm.sh (or set GIGAPATH_MINILM_DIR)",
        dir.display()
    );
    dir
}

#[test]
fn minilm_matches_sentence_transformers() {
    let dir = fixtures().join("text_minilm");
    let expected = load(&dir.join("expected.safetensors"));
    let model = TextEncoder::load(&minilm_dir(), &Precision::cpu()).unwrap();
    let emb = model
        .encode(&texts(&dir.join("inputs.json")), TextPool::Mean, true)
        .unwrap();
    assert_parity(
        "text_minilm/mean_pooled_normalized",
        &emb,
        &expected["mean_pooled_normalized"],
    );
}

#[test]
fn bert_mlm_folder_matches_transformers() {
    let dir = fixtures().join("text_bert_mlm");
    let expected = load(&dir.join("expected.safetensors"));
    let model = TextEncoder::load(&dir, &Precision::cpu()).unwrap();
    let batch = model.tokenize(&texts(&dir.join("inputs.json"))).unwrap();
    let ids: Vec<Vec<u32>> = batch.input_ids.to_vec2().unwrap();
    let want: Vec<Vec<u32>> = expected["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    assert_eq!(ids, want, "input_ids");
    let mask: Vec<Vec<u32>> = batch.attention_mask.to_vec2().unwrap();
    let want_mask: Vec<Vec<u32>> = expected["attention_mask"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    assert_eq!(mask, want_mask, "attention_mask");
    let states = model.hidden_states(&batch).unwrap();
    assert_parity(
        "text_bert_mlm/last_hidden_state",
        &states,
        &expected["last_hidden_state"],
    );
    let cls = model
        .encode(&texts(&dir.join("inputs.json")), TextPool::Cls, false)
        .unwrap();
    assert_parity("text_bert_mlm/cls", &cls, &expected["cls"]);
}

#[test]
fn vocab_txt_tokenizer_matches_tokenizer_json() {
    // Older PubMedBERT folders ship vocab.txt + tokenizer_config.json only: rebuild that layout
    // from the fixture's tokenizer.json and check the ids are the same.
    let src = fixtures().join("text_bert_mlm");
    let tmp = tempfile::tempdir().unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
            .unwrap();
    let mut vocab: Vec<(String, u64)> = json["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(t, id)| (t.clone(), id.as_u64().unwrap()))
        .collect();
    vocab.sort_by_key(|(_, id)| *id);
    let lines: Vec<String> = vocab.into_iter().map(|(t, _)| t).collect();
    std::fs::write(tmp.path().join("vocab.txt"), lines.join("\n") + "\n").unwrap();
    std::fs::copy(
        src.join("tokenizer_config.json"),
        tmp.path().join("tokenizer_config.json"),
    )
    .unwrap();

    let from_vocab = load_tokenizer(tmp.path(), 128).unwrap();
    let from_json = load_tokenizer(&src, 128).unwrap();
    let texts = texts(&src.join("inputs.json"));
    let mut texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    texts.push("Ünïcödé ACCENTS, 中文 and   spaces\ttabs");
    let ids = |t: &tokenizers::Tokenizer| -> Vec<Vec<u32>> {
        t.encode_batch(texts.clone(), true)
            .unwrap()
            .iter()
            .map(|e| e.get_ids().to_vec())
            .collect()
    };
    assert_eq!(ids(&from_vocab), ids(&from_json));
    let expected = load(&src.join("expected.safetensors"));
    let want: Vec<Vec<u32>> = expected["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    let got = ids(&from_vocab);
    for (g, w) in got.iter().zip(&want) {
        let real: Vec<u32> = w.iter().cloned().filter(|&i| i != 0).collect();
        assert_eq!(&g[..real.len()], &real[..]);
    }
}

/// With a `Var` input every op tracks gradients, so the encoders take their differentiable paths
/// (basic-op LayerNorm and softmax, candle-op dilated attention): these must match too.
#[test]
fn differentiable_paths_match_the_references() {
    let tile = fixtures().join("tile_encoder");
    let expected = load(&tile.join("expected.safetensors"));
    let model = TileEncoder::load(&tile, &Precision::cpu()).unwrap();
    let pixels = candle_core::Var::from_tensor(&expected["pixel_values"]).unwrap();
    let tokens = model.forward_tokens(pixels.as_tensor()).unwrap();
    assert!(
        tokens.track_op(),
        "the tile encoder output depends on the Var"
    );
    assert_parity(
        "tile_encoder/tokens (grad path)",
        &tokens,
        &expected["tokens"],
    );

    let slide = fixtures().join("slide_encoder");
    let inputs = load(&slide.join("inputs.safetensors"));
    let expected = load(&slide.join("expected.safetensors"));
    let model = SlideEncoder::load(&slide, &Precision::cpu()).unwrap();
    let features = candle_core::Var::from_tensor(&inputs["features"]).unwrap();
    let out = model
        .encode(features.as_tensor(), &inputs["coords"], 256.0)
        .unwrap();
    assert!(out.cls.track_op());
    assert_parity("slide_encoder/cls (grad path)", &out.cls, &expected["cls"]);
    assert_parity(
        "slide_encoder/all_layers_pool (grad path)",
        &out.all_layers_pool,
        &expected["all_layers_pool"],
    );
}

#[test]
fn long_texts_are_truncated_to_the_model_length() {
    // The fixture model has a 128-row position table: longer inputs must be cut, not crash.
    let dir = fixtures().join("text_bert_mlm");
    let model = TextEncoder::load(&dir, &Precision::cpu()).unwrap();
    let long = "carcinoma ".repeat(1000);
    let batch = model.tokenize(&[long.as_str(), "short"]).unwrap();
    assert_eq!(batch.input_ids.dims(), [2, 128]);
    let mask: Vec<Vec<u32>> = batch.attention_mask.to_vec2().unwrap();
    assert_eq!(mask[0].iter().sum::<u32>(), 128);
    assert_eq!(
        mask[1].iter().sum::<u32>(),
        3,
        "[CLS] short [SEP], then padding"
    );
    let ids: Vec<Vec<u32>> = batch.input_ids.to_vec2().unwrap();
    assert_eq!(ids[0][127], 102, "truncation keeps the final [SEP]");
    let emb = model
        .encode(&[long.as_str()], TextPool::Mean, true)
        .unwrap();
    let norm: f32 = emb
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!((norm - 1.0).abs() < 1e-5);
}
