//! Held-out evaluation of a causal LM during training: cross-entropy on the
//! eval targets and, when a scorer knows the prompts (the embedded task's
//! ground truth), the score of greedy completions.

use burn::module::Module;
use posttrain_datasets::{ChatTokenizer, Example};
use posttrain_model::{Gemma2ForCausalLM, SamplingConfig, generate_batches};
use posttrain_train::logprobs::sequence_logprobs;
use posttrain_train::make_batch;
use posttrain_train::rollout::Scorer;

use crate::ce::cross_entropy;

/// Eval rows and, per row, the prompt text a scorer reads (`None` for text
/// rows), and the scorer when the task has one.
#[derive(Debug, Clone, Default)]
pub struct EvalSet {
    pub examples: Vec<Example>,
    pub prompts: Vec<Option<String>>,
    pub scorer: Option<Scorer>,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TaskScore {
    pub score: f64,
    pub accuracy: f64,
    pub samples: usize,
}

/// Mean cross-entropy over the target tokens of `examples` (no gradients).
pub fn eval_loss(
    model: &Gemma2ForCausalLM,
    examples: &[Example],
    pad: u32,
    batch_size: usize,
) -> f64 {
    let model = model.valid();
    let device = model.model.embed_tokens.weight.device();
    let (mut total, mut count) = (0.0, 0.0);
    let refs: Vec<&Example> = examples.iter().collect();
    for chunk in refs.chunks(batch_size.max(1)) {
        let (batch, weights) = make_batch(chunk, pad, &device);
        let n = weights.clone().sum().into_scalar::<f64>();
        if model.chunks_head(&batch) {
            let lp = sequence_logprobs(&model, &batch, weights, false).sums;
            total -= lp.sum().into_scalar::<f64>();
            count += n;
            continue;
        }
        let ce = cross_entropy(model.forward(&batch), &batch, weights);
        total += ce.into_scalar::<f64>() * n;
        count += n;
    }
    total / count.max(1.0)
}

/// Greedy completions of the first `samples` eval prompts, scored by the
/// set's scorer; `None` without one or when it cannot score a prompt.
pub fn task_score(
    model: &Gemma2ForCausalLM,
    set: &EvalSet,
    tokenizer: &ChatTokenizer,
    stop_ids: &[u32],
    samples: usize,
    max_new_tokens: usize,
    batch_size: usize,
) -> Option<TaskScore> {
    let n = samples.min(set.examples.len());
    let scorer = set.scorer?;
    if n == 0 {
        return None;
    }
    let prompts: Vec<&str> = set.prompts[..n]
        .iter()
        .map(|p| p.as_deref().filter(|p| scorer(p, "").is_some()))
        .collect::<Option<_>>()?;
    let model = model.valid();
    let sampling = SamplingConfig {
        max_new_tokens,
        temperature: 0.0,
        stop_ids: stop_ids.to_vec(),
        ..SamplingConfig::default()
    };
    let ids: Vec<Vec<u32>> = set.examples[..n]
        .iter()
        .map(|e| e.ids[..e.prompt_len()].to_vec())
        .collect();
    let (mut total, mut correct) = (0.0, 0usize);
    generate_batches(
        &model,
        &ids,
        tokenizer.pad,
        &sampling,
        batch_size,
        |first, out| {
            for (i, c) in out.iter().enumerate() {
                let text = tokenizer.decode(c.answer()).unwrap_or_default();
                let (score, right) = scorer(prompts[first + i], text.trim()).ok_or(())?;
                total += score;
                correct += usize::from(right);
            }
            Ok::<(), ()>(())
        },
    )
    .ok()?;
    Some(TaskScore {
        score: total / n as f64,
        accuracy: correct as f64 / n as f64,
        samples: n,
    })
}
