//! LoRA (Hu et al. 2021, arXiv 2106.09685) on any of Gemma 2's seven
//! projections, in PEFT's layout: a frozen `W` `[out, in]` plus trainable
//! `A` `[r, in]` and `B` `[out, r]`,
//!
//! `y = x·Wᵀ + (α/r)·(x·Aᵀ)·Bᵀ`,
//!
//! computed in that factored form (never `W + (α/r)·B·A` per step: that would
//! read and write every base weight twice per forward). `B` starts at zero so
//! the adapted model starts equal to its base; `A` is drawn as PEFT does
//! (`kaiming_uniform_(a=√5)`: uniform in `±1/√in`).
//!
//! An adapter directory holds `adapter_config.json` and
//! `adapter_model.safetensors` with PEFT's keys
//! (`base_model.model.<module>.lora_A.weight`), so
//! `PeftModel.from_pretrained(base, dir)` loads it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{ModelError, Result};
use crate::gemma2::{Gemma2ForCausalLM, Gemma2ForSequenceClassification, Gemma2Model};
use crate::layers::Linear;
use crate::params::param_map;
use crate::safetensors_io::HostTensor;

pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's prefix of every saved key.
pub const PEFT_PREFIX: &str = "base_model.model.";
/// The projections LoRA can adapt, by their Hugging Face module names.
pub const TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    /// r: rank of `B·A`.
    pub rank: usize,
    /// α: the update is scaled by α/r.
    pub alpha: f64,
    /// Module names among [`TARGETS`].
    pub targets: Vec<String>,
    /// Dropout on the factors' input while training (PEFT's `lora_dropout`).
    #[serde(default)]
    pub dropout: f64,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Refuses a zero rank and names that are not projections.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.rank == 0 {
            return Err("--lora-rank must be at least 1".into());
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(format!("--lora-alpha must be positive, got {}", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!(
                "--lora-dropout must be in [0, 1), got {}",
                self.dropout
            ));
        }
        if self.targets.is_empty() {
            return Err("--lora-targets names no projection".into());
        }
        if let Some(t) = self.targets.iter().find(|t| !TARGETS.contains(&t.as_str())) {
            return Err(format!(
                "--lora-targets: `{t}` is not one of {}",
                TARGETS.join(", ")
            ));
        }
        Ok(())
    }

    /// `adapter_config.json` as PEFT writes it. `modules_to_save` names
    /// fully trained modules saved beside the factors (a reward model's
    /// `score` head).
    pub fn to_peft_json(&self, base: &Path, task: PeftTask) -> String {
        let (task_type, modules_to_save) = match task {
            PeftTask::CausalLm => ("CAUSAL_LM", serde_json::Value::Null),
            PeftTask::SequenceClassification => ("SEQ_CLS", serde_json::json!(["score"])),
        };
        let v = serde_json::json!({
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": base.display().to_string(),
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "use_rslora": false,
            "use_dora": false,
            "modules_to_save": modules_to_save,
            "revision": null,
        });
        serde_json::to_string_pretty(&v).expect("json") + "\n"
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeftTask {
    CausalLm,
    SequenceClassification,
}

/// One LoRA factor: parameter path `….lora_a.weight`, PEFT key
/// `base_model.model.….lora_A.weight` (see [`peft_key`]).
#[derive(Module, Debug)]
pub struct Factor {
    pub weight: Param<Tensor<2>>,
}

impl Factor {
    fn new(data: Vec<f32>, shape: [usize; 2], device: &Device) -> Self {
        let t = Tensor::<2>::from_data(TensorData::new(data, shape), device);
        let t = if device.is_autodiff() {
            t.require_grad()
        } else {
            t
        };
        Self {
            weight: Param::from_tensor(t),
        }
    }
}

impl Linear {
    /// Attaches new factors (`A` drawn from `rng`, `B` zero).
    fn attach(&mut self, rank: usize, scale: f64, dropout: f64, rng: &mut StdRng) {
        let [d_out, d_in] = self.dims();
        let device = self.weight.device();
        let bound = 1.0 / (d_in as f32).sqrt();
        let a: Vec<f32> = (0..rank * d_in)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        self.lora_a = Some(Factor::new(a, [rank, d_in], &device));
        self.lora_b = Some(Factor::new(vec![0.0; d_out * rank], [d_out, rank], &device));
        self.lora_scale = scale;
        self.lora_dropout = dropout;
    }

    /// `W + (α/r)·B·A` in place of the factors; a quantized `W` keeps
    /// them (the factored forward computes the same function).
    fn merge(&mut self) {
        if self.quantized.is_some() {
            return;
        }
        let (Some(a), Some(b)) = (self.lora_a.take(), self.lora_b.take()) else {
            return;
        };
        let delta = b
            .weight
            .val()
            .inner()
            .matmul(a.weight.val().inner())
            .mul_scalar(self.lora_scale);
        let require_grad = self.weight.is_require_grad();
        // a compact (bf16) base is merged in f32 and kept compact
        let dtype = self.weight.val().dtype();
        let base = self.weight.val().inner();
        let weight = if dtype == burn::tensor::DType::F32 {
            base + delta
        } else {
            (base.cast(burn::tensor::DType::F32) + delta).cast(dtype)
        };
        let device = self.weight.device();
        let weight = if device.is_autodiff() {
            crate::on_autodiff(weight, &device).set_require_grad(require_grad)
        } else {
            weight
        };
        self.weight = Param::initialized(self.weight.id, weight);
    }
}

impl Gemma2Model {
    /// Every projection with its module name (`q_proj`, …) and path.
    fn projections_mut(&mut self) -> impl Iterator<Item = (&'static str, String, &mut Linear)> {
        self.layers.iter_mut().enumerate().flat_map(|(i, l)| {
            let a = &mut l.self_attn;
            let m = &mut l.mlp;
            let at = move |n: &'static str| (n, format!("model.layers.{i}.self_attn.{n}"));
            let mp = move |n: &'static str| (n, format!("model.layers.{i}.mlp.{n}"));
            [
                (at("q_proj"), &mut a.q_proj),
                (at("k_proj"), &mut a.k_proj),
                (at("v_proj"), &mut a.v_proj),
                (at("o_proj"), &mut a.o_proj),
                (mp("gate_proj"), &mut m.gate_proj),
                (mp("up_proj"), &mut m.up_proj),
                (mp("down_proj"), &mut m.down_proj),
            ]
            .into_iter()
            .map(|((n, p), lin)| (n, p, lin))
        })
    }

    /// Freezes every parameter and attaches trainable factors to the target
    /// projections, drawn in layer order from `seed`.
    pub fn attach_lora(self, cfg: &LoraConfig, seed: u64) -> Self {
        let mut model = self.no_grad();
        let mut rng = StdRng::seed_from_u64(seed);
        for (name, _, lin) in model.projections_mut() {
            if cfg.targets.iter().any(|t| t == name) {
                lin.attach(cfg.rank, cfg.scale(), cfg.dropout, &mut rng);
            }
        }
        model
    }

    /// Folds every adapter into its base weight.
    pub fn merge_lora(mut self) -> Self {
        for (_, _, lin) in self.projections_mut() {
            lin.merge();
        }
        self
    }

    /// Every projection of every layer.
    fn projections(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().flat_map(|l| {
            let (a, m) = (&l.self_attn, &l.mlp);
            [
                &a.q_proj,
                &a.k_proj,
                &a.v_proj,
                &a.o_proj,
                &m.gate_proj,
                &m.up_proj,
                &m.down_proj,
            ]
        })
    }

    /// Elements of the projections held quantized.
    pub fn quantized_params(&self) -> usize {
        self.projections()
            .filter_map(|p| p.quantized.as_ref())
            .map(|q| q.rows * q.cols)
            .sum()
    }

    pub fn has_lora(&self) -> bool {
        self.projections().any(|p| p.lora_a.is_some())
    }
}

/// A model LoRA can adapt: a causal LM, or a reward model (LoRA on the
/// trunk; its `score` head stays fully trainable).
pub trait Adaptable: Module + Sized {
    const TASK: PeftTask;
    fn attach_lora(self, cfg: &LoraConfig, seed: u64) -> Self;
    fn merge_lora(self) -> Self;
    /// Elements of the frozen matrices held quantized (not parameters of
    /// the module).
    fn quantized_params(&self) -> usize;
}

impl Adaptable for Gemma2ForCausalLM {
    const TASK: PeftTask = PeftTask::CausalLm;

    fn attach_lora(self, cfg: &LoraConfig, seed: u64) -> Self {
        Self {
            model: self.model.attach_lora(cfg, seed),
            ..self
        }
    }

    fn merge_lora(self) -> Self {
        Self {
            model: self.model.merge_lora(),
            ..self
        }
    }

    fn quantized_params(&self) -> usize {
        self.model.quantized_params()
    }
}

impl Adaptable for Gemma2ForSequenceClassification {
    const TASK: PeftTask = PeftTask::SequenceClassification;

    fn attach_lora(self, cfg: &LoraConfig, seed: u64) -> Self {
        let model = self.model.attach_lora(cfg, seed);
        let score = self.score.set_require_grad(true);
        Self { model, score }
    }

    fn merge_lora(self) -> Self {
        Self {
            model: self.model.merge_lora(),
            ..self
        }
    }

    fn quantized_params(&self) -> usize {
        self.model.quantized_params()
    }
}

/// PEFT's key of a parameter path.
pub fn peft_key(path: &str) -> String {
    let key = path
        .replace(".lora_a.", ".lora_A.")
        .replace(".lora_b.", ".lora_B.");
    format!("{PEFT_PREFIX}{key}")
}

/// The parameter path of a PEFT key (`None` without PEFT's prefix).
pub fn param_path(key: &str) -> Option<String> {
    let path = key.strip_prefix(PEFT_PREFIX)?;
    Some(
        path.replace(".lora_A.", ".lora_a.")
            .replace(".lora_B.", ".lora_b."),
    )
}

/// Whether an adapter directory stores this parameter: every factor and
/// the fully trained modules (`score.weight` of a reward model).
pub fn in_adapter(path: &str) -> bool {
    path.contains(".lora_a.") || path.contains(".lora_b.") || path == "score.weight"
}

/// The tensors an adapter directory stores, by PEFT key.
pub fn adapter_tensors<M: Module>(model: &M) -> BTreeMap<String, HostTensor> {
    param_map(model)
        .into_iter()
        .filter(|(name, _)| in_adapter(name))
        .map(|(name, t)| (peft_key(&name), t.to_host()))
        .collect()
}

/// An adapter directory's settings and where its base lives.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub dir: PathBuf,
    pub base: PathBuf,
    pub config: LoraConfig,
    pub task: PeftTask,
}

