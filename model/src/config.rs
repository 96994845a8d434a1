//! Hugging Face `Gemma2Config`, read from `config.json` in both dialects:
//! transformers 5 (`rope_parameters`, `layer_types`) and the 2024 releases
//! (`rope_theta` at top level, `hidden_act`, `torch_dtype`). Unknown fields are
//! kept and written back, so a saved config still loads in `transformers`.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ModelError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gemma2Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "defaults::rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "defaults::query_pre_attn_scalar")]
    pub query_pre_attn_scalar: usize,
    #[serde(default = "defaults::sliding_window")]
    pub sliding_window: usize,
    #[serde(default = "defaults::attn_softcap")]
    pub attn_logit_softcapping: Option<f64>,
    #[serde(default = "defaults::final_softcap")]
    pub final_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub layer_types: Option<Vec<LayerType>>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub hidden_activation: Option<String>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default = "defaults::tie")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default = "defaults::model_type")]
    pub model_type: String,
    /// Everything else in the file (`architectures`, `num_labels`, versions, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerType {
    SlidingAttention,
    FullAttention,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    pub rope_theta: f64,
    #[serde(default = "defaults::rope_type")]
    pub rope_type: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

mod defaults {
    pub fn max_position_embeddings() -> usize {
        8192
    }
    pub fn rms_norm_eps() -> f64 {
        1e-6
    }
    pub fn query_pre_attn_scalar() -> usize {
        256
    }
    pub fn sliding_window() -> usize {
        4096
    }
    pub fn attn_softcap() -> Option<f64> {
        Some(50.0)
    }
    pub fn final_softcap() -> Option<f64> {
        Some(30.0)
    }
    pub fn tie() -> bool {
        true
    }
    pub fn model_type() -> String {
        "gemma2".into()
    }
    pub fn rope_type() -> String {
        "default".into()
    }
}

impl Gemma2Config {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = fs_err::read_to_string(path)?;
        Self::from_json(&text).map_err(|reason| ModelError::Config {
            path: path.to_path_buf(),
            reason,
        })
    }

    pub fn from_json(text: &str) -> Result<Self, String> {
        let config: Self = serde_json::from_str(text).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    /// A config built in code (new weights), in the transformers-5 dialect.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
        head_dim: usize,
        sliding_window: usize,
    ) -> Self {
        let mut extra = Map::new();
        extra.insert(
            "architectures".into(),
            serde_json::json!(["Gemma2ForCausalLM"]),
        );
        extra.insert("hidden_activation".into(), "gelu_pytorch_tanh".into());
        Self {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: defaults::max_position_embeddings(),
            rms_norm_eps: defaults::rms_norm_eps(),
            query_pre_attn_scalar: head_dim,
            sliding_window,
            attn_logit_softcapping: defaults::attn_softcap(),
            final_logit_softcapping: defaults::final_softcap(),
            layer_types: Some(
                (0..num_hidden_layers)
                    .map(default_layer_type)
                    .collect::<Vec<_>>(),
            ),
            rope_theta: None,
            rope_parameters: Some(RopeParameters {
                rope_theta: 10_000.0,
                rope_type: defaults::rope_type(),
            }),
            hidden_activation: None,
            hidden_act: None,
            tie_word_embeddings: true,
            pad_token_id: Some(0),
            bos_token_id: Some(2),
            eos_token_id: Some(TokenIds::One(1)),
            model_type: defaults::model_type(),
            extra,
        }
        .with_activation()
    }

    fn with_activation(mut self) -> Self {
        if let Some(Value::String(a)) = self.extra.remove("hidden_activation") {
            self.hidden_activation = Some(a);
        }
        self
    }

    fn validate(&self) -> Result<(), String> {
        if self.model_type != "gemma2" {
            return Err(format!(
                "model_type is {:?}, posttrain reads \"gemma2\"",
                self.model_type
            ));
        }
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("sliding_window", self.sliding_window),
            ("query_pre_attn_scalar", self.query_pre_attn_scalar),
        ] {
            if value == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_dim
            ));
        }
        if let Some(types) = &self.layer_types
            && types.len() != self.num_hidden_layers
        {
            return Err(format!(
                "layer_types has {} entries for {} layers",
                types.len(),
                self.num_hidden_layers
            ));
        }
        let act = self.activation();
        if !matches!(act, "gelu_pytorch_tanh" | "gelu_tanh" | "gelu_new") {
            return Err(format!(
                "hidden_activation {act:?} is not supported (Gemma 2 uses gelu_pytorch_tanh)"
            ));
        }
        if let Some(rope) = &self.rope_parameters
            && rope.rope_type != "default"
        {
            return Err(format!(
                "rope_type {:?} is not supported (only \"default\")",
                rope.rope_type
            ));
        }
        Ok(())
    }

    pub fn activation(&self) -> &str {
        self.hidden_activation
            .as_deref()
            .or(self.hidden_act.as_deref())
            .unwrap_or("gelu_pytorch_tanh")
    }

    pub fn rope_base(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .map(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10_000.0)
    }

    pub fn layer_type(&self, layer: usize) -> LayerType {
        match &self.layer_types {
            Some(types) => types[layer],
            None => default_layer_type(layer),
        }
    }

    pub fn is_sliding(&self, layer: usize) -> bool {
        self.layer_type(layer) == LayerType::SlidingAttention
    }

    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_token_id.unwrap_or(0)
    }

    /// Number of scalar parameters of the causal LM (tied head counted once).
    pub fn num_params(&self) -> usize {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let layer = h * q + 2 * h * kv + q * h + 3 * h * i + 4 * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_hidden_layers * layer + h + head
    }

    /// Elements of the seven projections of every layer (what a quantized
    /// model holds in 8 or 4 bits).
    pub fn projection_params(&self) -> usize {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        self.num_hidden_layers * (h * q + 2 * h * kv + q * h + 3 * h * i)
    }

    /// The same config in the transformers-5 dialect, ready to write, for
    /// f32 weights.
    pub fn to_json(&self) -> String {
        self.to_json_with_dtype("float32")
    }

    /// As [`Self::to_json`], naming the stored weights' dtype (`float32`,
    /// `bfloat16`, `float16`) so that `transformers` loads them as stored.
    pub fn to_json_with_dtype(&self, dtype: &str) -> String {
        let mut out = self.clone();
        if out.rope_parameters.is_none() {
            out.rope_parameters = Some(RopeParameters {
                rope_theta: self.rope_base(),
                rope_type: defaults::rope_type(),
            });
        }
        out.rope_theta = None;
        out.layer_types = Some(
            (0..self.num_hidden_layers)
                .map(|l| self.layer_type(l))
                .collect(),
        );
        out.hidden_activation = Some(self.activation().to_string());
        out.hidden_act = None;
        out.extra.remove("torch_dtype");
        out.extra.insert("dtype".into(), dtype.into());
        let mut value = serde_json::to_value(&out).expect("config serialises");
        if let Value::Object(map) = &mut value {
            map.retain(|_, v| !v.is_null());
        }
        serde_json::to_string_pretty(&value).expect("config serialises")
    }
}

