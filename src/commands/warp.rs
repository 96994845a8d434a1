use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use posttrain_datasets::tokenizer::{SPECIAL_TOKENS_FILE, TOKENIZER_CONFIG_FILE};
use posttrain_model::HostTensor;
use posttrain_model::checkpoint::TOKENIZER_FILE;
use posttrain_model::lora::{Adapter, LoraConfig, PeftTask, peft_key};
use posttrain_model::params::{ParamMap, param_map, with_params};
use posttrain_model::provenance::PROVENANCE_FILE;
use posttrain_model::{
    CheckpointWriter, Gemma2Config, Gemma2ForCausalLM, Provenance, SaveDtype, load_causal_lm,
};
use posttrain_warp::lora_merge::{self, LoraPolicy};
use posttrain_warp::{GroupAngle, check_same, ema, liti, normalised_weights, slerp_all, warm};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// Writes a merged model beside the tokenizer files of `parent` (when it
/// has them: merging is a weight operation and needs none).
fn write_merged(
    writer: CheckpointWriter,
    model: &Gemma2ForCausalLM,
    config: &Gemma2Config,
    parent: &Path,
    provenance: Provenance,
) -> Result<PathBuf> {
    writer.write_model(model, config, SaveDtype::F32)?;
    for file in [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE] {
        writer.copy_from(parent, file)?;
    }
    writer.write(PROVENANCE_FILE, provenance.to_json().as_bytes())?;
    Ok(writer.commit()?)
}
use crate::backend::Env;
use crate::cli::{WarpAverageArgs, WarpCommand, WarpEmaArgs, WarpMergeArgs};

pub fn run(command: WarpCommand, env: &Env) -> Result<()> {
    let (device, backend) = (env.device()?, env.backend());
    match command {
        WarpCommand::Merge(args) => merge(args, &device, backend),
        WarpCommand::Ema(args) => ema_step(args, &device, backend),
        WarpCommand::Average(args) => average(args, &device, backend),
    }
}

/// A checkpoint's config and parameters: a reward model when it has a
/// `score` head, else a causal LM (each checked against its config).
fn load_params(dir: &Path, device: &Device) -> Result<(Gemma2Config, ParamMap)> {
    Ok(if posttrain_model::checkpoint::is_reward_model(dir)? {
        let (config, model) = posttrain_model::load_reward_model(dir, device)?;
        (config, param_map(&model))
    } else {
        let (config, model) = load_causal_lm(dir, device)?;
        (config, param_map(&model))
    })
}

/// What a reward model was fine-tuned from, as its `posttrain.json` says:
/// the `--init` checkpoint's hash and the seed of a new score head, or new
/// weights of a seed.
fn initialisation(dir: &Path) -> Option<String> {
    let text = fs_err::read_to_string(dir.join(PROVENANCE_FILE)).ok()?;
    let p: Provenance = serde_json::from_str(&text).ok()?;
    if p.stage != "reward" {
        return None;
    }
    let drawn = &p.params["head_seed"];
    match p.params["init"].as_str() {
        Some(init) => {
            let parent = p.parents.iter().find(|parent| parent.path == init)?;
            let head = match drawn.as_u64() {
                Some(seed) => format!(" with a new score head of seed {seed}"),
                None => String::new(),
            };
            Some(format!("{init} (sha256 {}){head}", parent.sha256))
        }
        None => {
            let seed = drawn
                .as_u64()
                .map_or(p.params["train"]["seed"].clone(), Into::into);
            Some(format!("new weights of seed {seed}"))
        }
    }
}

