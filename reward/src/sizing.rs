//! A reward model config about `R` times the policy's parameter count
//! (Gemma 2 uses an RM an order of magnitude larger than the policy).
//!
//! Width scales by `s` (hidden and intermediate sizes rounded to multiples of
//! 8, query heads `round(s·heads)`, key/value heads the largest divisor of
//! those not above `round(s·kv_heads)`, head_dim kept) and depth by whole
//! layers from `L` to `4L`; of all candidates (s from 1 to 12 in steps of
//! 1/8) the one whose ratio is closest to `R` in log space wins, fewer layers
//! on ties. Vocabulary, context, RoPE and soft-caps stay the policy's.

use posttrain_model::Gemma2Config;
use posttrain_model::config::LayerType;

fn round8(x: f64) -> usize {
    ((x / 8.0).round() as usize).max(1) * 8
}

fn candidate(policy: &Gemma2Config, s: f64, layers: usize) -> Gemma2Config {
    let mut c = policy.clone();
    c.hidden_size = round8(policy.hidden_size as f64 * s);
    c.intermediate_size = round8(policy.intermediate_size as f64 * s);
    let heads = ((policy.num_attention_heads as f64 * s).round() as usize).max(1);
    let kv_want = ((policy.num_key_value_heads as f64 * s).round() as usize).clamp(1, heads);
    c.num_attention_heads = heads;
    c.num_key_value_heads = (1..=kv_want)
        .rev()
        .find(|k| heads.is_multiple_of(*k))
        .unwrap_or(1);
    c.num_hidden_layers = layers;
    c.layer_types = Some(
        (0..layers)
            .map(|i| {
                if i.is_multiple_of(2) {
                    LayerType::SlidingAttention
                } else {
                    LayerType::FullAttention
                }
            })
            .collect(),
    );
    c
}

/// The RM config and its actual parameter ratio to the policy.
pub fn scale_config(policy: &Gemma2Config, ratio: f64) -> (Gemma2Config, f64) {
    let base = policy.num_params() as f64;
    let mut best = (policy.clone(), 1.0, f64::INFINITY);
    let l = policy.num_hidden_layers.max(1);
    for layers in l..=4 * l {
        for step in 8..=96 {
            let c = candidate(policy, step as f64 / 8.0, layers);
            let r = c.num_params() as f64 / base;
            let miss = (r / ratio).ln().abs();
            if miss < best.2 - 1e-12 {
                best = (c, r, miss);
            }
        }
    }
    (best.0, best.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_times_within_a_fifth() {
        // the embedded task's student and a wide-vocabulary model
        let mut student = Gemma2Config::new(128, 64, 128, 2, 2, 1, 32, 32);
        student.max_position_embeddings = 128;
        let wide = Gemma2Config::new(32_000, 256, 1024, 4, 4, 2, 64, 64);
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/gemma2-tiny/config.json");
        let fixture = Gemma2Config::from_file(&fixture).unwrap();
        for policy in [student, wide, fixture] {
            for want in [1.0, 3.0, 10.0] {
                let (c, got) = scale_config(&policy, want);
                let measured = c.num_params() as f64 / policy.num_params() as f64;
                assert!((measured - got).abs() < 1e-12);
                assert!((got / want - 1.0).abs() < 0.2, "{want}: {got}");
                assert_eq!(c.num_attention_heads % c.num_key_value_heads, 0);
                assert_eq!(c.layer_types.as_ref().unwrap().len(), c.num_hidden_layers);
                assert_eq!(c.vocab_size, policy.vocab_size);
            }
        }
    }
}
