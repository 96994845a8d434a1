//! The `generate` stage: a teacher writes completions for prompts, and
//! optionally its top-k log-probabilities for every completion token, so
//! that SFT can distil offline without the teacher in memory.
//!
//! The top-k rows are computed on the completion as SFT will tokenize it
//! (the decoded text, re-encoded, plus the closing `<end_of_turn>`), so row
//! `i` always belongs to completion token `i`.

use burn::tensor::activation::log_softmax;
use posttrain_datasets::{ChatTokenizer, Prompt, SftPair, TokenizerError, TopK};
use posttrain_model::{
    Gemma2ForCausalLM, Padding, SamplingConfig, TokenBatch, generate_batches_shared,
};
use posttrain_train::Progress;

pub struct GenerateReport {
    pub pairs: Vec<SftPair>,
    /// Prompts whose completion came out empty (left out).
    pub empty: usize,
    pub new_tokens: u64,
}

/// Top-k log-probabilities at the positions that predict each completion
/// token of `examples` (ids, prompt length).
fn teacher_topk(
    model: &Gemma2ForCausalLM,
    rows: &[(Vec<u32>, usize)],
    pad: u32,
    k: usize,
) -> Vec<TopK> {
    let ids: Vec<Vec<u32>> = rows.iter().map(|(ids, _)| ids.clone()).collect();
    let batch = TokenBatch::new(&ids, pad, Padding::Right);
    let logp = log_softmax(model.forward(&batch), 2);
    let [b, t, _] = logp.dims();
    let (values, indices) = logp.topk_with_indices(k, 2);
    let values = values.into_data().try_into_vec_as::<f32>().expect("f32");
    let indices = indices.into_data().try_into_vec_as::<i64>().expect("ids");
    (0..b)
        .map(|r| {
            let (ids, prompt_len) = &rows[r];
            let mut out = TopK {
                ids: Vec::new(),
                logprobs: Vec::new(),
            };
            // position p predicts token p + 1
            for p in prompt_len - 1..ids.len() - 1 {
                let at = (r * t + p) * k;
                out.ids
                    .push(indices[at..at + k].iter().map(|&i| i as u32).collect());
                out.logprobs.push(values[at..at + k].to_vec());
            }
            out
        })
        .collect()
}

pub fn generate_pairs(
    model: &Gemma2ForCausalLM,
    tokenizer: &ChatTokenizer,
    prompts: &[Prompt],
    sampling: &SamplingConfig,
    batch_size: usize,
    topk: usize,
) -> Result<GenerateReport, TokenizerError> {
    let mut report = GenerateReport {
        pairs: Vec::with_capacity(prompts.len()),
        empty: 0,
        new_tokens: 0,
    };
    let mut progress = Progress::new("generate", prompts.len() as u64, "prompts");
    let encoded = prompts
        .iter()
        .map(|p| tokenizer.render_prompt(&p.messages()))
        .collect::<Result<Vec<_>, _>>()?;
    generate_batches_shared(
        model,
        &encoded,
        tokenizer.pad,
        sampling,
        batch_size,
        |first, out| {
            let chunk = &prompts[first..first + out.len()];
            let mut kept = Vec::new();
            let mut prompt_lens = Vec::new();
            let mut tokens = 0;
            for ((prompt, ids), completion) in chunk.iter().zip(&encoded[first..]).zip(&out) {
                tokens += completion.tokens.len() as u64;
                let text = tokenizer.decode(completion.answer())?.trim().to_string();
                if text.is_empty() {
                    report.empty += 1;
                    continue;
                }
                prompt_lens.push(ids.len());
                kept.push(SftPair {
                    prompt: prompt.clone(),
                    completion: text,
                    teacher_topk: None,
                });
            }
            if topk > 0 && !kept.is_empty() {
                let rows = kept
                    .iter()
                    .zip(&prompt_lens)
                    .map(|(pair, &prompt_len)| {
                        let ex =
                            tokenizer.render_example(&pair.prompt.messages(), &pair.completion)?;
                        Ok((ex.ids, prompt_len))
                    })
                    .collect::<Result<Vec<_>, TokenizerError>>()?;
                for (pair, top) in
                    kept.iter_mut()
                        .zip(teacher_topk(model, &rows, tokenizer.pad, topk))
                {
                    pair.teacher_topk = Some(top);
                }
            }
            report.new_tokens += tokens;
            report.pairs.extend(kept);
            progress.advance(chunk.len() as u64, tokens);
            Ok::<(), TokenizerError>(())
        },
    )?;
    progress.finish();
    Ok(report)
}
