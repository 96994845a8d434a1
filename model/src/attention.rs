//! Grouped-query self-attention with Gemma 2's score scale
//! `query_pre_attn_scalar^-½` and soft-capping `cap · tanh(s / cap)`.

use burn::module::Module;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, Tensor};

use crate::config::Gemma2Config;
use crate::error::Result;
use crate::init::ParamSource;
use crate::layers::{Linear, soft_cap};
use crate::rope::Rope;

#[derive(Module, Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f64,
    pub softcap: Option<f64>,
}

/// The attention mask of one layer kind, `[batch, 1, q, k]`, in the form
/// the path in use needs; it also chooses the path.
#[derive(Debug, Clone)]
pub enum LayerMask {
    /// Burn's fused kernel (inference): `true` = masked; `None` = plain causal.
    Fused(Option<Tensor<4, Bool>>),
    /// The differentiable path (training): 0 or the most negative float.
    Bias(Tensor<4>),
}

/// Keys and values of one layer, after RoPE and before head repetition:
/// `[batch, kv_heads, columns, head_dim]`.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    pub k: Option<Tensor<4>>,
    pub v: Option<Tensor<4>>,
}

impl Attention {
    pub(crate) fn new(
        source: &mut dyn ParamSource,
        name: &str,
        c: &Gemma2Config,
        device: &Device,
    ) -> Result<Self> {
        let (h, q, kv) = (
            c.hidden_size,
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        Ok(Self {
            q_proj: Linear::new(source, &format!("{name}.q_proj"), h, q, device)?,
            k_proj: Linear::new(source, &format!("{name}.k_proj"), h, kv, device)?,
            v_proj: Linear::new(source, &format!("{name}.v_proj"), h, kv, device)?,
            o_proj: Linear::new(source, &format!("{name}.o_proj"), q, h, device)?,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            scale: (c.query_pre_attn_scalar as f64).powf(-0.5),
            softcap: c.attn_logit_softcapping,
        })
    }

    fn split_heads(&self, x: Tensor<3>, heads: usize) -> Tensor<4> {
        let [b, t, _] = x.dims();
        x.reshape([b, t, heads, self.head_dim]).swap_dims(1, 2)
    }

    fn repeat_kv(&self, x: Tensor<4>) -> Tensor<4> {
        let groups = self.heads / self.kv_heads;
        if groups == 1 {
            return x;
        }
        let [b, kv, s, d] = x.dims();
        x.unsqueeze_dim::<5>(2)
            .expand([b, kv, groups, s, d])
            .reshape([b, kv * groups, s, d])
    }

    /// `x` is `[batch, len, hidden]`; with a cache, the new keys are appended
    /// to it and attention runs over all cached columns.
    pub fn forward(
        &self,
        x: Tensor<3>,
        rope: &Rope,
        mask: &LayerMask,
        cache: Option<&mut LayerCache>,
    ) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let q = rope.apply(self.split_heads(self.q_proj.forward(x.clone()), self.heads));
        let mut k = rope.apply(self.split_heads(self.k_proj.forward(x.clone()), self.kv_heads));
        let mut v = self.split_heads(self.v_proj.forward(x), self.kv_heads);
        if let Some(cache) = cache {
            if let (Some(pk), Some(pv)) = (cache.k.take(), cache.v.take()) {
                k = Tensor::cat(vec![pk, k], 2);
                v = Tensor::cat(vec![pv, v], 2);
            }
            cache.k = Some(k.clone());
            cache.v = Some(v.clone());
        }
        let out = match mask {
            LayerMask::Bias(bias) => self.differentiable(q, k, v, bias.clone()),
            LayerMask::Fused(mask) if t == 1 => self.one_query(q, k, v, mask.clone()),
            LayerMask::Fused(mask) => {
                let options = AttentionModuleOptions {
                    scale: Some(self.scale),
                    softcap: self.softcap,
                    is_causal: mask.is_none(),
                };
                let mask = mask.clone().map(|m| {
                    let [mb, _, mq, mk] = m.dims();
                    m.expand([mb, self.heads, mq, mk])
                });
                attention(q, self.repeat_kv(k), self.repeat_kv(v), mask, None, options)
            }
        };
        self.o_proj.forward(
            out.swap_dims(1, 2)
                .reshape([b, t, self.heads * self.head_dim]),
        )
    }

    /// One new column per row (a decoding step): the query heads that share
    /// a key/value head become that head's queries, so the cache is not
    /// repeated; with one query per head nothing is causal beyond `mask`.
    fn one_query(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        mask: Option<Tensor<4, Bool>>,
    ) -> Tensor<4> {
        let [b, h, _, d] = q.dims();
        let (kv, g) = (self.kv_heads, self.heads / self.kv_heads);
        let s = k.dims()[2];
        let options = AttentionModuleOptions {
            scale: Some(self.scale),
            softcap: self.softcap,
            is_causal: false,
        };
        let mask = mask.map(|m| m.expand([b, kv, g, s]));
        attention(q.reshape([b, kv, g, d]), k, v, mask, None, options).reshape([b, h, 1, d])
    }

    /// Attention from differentiable ops, for training: the query heads that
    /// share a key/value head are stacked instead of repeating the keys, and
    /// the soft-cap is written with `exp` (`c·tanh(z) = c − 2c / (e^{2z} + 1)`),
    /// which the CPU backend computes far faster than `tanh`.
    fn differentiable(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        bias: Tensor<4>,
    ) -> Tensor<4> {
        let [b, h, t, d] = q.dims();
        let kv = self.kv_heads;
        let g = h / kv;
        let s = k.dims()[2];
        let scores = product(q.reshape([b, kv, g * t, d]), k.swap_dims(2, 3));
        let [mb, _, mq, mk] = bias.dims();
        let scores = match crate::kernels::softmax::capped_softmax(
            scores.reshape([b, kv, g, t, s]),
            &bias.clone().reshape([mb, mq, mk]),
            self.scale,
            self.softcap,
        ) {
            Ok(probs) => {
                return product(probs.reshape([b, kv, g * t, s]), v).reshape([b, h, t, d]);
            }
            Err(scores) => scores.reshape([b, kv, g * t, s]),
        };
        let scores = match self.softcap {
            Some(cap) => soft_cap(scores.mul_scalar(self.scale), Some(cap)),
            None => scores.mul_scalar(self.scale),
        };
        let scores = scores.reshape([b, kv, g, t, s]) + bias.reshape([mb, 1, 1, mq, mk]);
        let probs = burn::tensor::activation::softmax(scores, 4).reshape([b, kv, g * t, s]);
        product(probs, v).reshape([b, h, t, d])
    }
}

/// `a · b` over the last two axes, by the batched kernel where it applies.
fn product(a: Tensor<4>, b: Tensor<4>) -> Tensor<4> {
    crate::kernels::matmul::matmul(a, b).unwrap_or_else(|operands| {
        let [a, b] = *operands;
        a.matmul(b)
    })
}

impl LayerCache {
    /// Drops all but the last `keep` columns.
    pub fn keep_last(&mut self, keep: usize) {
        for slot in [&mut self.k, &mut self.v] {
            if let Some(t) = slot.take() {
                let s = t.dims()[2];
                *slot = Some(if s > keep {
                    t.narrow(2, s - keep, keep)
                } else {
                    t
                });
            }
        }
    }

    pub fn columns(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dims()[2])
    }
}
