//! Held-out evaluation of a causal LM during training: cross-entropy on the
//! eval targets and, when the prompts are questions of the embedded task,
//! the ground-truth score of greedy completions.

use burn::module::Module;
use posttrain_datasets::task::{expected, score};
use posttrain_datasets::{ChatTokenizer, Example};
use posttrain_model::{Gemma2ForCausalLM, SamplingConfig, generate};
use posttrain_train::make_batch;

use crate::ce::cross_entropy;

/// Eval rows and, per row, the prompt text the task scorer reads (`None`
/// for text rows).
#[derive(Debug, Clone, Default)]
pub struct EvalSet {
    pub examples: Vec<Example>,
    pub prompts: Vec<Option<String>>,
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
        let ce = cross_entropy(model.forward(&batch), &batch, weights);
        total += ce.into_scalar::<f64>() * n;
        count += n;
    }
    total / count.max(1.0)
}

/// Greedy completions of the first `samples` eval prompts, scored by the
/// embedded task's scorer; `None` when a prompt is not one of its questions.
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
    if n == 0 {
        return None;
    }
    let prompts: Vec<&str> = set.prompts[..n]
        .iter()
        .map(|p| p.as_deref().filter(|p| expected(p).is_some()))
        .collect::<Option<_>>()?;
    let model = model.valid();
    let sampling = SamplingConfig {
        max_new_tokens,
        temperature: 0.0,
        stop_ids: stop_ids.to_vec(),
        ..SamplingConfig::default()
    };
    let (mut total, mut correct) = (0.0, 0usize);
    for (b, chunk) in set.examples[..n].chunks(batch_size.max(1)).enumerate() {
        let ids: Vec<Vec<u32>> = chunk
            .iter()
            .map(|e| e.ids[..e.prompt_len()].to_vec())
            .collect();
        let first = (b * batch_size) as u64;
        for (i, c) in generate(&model, &ids, tokenizer.pad, &sampling, first)
            .iter()
            .enumerate()
        {
            let text = tokenizer.decode(c.answer()).unwrap_or_default();
            let s = score(prompts[b * batch_size + i], text.trim())?;
            total += s.score;
            correct += usize::from(s.correct);
        }
    }
    Some(TaskScore {
        score: total / n as f64,
        accuracy: correct as f64 / n as f64,
        samples: n,
    })
}