fn average(args: WarpAverageArgs, device: &Device, backend: &str) -> Result<()> {
    let n = args.models.len();
    if n < 2 {
        bail!("--models: averaging needs at least two models, got {n}");
    }
    let weights = normalised_weights(n, args.weights.as_deref()).context("--weights")?;
    let writer = CheckpointWriter::create(&args.output.out, args.output.overwrite)?;
    let (config, first) = load_params(&args.models[0], device)?;
    let base = (args.models[0].clone(), config, first);
    let mut models = vec![base.2.clone()];
    for dir in &args.models[1..] {
        models.push(load_like(dir, &base, device)?);
    }
    let inits: Vec<Option<String>> = args.models.iter().map(|d| initialisation(d)).collect();
    if let [Some(a), rest @ ..] = &inits[..]
        && let Some((i, Some(b))) = rest.iter().enumerate().find(|(_, b)| b.as_ref() != Some(a))
    {
        eprintln!(
            "warning: {} was fine-tuned from {b}, {} from {a}: WARM assumes one shared initialisation",
            args.models[i + 1].display(),
            args.models[0].display()
        );
    }
    let averaged = warm(&models, Some(&weights))?;
    let mut provenance = Provenance::new(
        "warp-average",
        backend,
        json!({ "weights": weights, "models": n }),
    );
    for dir in &args.models {
        provenance = provenance.with_parent(dir)?;
    }
    let tensors = averaged
        .iter()
        .map(|(name, p)| (name.clone(), p.to_host()))
        .collect();
    writer.write_weights(&base.1, &tensors, SaveDtype::F32, 1)?;
    for file in [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE] {
        writer.copy_from(&args.models[0], file)?;
    }
    writer.write(PROVENANCE_FILE, provenance.to_json().as_bytes())?;
    let out = writer.commit()?;
    let shown: Vec<String> = weights.iter().map(|w| format!("{w:.3}")).collect();
    eprintln!(
        "warp average: {n} models, weights {} -> {}",
        shown.join(", "),
        out.display()
    );
    Ok(())
}

/// The config without what does not change the tensors (dtype, versions).
fn shape_keys(c: &Gemma2Config) -> serde_json::Map<String, Value> {
    let Ok(Value::Object(mut m)) = serde_json::to_value(c) else {
        unreachable!("configs serialise to objects")
    };
    for k in [
        "dtype",
        "torch_dtype",
        "transformers_version",
        "architectures",
    ] {
        m.remove(k);
    }
    m
}

/// Refuses a config that differs from `base`'s in anything but dtype and versions.
fn check_config(
    dir: &Path,
    base: &(PathBuf, Gemma2Config, ParamMap),
    c: &Gemma2Config,
) -> Result<()> {
    let (a, b) = (shape_keys(&base.1), shape_keys(c));
    if let Some((k, v)) = a.iter().find(|(k, v)| b.get(*k) != Some(*v)) {
        bail!(
            "{}: config differs from {}'s: {k} is {} there and {} here",
            dir.display(),
            base.0.display(),
            v,
            b.get(k).unwrap_or(&Value::Null)
        );
    }
    Ok(())
}

/// Loads `dir` and checks it has `base`'s config and tensor set.
fn load_like(
    dir: &Path,
    base: &(PathBuf, Gemma2Config, ParamMap),
    device: &Device,
) -> Result<ParamMap> {
    let (config, params) = load_params(dir, device)?;
    check_config(dir, base, &config)?;
    check_same(&base.2, &params).with_context(|| dir.display().to_string())?;
    Ok(params)
}

fn eta_name(eta: f64) -> String {
    format!("eta-{eta:.2}")
}

fn merge(args: WarpMergeArgs, device: &Device, backend: &str) -> Result<()> {
    if args.eta.is_empty() || args.eta.iter().any(|e| !e.is_finite()) {
        bail!("--eta must be one or more finite numbers");
    }
    if let Some(eta) = args.eta.iter().find(|e| !(0.0..=1.0).contains(*e))
        && !args.allow_extrapolation
    {
        bail!(
            "--eta {eta} lies outside [0, 1] and would extrapolate (pass --allow-extrapolation to mean it)"
        );
    }
    let writer = CheckpointWriter::create(&args.out, args.overwrite)?;
    if let Some(policies) = lora_policies(&args)? {
        return merge_adapters(args, writer, &policies, backend);
    }
    let (config, init) = load_causal_lm(&args.init, device)?;
    let base = (args.init.clone(), config, param_map(&init));
    let policies = args
        .policies
        .iter()
        .map(|p| load_like(p, &base, device))
        .collect::<Result<Vec<_>>>()?;
    let (merged, angles) = slerp_all(&base.2, &policies)?;
    let angle_log = log_angles(&angles);
    let write = |writer: CheckpointWriter, eta: f64| -> Result<PathBuf> {
        let theta = liti(&base.2, &merged, eta)?;
        let model = with_params(init.clone(), &theta);
        let provenance = merge_provenance(&args, eta, &angle_log, backend)?;
        write_merged(writer, &model, &base.1, &args.init, provenance)
    };
    write_etas(&args, writer, write)
}

