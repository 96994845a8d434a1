//! Sampling on the device by the Gumbel-max trick: with `G_i = -ln(-ln U_i)`
//! for uniform `U_i`, `argmax_i (l_i / T + G_i)` is distributed as
//! `softmax(l / T)`. Top-k keeps the k largest logits and top-p the shortest
//! prefix of them (largest first) whose probability reaches p, renormalised
//! within the top-k, as the host sampler does; the draw is an argmax over the
//! survivors, so only one id per row is read back.
//!
//! `U_i` is a counter-based hash of (row stream, step, token id): the row's
//! key for the step comes from its seeded stream on the host, and
//! `h = mix(mix(id) ^ key)` runs in 31-bit integer arithmetic (masked after
//! every product, non-negative before every shift), which gives the same bits
//! whether the backend's integers are 32 or 64 bits wide. A row's draws
//! depend on its stream only, not on its batch-mates.

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::generate::{SamplingConfig, row_seed};

const MASK31: i64 = 0x7FFF_FFFF;
const MUL: i64 = 0x045D_9F3B;

/// A bijection of `[0, 2^31)` (xor-shift / multiply rounds).
fn mix(x: Tensor<2, Int>) -> Tensor<2, Int> {
    let round = |x: Tensor<2, Int>| {
        x.clone()
            .bitwise_xor(x.bitwise_right_shift_scalar(16))
            .mul_scalar(MUL)
            .bitwise_and_scalar(MASK31)
    };
    let x = round(round(x));
    x.clone().bitwise_xor(x.bitwise_right_shift_scalar(16))
}

/// The same bijection on the host.
#[cfg(test)]
fn mix_host(x: i64) -> i64 {
    let round = |x: i64| ((x ^ (x >> 16)) * MUL) & MASK31;
    let x = round(round(x));
    x ^ (x >> 16)
}

/// Row `stream`'s 31-bit key at decoding step `step`.
pub(crate) fn step_key(stream: u64, step: u64) -> i64 {
    (row_seed(stream, step + 1) >> 33) as i64
}

/// Uniforms in (0, 1) for token ids `ids` `[n, w]` of rows keyed `keys` `[n, 1]`.
fn uniforms(ids: Tensor<2, Int>, keys: Tensor<2, Int>) -> Tensor<2> {
    let shape = ids.dims();
    let h = mix(mix(ids).bitwise_xor(keys.expand(shape)));
    (h.bitwise_right_shift_scalar(7).float() + 0.5) / (1u32 << 24) as f32
}

/// One token per row of `logits` `[n, vocab]`; `keys[r]` is row r's
/// [`step_key`] (unused when greedy).
pub(crate) fn draw(logits: Tensor<2>, config: &SamplingConfig, keys: &[i64]) -> Vec<u32> {
    let [n, vocab] = logits.dims();
    let device = logits.device();
    let chosen = if config.temperature <= 0.0 {
        logits.argmax(1)
    } else {
        let scaled = logits / config.temperature;
        let top_k = (config.top_k > 0 && config.top_k < vocab).then_some(config.top_k);
        let (mut values, ids) = match (top_k, config.top_p < 1.0) {
            (Some(k), _) => {
                let (v, i) = scaled.topk_with_indices(k, 1);
                (v, Some(i))
            }
            (None, true) => {
                let (v, i) = scaled.sort_descending_with_indices(1);
                (v, Some(i))
            }
            (None, false) => (scaled, None),
        };
        if config.top_p < 1.0 {
            let probs = softmax(values.clone(), 1);
            let before = probs.clone().cumsum(1) - probs;
            // the largest always stays, whatever p is
            let drop = before.greater_equal_elem(config.top_p.max(f32::MIN_POSITIVE));
            values = values.mask_fill(drop, f32::NEG_INFINITY);
        }
        let width = values.dims()[1];
        let noise_ids = ids.clone().unwrap_or_else(|| {
            Tensor::arange(0..vocab as i64, &device)
                .reshape([1, vocab])
                .expand([n, width])
        });
        let keys = key_tensor(keys, &device);
        let gumbel = uniforms(noise_ids, keys).log().neg().log().neg();
        let best = (values + gumbel).argmax(1);
        match ids {
            Some(ids) => ids.gather(1, best),
            None => best,
        }
    };
    chosen
        .into_data()
        .iter::<i64>()
        .map(|id| id as u32)
        .collect()
}

