use std::collections::HashSet;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;
use posttrain_model::checkpoint::TOKENIZER_FILE;
use posttrain_model::provenance::content_hash;
use posttrain_model::{Gemma2Config, Weights, load_config};
use serde_json::{Value, json};

use crate::cli::InspectArgs;

/// One node of a lineage: an output and what it was made from.
struct Node {
    depth: usize,
    stage: String,
    path: String,
    /// Does the parent still hash as recorded: "ok", "changed" or "missing".
    state: &'static str,
    seen: bool,
}

fn read_provenance(path: &Path) -> Option<Value> {
    posttrain_model::provenance::read(path).and_then(|p| serde_json::to_value(p).ok())
}

/// The chain of parents from `dir` back to its roots, depth first; an output
/// met twice is listed once more, marked seen, without its parents.
fn lineage(dir: &Path) -> Vec<Node> {
    fn visit(
        dir: &Path,
        depth: usize,
        state: &'static str,
        seen: &mut HashSet<PathBuf>,
        out: &mut Vec<Node>,
    ) {
        let provenance = read_provenance(dir);
        let stage = match (&provenance, dir.is_file()) {
            (Some(p), _) => p["stage"].as_str().unwrap_or("?").to_string(),
            (None, true) => "file".into(),
            (None, false) => "-".into(),
        };
        let key = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        let again = !seen.insert(key);
        out.push(Node {
            depth,
            stage,
            path: dir.display().to_string(),
            state,
            seen: again && provenance.is_some(),
        });
        let Some(p) = provenance.filter(|_| !again) else {
            return;
        };
        for parent in p["parents"].as_array().into_iter().flatten() {
            let recorded = parent["path"].as_str().unwrap_or_default();
            let path = parent["resolved"]
                .as_str()
                .map(PathBuf::from)
                .filter(|p| p.exists())
                .unwrap_or_else(|| PathBuf::from(recorded));
            let state = match content_hash(&path) {
                Ok(h) if Some(h.as_str()) == parent["sha256"].as_str() => "ok",
                Ok(_) => "changed",
                Err(_) => "missing",
            };
            visit(&path, depth + 1, state, seen, out);
        }
    }
    let mut out = Vec::new();
    visit(dir, 0, "ok", &mut HashSet::new(), &mut out);
    out
}

/// Each tensor's name, dtype, shape and file, and the elements stored.
fn tensor_list(weights: &Weights) -> (Vec<serde_json::Value>, usize) {
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
    (tensors, stored)
}

/// What the model occupies frozen in each dtype (`--weights-dtype`, `--base-dtype`).
fn held_bytes(dir: &std::path::Path, config: &Gemma2Config) -> Result<Vec<(&'static str, u64)>> {
    use posttrain_model::checkpoint::FrozenDtype;
    use posttrain_model::quant::QuantFormat;
    let other = if posttrain_model::checkpoint::stores_16_bit(dir)? {
        2
    } else {
        4
    };
    Ok([
        FrozenDtype::F32,
        FrozenDtype::Bf16,
        FrozenDtype::Quantized(QuantFormat::Int8),
        FrozenDtype::Quantized(QuantFormat::Nf4),
    ]
    .into_iter()
    .map(|d| (d.name(), d.model_bytes(config, other)))
    .collect())
}

pub fn run(args: InspectArgs) -> Result<()> {
    let config = load_config(&args.dir)?;
    let weights = Weights::open(&args.dir)?;
    let (tensors, stored) = tensor_list(&weights);
    let provenance = read_provenance(&args.dir);
    let chain = lineage(&args.dir);
    let sliding = (0..config.num_hidden_layers)
        .filter(|&l| config.is_sliding(l))
        .count();
    let held = held_bytes(&args.dir, &config)?;
    let summary = json!({
        "dir": args.dir,
        "held_bytes": held.iter().map(|(n, b)| (n.to_string(), json!(b))).collect::<serde_json::Map<_, _>>(),
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
        "lineage": chain.iter().map(|n| json!({
            "depth": n.depth, "stage": n.stage, "path": n.path, "hash": n.state, "seen": n.seen,
        })).collect::<Vec<_>>(),
        "tensors": tensors,
    });
    if args.json {
        return crate::print_stdout(&format!("{}\n", serde_json::to_string_pretty(&summary)?));
    }
    let recorded = provenance.is_some();
    crate::print_stdout(&text(
        &args,
        &config,
        &summary,
        (&held, &chain, recorded),
        (sliding, stored),
    )?)
}

/// The summary as text.
fn text(
    args: &InspectArgs,
    config: &Gemma2Config,
    summary: &serde_json::Value,
    (held, chain, recorded): (&[(&str, u64)], &[Node], bool),
    (sliding, stored): (usize, usize),
) -> Result<String> {
    let provenance = recorded.then_some(());
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
        "  held frozen: {}",
        held.iter()
            .map(|(n, b)| format!("{n} {:.2} GB", *b as f64 / 1e9))
            .collect::<Vec<_>>()
            .join(", ")
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
    if chain.len() > 1 || provenance.is_some() {
        writeln!(
            out,
            "  lineage (hash: does the parent still match what was recorded):"
        )?;
        for n in chain {
            writeln!(
                out,
                "    {}{:<11} {}{}{}",
                "  ".repeat(n.depth),
                n.stage,
                n.path,
                if n.depth > 0 {
                    format!("  [{}]", n.state)
                } else {
                    String::new()
                },
                if n.seen { "  (above)" } else { "" }
            )?;
        }
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
    Ok(out)
}
