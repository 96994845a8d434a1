use std::fmt::Write;

use anyhow::Result;
use posttrain_model::checkpoint::TOKENIZER_FILE;
use posttrain_model::{Weights, load_config};
use serde_json::json;

use crate::cli::InspectArgs;

pub fn run(args: InspectArgs) -> Result<()> {
    let config = load_config(&args.dir)?;
    let weights = Weights::open(&args.dir)?;
    let mut tensors = Vec::new();
    let mut stored = 0usize;
    for name in weights.names() {
        let (dtype, shape) = weights.info(name).expect("listed tensor");
        stored += shape.iter().product::<usize>();
        let file = weights
            .path_of(name)
            .and_then(|p| p.file_name())
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        tensors.push(
            json!({"name": name, "dtype": format!("{dtype:?}"), "shape": shape, "file": file}),
        );
    }
    let provenance = fs_err::read_to_string(args.dir.join("posttrain.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    let sliding = (0..config.num_hidden_layers)
        .filter(|&l| config.is_sliding(l))
        .count();
    let summary = json!({
        "dir": args.dir,
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "sliding_layers": sliding,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "sliding_window": config.sliding_window,
        "max_position_embeddings": config.max_position_embeddings,
        "parameters": config.num_params(),
        "stored_parameters": stored,
        "files": weights.files().iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "tokenizer": args.dir.join(TOKENIZER_FILE).is_file(),
        "provenance": provenance,
        "tensors": tensors,
    });
    if args.json {
        return crate::print_stdout(&format!("{}\n", serde_json::to_string_pretty(&summary)?));
    }
    let mut out = String::new();
    writeln!(out, "{}", args.dir.display())?;
    writeln!(
        out,
        "  gemma2: {} layers ({sliding} sliding, window {}), hidden {}, intermediate {}, heads {}/{} x {}, vocab {}, context {}",
        config.num_hidden_layers,
        config.sliding_window,
        config.hidden_size,
        config.intermediate_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.vocab_size,
        config.max_position_embeddings
    )?;
    writeln!(
        out,
        "  parameters: {} ({:.2}M); stored: {stored}",
        config.num_params(),
        config.num_params() as f64 / 1e6
    )?;
    writeln!(
        out,
        "  tokenizer.json: {}",
        if args.dir.join(TOKENIZER_FILE).is_file() {
            "yes"
        } else {
            "no"
        }
    )?;
    if let Some(p) = &summary["provenance"].as_object() {
        writeln!(
            out,
            "  provenance: stage {}",
            p.get("stage").and_then(|s| s.as_str()).unwrap_or("?")
        )?;
    }
    writeln!(
        out,
        "  {:<56} {:>5} {:>16} file",
        "tensor", "dtype", "shape"
    )?;
    for t in summary["tensors"].as_array().expect("array") {
        writeln!(
            out,
            "  {:<56} {:>5} {:>16} {}",
            t["name"].as_str().unwrap_or_default(),
            t["dtype"].as_str().unwrap_or_default(),
            t["shape"].to_string(),
            t["file"].as_str().unwrap_or_default()
        )?;
    }
    crate::print_stdout(&out)
}
