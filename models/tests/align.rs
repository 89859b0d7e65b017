//! The alignment model (`gigapath_models::align`): gradients reach every trainable parameter
//! (with fine-tuned slide and text layers), frozen weights do not move, fine-tuned tails start
//! out equal to the frozen encoders, and checkpoints round-trip.
//!
//! Uses a small generated slide encoder and the real all-MiniLM-L6-v2 (`scripts/fetch-minilm.sh`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use gigapath_models::align::{
    self, init_trainable, Alignment, AlignmentConfig, HeadKind, SlidePrefix, TextPrefix,
};
use gigapath_models::init::{init_slide_encoder, SlideSize};
use gigapath_models::{Precision, SlideEncoder, TextEncoder, TextPool};

fn minilm_dir() -> PathBuf {
    let dir = std::env::var_os("GIGAPATH_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/all-MiniLM-L6-v2"));
    assert!(
        dir.join("config.json").is_file(),
        "all-MiniLM-L6-v2 not found in {}: run scripts/fetch-minilm.sh (or set GIGAPATH_MINILM_DIR)",
        dir.display()
    );
    dir
}

struct Fixture {
    _tmp: tempfile::TempDir,
    slide_dir: PathBuf,
    slide: SlideEncoder,
    text: TextEncoder,
    slides: Vec<(Tensor, Vec<[u32; 2]>)>,
    texts: Vec<&'static str>,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let slide_dir = tmp.path().join("slide");
    let size = SlideSize {
        in_chans: 24,
        embed_dim: 32,
        depth: 2,
        num_heads: 16,
    };
    init_slide_encoder(&slide_dir, size, 3).unwrap();
    let slide = SlideEncoder::load(&slide_dir, &Precision::cpu()).unwrap();
    let text = TextEncoder::load(&minilm_dir(), &Precision::cpu()).unwrap();
    // Four slides of different sizes on small grids; features differ per slide.
    let slides = (0..4)
        .map(|s| {
            let n = 5 + 3 * s;
            let cells: Vec<[u32; 2]> = (0..n).map(|i| [(i % 4) as u32, (i / 4) as u32]).collect();
            let values: Vec<f32> = (0..n * 24)
                .map(|i| ((i * 7 + s * 13) % 17) as f32 / 8.0 - 1.0 + s as f32 * 0.3)
                .collect();
            (
                Tensor::from_vec(values, (n, 24), &Device::Cpu).unwrap(),
                cells,
            )
        })
        .collect();
    Fixture {
        _tmp: tmp,
        slide_dir,
        slide,
        text,
        slides,
        texts: vec![
            "clear cell renal cell carcinoma, nests of clear cells",
            "papillary renal cell carcinoma with fibrovascular cores",
            "chromophobe carcinoma",
            "Specimen: left kidney. Diagnosis: oncocytoma.",
        ],
    }
}

fn config(f: &Fixture, slide_layers: usize, text_layers: usize, head: HeadKind) -> AlignmentConfig {
    let mut cfg = AlignmentConfig::new(f.slide.config(), f.text.config());
    cfg.joint_dim = 16;
    cfg.slide_head = head;
    cfg.text_head = head;
    cfg.slide_trainable_layers = slide_layers;
    cfg.text_trainable_layers = text_layers;
    cfg
}

/// Loss of the fixture's batch under `model`.
fn loss(f: &Fixture, model: &Alignment) -> Tensor {
    let slide_prefixes: Vec<SlidePrefix> = f
        .slides
        .iter()
        .map(|(x, c)| model.slide_prefix(&f.slide, x, c).unwrap())
        .collect();
    let text_prefixes = model.text_prefixes(&f.text, &f.texts).unwrap();
    let s = model
        .slide_embeddings(&slide_prefixes.iter().collect::<Vec<_>>())
        .unwrap();
    let t = model
        .text_embeddings(&text_prefixes.iter().collect::<Vec<_>>())
        .unwrap();
    let s = model.project_slides(&s).unwrap();
    let t = model.project_texts(&t).unwrap();
    model.clip_loss(&s, &t).unwrap()
}

