//! Loading checkpoints: parity through the CLI, conversion, and one clear
//! line for every kind of broken checkpoint.

use std::collections::HashMap;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::{fails, fixture, fixture_copy, ok, s};

pub(crate) fn read_f32(path: &std::path::Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    let data = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), data)
}

/// Rewrites model.safetensors through `edit(name, dtype, shape, bytes)`;
/// returning None drops the tensor.
pub(crate) fn rewrite(
    ckpt: &std::path::Path,
    edit: impl Fn(&str, Dtype, Vec<usize>, Vec<u8>) -> Option<(Dtype, Vec<usize>, Vec<u8>)>,
) {
    let path = ckpt.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut kept = Vec::new();
    for (name, t) in st.tensors() {
        if let Some(v) = edit(&name, t.dtype(), t.shape().to_vec(), t.data().to_vec()) {
            kept.push((name, v));
        }
    }
    let views: Vec<(String, TensorView)> = kept
        .iter()
        .map(|(n, (d, sh, b))| (n.clone(), TensorView::new(*d, sh.clone(), b).unwrap()))
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    std::fs::write(&path, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
}

fn write_ids(path: &std::path::Path) {
    let (shape, _) = read_f32(&fixture().join("parity.safetensors"), "long.logits");
    let bytes = std::fs::read(fixture().join("parity.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids = st.tensor("ids_long").unwrap();
    assert_eq!(ids.shape(), &shape[..2]);
    let view = TensorView::new(Dtype::I64, ids.shape().to_vec(), ids.data()).unwrap();
    std::fs::write(path, safetensors::serialize([("ids", view)], None).unwrap()).unwrap();
}

/// Max |logits − reference| of `posttrain logits` on the fixture's long ids.
fn reference_logits_diff(model: &std::path::Path) -> f32 {
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("ids.safetensors");
    let out = dir.path().join("logits.safetensors");
    write_ids(&ids);
    ok(&[
        "logits",
        "--model",
        s(model),
        "--ids",
        s(&ids),
        "--out",
        s(&out),
    ]);
    let (shape, got) = read_f32(&out, "logits");
    let (want_shape, want) = read_f32(&fixture().join("parity.safetensors"), "long.logits");
    assert_eq!(shape, want_shape);
    got.iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

#[test]
fn logits_command_reproduces_the_reference() {
    let diff = reference_logits_diff(&fixture());
    assert!(diff <= 1e-4, "max abs diff {diff}");
}

#[test]
fn converted_bf16_shards_load_and_stay_close() {
    let dir = tempfile::tempdir().unwrap();
    let conv = dir.path().join("bf16");
    ok(&[
        "convert",
        "--model",
        s(&fixture()),
        "--out",
        s(&conv),
        "--dtype",
        "bf16",
        "--shards",
        "2",
    ]);
    assert!(conv.join("model.safetensors.index.json").is_file());
    assert!(
        conv.join("tokenizer.json").is_file(),
        "tokenizer travels with the checkpoint"
    );
    let inspect = ok(&["inspect", s(&conv), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(v["files"].as_array().unwrap().len(), 2);
    assert_eq!(v["tensors"][0]["dtype"], "BF16");
    let diff = reference_logits_diff(&conv);
    assert!(diff > 0.0 && diff <= 2e-2, "bf16 max abs diff {diff}");
}

fn logits_of(ckpt: &std::path::Path, needles: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("ids.safetensors");
    write_ids(&ids);
    let out = dir.path().join("out.safetensors");
    let line = fails(
        &[
            "logits",
            "--model",
            s(ckpt),
            "--ids",
            s(&ids),
            "--out",
            s(&out),
        ],
        needles,
    );
    assert!(!out.exists(), "no output after a failure");
    line
}

#[test]
fn truncated_weights_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = fixture_copy(dir.path());
    let path = ckpt.join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 100).unwrap();
    logits_of(&ckpt, &["model.safetensors", "truncated"]);
}

#[test]
fn header_lying_about_sizes_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = fixture_copy(dir.path());
    let path = ckpt.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    logits_of(&ckpt, &["model.safetensors"]);
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = fixture_copy(dir.path());
    rewrite(&ckpt, |n, d, sh, b| {
        (n != "model.layers.1.mlp.up_proj.weight").then_some((d, sh, b))
    });
    logits_of(&ckpt, &["model.layers.1.mlp.up_proj.weight", "missing"]);
}

#[test]
fn wrong_shape_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = fixture_copy(dir.path());
    rewrite(&ckpt, |n, d, sh, b| {
        if n == "model.layers.2.self_attn.k_proj.weight" {
            Some((d, vec![sh[1], sh[0]], b))
        } else {
            Some((d, sh, b))
        }
    });
    logits_of(
        &ckpt,
        &[
            "model.layers.2.self_attn.k_proj.weight",
            "shape [64, 32]",
            "[32, 64]",
        ],
    );
}

#[test]
fn nan_in_weights_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = fixture_copy(dir.path());
    rewrite(&ckpt, |n, d, sh, mut b| {
        if n == "model.norm.weight" {
            b[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
        }
        Some((d, sh, b))
    });
    logits_of(
        &ckpt,
        &["model.norm.weight", "non-finite", "model.safetensors"],
    );
}

pub(crate) fn edit_config(ckpt: &std::path::Path, key: &str, value: serde_json::Value) {
    let path = ckpt.join("config.json");
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    c[key] = value;
    if key == "num_hidden_layers" {
        c.as_object_mut().unwrap().remove("layer_types");
    }
    std::fs::write(&path, c.to_string()).unwrap();
}

#[test]
fn config_weights_mismatch_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = fixture_copy(dir.path());
    edit_config(&ckpt, "num_hidden_layers", 4.into());
    logits_of(&ckpt, &["model.layers.3.", "missing"]);
    edit_config(&ckpt, "num_hidden_layers", 2.into());
    logits_of(&ckpt, &["model.layers.2.", "not part of this model"]);
    edit_config(&ckpt, "num_hidden_layers", 3.into());
    edit_config(&ckpt, "intermediate_size", 128.into());
    logits_of(&ckpt, &["mlp", "shape", "config.json implies"]);
}

#[test]
fn bad_config_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = fixture_copy(dir.path());
    edit_config(&ckpt, "num_key_value_heads", 3.into());
    logits_of(&ckpt, &["config.json", "num_key_value_heads"]);
    std::fs::write(ckpt.join("config.json"), "{ not json").unwrap();
    logits_of(&ckpt, &["config.json", "invalid config"]);
    std::fs::remove_file(ckpt.join("config.json")).unwrap();
    logits_of(&ckpt, &["config.json", "not found"]);
}