impl Adapter {
    /// `Some` when `dir` holds `adapter_config.json`. A relative base path
    /// is tried as written, then relative to the adapter directory.
    pub fn find(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(ADAPTER_CONFIG_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let bad = |reason: String| ModelError::Config {
            path: path.clone(),
            reason,
        };
        let v: serde_json::Value = serde_json::from_slice(&fs_err::read(&path)?)
            .map_err(|e| bad(format!("not JSON: {e}")))?;
        if v["peft_type"] != "LORA" {
            return Err(bad(format!(
                "peft_type {} is not supported (LORA is)",
                v["peft_type"]
            )));
        }
        for (key, off) in [("use_dora", true), ("use_rslora", true)] {
            if v[key] == off {
                return Err(bad(format!("`{key}: true` is not supported")));
            }
        }
        let rank = v["r"]
            .as_u64()
            .ok_or_else(|| bad("`r` is not a positive integer".into()))?
            as usize;
        let alpha = v["lora_alpha"]
            .as_f64()
            .ok_or_else(|| bad("`lora_alpha` is not a number".into()))?;
        let targets: Vec<String> = match &v["target_modules"] {
            serde_json::Value::String(s) => vec![s.clone()],
            other => serde_json::from_value(other.clone())
                .map_err(|_| bad("`target_modules` is not a list of names".into()))?,
        };
        let config = LoraConfig {
            rank,
            alpha,
            targets,
            dropout: v["lora_dropout"].as_f64().unwrap_or(0.0),
        };
        config.check().map_err(bad)?;
        let named = v["base_model_name_or_path"]
            .as_str()
            .ok_or_else(|| bad("`base_model_name_or_path` is missing".into()))?;
        let named = PathBuf::from(named);
        let base = if named.is_absolute() || named.is_dir() {
            named
        } else {
            dir.join(&named)
        };
        if !base.is_dir() {
            return Err(bad(format!(
                "the base model {} is not a directory",
                base.display()
            )));
        }
        let task = match v["task_type"].as_str() {
            Some("SEQ_CLS") => PeftTask::SequenceClassification,
            _ => PeftTask::CausalLm,
        };
        Ok(Some(Self {
            dir: dir.to_path_buf(),
            base,
            config,
            task,
        }))
    }

    /// The adapter's tensors by module path (PEFT prefix removed).
    pub fn tensors(&self) -> Result<BTreeMap<String, HostTensor>> {
        let path = self.dir.join(ADAPTER_WEIGHTS_FILE);
        let weights = crate::Weights::open_file(&path)?;
        let mut out = BTreeMap::new();
        for name in weights.names() {
            let Some(short) = param_path(name) else {
                return Err(ModelError::Tensor {
                    path: path.clone(),
                    tensor: name.to_string(),
                    reason: format!("does not start with `{PEFT_PREFIX}`"),
                });
            };
            out.insert(short, weights.read(name)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::Adaptable;
    use crate::params::{named_params, with_params};
    use crate::{Gemma2Config, RandomInit, TokenBatch};

    fn tiny(device: &Device) -> Gemma2ForCausalLM {
        let c = Gemma2Config::new(32, 16, 32, 2, 2, 1, 8, 8);
        Gemma2ForCausalLM::new(&c, &mut RandomInit::new(3), device).unwrap()
    }

    fn all() -> LoraConfig {
        LoraConfig {
            rank: 4,
            alpha: 8.0,
            targets: TARGETS.iter().map(|t| t.to_string()).collect(),
            dropout: 0.0,
        }
    }

    fn logits(m: &Gemma2ForCausalLM) -> Vec<f32> {
        let batch = TokenBatch::dense(vec![1, 5, 7, 2, 9, 3], 2, 3);
        m.forward(&batch)
            .inner()
            .into_data()
            .try_into_vec::<f32>()
            .unwrap()
    }

    #[test]
    fn new_adapters_leave_the_model_unchanged_and_merge_to_the_factored_forward() {
        let device = Device::default();
        let base = tiny(&device);
        let before = logits(&base);
        let adapted = base.attach_lora(&all(), 7);
        assert_eq!(logits(&adapted), before, "B = 0 at the start");
        // give B values, then compare factored and merged forwards
        let mut params = param_map(&adapted);
        for (name, p) in params.iter_mut() {
            if name.contains("lora_b") {
                let n = p.shape.iter().product::<usize>();
                let v: Vec<f32> = (0..n).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect();
                *p = p.with(Tensor::from_data(TensorData::new(v, [n]), &device));
            }
        }
        let adapted = with_params(adapted, &params);
        let factored = logits(&adapted);
        assert_ne!(factored, before);
        let merged = logits(&adapted.merge_lora());
        for (f, m) in factored.iter().zip(&merged) {
            assert!((f - m).abs() <= 1e-5 * (1.0 + m.abs()), "{f} vs {m}");
        }
    }

    #[test]
    fn only_the_factors_get_gradients_and_their_names_are_peft_keys() {
        let device = Device::default().autodiff();
        let cfg = LoraConfig {
            targets: vec!["q_proj".into(), "down_proj".into()],
            ..all()
        };
        let m = tiny(&device).attach_lora(&cfg, 1);
        let batch = TokenBatch::dense(vec![1, 5, 7, 2, 9, 3], 2, 3);
        let grads = m.causal_lm_loss(&batch).backward();
        let names: Vec<String> = crate::params::named_grads(&m, &grads).into_keys().collect();
        assert_eq!(
            names,
            [
                "model.layers.0.mlp.down_proj.lora_a.weight",
                "model.layers.0.mlp.down_proj.lora_b.weight",
                "model.layers.0.self_attn.q_proj.lora_a.weight",
                "model.layers.0.self_attn.q_proj.lora_b.weight",
                "model.layers.1.mlp.down_proj.lora_a.weight",
                "model.layers.1.mlp.down_proj.lora_b.weight",
                "model.layers.1.self_attn.q_proj.lora_a.weight",
                "model.layers.1.self_attn.q_proj.lora_b.weight",
            ]
        );
        let saved: Vec<String> = adapter_tensors(&m).into_keys().collect();
        assert_eq!(saved.len(), 8);
        assert_eq!(
            saved[0],
            "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
        );
        assert_eq!(param_path(&saved[0]).unwrap(), names[0]);
        let a = &named_params(&m)["model.layers.0.self_attn.q_proj.lora_a.weight"];
        assert_eq!(a.shape, [4, 16]);
        let bound = 1.0 / 16f32.sqrt();
        assert!(a.data.iter().all(|v| v.abs() <= bound) && a.data.iter().any(|v| *v != 0.0));
    }
}
