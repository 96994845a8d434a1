//! Grouped-query self-attention with Gemma 2's score scale
//! `query_pre_attn_scalar^-½` and soft-capping `cap · tanh(s / cap)`.

use burn::module::Module;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, Int, Tensor};

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
/// buffers `[batch, kv_heads, capacity, head_dim]` holding columns
/// `start..end`. New columns are written in place; a full buffer moves the
/// columns it holds into one of twice their number.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    k: Option<Tensor<4>>,
    v: Option<Tensor<4>>,
    start: usize,
    end: usize,
    reserve: usize,
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
        let [q, k, v] = Linear::forward_each(x, [&self.q_proj, &self.k_proj, &self.v_proj]);
        let q = rope.apply(self.split_heads(q, self.heads));
        let mut k = rope.apply(self.split_heads(k, self.kv_heads));
        let mut v = self.split_heads(v, self.kv_heads);
        if let Some(cache) = cache {
            (k, v) = cache.append(k, v);
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
        let q = q.reshape([b, kv, g, d]);
        let out = crate::kernels::decode_attention::decode_attention(
            q,
            k,
            v,
            mask,
            self.scale,
            self.softcap,
        )
        .unwrap_or_else(|operands| {
            let (q, k, v, mask) = *operands;
            let mask = mask.map(|m| m.expand([b, kv, g, s]));
            attention(q, k, v, mask, None, options)
        });
        out.reshape([b, h, 1, d])
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
    /// Appends `[batch, kv_heads, new, head_dim]` keys and values and
    /// returns all the columns held, as views of the buffers.
    fn append(&mut self, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let [b, kv, new, d] = k.dims();
        let held = self.end - self.start;
        let capacity = self.k.as_ref().map_or(0, |k| k.dims()[2]);
        if self.end + new > capacity {
            let capacity = (2 * (held + new)).max(self.reserve);
            let start = self.start;
            let grow = |old: Option<Tensor<4>>, device: &Device| {
                let buffer = Tensor::zeros([b, kv, capacity, d], device);
                match old {
                    Some(old) if held > 0 => buffer
                        .slice_assign([0..b, 0..kv, 0..held, 0..d], old.narrow(2, start, held)),
                    _ => buffer,
                }
            };
            let device = k.device();
            self.k = Some(grow(self.k.take(), &device));
            self.v = Some(grow(self.v.take(), &device));
            (self.start, self.end) = (0, held);
        }
        let at = [0..b, 0..kv, self.end..self.end + new, 0..d];
        let kb = self
            .k
            .take()
            .expect("allocated")
            .slice_assign(at.clone(), k);
        let vb = self.v.take().expect("allocated").slice_assign(at, v);
        self.end += new;
        let held = self.end - self.start;
        let views = (
            kb.clone().narrow(2, self.start, held),
            vb.clone().narrow(2, self.start, held),
        );
        (self.k, self.v) = (Some(kb), Some(vb));
        views
    }

    /// The cache of `rows` of this one's batch (a row may repeat).
    pub(crate) fn select_rows(&self, rows: &Tensor<1, Int>) -> Self {
        let select = |t: &Option<Tensor<4>>| t.clone().map(|t| t.select(0, rows.clone()));
        Self {
            k: select(&self.k),
            v: select(&self.v),
            ..*self
        }
    }

    /// Room for `columns` columns when the first buffer is made.
    pub(crate) fn reserve(&mut self, columns: usize) {
        self.reserve = columns;
    }

    /// Drops all but the last `keep` columns.
    pub fn keep_last(&mut self, keep: usize) {
        self.start = self.start.max(self.end.saturating_sub(keep));
    }

    pub fn columns(&self) -> usize {
        self.end - self.start
    }
}