#[test]
fn directory_without_weights_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = fixture_copy(dir.path());
    std::fs::remove_file(ckpt.join("model.safetensors")).unwrap();
    logits_of(&ckpt, &["no model.safetensors"]);
}

#[test]
fn checkpoints_carry_hugging_face_tokenizer_settings_with_the_chat_template() {
    let dir = tempfile::tempdir().unwrap();
    let read = |p: &std::path::Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let made = dir.path().join("made");
    let config = fixture().join("config.json");
    let tokenizer = fixture().join("tokenizer.json");
    ok(&[
        "init",
        "--config",
        s(&config),
        "--tokenizer",
        s(&tokenizer),
        "--out",
        s(&made),
    ]);
    let tc = read(&made.join("tokenizer_config.json"));
    assert!(
        tc["chat_template"]
            .as_str()
            .unwrap()
            .contains("<start_of_turn>")
    );
    assert_eq!(tc["bos_token"], "<bos>");
    let special = read(&made.join("special_tokens_map.json"));
    assert_eq!(
        special["additional_special_tokens"],
        serde_json::json!(["<start_of_turn>", "<end_of_turn>"])
    );
    // a tokenizer's own settings travel with it, through every writer
    let own = fixture_copy(dir.path());
    std::fs::write(
        own.join("tokenizer_config.json"),
        r#"{"chat_template": "mine", "model_max_length": 77}"#,
    )
    .unwrap();
    let carried = dir.path().join("carried");
    ok(&[
        "init",
        "--config",
        s(&config),
        "--tokenizer",
        s(&own.join("tokenizer.json")),
        "--out",
        s(&carried),
    ]);
    assert_eq!(
        read(&carried.join("tokenizer_config.json"))["chat_template"],
        "mine"
    );
    let converted = dir.path().join("converted");
    ok(&["convert", "--model", s(&carried), "--out", s(&converted)]);
    assert_eq!(
        read(&converted.join("tokenizer_config.json"))["model_max_length"],
        77
    );
    assert!(converted.join("special_tokens_map.json").is_file());
    // the ids posttrain trains on, as `tokenizer encode` prints them
    let ids = ok(&[
        "tokenizer",
        "encode",
        "--tokenizer",
        s(&made),
        "--messages",
        r#"[{"role": "user", "content": "hi"}]"#,
    ]);
    let ids: serde_json::Value = serde_json::from_str(ids.trim()).unwrap();
    let ids = ids["ids"].as_array().unwrap();
    assert_eq!(ids[0], 2, "<bos> first");
    let count = |id: u64| ids.iter().filter(|v| v.as_u64() == Some(id)).count();
    assert_eq!(
        (count(4), count(5)),
        (2, 1),
        "two <start_of_turn> (user, model), one <end_of_turn>: {ids:?}"
    );
}
