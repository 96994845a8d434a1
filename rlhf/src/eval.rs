//! Evaluation of a policy on held-out prompts: samples from the policy,
//! their mean reward-model score, true score (embedded task), Monte-Carlo
//! KL to a reference `E_y~π[log π(y) − log π_ref(y)]` and length. Sampled at
//! temperature 1 by default, so the KL estimate is unbiased.

use burn::module::Module;
use posttrain_model::{Gemma2ForCausalLM, SamplingConfig};
use posttrain_train::Vocab;
use posttrain_train::logprobs::logprob_sums;
use posttrain_train::rollout::{PromptSet, gather_true_scores, roll_out};

use crate::rollout::Judge;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PolicyEval {
    pub samples: usize,
    pub reward: Option<f64>,
    pub score: Option<f64>,
    pub accuracy: Option<f64>,
    pub kl: Option<f64>,
    /// Mean sampled tokens per completion (with the stop token).
    pub length: f64,
}

#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &Gemma2ForCausalLM,
    reference: Option<&Gemma2ForCausalLM>,
    judge: Option<&Judge>,
    set: &PromptSet,
    samples_per_prompt: usize,
    sampling: &SamplingConfig,
    vocab: &Vocab,
    batch_size: usize,
) -> Result<PolicyEval, posttrain_datasets::DataError> {
    let pad = vocab.tokenizer.pad;
    let model = model.valid();
    let reference = reference.map(Module::valid);
    let k = samples_per_prompt.max(1);
    let per_batch = (batch_size / k).max(1);
    let indices: Vec<usize> = (0..set.len()).collect();
    let (mut rewards, mut kls, mut lengths) = (Vec::new(), Vec::new(), Vec::new());
    let mut scores: Option<Vec<(f64, bool)>> = Some(Vec::new());
    // each rank of a data-parallel run takes a contiguous run of the batches
    let world = posttrain_train::dist::world();
    let chunks: Vec<&[usize]> = indices.chunks(per_batch).collect();
    for b in world.share(chunks.len()) {
        let chunk = chunks[b];
        let cfg = SamplingConfig {
            seed: sampling.seed ^ (b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ..sampling.clone()
        };
        let r = roll_out(&model, set, chunk, k, &cfg, vocab);
        if let Some(judge) = judge {
            rewards.extend(judge.rewards(set, &r)?);
        }
        if let Some(reference) = &reference {
            let own = logprob_sums(&model, &r.examples, pad, batch_size);
            let other = logprob_sums(reference, &r.examples, pad, batch_size);
            kls.extend(own.iter().zip(other).map(|(a, b)| a - b));
        }
        scores = match (scores, r.true_scores(set)) {
            (Some(mut all), Some(s)) => {
                all.extend(s);
                Some(all)
            }
            _ => None,
        };
        lengths.extend(r.lengths());
    }
    let gather = |v: &[f64]| world.all_gather_f64(v);
    let (rewards, kls) = (gather(&rewards), gather(&kls));
    let lengths = world.all_gather_usize(&lengths);
    let scores = gather_true_scores(scores);
    let n = lengths.len();
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let score = scores
        .as_ref()
        .and_then(|s| mean(&s.iter().map(|x| x.0).collect::<Vec<_>>()));
    let accuracy = scores.as_ref().and_then(|s| {
        mean(
            &s.iter()
                .map(|x| f64::from(u8::from(x.1)))
                .collect::<Vec<_>>(),
        )
    });
    Ok(PolicyEval {
        samples: n,
        reward: mean(&rewards),
        score,
        accuracy,
        kl: mean(&kls),
        length: lengths.iter().sum::<usize>() as f64 / n.max(1) as f64,
    })
}
