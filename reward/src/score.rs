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

/// [`score_examples`] of sequences of which several answer one prompt
/// (`groups[i]` names the prompt of sequence `i`: an RLHF step's K
/// samples): in each forward, the tokens a group's sequences have in common
/// (all but at least their last) run once, and each sequence continues from
/// them (see [`Gemma2ForSequenceClassification::forward_shared`]). The same
/// rewards up to rounding.
pub fn score_with_shared_prompts(
    model: &Gemma2ForSequenceClassification,
    sequences: &[Vec<u32>],
    groups: &[usize],
    pad: u32,
    batch_size: usize,
) -> Vec<f32> {
    assert_eq!(sequences.len(), groups.len());
    let model = model.valid();
    let n = batch_size.max(1);
    let mut out = Vec::with_capacity(sequences.len());
    for (chunk, groups) in sequences.chunks(n).zip(groups.chunks(n)) {
        // each group's prefix: what its sequences share, one token short of the shortest
        let mut heads: Vec<(usize, &[u32])> = Vec::new();
        for (seq, &g) in chunk.iter().zip(groups) {
            let seq = &seq[..seq.len().saturating_sub(1)];
            match heads.iter_mut().find(|(h, _)| *h == g) {
                Some((_, prefix)) => {
                    let held = *prefix;
                    let common = held.iter().zip(seq).take_while(|(a, b)| a == b).count();
                    *prefix = &held[..common];
                }
                None => heads.push((g, seq)),
            }
        }
        if heads.iter().any(|(_, prefix)| prefix.is_empty()) {
            out.extend(score_examples(&model, chunk, pad, Padding::Right, n));
            continue;
        }
        let of: Vec<usize> = groups
            .iter()
            .map(|g| heads.iter().position(|(h, _)| h == g).expect("every group"))
            .collect();
        let rest: Vec<Vec<u32>> = chunk
            .iter()
            .zip(&of)
            .map(|(seq, &u)| seq[heads[u].1.len()..].to_vec())
            .collect();
        let heads: Vec<Vec<u32>> = heads.into_iter().map(|(_, p)| p.to_vec()).collect();
        let r = model.forward_shared(&heads, &of, &rest, pad);
        out.extend(r.into_data().try_into_vec_as::<f32>().expect("f32 rewards"));
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
        // rows 0 and 1 answer prompt 0, 2 and 4 prompt 1 (sharing 4 tokens), 3 alone
        let mut rows = rows;
        rows[1] = [&rows[0][..2], &[9, 9, 9][..]].concat();
        rows[4] = [&rows[2][..4], &rows[4][4..]].concat();
        let alone: Vec<f32> = rows
            .iter()
            .flat_map(|r| score_examples(&rm, std::slice::from_ref(r), 0, Padding::Right, 1))
            .collect();
        for batch_size in [5, 3, 1] {
            let shared = score_with_shared_prompts(&rm, &rows, &[0, 0, 1, 2, 1], 0, batch_size);
            for (a, b) in alone.iter().zip(&shared) {
                assert!((a - b).abs() < 1e-5, "batch {batch_size}: {a} vs {b}");
            }
        }
        // a different last token changes the reward: the head reads the end, not a pad
        let mut other = rows[0].clone();
        *other.last_mut().unwrap() += 1;
        let changed = score_examples(&rm, &[other], 0, Padding::Right, 1)[0];
        assert!((changed - alone[0]).abs() > 1e-6);
    }
}
