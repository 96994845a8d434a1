//! Gemma 2: `Gemma2ForCausalLM` (tied LM head) and the reward variant
//! `Gemma2ForSequenceClassification` (one `score` row read at the last real
//! token). Parameter paths are the Hugging Face keys.

use burn::module::Module;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use crate::attention::{Attention, LayerCache, LayerMask};
use crate::config::Gemma2Config;
use crate::error::Result;
use crate::init::{Init, ParamSource};
use crate::layers::{Embedding, Linear, Mlp, RmsNorm, param, soft_cap};
use crate::rope::Rope;
use crate::skinny_matmul::matmul_transposed;
use crate::tokens::{MaskSpec, Padding, TokenBatch};

#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub pre_feedforward_layernorm: RmsNorm,
    pub mlp: Mlp,
    pub post_feedforward_layernorm: RmsNorm,
    pub sliding: bool,
}

impl DecoderLayer {
    fn new(
        source: &mut dyn ParamSource,
        i: usize,
        c: &Gemma2Config,
        device: &Device,
    ) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let norm = |source: &mut dyn ParamSource, n: &str| {
            RmsNorm::new(
                source,
                &format!("{p}.{n}"),
                c.hidden_size,
                c.rms_norm_eps,
                device,
            )
        };
        Ok(Self {
            input_layernorm: norm(source, "input_layernorm")?,
            self_attn: Attention::new(source, &format!("{p}.self_attn"), c, device)?,
            post_attention_layernorm: norm(source, "post_attention_layernorm")?,
            pre_feedforward_layernorm: norm(source, "pre_feedforward_layernorm")?,
            mlp: Mlp::new(
                source,
                &format!("{p}.mlp"),
                c.hidden_size,
                c.intermediate_size,
                device,
            )?,
            post_feedforward_layernorm: norm(source, "post_feedforward_layernorm")?,
            sliding: c.is_sliding(i),
        })
    }

    fn forward(
        &self,
        x: Tensor<3>,
        rope: &Rope,
        mask: &LayerMask,
        cache: Option<&mut LayerCache>,
    ) -> Tensor<3> {
        let h = self
            .self_attn
            .forward(self.input_layernorm.forward(x.clone()), rope, mask, cache);
        let x = x + self.post_attention_layernorm.forward(h);
        let h = self
            .mlp
            .forward(self.pre_feedforward_layernorm.forward(x.clone()));
        x + self.post_feedforward_layernorm.forward(h)
    }
}

/// The decoder stack (`model.*` in Hugging Face checkpoints).
#[derive(Module, Debug)]
pub struct Gemma2Model {
    pub embed_tokens: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    pub sliding_window: usize,
    pub rope_base: f64,
    pub head_dim: usize,
    pub pad_token_id: Option<u32>,
}

/// Every intermediate activation of one forward pass, for parity checks.
#[derive(Debug, Default)]
pub struct Trace {
    pub embed: Option<Tensor<3>>,
    pub layers: Vec<Tensor<3>>,
    pub final_norm: Option<Tensor<3>>,
}

/// Keys and values of every layer plus, per row, which columns are real
/// tokens. Sliding layers keep only their window.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    valid: Vec<Vec<bool>>,
    positions: Vec<usize>,
    columns: usize,
    sliding_start: usize,
}

impl KvCache {
    pub fn new(model: &Gemma2Model, batch: usize) -> Self {
        Self {
            layers: vec![LayerCache::default(); model.layers.len()],
            valid: vec![Vec::new(); batch],
            positions: vec![0; batch],
            columns: 0,
            sliding_start: 0,
        }
    }

    /// The same cache with room for `columns` columns in every layer's
    /// first buffer (a decoding loop's prompt and new tokens), so that it
    /// never grows.
    pub fn reserving(mut self, columns: usize) -> Self {
        for layer in &mut self.layers {
            layer.reserve(columns);
        }
        self
    }

    pub fn columns(&self) -> usize {
        self.columns
    }

