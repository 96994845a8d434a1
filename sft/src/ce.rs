//! Completion-only cross-entropy: with `w_t` = 1 where token `t + 1` is a
//! target (a completion token or its closing `<end_of_turn>`),
//!
//! `CE = −Σ_t w_t · log p_S(y_{t+1} | y_≤t) / Σ_t w_t`.

use burn::tensor::Tensor;
use posttrain_model::TokenBatch;
use posttrain_model::gemma2::next_token_logprobs;

/// `logits` `[batch, len, vocab]`, `weights` `[batch, len − 1]`.
pub fn cross_entropy(logits: Tensor<3>, batch: &TokenBatch, weights: Tensor<2>) -> Tensor<1> {
    weighted_mean(next_token_logprobs(logits, batch), weights).neg()
}

/// `Σ_t w_t · x_t / Σ_t w_t` of a per-position quantity `[batch, len − 1]`.
pub fn weighted_mean(x: Tensor<2>, weights: Tensor<2>) -> Tensor<1> {
    let count = weights.clone().sum();
    (x * weights).sum().div(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn only_weighted_positions_count() {
        // tokens 0 2 1: position 0 predicts 2 (not a target), position 1 predicts 1
        let batch = TokenBatch::dense(vec![0, 2, 1], 1, 3);
        let l = vec![0.3f32, -0.2, 1.0, 0.1, 0.4, -0.5, 9.0, 9.0, 9.0];
        let logits = Tensor::<3>::from_data(TensorData::new(l, [1, 3, 3]), &Device::default());
        let w = Tensor::<2>::from_data(
            TensorData::new(vec![0.0f32, 1.0], [1, 2]),
            &Device::default(),
        );
        let got = cross_entropy(logits, &batch, w).into_scalar::<f32>();
        let lse = [0.1f32, 0.4, -0.5]
            .iter()
            .map(|x| x.exp())
            .sum::<f32>()
            .ln();
        assert!((got - (lse - 0.4)).abs() < 1e-6, "{got}");
    }
}
