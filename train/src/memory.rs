//! A training run's peak memory, estimated before any weights load, and
//! the machine's available memory, so that a run that cannot fit is refused
//! in one line instead of being killed by the kernel minutes later.
//!
//! `weights` = parameters × 4 (f32), or as a LoRA run's frozen base is held
//! (bf16 2; int8 1 + 4/64 and nf4 ½ + 4/64 per projection element);
//! `optimizer` = trainable × 4 × 4
//! (gradient, its accumulation, AdamW's two moments); `frozen` = the other
//! models held beside (teacher, reference, reward model, anchor) as they
//! are held;
//! `activations` = layers × tokens × (14·hidden + 4·intermediate +
//! 2·(q + 2·kv)) × 4 plus the attention scores layers × batch × heads × len²
//! × 4 × 2; `logits` = 6 copies (logits, soft-cap and log-softmax
//! intermediates, gradient) of one chunk, or of every position when the
//! head is not chunked; `runtime` 0.3 GB.

use posttrain_model::checkpoint::FrozenDtype;
use posttrain_model::{Gemma2Config, LoraConfig};

const GB: f64 = 1e9;
const RUNTIME: u64 = 300_000_000;

/// What a run holds at its peak, in bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Footprint {
    pub parts: Vec<(&'static str, u64)>,
}

impl Footprint {
    pub fn total(&self) -> u64 {
        self.parts.iter().map(|(_, b)| b).sum()
    }

    /// `12.3 GB (weights 10.5, optimizer 0.3, …)`.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .parts
            .iter()
            .filter(|(_, b)| *b > 0)
            .map(|(name, b)| format!("{name} {:.1}", *b as f64 / GB))
            .collect();
        format!("{:.1} GB ({})", self.total() as f64 / GB, parts.join(", "))
    }
}

/// The run to estimate.
pub struct Plan<'a> {
    /// The trained model's config.
    pub config: &'a Gemma2Config,
    pub lora: Option<&'a LoraConfig>,
    /// Sequences per micro-batch (a preference pair counts two).
    pub batch: usize,
    /// Longest sequence of the data, in tokens.
    pub longest: usize,
    /// Bytes of the frozen models held beside the trained one.
    pub frozen_bytes: u64,
    /// How the frozen models beside are held (for the refusal's hint).
    pub frozen_dtype: FrozenDtype,
    /// How the trained model's matrices are held (other than f32 only for a
    /// LoRA run's frozen base), and their bytes.
    pub base: (FrozenDtype, u64),
}

impl Plan<'_> {
    /// What would make the run smaller, for the refusal.
    fn hints(&self) -> Vec<String> {
        let mut hints = Vec::new();
        let quantized = |d: FrozenDtype| matches!(d, FrozenDtype::Quantized(_));
        match self.lora {
            None => hints.push("train LoRA adapters (--lora-rank 16)".to_string()),
            Some(_) if !quantized(self.base.0) => {
                hints.push("hold the frozen base in 4 bits (--base-dtype nf4)".into())
            }
            Some(_) => {}
        }
        if self.frozen_bytes > 0 && !quantized(self.frozen_dtype) {
            hints.push("hold the frozen models in 4 bits (--weights-dtype nf4)".into());
        }
        if self.batch > 1 {
            hints.push("a smaller --batch-size".into());
        }
        hints
    }
}

/// Parameters LoRA trains: `r·(in + out)` per adapted projection.
pub fn lora_params(c: &Gemma2Config, lora: &LoraConfig) -> usize {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let q = c.num_attention_heads * c.head_dim;
    let kv = c.num_key_value_heads * c.head_dim;
    let per_layer: usize = lora
        .targets
        .iter()
        .map(|t| match t.as_str() {
            "q_proj" => h + q,
            "k_proj" | "v_proj" => h + kv,
            "o_proj" => q + h,
            _ => h + i,
        })
        .sum();
    c.num_hidden_layers * lora.rank * per_layer
}

pub fn estimate(plan: &Plan) -> Footprint {
    let c = plan.config;
    let params = c.num_params() as u64;
    let trainable = match plan.lora {
        Some(lora) => lora_params(c, lora) as u64,
        None => params,
    };
    let (h, i) = (c.hidden_size as u64, c.intermediate_size as u64);
    let q = (c.num_attention_heads * c.head_dim) as u64;
    let kv = (c.num_key_value_heads * c.head_dim) as u64;
    let layers = c.num_hidden_layers as u64;
    let (batch, len) = (plan.batch as u64, plan.longest as u64);
    let tokens = batch * len;
    let activations = layers * tokens * (14 * h + 4 * i + 2 * (q + 2 * kv)) * 4
        + layers * batch * c.num_attention_heads as u64 * len * len * 4 * 2;
    let whole = tokens * c.vocab_size as u64;
    let chunked = plan.lora.is_some() && whole > posttrain_model::lm_head::CHUNK_ELEMENTS as u64;
    let logit_elements = if chunked {
        posttrain_model::lm_head::CHUNK_ELEMENTS as u64
    } else {
        whole
    };
    Footprint {
        parts: vec![
            ("weights", plan.base.1),
            ("optimizer", trainable * 16),
            ("frozen models", plan.frozen_bytes),
            ("activations", activations),
            ("logits", logit_elements * 4 * 6),
            ("runtime", RUNTIME),
        ],
    }
}

