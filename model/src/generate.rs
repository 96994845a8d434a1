//! Batched, KV-cached sampling: left-padded prompts, one forward pass over
//! all prompts, then one column per step. Temperature, top-k and top-p are
//! applied to the last column's logits on the host (CPU backends: the exact
//! distribution in f64) or on the device ([`crate::gumbel`], GPU backends:
//! only token ids are read back); each row draws from its own seeded stream,
//! so a row's sample does not depend on its batch-mates.

use std::sync::atomic::{AtomicBool, Ordering};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::gemma2::{Gemma2ForCausalLM, KvCache};
use crate::gumbel::{self, step_key};
use crate::tokens::{Padding, TokenBatch};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1 means no nucleus cut.
    pub top_p: f32,
    pub seed: u64,
    pub stop_ids: Vec<u32>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            stop_ids: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop id was sampled (it is the last token).
    Stop,
    Length,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
}

impl Completion {
    /// The generated tokens without the stop id that ended them.
    pub fn answer(&self) -> &[u32] {
        match self.finish {
            FinishReason::Stop => &self.tokens[..self.tokens.len() - 1],
            FinishReason::Length => &self.tokens,
        }
    }
}

static SAMPLE_ON_DEVICE: AtomicBool = AtomicBool::new(false);

/// Whether [`generate`] draws on the device (Gumbel-max, ids read back) or
/// on the host (logits read back); for the whole process.
pub fn sample_on_device(on: bool) {
    SAMPLE_ON_DEVICE.store(on, Ordering::Relaxed);
}

/// Where [`generate`] draws: `"device"` or `"host"`.
pub fn sampling_place() -> &'static str {
    if SAMPLE_ON_DEVICE.load(Ordering::Relaxed) {
        "device"
    } else {
        "host"
    }
}

