//! What a causal-LM stage needs of its tokenizer, and how its examples
//! become a batch with target weights.

use burn::tensor::{Device, Tensor, TensorData};
use posttrain_datasets::{ChatTokenizer, Example};
use posttrain_model::{Padding, TokenBatch};

/// The tokenizer side of a run: padding, decoding, where sampling stops.
pub struct Vocab<'a> {
    pub tokenizer: &'a ChatTokenizer,
    pub stop_ids: Vec<u32>,
    /// The model's context length.
    pub max_len: usize,
}

/// A right-padded batch and its target weights `[batch, len − 1]`: 1 where
/// the next token is a target, 0 elsewhere.
pub fn make_batch(examples: &[&Example], pad: u32, device: &Device) -> (TokenBatch, Tensor<2>) {
    let rows: Vec<Vec<u32>> = examples.iter().map(|e| e.ids.clone()).collect();
    let batch = TokenBatch::new(&rows, pad, Padding::Right);
    let len = batch.len;
    let mut w = Vec::with_capacity(batch.batch * (len - 1));
    for e in examples {
        w.extend((1..len).map(|t| f32::from(u8::from(e.target.get(t).copied().unwrap_or(false)))));
    }
    let weights = Tensor::from_data(TensorData::new(w, [batch.batch, len - 1]), device);
    (batch, weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_mark_the_positions_that_predict_targets() {
        let e = |ids: Vec<u32>, from: usize| Example {
            target: (0..ids.len()).map(|i| i >= from).collect(),
            ids,
            topk: None,
        };
        let (a, b) = (e(vec![5, 6, 7, 8], 2), e(vec![5, 6, 7], 1));
        let (batch, w) = make_batch(&[&a, &b], 0, &Device::default());
        assert_eq!(batch.len, 4);
        let w = w.into_data().try_into_vec::<f32>().unwrap();
        // position t predicts token t + 1; padding is never a target
        assert_eq!(w, vec![0.0, 1.0, 1.0, 1.0, 1.0, 0.0]);
    }
}
