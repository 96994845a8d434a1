//! `posttrain report`: charts (PNG + SVG) and an `index.html` from run
//! directories: the loss curves of every training stage, RLHF reward and KL
//! over steps, and the KL–reward Pareto plot of every `eval` table found
//! (RL trajectories through their snapshots, LITI points per merge).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use plotters::prelude::SeriesLabelPosition;
use posttrain_datasets::read_records;
use posttrain_model::CheckpointWriter;
use posttrain_model::provenance::PROVENANCE_FILE;
use serde_json::{Map, Value};

use super::JsonRow;
use crate::charts::{Chart, Series, draw};
use crate::cli::ReportArgs;

struct Run {
    label: String,
    stage: String,
    metrics: Vec<Value>,
}

struct Table {
    label: String,
    rows: Vec<Map<String, Value>>,
}

fn is_eval_row(row: &Map<String, Value>) -> bool {
    ["checkpoint", "samples", "length"]
        .iter()
        .all(|k| row.contains_key(*k))
}

/// The first line of a JSONL file, as a row, when it parses.
fn first_row(path: &Path) -> Option<Map<String, Value>> {
    use std::io::BufRead;
    let file = std::fs::File::open(path).ok()?;
    let mut line = String::new();
    std::io::BufReader::new(file).read_line(&mut line).ok()?;
    match serde_json::from_str(&line).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

/// An eval row whose checkpoint lies under `root`, named as the run labels
/// are: `root`'s name joined with the path below it.
fn relative(root: &Path, mut row: Map<String, Value>) -> Map<String, Value> {
    let Some(Value::String(c)) = row.get("checkpoint") else {
        return row;
    };
    let (root, path) = (fs_err::canonicalize(root), fs_err::canonicalize(c));
    if let (Ok(root), Ok(path)) = (root, path)
        && let Ok(rel) = path.strip_prefix(&root)
    {
        let name = root.file_name().map(PathBuf::from).unwrap_or_default();
        row.insert(
            "checkpoint".into(),
            name.join(rel).display().to_string().into(),
        );
    }
    row
}

fn walk(
    root: &Path,
    dir: &Path,
    depth: usize,
    runs: &mut Vec<Run>,
    tables: &mut Vec<Table>,
) -> Result<()> {
    let label = || {
        let rel = dir.strip_prefix(root).unwrap_or(dir);
        let name = root.file_name().map(PathBuf::from).unwrap_or_default();
        name.join(rel).display().to_string()
    };
    let provenance = dir.join(PROVENANCE_FILE);
    let metrics = dir.join("metrics.jsonl");
    if provenance.is_file() && metrics.is_file() {
        let p: Value = serde_json::from_slice(&fs_err::read(&provenance)?)?;
        let rows = fs_err::read_to_string(&metrics)?
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        runs.push(Run {
            label: label(),
            stage: p["stage"].as_str().unwrap_or("?").to_string(),
            metrics: rows,
        });
    }
    if depth == 0 {
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = fs_err::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') || name == "snapshots" {
            continue;
        }
        if path.is_dir() {
            walk(root, &path, depth - 1, runs, tables)?;
        } else if name.ends_with(".jsonl") && first_row(&path).is_some_and(|r| is_eval_row(&r))
            || name.ends_with(".parquet") && name.contains("eval")
        {
            let rows: Vec<JsonRow> = read_records(&path)?;
            let rows: Vec<_> = rows.into_iter().map(|r| relative(root, r.0)).collect();
            if rows.first().is_some_and(is_eval_row) {
                let rel = path.strip_prefix(root).unwrap_or(&path);
                tables.push(Table {
                    label: rel.display().to_string(),
                    rows,
                });
            }
        }
    }
    Ok(())
}

fn curve(run: &Run, key: &str, smooth: usize) -> Vec<(f64, f64)> {
    let raw: Vec<(f64, f64)> = run
        .metrics
        .iter()
        .filter_map(|r| Some((r["step"].as_f64()?, r[key].as_f64()?)))
        .collect();
    if smooth <= 1 {
        return raw;
    }
    (0..raw.len())
        .map(|i| {
            let w = &raw[i.saturating_sub(smooth - 1)..=i];
            (
                raw[i].0,
                w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64,
            )
        })
        .collect()
}