/// Seed of row `row`'s stream (SplitMix64 of seed and row).
pub(crate) fn row_seed(seed: u64, row: u64) -> u64 {
    let mut z = seed ^ row.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// [`generate`] over `prompts` in batches of `batch_size`, prompt `i` on
/// stream `i` whatever the batching; `each(first, completions)` receives a
/// batch's first prompt index and its completions as soon as it is done.
pub fn generate_batches<E>(
    model: &Gemma2ForCausalLM,
    prompts: &[Vec<u32>],
    pad_id: u32,
    config: &SamplingConfig,
    batch_size: usize,
    mut each: impl FnMut(usize, Vec<Completion>) -> Result<(), E>,
) -> Result<(), E> {
    let batch_size = batch_size.max(1);
    for (b, chunk) in prompts.chunks(batch_size).enumerate() {
        let first = b * batch_size;
        each(first, generate(model, chunk, pad_id, config, first as u64))?;
    }
    Ok(())
}

/// [`generate_batches`] with the batches shared out over the ranks of a
/// data-parallel run: each rank samples its own contiguous run of batches
/// (as one process batches them, so every row comes out bit for bit the
/// same), then `each` sees every batch's completions, in order, on every
/// rank.
pub fn generate_batches_shared<E>(
    model: &Gemma2ForCausalLM,
    prompts: &[Vec<u32>],
    pad_id: u32,
    config: &SamplingConfig,
    batch_size: usize,
    mut each: impl FnMut(usize, Vec<Completion>) -> Result<(), E>,
) -> Result<(), E> {
    let world = posttrain_dist::world();
    if world.size() == 1 {
        return generate_batches(model, prompts, pad_id, config, batch_size, each);
    }
    let batch_size = batch_size.max(1);
    // a completion on the wire: its length, its tokens, 1 when it stopped
    let mut wire = Vec::new();
    let own = world.share_batches(prompts.len(), batch_size);
    for first in own.clone().step_by(batch_size) {
        let chunk = &prompts[first..(first + batch_size).min(own.end)];
        for c in generate(model, chunk, pad_id, config, first as u64) {
            wire.push(c.tokens.len() as f64);
            wire.extend(c.tokens.iter().map(|&t| f64::from(t)));
            wire.push(f64::from(u8::from(c.finish == FinishReason::Stop)));
        }
    }
    let wire = world.all_gather_f64(&wire);
    let mut all = Vec::with_capacity(prompts.len());
    let mut at = 0;
    while at < wire.len() {
        let n = wire[at] as usize;
        let tokens = wire[at + 1..at + 1 + n].iter().map(|&t| t as u32).collect();
        let finish = if wire[at + 1 + n] > 0.0 {
            FinishReason::Stop
        } else {
            FinishReason::Length
        };
        all.push(Completion { tokens, finish });
        at += n + 2;
    }
    let mut rest = all.into_iter();
    for first in (0..prompts.len()).step_by(batch_size) {
        each(first, rest.by_ref().take(batch_size).collect())?;
    }
    Ok(())
}

/// `first_row` numbers the prompts globally, so that splitting a dataset
/// into batches does not change which stream a prompt gets.
pub fn generate(
    model: &Gemma2ForCausalLM,
    prompts: &[Vec<u32>],
    pad_id: u32,
    config: &SamplingConfig,
    first_row: u64,
) -> Vec<Completion> {
    let n = prompts.len();
    let mut out: Vec<Completion> = (0..n)
        .map(|_| Completion {
            tokens: Vec::new(),
            finish: FinishReason::Length,
        })
        .collect();
    if n == 0 || config.max_new_tokens == 0 {
        return out;
    }
    let streams: Vec<u64> = (0..n)
        .map(|r| row_seed(config.seed, first_row + r as u64))
        .collect();
    let mut rngs: Vec<StdRng> = streams.iter().map(|&s| StdRng::seed_from_u64(s)).collect();
    let on_device = SAMPLE_ON_DEVICE.load(Ordering::Relaxed);
    let vocab = model.vocab_size();
    let mut batch = TokenBatch::new(prompts, pad_id, Padding::Left);
    let mut cache = KvCache::new(&model.model, n).reserving(batch.len + config.max_new_tokens);
    let mut done = vec![false; n];
    for step in 0..config.max_new_tokens {
        let logits = model.next_logits(&batch, &mut cache);
        let drawn: Vec<u32> = if on_device {
            let keys: Vec<i64> = streams.iter().map(|&s| step_key(s, step as u64)).collect();
            gumbel::draw(logits, config, &keys)
        } else {
            let logits = logits
                .into_data()
                .try_into_vec_as::<f32>()
                .expect("f32 logits");
            (0..n)
                .map(|r| match done[r] {
                    true => pad_id,
                    false => sample(&logits[r * vocab..(r + 1) * vocab], config, &mut rngs[r]),
                })
                .collect()
        };
        let mut next = Vec::with_capacity(n);
        let mut valid = Vec::with_capacity(n);
        for (r, token) in drawn.into_iter().enumerate() {
            if done[r] {
                next.push(pad_id);
                valid.push(false);
                continue;
            }
            out[r].tokens.push(token);
            if config.stop_ids.contains(&token) {
                out[r].finish = FinishReason::Stop;
                done[r] = true;
            }
            next.push(token);
            valid.push(true);
        }
        if done.iter().all(|&d| d) {
            break;
        }
        batch = TokenBatch {
            batch: n,
            len: 1,
            ids: next,
            valid,
        };
    }
    out
}

/// Draws one token id from `logits` under the config's temperature, top-k
/// and top-p. Greedy picks the first maximum, as `torch.argmax` does.
pub fn sample(logits: &[f32], config: &SamplingConfig, rng: &mut impl Rng) -> u32 {
    if config.temperature <= 0.0 {
        let mut best = 0;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    // ids by logit, largest first (`total_cmp`), ties by id: one integer
    // per id, sorted without looking the logits up in every comparison
    let mut keys: Vec<u64> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| u64::from(!total_order_bits(x)) << 32 | i as u64)
        .collect();
    if config.top_k > 0 && config.top_k < keys.len() {
        keys.select_nth_unstable(config.top_k - 1);
        keys.truncate(config.top_k);
    }
    keys.sort_unstable();
    let idx: Vec<u32> = keys.iter().map(|&k| k as u32).collect();
    let inv_t = 1.0 / config.temperature as f64;
    let max = logits[idx[0] as usize] as f64 * inv_t;
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| (logits[i as usize] as f64 * inv_t - max).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if config.top_p < 1.0 {
        let mut cumulative = 0.0;
        let mut keep = probs.len();
        for (k, p) in probs.iter().enumerate() {
            cumulative += p;
            if cumulative >= config.top_p as f64 {
                keep = k + 1;
                break;
            }
        }
        probs.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (k, p) in probs.iter().enumerate() {
        u -= p;
        if u < 0.0 {
            return idx[k];
        }
    }
    idx[probs.len() - 1]
}

/// `x`'s bits as an integer that orders as `f32::total_cmp` does.
fn total_order_bits(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 1 { !b } else { b | 1 << 31 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn total_order_bits_orders_as_total_cmp() {
        let xs = [
            f32::NEG_INFINITY,
            -3.5,
            -0.0,
            0.0,
            f32::MIN_POSITIVE,
            1.0,
            1.0 + f32::EPSILON,
            f32::INFINITY,
            f32::NAN,
            -f32::NAN,
        ];
        for a in xs {
            for b in xs {
                assert_eq!(
                    total_order_bits(a).cmp(&total_order_bits(b)),
                    a.total_cmp(&b),
                    "{a} {b}"
                );
            }
        }
    }

    fn draws(logits: &[f32], config: &SamplingConfig, n: usize) -> Vec<usize> {
        let mut rng = StdRng::seed_from_u64(1);
        let mut counts = vec![0; logits.len()];
        for _ in 0..n {
            counts[sample(logits, config, &mut rng) as usize] += 1;
        }
        counts
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let c = SamplingConfig {
            temperature: 0.0,
            ..Default::default()
        };
        assert_eq!(
            sample(&[0.1, 3.0, 3.0, -1.0], &c, &mut StdRng::seed_from_u64(0)),
            1
        );
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        // probabilities 0.5, 0.25, 0.125, 0.125
        let logits = [2f32.ln() * 2.0, 2f32.ln(), 0.0, 0.0];
        let top_k = SamplingConfig {
            top_k: 2,
            ..Default::default()
        };
        let c = draws(&logits, &top_k, 3000);
        assert_eq!(c[2] + c[3], 0);
        assert!((c[0] as f64 / 3000.0 - 2.0 / 3.0).abs() < 0.05, "{c:?}");
        let top_p = SamplingConfig {
            top_p: 0.7,
            ..Default::default()
        };
        let c = draws(&logits, &top_p, 3000);
        assert_eq!(c[2] + c[3], 0, "0.5 + 0.25 reaches 0.7: {c:?}");
        let full = draws(&logits, &SamplingConfig::default(), 4000);
        assert!((full[3] as f64 / 4000.0 - 0.125).abs() < 0.03, "{full:?}");
    }

    #[test]
    fn low_temperature_sharpens() {
        let logits = [1.0f32, 0.0];
        let cold = SamplingConfig {
            temperature: 0.1,
            ..Default::default()
        };
        let c = draws(&logits, &cold, 1000);
        assert!(c[0] > 990, "{c:?}");
    }

    #[test]
    fn row_streams_differ_and_repeat() {
        assert_ne!(row_seed(0, 0), row_seed(0, 1));
        assert_eq!(row_seed(5, 3), row_seed(5, 3));
    }
}