    /// The cache of `rows` of this one's batch, in that order (a row may
    /// repeat: the samples of one prompt continue from its keys and values).
    pub fn select_rows(&self, rows: &[usize], device: &Device) -> Self {
        let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [rows.len()]), device);
        Self {
            layers: self.layers.iter().map(|l| l.select_rows(&idx)).collect(),
            valid: rows.iter().map(|&r| self.valid[r].clone()).collect(),
            positions: rows.iter().map(|&r| self.positions[r]).collect(),
            columns: self.columns,
            sliding_start: self.sliding_start,
        }
    }

    /// Columns held by the layer (for tests of the window).
    pub fn layer_columns(&self, layer: usize) -> usize {
        self.layers[layer].columns()
    }
}

impl Gemma2Model {
    pub fn new(c: &Gemma2Config, source: &mut dyn ParamSource, device: &Device) -> Result<Self> {
        let embed_tokens = Embedding::new(
            source,
            "model.embed_tokens",
            c.vocab_size,
            c.hidden_size,
            device,
        )?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| DecoderLayer::new(source, i, c, device))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(source, "model.norm", c.hidden_size, c.rms_norm_eps, device)?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            sliding_window: c.sliding_window,
            rope_base: c.rope_base(),
            head_dim: c.head_dim,
            pad_token_id: c.pad_token_id,
        })
    }

    /// Hidden states after the final norm, `[batch, len, hidden]`.
    pub fn forward(&self, batch: &TokenBatch, trace: Option<&mut Trace>) -> Tensor<3> {
        let device = self.embed_tokens.weight.device();
        let mut cache = KvCache::new(self, batch.batch);
        self.run(batch, &mut cache, false, trace, &device)
    }

    /// Appends `batch` (the next columns of every row) to the cache and
    /// returns the hidden states of those columns.
    pub fn forward_cached(&self, batch: &TokenBatch, cache: &mut KvCache) -> Tensor<3> {
        let device = self.embed_tokens.weight.device();
        self.run(batch, cache, true, None, &device)
    }

    /// Rows that continue shared prefixes (the K samples of one prompt):
    /// each of `prefixes` runs once, left-padded so that all end in the
    /// same column, then row `i` continues prefix `of[i]` with `rest[i]`
    /// (right-padded) from a copy of its keys and values. The prefixes' last
    /// hidden rows `[prefixes, hidden]`, the continuations' hidden states
    /// `[rows, len, hidden]` and their batch; the same values as whole rows
    /// up to rounding.
    pub fn forward_shared(
        &self,
        prefixes: &[Vec<u32>],
        of: &[usize],
        rest: &[Vec<u32>],
        pad: u32,
    ) -> (Tensor<2>, Tensor<3>, TokenBatch) {
        let device = self.embed_tokens.weight.device();
        let first = TokenBatch::new(prefixes, pad, Padding::Left);
        let then = TokenBatch::new(rest, pad, Padding::Right);
        let mut cache = KvCache::new(self, first.batch).reserving(first.len + then.len);
        let hidden = self.forward_cached(&first, &mut cache);
        let [u, len, h] = hidden.dims();
        let last = hidden.narrow(1, len - 1, 1).reshape([u, h]);
        let mut cache = cache.select_rows(of, &device);
        (last, self.forward_cached(&then, &mut cache), then)
    }

    /// The pad row gets no gradient through the lookup, as with
    /// `nn.Embedding(padding_idx=pad_token_id)`.
    fn embed(&self, batch: &TokenBatch, device: &Device) -> Tensor<3> {
        let x = self.embed_tokens.forward(batch.ids_tensor(device));
        let pad = match self.pad_token_id {
            Some(pad) if x.is_autodiff() && batch.ids.contains(&pad) => pad,
            _ => return x,
        };
        let is_pad: Vec<bool> = batch.ids.iter().map(|&id| id == pad).collect();
        let mask = Tensor::<3, Bool>::from_data(
            TensorData::new(is_pad, [batch.batch, batch.len, 1]),
            device,
        )
        .expand(x.dims());
        x.clone().mask_where(mask, x.detach())
    }

    fn run(
        &self,
        batch: &TokenBatch,
        cache: &mut KvCache,
        keep: bool,
        mut trace: Option<&mut Trace>,
        device: &Device,
    ) -> Tensor<3> {
        let q_start = cache.columns;
        let mut positions = Vec::with_capacity(batch.batch);
        for b in 0..batch.batch {
            let mut row = Vec::with_capacity(batch.len);
            for &v in batch.row_valid(b) {
                row.push(cache.positions[b]);
                if v {
                    cache.positions[b] += 1;
                }
            }
            cache.valid[b].extend_from_slice(batch.row_valid(b));
            positions.push(row);
        }
        cache.columns += batch.len;
        let rope = Rope::new(&positions, self.head_dim, self.rope_base, device);
        let train = self.embed_tokens.weight.val().is_autodiff();
        let mask_for = |k_start: usize, window: Option<usize>| {
            let spec = MaskSpec {
                valid: &cache.valid,
                q_start,
                q_len: batch.len,
                k_start,
                window,
            };
            if train {
                LayerMask::Bias(spec.bias(device))
            } else {
                LayerMask::Fused(spec.needed().then(|| spec.build(device)))
            }
        };
        let global_mask = mask_for(0, None);
        let sliding_mask = mask_for(cache.sliding_start, Some(self.sliding_window));

        let hidden = self.embed_tokens.weight.dims()[1];
        let mut x = self.embed(batch, device).mul_scalar((hidden as f32).sqrt());
        if let Some(t) = trace.as_deref_mut() {
            t.embed = Some(x.clone());
        }
        for (layer, layer_cache) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let mask = if layer.sliding {
                &sliding_mask
            } else {
                &global_mask
            };
            x = layer.forward(x, &rope, mask, keep.then_some(layer_cache));
            if keep && layer.sliding {
                layer_cache.keep_last(self.sliding_window);
            }
            if let Some(t) = trace.as_deref_mut() {
                t.layers.push(x.clone());
            }
        }
        cache.sliding_start = cache.columns.saturating_sub(self.sliding_window);
        let x = self.norm.forward(x);
        if let Some(t) = trace {
            t.final_norm = Some(x.clone());
        }
        x
    }
}