fn stage_chart(
    runs: &[Run],
    stages: &[&str],
    key: &str,
    smooth: usize,
    title: &str,
    y: &str,
) -> Option<Chart> {
    let rising = matches!(
        key,
        "kl_init" | "reward" | "eval_accuracy" | "eval_reward_accuracy"
    );
    let series: Vec<Series> = runs
        .iter()
        .filter(|r| stages.contains(&r.stage.as_str()))
        .map(|r| Series {
            label: r.label.clone(),
            points: curve(r, key, smooth),
            line: true,
        })
        .filter(|s| !s.points.is_empty())
        .collect();
    (!series.is_empty()).then(|| Chart {
        title: title.into(),
        x_label: "step".into(),
        y_label: y.into(),
        series,
        legend: if rising {
            SeriesLabelPosition::LowerRight
        } else {
            SeriesLabelPosition::UpperRight
        },
    })
}

/// Where a checkpoint of an eval table belongs: an RL run (through its
/// snapshots), a LITI sweep (its `eta-*` siblings) or alone.
fn group_of(checkpoint: &str) -> (String, &'static str, f64) {
    let path = Path::new(checkpoint);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let parent = path
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    if let Some(step) = name.strip_prefix("step-")
        && parent.ends_with("snapshots")
    {
        let run = Path::new(&parent).parent().map(|p| p.display().to_string());
        return (run.unwrap_or_default(), "RL", step.parse().unwrap_or(0.0));
    }
    if let Some(eta) = name.strip_prefix("eta-") {
        return (parent, "LITI", eta.parse().unwrap_or(0.0));
    }
    (checkpoint.to_string(), "", f64::INFINITY)
}

fn pareto(table: &Table, y: &str, y_label: &str) -> Option<Chart> {
    // group -> (kind, [(order, kl, value)])
    type Points = Vec<(f64, f64, f64)>;
    let mut groups: BTreeMap<String, (&str, Points)> = BTreeMap::new();
    for row in &table.rows {
        let (Some(c), Some(kl), Some(v)) = (
            row["checkpoint"].as_str(),
            row.get("kl").and_then(Value::as_f64),
            row.get(y).and_then(Value::as_f64),
        ) else {
            continue;
        };
        let (group, kind, order) = group_of(c);
        let entry = groups.entry(group).or_insert((kind, Vec::new()));
        if !kind.is_empty() {
            entry.0 = kind;
        }
        entry.1.push((order, kl, v));
    }
    let series: Vec<Series> = groups
        .into_iter()
        .map(|(group, (kind, mut pts))| {
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            Series {
                label: if kind.is_empty() {
                    group
                } else {
                    format!("{kind}: {group}")
                },
                line: pts.len() > 1,
                points: pts.into_iter().map(|p| (p.1, p.2)).collect(),
            }
        })
        .collect();
    (!series.is_empty()).then(|| Chart {
        title: format!("{y_label} against KL ({})", table.label),
        x_label: "KL to the reference (nats per completion)".into(),
        y_label: y_label.into(),
        series,
        legend: SeriesLabelPosition::LowerRight,
    })
}