fn default_layer_type(layer: usize) -> LayerType {
    if layer.is_multiple_of(2) {
        LayerType::SlidingAttention
    } else {
        LayerType::FullAttention
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = include_str!("../../tests/fixtures/gemma2-tiny/config.json");
    const GEMMA2_2B_2024: &str =
        include_str!("../../tests/fixtures/gemma2-2b-config-2024-dialect.json");

    #[test]
    fn reads_the_transformers_5_dialect() {
        let c = Gemma2Config::from_json(TINY).unwrap();
        assert_eq!(c.vocab_size, 256);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.query_pre_attn_scalar, 24);
        assert_eq!(c.rope_base(), 10_000.0);
        assert!(c.is_sliding(0) && !c.is_sliding(1) && c.is_sliding(2));
        assert_eq!(c.eos_ids(), vec![1]);
        assert_eq!(c.num_params(), 164_672);
    }

    #[test]
    fn reads_the_2024_dialect() {
        let c = Gemma2Config::from_json(GEMMA2_2B_2024).unwrap();
        assert_eq!(c.hidden_size, 2304);
        assert_eq!(c.num_hidden_layers, 26);
        assert_eq!(c.sliding_window, 4096);
        assert_eq!(c.rope_base(), 10_000.0);
        assert_eq!(c.activation(), "gelu_pytorch_tanh");
        assert!(c.is_sliding(0) && !c.is_sliding(25));
        // Gemma-2 2B has 2.61B parameters.
        assert_eq!(c.num_params(), 2_614_341_888);
    }

    #[test]
    fn written_config_reads_back_equal_in_meaning() {
        let c = Gemma2Config::from_json(GEMMA2_2B_2024).unwrap();
        let back = Gemma2Config::from_json(&c.to_json()).unwrap();
        assert_eq!(back.rope_base(), c.rope_base());
        assert_eq!(back.num_params(), c.num_params());
        assert_eq!(
            (0..26).map(|l| back.is_sliding(l)).collect::<Vec<_>>(),
            (0..26).map(|l| c.is_sliding(l)).collect::<Vec<_>>()
        );
        assert!(back.extra.contains_key("architectures"));
    }

    #[test]
    fn missing_required_field_names_it() {
        let mut v: Value = serde_json::from_str(TINY).unwrap();
        v.as_object_mut().unwrap().remove("num_key_value_heads");
        let err = Gemma2Config::from_json(&v.to_string()).unwrap_err();
        assert!(err.contains("num_key_value_heads"), "{err}");
    }

    #[test]
    fn inconsistent_heads_are_refused() {
        let mut v: Value = serde_json::from_str(TINY).unwrap();
        v["num_key_value_heads"] = 3.into();
        let err = Gemma2Config::from_json(&v.to_string()).unwrap_err();
        assert!(err.contains("multiple"), "{err}");
        let mut v: Value = serde_json::from_str(TINY).unwrap();
        v["model_type"] = "llama".into();
        assert!(Gemma2Config::from_json(&v.to_string()).is_err());
    }

    #[test]
    fn unknown_fields_are_ignored_and_kept() {
        let mut v: Value = serde_json::from_str(TINY).unwrap();
        v["some_future_field"] = 42.into();
        let c = Gemma2Config::from_json(&v.to_string()).unwrap();
        assert!(c.to_json().contains("some_future_field"));
    }
}
