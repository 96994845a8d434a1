//! Batched scoring with a reward model: each prompt/completion is rendered
//! with the chat template (ending in `<end_of_turn>`) and scored at its last
//! real token. The `score` command and the rlhf stage share this path.

use std::path::Path;

use burn::module::Module;
use posttrain_datasets::{ChatTokenizer, DataError, Message};
use posttrain_model::{Gemma2ForSequenceClassification, Padding, TokenBatch};

/// Token ids of each prompt + completion; errors name `path` and the row.
pub fn encode_pairs<'a>(
    tokenizer: &ChatTokenizer,
    rows: impl Iterator<Item = (Vec<Message>, &'a str)>,
    max_len: usize,
    path: &Path,
) -> Result<Vec<Vec<u32>>, DataError> {
    rows.enumerate()
        .map(|(i, (messages, completion))| {
            let err = |reason: String| DataError::Row {
                path: path.to_path_buf(),
                row: i + 1,
                reason,
            };
            let ex = tokenizer
                .render_example(&messages, completion)
                .map_err(|e| err(e.to_string()))?;
            if ex.ids.len() > max_len {
                return Err(err(format!(
                    "{} tokens exceed the reward model's context of {max_len}",
                    ex.ids.len()
                )));
            }
            Ok(ex.ids)
        })
        .collect()
}

/// One reward per sequence, in order, `batch_size` sequences per forward.
pub fn score_examples(
    model: &Gemma2ForSequenceClassification,
    sequences: &[Vec<u32>],
    pad: u32,
    padding: Padding,
    batch_size: usize,
) -> Vec<f32> {
    let model = model.valid();
    let mut out = Vec::with_capacity(sequences.len());
    for chunk in sequences.chunks(batch_size.max(1)) {
        let batch = TokenBatch::new(chunk, pad, padding);
        let r = model.forward(&batch).into_data().try_into_vec_as::<f32>();
        out.extend(r.expect("f32 rewards"));
    }
    out
}

/// [`score_examples`] with whole batches shared out over the ranks of a
/// data-parallel run; every rank gets every reward, in order.
pub fn score_examples_shared(
    model: &Gemma2ForSequenceClassification,
    sequences: &[Vec<u32>],
    pad: u32,
    padding: Padding,
    batch_size: usize,
) -> Vec<f32> {
    let world = posttrain_train::dist::world();
    let rows = world.share_batches(sequences.len(), batch_size);
    let mine = score_examples(model, &sequences[rows], pad, padding, batch_size);
    let mine: Vec<f64> = mine.into_iter().map(f64::from).collect();
    world
        .all_gather_f64(&mine)
        .into_iter()
        .map(|r| r as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;
    use posttrain_model::{Gemma2Config, RandomInit};

    #[test]
    fn left_and_right_padding_and_batch_size_give_the_same_rewards() {
        let mut c = Gemma2Config::new(40, 32, 64, 2, 2, 1, 16, 4);
        c.max_position_embeddings = 32;
        let rm =
            Gemma2ForSequenceClassification::new(&c, &mut RandomInit::new(3), &Device::default())
                .unwrap();
        let rows: Vec<Vec<u32>> = (0..5u32)
            .map(|i| {
                (0..3 + 2 * i as usize)
                    .map(|j| 6 + (i * 5 + j as u32 * 7) % 30)
                    .collect()
            })
            .collect();
        let alone: Vec<f32> = rows
            .iter()
            .flat_map(|r| score_examples(&rm, std::slice::from_ref(r), 0, Padding::Right, 1))
            .collect();
        for padding in [Padding::Left, Padding::Right] {
            let batched = score_examples(&rm, &rows, 0, padding, 5);
            for (a, b) in alone.iter().zip(&batched) {
                assert!((a - b).abs() < 1e-5, "{padding:?}: {a} vs {b}");
            }
        }
        // a different last token changes the reward: the head reads the end, not a pad
        let mut other = rows[0].clone();
        *other.last_mut().unwrap() += 1;
        let changed = score_examples(&rm, &[other], 0, Padding::Right, 1)[0];
        assert!((changed - alone[0]).abs() > 1e-6);
    }
}