fn html_table(table: &Table) -> String {
    let cols = [
        "checkpoint",
        "reward",
        "score",
        "accuracy",
        "kl",
        "length",
        "samples",
    ];
    let mut h = String::from("<table>\n<tr>");
    for c in cols {
        let _ = write!(h, "<th>{c}</th>");
    }
    h.push_str("</tr>\n");
    for r in &table.rows {
        h.push_str("<tr>");
        for c in cols {
            let cell = match r.get(c) {
                Some(Value::Number(n)) if c != "samples" => {
                    format!("{:.3}", n.as_f64().unwrap_or(f64::NAN))
                }
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => "-".into(),
                Some(v) => v.to_string(),
            };
            let _ = write!(h, "<td>{}</td>", escape(&cell));
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n");
    h
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A per-step chart of training stages: file name, stages, metrics key,
/// moving-average window, title, y label.
type StageChart<'a> = (&'a str, &'a [&'a str], &'a str, usize, String, &'a str);

/// The per-step charts of training stages.
fn stage_charts(runs: &[Run], s: usize) -> Vec<(String, Chart)> {
    let table: [StageChart; 8] = [
        (
            "loss",
            &["pretrain", "sft"],
            "loss",
            s,
            format!("Training loss (pretrain, sft; moving average of {s})"),
            "loss",
        ),
        (
            "eval_loss",
            &["pretrain", "sft"],
            "eval_loss",
            1,
            "Held-out loss (pretrain, sft)".into(),
            "eval loss",
        ),
        (
            "reward_model",
            &["reward"],
            "loss",
            s,
            format!("Reward model: Bradley-Terry loss (moving average of {s})"),
            "loss",
        ),
        (
            "reward_model_accuracy",
            &["reward"],
            "eval_accuracy",
            1,
            "Reward model: held-out pairwise accuracy".into(),
            "accuracy",
        ),
        (
            "rlhf_reward",
            &["rlhf"],
            "reward",
            s,
            format!("RLHF: mean reward per step (moving average of {s})"),
            "reward",
        ),
        (
            "rlhf_kl",
            &["rlhf"],
            "kl_init",
            s,
            format!("RLHF: KL to the initial policy (moving average of {s})"),
            "KL (nats)",
        ),
        (
            "dpo_loss",
            &["dpo"],
            "loss",
            s,
            format!("DPO: preference loss (moving average of {s})"),
            "loss",
        ),
        (
            "dpo_reward_accuracy",
            &["dpo"],
            "eval_reward_accuracy",
            1,
            "DPO: held-out implicit-reward accuracy".into(),
            "accuracy",
        ),
    ];
    table
        .into_iter()
        .filter_map(|(name, stages, key, window, title, y)| {
            stage_chart(runs, stages, key, window, &title, y).map(|c| (name.to_string(), c))
        })
        .collect()
}

/// The directories given, for messages.
fn listed(dirs: &[PathBuf]) -> String {
    let names: Vec<String> = dirs.iter().map(|p| p.display().to_string()).collect();
    names.join(", ")
}

/// `index.html`: every chart (drawn into `out` as PNG and SVG), then every eval table.
fn page(
    args: &ReportArgs,
    (runs, charts, tables): (usize, &[(String, Chart)], &[Table]),
    out: &Path,
) -> Result<String> {
    let mut html = String::from(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>posttrain report</title>\n<style>body{font-family:sans-serif;max-width:1000px;margin:auto} table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:2px 6px;text-align:right} td:first-child{text-align:left}</style></head><body>\n<h1>posttrain report</h1>\n",
    );
    let from = escape(&listed(&args.runs));
    let _ = writeln!(
        html,
        "<p>{runs} runs, {} eval tables from {from}</p>",
        tables.len()
    );
    for (name, chart) in charts {
        draw(chart, out, name)?;
        let title = escape(&chart.title);
        let _ = writeln!(
            html,
            "<h2>{title}</h2>\n<img src=\"{name}.png\" alt=\"{title}\" width=\"900\"> <a href=\"{name}.svg\">SVG</a>",
        );
    }
    for t in tables {
        let _ = writeln!(
            html,
            "<h2>Eval table {}</h2>\n{}",
            escape(&t.label),
            html_table(t)
        );
    }
    html.push_str("</body></html>\n");
    Ok(html)
}

pub fn run(args: ReportArgs) -> Result<()> {
    let writer = CheckpointWriter::create(&args.out, args.overwrite)?;
    let (mut runs, mut tables) = (Vec::new(), Vec::new());
    for dir in &args.runs {
        if !dir.is_dir() {
            bail!("{}: not a directory", dir.display());
        }
        walk(dir, dir, 8, &mut runs, &mut tables)?;
    }
    if runs.is_empty() && tables.is_empty() {
        bail!(
            "no run found under {} (a run is a directory with posttrain.json and metrics.jsonl)",
            listed(&args.runs)
        );
    }
    let mut charts = stage_charts(&runs, args.smooth.max(1));
    for (i, t) in tables.iter().enumerate() {
        if let Some(c) = pareto(t, "reward", "reward-model score") {
            charts.push((format!("pareto_reward_{}", i + 1), c));
        }
        if let Some(c) = pareto(t, "score", "true score") {
            charts.push((format!("pareto_score_{}", i + 1), c));
        }
    }
    let html = page(&args, (runs.len(), &charts, &tables), writer.path())?;
    writer.write("index.html", html.as_bytes())?;
    let out = writer.commit()?;
    eprintln!(
        "report: {} charts from {} runs and {} eval tables -> {}",
        charts.len(),
        runs.len(),
        tables.len(),
        out.join("index.html").display()
    );
    Ok(())
}