fn abs_sum(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn every_trainable_parameter_gets_a_gradient() {
    let f = fixture();
    for head in [HeadKind::Linear, HeadKind::Mlp { hidden: 20 }] {
        // Every slide layer and two text layers fine-tuned: the dilated attention, the
        // LayerNorms and BERT's softmax all sit on the gradient path.
        let cfg = config(&f, 2, 2, head);
        let (model, varmap) = init_trainable(
            &cfg,
            Some(&f.slide_dir),
            Some(&minilm_dir()),
            5,
            &Device::Cpu,
        )
        .unwrap();
        let grads = loss(&f, &model).backward().unwrap();
        let data = varmap.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let n_slide = names
            .iter()
            .filter(|n| n.starts_with("slide_encoder."))
            .count();
        let n_text = names
            .iter()
            .filter(|n| n.starts_with("text_encoder."))
            .count();
        // 2 layers x 20 tensors + 2 output norms x 2 on the slide side; 2 BERT layers x 16.
        assert_eq!((n_slide, n_text), (44, 32), "{names:?}");
        assert!(data.contains_key("logit_scale"));
        let mut dead = Vec::new();
        for name in names {
            let var = &data[name];
            match grads.get(var.as_tensor()) {
                Some(g) if abs_sum(g) > 0.0 && abs_sum(g).is_finite() => {}
                Some(g) => dead.push(format!("{name} (|grad| = {})", abs_sum(g))),
                None => dead.push(format!("{name} (no gradient)")),
            }
        }
        assert!(
            dead.is_empty(),
            "{head:?}: parameters without gradient: {dead:?}"
        );
    }
}

#[test]
fn a_step_moves_trainable_weights_and_never_the_frozen_encoders() {
    let f = fixture();
    let cfg = config(&f, 1, 1, HeadKind::Linear);
    let (model, varmap) = init_trainable(
        &cfg,
        Some(&f.slide_dir),
        Some(&minilm_dir()),
        5,
        &Device::Cpu,
    )
    .unwrap();
    let (x, cells) = &f.slides[0];
    let base_slide_before = f.slide.encode_cells(x, cells).unwrap().pool;
    let base_text_before = f.text.encode(&f.texts, TextPool::Mean, true).unwrap();
    let before: Vec<(String, Tensor)> = {
        let data = varmap.data().lock().unwrap();
        data.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
            .collect()
    };
    let l0 = loss(&f, &model).to_scalar::<f32>().unwrap();
    let grads = loss(&f, &model).backward().unwrap();
    for var in varmap.all_vars() {
        let g = grads.get(var.as_tensor()).unwrap();
        var.set(&(var.as_tensor() - (g * 0.002).unwrap()).unwrap())
            .unwrap();
    }
    let l1 = loss(&f, &model).to_scalar::<f32>().unwrap();
    assert!(l1 < l0, "a gradient step lowers the loss: {l0} -> {l1}");
    let data = varmap.data().lock().unwrap();
    for (name, old) in &before {
        let d = abs_sum(&(data[name].as_tensor() - old).unwrap());
        assert!(d > 0.0, "{name} did not move");
    }
    // The base encoders are not in the VarMap and their outputs are bit-identical.
    let base_slide_after = f.slide.encode_cells(x, cells).unwrap().pool;
    let base_text_after = f.text.encode(&f.texts, TextPool::Mean, true).unwrap();
    assert_eq!(
        abs_sum(&(base_slide_after - base_slide_before).unwrap()),
        0.0
    );
    assert_eq!(abs_sum(&(base_text_after - base_text_before).unwrap()), 0.0);
}

#[test]
fn fine_tuned_tails_start_equal_to_the_frozen_encoders() {
    let f = fixture();
    let frozen_cfg = config(&f, 0, 0, HeadKind::Linear);
    let tuned_cfg = config(&f, 1, 2, HeadKind::Linear);
    let (frozen, _) = init_trainable(&frozen_cfg, None, None, 9, &Device::Cpu).unwrap();
    let (tuned, _) = init_trainable(
        &tuned_cfg,
        Some(&f.slide_dir),
        Some(&minilm_dir()),
        9,
        &Device::Cpu,
    )
    .unwrap();
    for (x, cells) in &f.slides {
        let (a, ja) = frozen.slide_joint(&f.slide, x, cells).unwrap();
        let (b, jb) = tuned.slide_joint(&f.slide, x, cells).unwrap();
        let err: f32 = a
            .iter()
            .zip(&b)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-4, "slide tail differs from the encoder by {err}");
        let jerr: f32 = ja
            .iter()
            .zip(&jb)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f32::max);
        assert!(jerr < 1e-4, "same heads (same seed), same joint: {jerr}");
        let norm: f32 = jb.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
    let a = frozen.text_joint(&f.text, &f.texts).unwrap();
    let b = tuned.text_joint(&f.text, &f.texts).unwrap();
    let err = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(err < 1e-4, "text tail differs from the encoder by {err}");
    // Hidden prefixes carry only the real tokens of each text.
    let prefixes = tuned.text_prefixes(&f.text, &f.texts).unwrap();
    let lens: Vec<usize> = prefixes
        .iter()
        .map(|p| match p {
            TextPrefix::Hidden(h) => h.dim(0).unwrap(),
            TextPrefix::Embedding(_) => panic!("expected hidden states"),
        })
        .collect();
    assert!(lens.iter().min() < lens.iter().max(), "{lens:?}");
}