#[derive(Module, Debug)]
pub struct Gemma2ForCausalLM {
    pub model: Gemma2Model,
    pub final_softcap: Option<f64>,
    /// Above this many logit elements a loss with a frozen head runs it in
    /// chunks (see [`crate::lm_head`]).
    pub head_chunk_elements: usize,
}

impl Gemma2ForCausalLM {
    pub fn new(c: &Gemma2Config, source: &mut dyn ParamSource, device: &Device) -> Result<Self> {
        Ok(Self {
            model: Gemma2Model::new(c, source, device)?,
            final_softcap: c.final_logit_softcapping,
            head_chunk_elements: crate::lm_head::CHUNK_ELEMENTS,
        })
    }

    /// Logits before the final soft-cap, `[batch, len, vocab]`.
    pub fn raw_logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        let [b, t, h] = hidden.dims();
        let w = self.model.embed_tokens.weight.val();
        let v = w.dims()[0];
        matmul_transposed(hidden.reshape([b * t, h]), w).reshape([b, t, v])
    }

    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        soft_cap(self.raw_logits(hidden), self.final_softcap)
    }

    pub fn forward(&self, batch: &TokenBatch) -> Tensor<3> {
        self.logits(self.model.forward(batch, None))
    }

    /// Logits of the last column only, `[batch, vocab]`, extending the cache.
    pub fn next_logits(&self, batch: &TokenBatch, cache: &mut KvCache) -> Tensor<2> {
        let hidden = self.model.forward_cached(batch, cache);
        let [b, t, _] = hidden.dims();
        self.logits(hidden.narrow(1, t - 1, 1))
            .reshape([b, self.vocab_size()])
    }

    pub fn vocab_size(&self) -> usize {
        self.model.embed_tokens.weight.dims()[0]
    }

    /// `log p(ids[t+1] | ids[..=t])` for every column but the last,
    /// `[batch, len - 1]`.
    pub fn token_logprobs(&self, batch: &TokenBatch) -> Tensor<2> {
        let logits = self.forward(batch);
        next_token_logprobs(logits, batch)
    }

    /// Mean next-token cross-entropy over real target tokens, as
    /// `transformers` computes the causal-LM loss with `labels = input_ids`.
    pub fn causal_lm_loss(&self, batch: &TokenBatch) -> Tensor<1> {
        let logp = self.token_logprobs(batch);
        let device = logp.device();
        let weights = target_weights(batch, &device);
        let count = weights.clone().sum();
        (logp * weights).sum().neg().div(count)
    }
}