fn key_tensor(keys: &[i64], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(keys.to_vec(), [keys.len(), 1]), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::sample;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn device() -> Device {
        Device::default()
    }

    #[test]
    fn the_device_hash_is_the_host_hash() {
        let xs: Vec<i64> = vec![0, 1, 2, 65535, 65536, 123_456_789, MASK31 - 1, MASK31];
        let t = Tensor::<2, Int>::from_data(TensorData::new(xs.clone(), [1, xs.len()]), &device());
        let got: Vec<i64> = mix(t).into_data().iter::<i64>().collect();
        let want: Vec<i64> = xs.iter().map(|&x| mix_host(x)).collect();
        assert_eq!(got, want);
        // 2^16 inputs map to 2^16 distinct outputs
        let mut seen: Vec<i64> = (0..1 << 16).map(mix_host).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 1 << 16);
    }

    #[test]
    fn uniforms_are_uniform() {
        let (n, w) = (64, 1000);
        let ids = Tensor::<1, Int>::arange(0..w as i64, &device())
            .reshape([1, w])
            .expand([n, w]);
        let keys: Vec<i64> = (0..n as u64).map(|r| step_key(r, 3)).collect();
        let u: Vec<f32> = uniforms(ids, key_tensor(&keys, &device()))
            .into_data()
            .iter::<f32>()
            .collect();
        assert!(u.iter().all(|&x| x > 0.0 && x < 1.0));
        let mut bins = [0usize; 10];
        for x in &u {
            bins[(x * 10.0) as usize] += 1;
        }
        // 6400 per bin, sd 76
        for b in bins {
            assert!((b as f64 - 6400.0).abs() < 400.0, "{bins:?}");
        }
    }

    /// `rows` draws of one step from `logits` (one row each, distinct streams).
    fn device_counts(logits: &[f32], config: &SamplingConfig, rows: usize) -> Vec<usize> {
        let v = logits.len();
        let data: Vec<f32> = logits.iter().copied().cycle().take(rows * v).collect();
        let t = Tensor::<2>::from_data(TensorData::new(data, [rows, v]), &device());
        let keys: Vec<i64> = (0..rows as u64).map(|r| step_key(r * 7919, 0)).collect();
        let mut counts = vec![0; v];
        for id in draw(t, config, &keys) {
            counts[id as usize] += 1;
        }
        counts
    }

    fn host_probabilities(logits: &[f32], config: &SamplingConfig, draws: usize) -> Vec<f64> {
        let mut rng = StdRng::seed_from_u64(5);
        let mut counts = vec![0.0; logits.len()];
        for _ in 0..draws {
            counts[sample(logits, config, &mut rng) as usize] += 1.0;
        }
        counts.iter().map(|c| c / draws as f64).collect()
    }

    /// Chi-square of `counts` against `p`; cells with p = 0 must be empty.
    fn chi_square(counts: &[usize], p: &[f64]) -> f64 {
        let n: usize = counts.iter().sum();
        let mut chi = 0.0;
        for (&c, &q) in counts.iter().zip(p) {
            if q == 0.0 {
                assert_eq!(c, 0, "drew a token the host never draws: {counts:?} {p:?}");
                continue;
            }
            let e = q * n as f64;
            chi += (c as f64 - e).powi(2) / e;
        }
        chi
    }

    #[test]
    fn draws_follow_the_host_samplers_distribution() {
        // softmax(l / T) with cuts: exact probabilities from the host sampler
        // (many draws), device draws tested against them
        let logits = [2.0f32, 1.5, 1.0, 0.2, 0.0, -0.5, -1.0, -3.0];
        let configs = [
            SamplingConfig::default(),
            SamplingConfig {
                temperature: 0.7,
                ..Default::default()
            },
            SamplingConfig {
                top_k: 3,
                ..Default::default()
            },
            SamplingConfig {
                top_p: 0.8,
                ..Default::default()
            },
            SamplingConfig {
                temperature: 1.3,
                top_k: 5,
                top_p: 0.9,
                ..Default::default()
            },
        ];
        for config in configs {
            let p = host_probabilities(&logits, &config, 400_000);
            let counts = device_counts(&logits, &config, 40_000);
            // 7 degrees of freedom at most: the 0.999 quantile is 24.3
            let chi = chi_square(&counts, &p);
            assert!(
                chi < 24.3,
                "{config:?}: chi-square {chi:.1}, {counts:?} vs {p:?}"
            );
        }
    }

    #[test]
    fn greedy_is_the_argmax() {
        let t = Tensor::<2>::from_data(
            TensorData::new(vec![0.1f32, 3.0, -1.0, 2.0, 5.0, 4.0, 0.0, 0.5], [2, 4]),
            &device(),
        );
        let greedy = SamplingConfig {
            temperature: 0.0,
            ..Default::default()
        };
        assert_eq!(draw(t, &greedy, &[0, 0]), vec![1, 0]);
    }

    #[test]
    fn a_rows_draw_depends_on_its_key_only() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let one = |rows: &[Vec<f32>], keys: &[i64]| {
            let data: Vec<f32> = rows.concat();
            let t = Tensor::<2>::from_data(TensorData::new(data, [rows.len(), 50]), &device());
            draw(t, &SamplingConfig::default(), keys)
        };
        let other: Vec<f32> = logits.iter().map(|x| -x).collect();
        let keys: Vec<i64> = (0..20).map(|s| step_key(s, 0)).collect();
        for &k in &keys {
            let alone = one(std::slice::from_ref(&logits), &[k]);
            let with = one(&[other.clone(), logits.clone()], &[k ^ 1, k]);
            assert_eq!(alone[0], with[1]);
        }
        // and different keys give different draws
        let all: Vec<u32> = keys
            .iter()
            .flat_map(|&k| one(std::slice::from_ref(&logits), &[k]))
            .collect();
        assert!(all.iter().any(|&t| t != all[0]), "{all:?}");
    }
}