#[test]
fn checkpoints_round_trip() {
    let f = fixture();
    let mut cfg = config(&f, 1, 1, HeadKind::Mlp { hidden: 24 });
    cfg.base_fingerprints.insert("slide".into(), "abc".into());
    cfg.run_id = "run-x".into();
    cfg.step = 7;
    let (model, varmap) = init_trainable(
        &cfg,
        Some(&f.slide_dir),
        Some(&minilm_dir()),
        1,
        &Device::Cpu,
    )
    .unwrap();
    let dir = f._tmp.path().join("ckpt");
    align::save_checkpoint(&dir, &cfg, &varmap).unwrap();
    let loaded = Alignment::load(&dir, &Precision::cpu()).unwrap();
    assert_eq!(loaded.config(), &cfg);
    assert_eq!(loaded.joint_dim(), 16);
    assert!(
        (loaded.logit_scale() - 1.0 / 0.07).abs() < 1e-3,
        "{}",
        loaded.logit_scale()
    );
    assert_eq!(loaded.base_fingerprints()["slide"], "abc");
    // The trainable model runs the differentiable ops, the loaded one the fused kernels: equal
    // to float rounding.
    let (x, cells) = &f.slides[1];
    let (a, b) = (
        model.slide_joint(&f.slide, x, cells).unwrap(),
        loaded.slide_joint(&f.slide, x, cells).unwrap(),
    );
    for (p, q) in a.0.iter().chain(&a.1).zip(b.0.iter().chain(&b.1)) {
        assert!((p - q).abs() < 1e-5, "{p} vs {q}");
    }
    let a = model.text_joint(&f.text, &f.texts).unwrap();
    let b = loaded.text_joint(&f.text, &f.texts).unwrap();
    let err = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(err < 1e-5, "{err}");
    // Keys: heads, scale, and fine-tuned layers under their original names.
    let keys: Vec<String> =
        candle_core::safetensors::load(dir.join(align::WEIGHTS_FILE), &Device::Cpu)
            .unwrap()
            .into_keys()
            .collect();
    for k in [
        "logit_scale",
        "slide_head.fc1.weight",
        "text_head.fc2.weight",
        "slide_encoder.encoder.layers.1.self_attn.q_proj.weight",
        "slide_encoder.norm.weight",
        "text_encoder.encoder.layer.5.attention.self.query.weight",
    ] {
        assert!(keys.iter().any(|x| x == k), "{k} missing from {keys:?}");
    }
    assert!(!keys
        .iter()
        .any(|k| k.contains("layers.0.") || k.contains("layer.4.")));
}

#[test]
fn bad_checkpoints_and_configs_are_clear_errors() {
    let f = fixture();
    let mut cfg = config(&f, 3, 0, HeadKind::Linear);
    let err = init_trainable(&cfg, Some(&f.slide_dir), None, 1, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("slide_trainable_layers = 3"), "{err}");
    cfg.slide_trainable_layers = 1;
    let err = init_trainable(&cfg, None, None, 1, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("needs the slide encoder folder"), "{err}");

    let empty = f._tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = Alignment::load(&empty, &Precision::cpu())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("alignment.json"), "{err}");

    // A checkpoint whose weights do not fit its config names the tensor.
    let (_, varmap) = init_trainable(
        &config(&f, 0, 0, HeadKind::Linear),
        None,
        None,
        1,
        &Device::Cpu,
    )
    .unwrap();
    let dir = f._tmp.path().join("bad");
    let mut wrong = config(&f, 0, 0, HeadKind::Linear);
    align::save_checkpoint(&dir, &wrong, &varmap).unwrap();
    wrong.joint_dim = 8;
    std::fs::write(
        dir.join(align::CONFIG_FILE),
        serde_json::to_string(&wrong).unwrap(),
    )
    .unwrap();
    let err = Alignment::load(&dir, &Precision::cpu())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("slide_head.proj.weight") || err.contains("shape"),
        "{err}"
    );

    // Wrong base encoder width.
    let other = f._tmp.path().join("other");
    init_slide_encoder(
        &other,
        SlideSize {
            in_chans: 24,
            embed_dim: 48,
            depth: 1,
            num_heads: 16,
        },
        1,
    )
    .unwrap();
    let other = SlideEncoder::load(&other, &Precision::cpu()).unwrap();
    let (model, _) = init_trainable(
        &config(&f, 0, 0, HeadKind::Linear),
        None,
        None,
        1,
        &Device::Cpu,
    )
    .unwrap();
    let (x, cells) = &f.slides[0];
    let err = model
        .slide_joint(&other, x, cells)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("48-d"), "{err}");
    let _ = DType::F32;
}
