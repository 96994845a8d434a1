//! Evaluation of a policy on held-out prompts: samples from the policy,
//! their mean reward-model score, true score (embedded task), Monte-Carlo
//! KL to a reference `E_y~π[log π(y) − log π_ref(y)]` and length. Sampled at
//! temperature 1 by default, so the KL estimate is unbiased.
//!
//! Each mean comes with its standard error over prompts: the `k` samples of
//! one prompt are averaged first and `se = sd(prompt means) / √P` over the
//! `P` prompts, since samples of one prompt are not independent.

use burn::module::Module;
use posttrain_model::{Gemma2ForCausalLM, SamplingConfig};
use posttrain_train::Vocab;
use posttrain_train::logprobs::shared_prompt_logprobs;
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
    pub reward_se: Option<f64>,
    pub score_se: Option<f64>,
    pub kl_se: Option<f64>,
}

/// Standard error of the mean of `values` (prompt-major, `k` per prompt)
/// over prompts: the sample standard deviation of the per-prompt means
/// divided by √P. `None` with fewer than two prompts.
pub fn prompt_standard_error(values: &[f64], k: usize) -> Option<f64> {
    let means: Vec<f64> = values
        .chunks(k.max(1))
        .map(|c| c.iter().sum::<f64>() / c.len() as f64)
        .collect();
    let p = means.len();
    if p < 2 {
        return None;
    }
    let mean = means.iter().sum::<f64>() / p as f64;
    let var = means.iter().map(|m| (m - mean).powi(2)).sum::<f64>() / (p - 1) as f64;
    Some((var / p as f64).sqrt())
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
            let (examples, n) = (&r.examples, batch_size);
            let own = shared_prompt_logprobs(&model, examples, pad, n, false).0;
            let other = shared_prompt_logprobs(reference, examples, pad, n, false).0;
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
    let true_scores: Option<Vec<f64>> = scores.as_ref().map(|s| s.iter().map(|x| x.0).collect());
    let score = true_scores.as_deref().and_then(mean);
    let se = |v: &[f64]| prompt_standard_error(v, k);
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
        reward_se: se(&rewards),
        score_se: true_scores.as_deref().and_then(se),
        kl_se: se(&kls),
    })
}

#[cfg(test)]
mod tests {
    use super::prompt_standard_error;

    #[test]
    fn standard_error_is_over_prompt_means() {
        // prompt means 1, 3, 8: mean 4, sample variance (9 + 1 + 16) / 2 = 13
        let se = prompt_standard_error(&[0.0, 2.0, 3.0, 3.0, 6.0, 10.0], 2).unwrap();
        assert!((se - (13.0f64 / 3.0).sqrt()).abs() < 1e-12, "{se}");
        // per-sample spread inside a prompt does not count
        let flat = prompt_standard_error(&[1.0, 1.0, 3.0, 3.0, 8.0, 8.0], 2).unwrap();
        assert!((flat - se).abs() < 1e-12);
        assert_eq!(prompt_standard_error(&[1.0, 2.0], 2), None);
    }
}