/// Memory this process may still use: `MemAvailable`, lowered by a cgroup
/// v2 limit when one is set; `None` where neither can be read.
pub fn available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let mut avail = meminfo.lines().find_map(|l| {
        let kb = l.strip_prefix("MemAvailable:")?.trim().strip_suffix("kB")?;
        kb.trim().parse::<u64>().ok().map(|kb| kb * 1024)
    })?;
    let cgroup = |f: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{f}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    if let (Some(max), Some(used)) = (cgroup("memory.max"), cgroup("memory.current")) {
        avail = avail.min(max.saturating_sub(used));
    }
    Some(avail)
}

/// Refuses `plan` when its footprint exceeds `available` (unless `force`),
/// naming what would make it smaller.
pub fn check(plan: &Plan, available: Option<u64>, force: bool) -> Result<Footprint, String> {
    let footprint = estimate(plan);
    match available {
        Some(avail) if footprint.total() > avail && !force => {
            let mut hints = plan.hints();
            hints.push("pass --force to try anyway".into());
            Err(format!(
                "this run needs about {}, but {:.1} GB are available; {}",
                footprint.describe(),
                avail as f64 / GB,
                hints.join(", ")
            ))
        }
        _ => Ok(footprint),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Gemma2Config {
        // vocab 1000, hidden 8, intermediate 16, 2 layers, 2 heads, 1 kv head, head_dim 4
        Gemma2Config::new(1000, 8, 16, 2, 2, 1, 4, 8)
    }

    #[test]
    fn hand_computed_footprint() {
        let c = config();
        // layer: q 8·8 + k,v 2·8·4 + o 8·8 + mlp 3·8·16 + norms 4·8 = 608
        assert_eq!(c.num_params(), 1000 * 8 + 2 * 608 + 8);
        let lora = LoraConfig {
            rank: 2,
            alpha: 4.0,
            targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
            dropout: 0.0,
        };
        // per layer 2·((8+8) + (8+4) + (8+16)) = 104
        assert_eq!(lora_params(&c, &lora), 2 * 104);
        let plan = Plan {
            config: &c,
            lora: None,
            batch: 3,
            longest: 5,
            frozen_bytes: 400,
            frozen_dtype: FrozenDtype::F32,
            base: (FrozenDtype::F32, 9224 * 4),
        };
        let f = estimate(&plan);
        let params = 9224u64;
        // activations: 2·15·(14·8 + 4·16 + 2·(8 + 8))·4 + 2·3·2·25·4·2
        let act = 2 * 15 * (112 + 64 + 32) * 4 + 2 * 3 * 2 * 25 * 8;
        let want = vec![
            ("weights", params * 4),
            ("optimizer", params * 16),
            ("frozen models", 400),
            ("activations", act),
            ("logits", 15 * 1000 * 24),
            ("runtime", RUNTIME),
        ];
        assert_eq!(f.parts, want);
        let with_lora = estimate(&Plan {
            lora: Some(&lora),
            ..plan
        });
        assert_eq!(with_lora.parts[1], ("optimizer", 208 * 16));
        // a LoRA run's bf16 base: half the bytes of the weights
        let bf16 = FrozenDtype::Bf16;
        let compact = estimate(&Plan {
            lora: Some(&lora),
            base: (bf16, bf16.model_bytes(&c, 2)),
            ..plan
        });
        assert_eq!(compact.parts[0], ("weights", params * 2));
        // nf4: the projections (2·(64 + 2·32 + 64 + 3·128) = 1152 elements)
        // at 0.5625 bytes, the embedding and norms (9224 - 1152) at 2
        let nf4 = FrozenDtype::Quantized(posttrain_model::quant::QuantFormat::Nf4);
        assert_eq!(c.projection_params(), 1152);
        assert_eq!(nf4.model_bytes(&c, 2), 648 + (9224 - 1152) * 2);
    }

    #[test]
    fn a_run_over_the_available_memory_is_refused_unless_forced() {
        let c = config();
        let plan = Plan {
            config: &c,
            lora: None,
            batch: 1,
            longest: 4,
            frozen_bytes: 0,
            frozen_dtype: FrozenDtype::F32,
            base: (FrozenDtype::F32, 4 * c.num_params() as u64),
        };
        let total = estimate(&plan).total();
        assert!(check(&plan, Some(total), false).is_ok());
        let err = check(&plan, Some(total - 1), false).unwrap_err();
        assert!(
            err.contains("needs about") && err.contains("--lora-rank"),
            "{err}"
        );
        assert!(!err.contains("--weights-dtype") && !err.contains("--batch-size"));
        assert!(check(&plan, Some(total - 1), true).is_ok());
        assert!(check(&plan, None, false).is_ok());
        // with LoRA on, the hint is the base's and the frozen models' dtype
        let lora = LoraConfig {
            rank: 2,
            alpha: 4.0,
            targets: vec!["q_proj".into()],
            dropout: 0.0,
        };
        let with = Plan {
            lora: Some(&lora),
            frozen_bytes: 1000,
            batch: 2,
            ..plan
        };
        let err = check(&with, Some(1), false).unwrap_err();
        assert!(!err.contains("--lora-rank"), "{err}");
        assert!(
            err.contains("--base-dtype nf4")
                && err.contains("--weights-dtype nf4")
                && err.contains("--batch-size"),
            "{err}"
        );
    }
}