/// `log_softmax(logits)[t, ids[t+1]]`, `[batch, len - 1]`.
pub fn next_token_logprobs(logits: Tensor<3>, batch: &TokenBatch) -> Tensor<2> {
    let [b, t, _] = logits.dims();
    let device = logits.device();
    let logp = crate::kernels::log_softmax::log_softmax(logits.narrow(1, 0, t - 1));
    let targets: Vec<i64> = (0..b)
        .flat_map(|r| batch.row(r)[1..].iter().map(|&x| x as i64))
        .collect();
    let targets = Tensor::<3, Int>::from_data(TensorData::new(targets, [b, t - 1, 1]), &device);
    logp.gather(2, targets).reshape([b, t - 1])
}

/// 1 where the next-token target is a real token, `[batch, len - 1]`.
pub fn target_weights(batch: &TokenBatch, device: &Device) -> Tensor<2> {
    let w: Vec<f32> = (0..batch.batch)
        .flat_map(|r| {
            batch.row_valid(r)[1..]
                .iter()
                .map(|&v| if v { 1.0 } else { 0.0 })
        })
        .collect();
    Tensor::from_data(TensorData::new(w, [batch.batch, batch.len - 1]), device)
}

/// Reward model: the same trunk and a `score` head `[1, hidden]` read at each
/// row's last real token (never a pad, whichever side is padded).
#[derive(Module, Debug)]
pub struct Gemma2ForSequenceClassification {
    pub model: Gemma2Model,
    pub score: Linear,
}

impl Gemma2ForSequenceClassification {
    pub fn new(c: &Gemma2Config, source: &mut dyn ParamSource, device: &Device) -> Result<Self> {
        let model = Gemma2Model::new(c, source, device)?;
        let score = Linear::from_weight(param(
            source,
            "score.weight",
            [1, c.hidden_size],
            Init::Normal {
                std: crate::layers::INIT_STD,
            },
            device,
        )?);
        Ok(Self { model, score })
    }

    /// One scalar per row, `[batch]`.
    pub fn forward(&self, batch: &TokenBatch) -> Tensor<1> {
        self.score_last(self.model.forward(batch, None), batch)
    }

    /// [`Self::forward`] of rows that continue shared prefixes (see
    /// [`Gemma2Model::forward_shared`]); every `rest[i]` holds a token.
    pub fn forward_shared(
        &self,
        prefixes: &[Vec<u32>],
        of: &[usize],
        rest: &[Vec<u32>],
        pad: u32,
    ) -> Tensor<1> {
        let (_, hidden, batch) = self.model.forward_shared(prefixes, of, rest, pad);
        self.score_last(hidden, &batch)
    }

    /// The score of each row's last real token.
    fn score_last(&self, hidden: Tensor<3>, batch: &TokenBatch) -> Tensor<1> {
        let [b, _, h] = hidden.dims();
        let device = hidden.device();
        let last: Vec<i64> = batch.last_valid().iter().map(|&c| c as i64).collect();
        let index = Tensor::<3, Int>::from_data(TensorData::new(last, [b, 1, 1]), &device)
            .expand([b, 1, h]);
        let picked = hidden.gather(1, index).reshape([b, h]);
        self.score.forward(picked).reshape([b])
    }
}