/// Writes one output per η (`OUT`, or `OUT/eta-0.10` … for several).
fn write_etas(
    args: &WarpMergeArgs,
    writer: CheckpointWriter,
    write: impl Fn(CheckpointWriter, f64) -> Result<PathBuf>,
) -> Result<()> {
    if let [eta] = args.eta[..] {
        let out = write(writer, eta)?;
        eprintln!("warp merge: η {eta} -> {}", out.display());
    } else {
        for &eta in &args.eta {
            let sub = CheckpointWriter::create(&writer.path().join(eta_name(eta)), false)?;
            write(sub, eta)?;
        }
        let out = writer.commit()?;
        let names: Vec<String> = args.eta.iter().map(|&e| eta_name(e)).collect();
        eprintln!("warp merge: {} -> {}", names.join(", "), out.display());
    }
    Ok(())
}

fn merge_provenance(
    args: &WarpMergeArgs,
    eta: f64,
    angle_log: &[Value],
    backend: &str,
) -> Result<Provenance> {
    let mut provenance = Provenance::new(
        "warp-merge",
        backend,
        json!({
            "eta": eta,
            "policies": args.policies.len(),
            "lambda": "1/m for the m-th policy (recursive SLERP)",
            "angles_degrees": angle_log,
        }),
    )
    .with_parent(&args.init)?;
    for p in &args.policies {
        provenance = provenance.with_parent(p)?;
    }
    Ok(provenance)
}

