//! Preference pairs for the embedded task: every policy samples completions
//! for every prompt, a scorer (the embedded task's ground truth) stands in for human
//! raters. Of a prompt's distinct completions, every two with different
//! scores make a candidate pair (higher score `chosen`); the
//! `pairs_per_prompt` with the largest score gaps are kept (ties in order by
//! the seed), so one pair per prompt is its best against its worst. Prompts
//! whose completions all score the same give none. With `label_noise` p a
//! pair is swapped with probability p, as a rater's mistake would.

use posttrain_datasets::{ChatTokenizer, Preference, Prompt};
use posttrain_model::{Gemma2ForCausalLM, SamplingConfig, generate_batches_shared};
use posttrain_train::Progress;
use posttrain_train::rollout::Scorer;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// A model that writes candidate completions.
pub struct Policy<'a> {
    pub model: &'a Gemma2ForCausalLM,
    pub tokenizer: &'a ChatTokenizer,
    pub stop_ids: Vec<u32>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PrefsConfig {
    /// Completions per prompt from each policy.
    pub samples: usize,
    pub temperature: f32,
    pub max_new_tokens: usize,
    pub seed: u64,
    pub label_noise: f64,
    pub batch_size: usize,
    pub pairs_per_prompt: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PrefsReport {
    #[serde(skip)]
    pub pairs: Vec<Preference>,
    pub prompts: usize,
    /// Prompts whose completions all scored the same.
    pub skipped: usize,
    pub flipped: usize,
    pub mean_chosen_score: f64,
    pub mean_rejected_score: f64,
    pub completions: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum PrefsError {
    #[error("prompt {0} is not a question of the embedded task: bring preference data of your own")]
    NotTaskPrompt(usize),
    #[error("{0}")]
    Tokenizer(#[from] posttrain_datasets::TokenizerError),
}

pub fn make_preferences(
    policies: &[Policy],
    prompts: &[Prompt],
    scorer: Scorer,
    cfg: &PrefsConfig,
) -> Result<PrefsReport, PrefsError> {
    if let Some(i) = prompts
        .iter()
        .position(|p| scorer(p.display(), "").is_none())
    {
        return Err(PrefsError::NotTaskPrompt(i + 1));
    }
    let samples = cfg.samples.max(1);
    // candidates[i]: (text, score) of prompt i
    let mut candidates: Vec<Vec<(String, f64)>> = vec![Vec::new(); prompts.len()];
    let total = (prompts.len() * samples * policies.len()) as u64;
    let mut progress = Progress::new("data prefs", total, "completions");
    for (p, policy) in policies.iter().enumerate() {
        let rows: Vec<usize> = (0..prompts.len())
            .flat_map(|i| std::iter::repeat_n(i, samples))
            .collect();
        let sampling = SamplingConfig {
            max_new_tokens: cfg.max_new_tokens,
            temperature: cfg.temperature,
            seed: cfg.seed.wrapping_add(p as u64),
            stop_ids: policy.stop_ids.clone(),
            ..SamplingConfig::default()
        };
        let rendered = prompts
            .iter()
            .map(|p| policy.tokenizer.render_prompt(&p.messages()))
            .collect::<Result<Vec<_>, _>>()?;
        let ids: Vec<Vec<u32>> = rows.iter().map(|&i| rendered[i].clone()).collect();
        let pad = policy.tokenizer.pad;
        generate_batches_shared(
            policy.model,
            &ids,
            pad,
            &sampling,
            cfg.batch_size,
            |first, out| {
                let mut tokens = 0;
                for (&i, c) in rows[first..].iter().zip(&out) {
                    tokens += c.tokens.len() as u64;
                    let text = policy.tokenizer.decode(c.answer())?.trim().to_string();
                    if text.is_empty() {
                        continue;
                    }
                    let (s, _) = scorer(prompts[i].display(), &text).expect("checked above");
                    candidates[i].push((text, s));
                }
                progress.advance(out.len() as u64, tokens);
                Ok::<_, PrefsError>(())
            },
        )?;
    }
    progress.finish();

    let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0x7072_6566);
    let mut report = PrefsReport {
        pairs: Vec::new(),
        prompts: prompts.len(),
        skipped: 0,
        flipped: 0,
        mean_chosen_score: 0.0,
        mean_rejected_score: 0.0,
        completions: candidates.iter().map(Vec::len).sum(),
    };
    for (prompt, mut cands) in prompts.iter().zip(candidates) {
        cands.sort_by(|a, b| a.0.cmp(&b.0));
        cands.dedup_by(|a, b| a.0 == b.0);
        let scores: Vec<f64> = cands.iter().map(|c| c.1).collect();
        let pairs = pick_pairs(&scores, cfg.pairs_per_prompt.max(1), &mut rng);
        if pairs.is_empty() {
            report.skipped += 1;
            continue;
        }
        for &(i, j) in &pairs {
            let (mut chosen, mut rejected) = (cands[i].0.clone(), cands[j].0.clone());
            report.mean_chosen_score += cands[i].1;
            report.mean_rejected_score += cands[j].1;
            if cfg.label_noise > 0.0 && rng.random::<f64>() < cfg.label_noise {
                std::mem::swap(&mut chosen, &mut rejected);
                report.flipped += 1;
            }
            report.pairs.push(Preference {
                prompt: prompt.clone(),
                chosen,
                rejected,
            });
        }
    }
    let n = report.pairs.len().max(1) as f64;
    report.mean_chosen_score /= n;
    report.mean_rejected_score /= n;
    Ok(report)
}

/// The `n` pairs `(chosen, rejected)` of candidates with the largest score
/// gaps, equal gaps in a seeded random order; equal scores never pair.
fn pick_pairs(scores: &[f64], n: usize, rng: &mut StdRng) -> Vec<(usize, usize)> {
    let mut pairs: Vec<(usize, usize)> = (0..scores.len())
        .flat_map(|i| (0..scores.len()).map(move |j| (i, j)))
        .filter(|&(i, j)| scores[i] > scores[j])
        .collect();
    pairs.shuffle(rng);
    let gap = |&(i, j): &(usize, usize)| scores[i] - scores[j];
    pairs.sort_by(|a, b| gap(b).total_cmp(&gap(a)));
    pairs.truncate(n);
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_come_largest_gap_first_and_ties_never_pair() {
        let mut rng = StdRng::seed_from_u64(0);
        // gaps: (1, 0) 1.0, (1, 2) 0.7, (2, 0) 0.3
        assert_eq!(pick_pairs(&[0.0, 1.0, 0.3], 2, &mut rng), [(1, 0), (1, 2)]);
        assert_eq!(pick_pairs(&[0.0, 1.0, 0.3], 9, &mut rng).len(), 3);
        assert!(pick_pairs(&[0.5, 0.5, 0.5], 4, &mut rng).is_empty());
        assert!(pick_pairs(&[0.5], 4, &mut rng).is_empty());
    }

    #[test]
    fn equal_gaps_are_ordered_by_the_seed_alone() {
        // (1, 0) and (2, 1) both have gap 0.5
        let order = |seed| pick_pairs(&[0.0, 0.5, 1.0], 3, &mut StdRng::seed_from_u64(seed));
        assert_eq!(order(3)[0], (2, 0), "the largest gap first");
        assert_eq!(order(3), order(3));
        let seconds: std::collections::BTreeSet<_> = (0..32).map(|s| order(s)[1]).collect();
        assert_eq!(
            seconds.len(),
            2,
            "both orders of the tie occur: {seconds:?}"
        );
    }
}