/// Per recursion step, each group's angle in degrees; the last step's mean
/// on stderr.
fn log_angles(angles: &[Vec<GroupAngle>]) -> Vec<Value> {
    let degrees = |a: &[GroupAngle]| -> Value {
        a.iter()
            .map(|g| {
                (
                    g.group.clone(),
                    json!((g.omega.to_degrees() * 100.0).round() / 100.0),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    if let Some(last) = angles.last().filter(|l| !l.is_empty()) {
        let mean = last.iter().map(|g| g.omega.to_degrees()).sum::<f64>() / last.len() as f64;
        eprintln!(
            "warp merge: {} policies, {} groups, mean task-vector angle {mean:.1}° (last merge step){}",
            angles.len() + 1,
            last.len(),
            if last.iter().any(|g| g.lerp) {
                ", some groups parallel: LERP"
            } else {
                ""
            }
        );
    }
    angles.iter().map(|a| degrees(a)).collect()
}

/// The policies' factors when every policy is a LoRA adapter on `--init`;
/// `None` when none is an adapter; refused when an adapter sits on another
/// base (its task vector would be relative to another model) or adapters
/// and full checkpoints are mixed.
fn lora_policies(args: &WarpMergeArgs) -> Result<Option<Vec<LoraPolicy>>> {
    let init = fs_err::canonicalize(&args.init)?;
    let mut found = Vec::new();
    for dir in &args.policies {
        match Adapter::find(dir)? {
            Some(a) => {
                if fs_err::canonicalize(&a.base)? != init {
                    bail!(
                        "{}: a LoRA adapter on {}, not on --init {}: its task vector is relative to another model",
                        dir.display(),
                        a.base.display(),
                        args.init.display()
                    );
                }
                found.push(Some(a));
            }
            None => found.push(None),
        }
    }
    if found.iter().all(Option::is_none) {
        return Ok(None);
    }
    if let Some(i) = found.iter().position(Option::is_none) {
        bail!(
            "{}: a full checkpoint among LoRA adapters: merge adapters with adapters (or `convert` each adapter to a full checkpoint first)",
            args.policies[i].display()
        );
    }
    found
        .into_iter()
        .flatten()
        .map(|a| {
            let mut factors: BTreeMap<String, (Option<HostTensor>, Option<HostTensor>)> =
                BTreeMap::new();
            for (path, t) in a.tensors()? {
                let (weight, is_a) = if let Some(w) = path.strip_suffix(".lora_a.weight") {
                    (w, true)
                } else if let Some(w) = path.strip_suffix(".lora_b.weight") {
                    (w, false)
                } else {
                    bail!(
                        "{}: tensor {path}: a causal-LM adapter holds only LoRA factors",
                        a.dir.display()
                    );
                };
                let e = factors.entry(format!("{weight}.weight")).or_default();
                if is_a { e.0 = Some(t) } else { e.1 = Some(t) }
            }
            let factors = factors
                .into_iter()
                .map(|(name, pair)| match pair {
                    (Some(fa), Some(fb)) => Ok((name, (fa, fb))),
                    _ => bail!(
                        "{}: {name} has only one of its two factors",
                        a.dir.display()
                    ),
                })
                .collect::<Result<_>>()?;
            Ok(LoraPolicy {
                factors,
                scale: a.config.scale(),
                rank: a.config.rank,
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// WARP's merge of LoRA policies in factor space: each LITI point is an
/// adapter of rank Σr on `--init` (see `posttrain_warp::lora_merge`).
fn merge_adapters(
    args: WarpMergeArgs,
    writer: CheckpointWriter,
    policies: &[LoraPolicy],
    backend: &str,
) -> Result<()> {
    let (coeffs, angles) = lora_merge::coefficients(policies)?;
    let angle_log = log_angles(&angles);
    let rank: usize = policies.iter().map(|p| p.rank).sum();
    let mut targets: Vec<String> = Vec::new();
    for p in policies {
        for name in p.factors.keys() {
            let module = name
                .trim_end_matches(".weight")
                .rsplit('.')
                .next()
                .unwrap_or_default();
            if !targets.iter().any(|t| t == module) {
                targets.push(module.to_string());
            }
        }
    }
    let config = LoraConfig {
        rank,
        alpha: rank as f64,
        targets,
        dropout: 0.0,
    };
    let write = |writer: CheckpointWriter, eta: f64| -> Result<PathBuf> {
        let merged = lora_merge::merged_adapter(policies, &coeffs, eta);
        let mut tensors = BTreeMap::new();
        for (name, (a, b)) in merged {
            let stem = name.trim_end_matches(".weight");
            tensors.insert(peft_key(&format!("{stem}.lora_a.weight")), a);
            tensors.insert(peft_key(&format!("{stem}.lora_b.weight")), b);
        }
        let provenance = merge_provenance(&args, eta, &angle_log, backend)?.with_lora(
            config.clone(),
            &args.init,
            PeftTask::CausalLm,
        )?;
        writer.write_adapter(&tensors, provenance.lora.as_ref().expect("set above"))?;
        for file in [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE] {
            writer.copy_from(&args.init, file)?;
        }
        writer.write(PROVENANCE_FILE, provenance.to_json().as_bytes())?;
        Ok(writer.commit()?)
    };
    write_etas(&args, writer, write)
}

fn ema_step(args: WarpEmaArgs, device: &Device, backend: &str) -> Result<()> {
    if !(0.0..=1.0).contains(&args.mu) {
        bail!("--mu must be in [0, 1], got {}", args.mu);
    }
    let writer = CheckpointWriter::create(&args.output.out, args.output.overwrite)?;
    let (config, anchor) = load_causal_lm(&args.anchor, device)?;
    let base = (args.anchor.clone(), config, param_map(&anchor));
    let policy = load_like(&args.policy, &base, device)?;
    let moved = ema(&base.2, &policy, args.mu)?;
    let model = with_params(anchor, &moved);
    let provenance = Provenance::new("warp-ema", backend, json!({ "mu": args.mu }))
        .with_parent(&args.anchor)?
        .with_parent(&args.policy)?;
    let out = write_merged(writer, &model, &base.1, &args.anchor, provenance)?;
    eprintln!("warp ema: μ {} -> {}", args.mu, out.display());
    Ok(())
}
