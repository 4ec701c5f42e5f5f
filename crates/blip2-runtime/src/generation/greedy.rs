//! Greedy search and multinomial sampling: transformers' `_sample`.
//!
//! Each row picks its next token from the processed raw logits (no log-softmax here, unlike beam
//! search). A row that produces an eos, or reaches the length limit, is finished: it is fed the
//! pad token from then on and its picks no longer count. Generation ends when every row is
//! finished, without a model step after the last pick.

use ndarray::Array2;

use super::processors::{argmax, Processors};
use super::rng::{sample_one, Rng};
use super::{new_tokens, step, GenerationConfig, GenerationError, Observer, Prompt, StepModel, StepOutput, Want};

pub(crate) fn run<M: StepModel + ?Sized>(
    model: &mut M,
    prompts: &[Prompt],
    first_logits: Array2<f32>,
    cfg: &GenerationConfig,
    seed: u64,
    observer: &mut Observer<'_>,
) -> Result<Vec<Vec<Vec<i64>>>, GenerationError<M::Error>> {
    let vocab = first_logits.ncols();
    let prompt_len = prompts[0].ids.len();
    let max_len = prompt_len + cfg.max_new_tokens;
    let eos = &cfg.eos_token_ids;
    // transformers feeds finished rows the pad token, falling back to the first eos id.
    let pad = cfg
        .pad_token_id
        .or_else(|| eos.first().copied())
        .unwrap_or(0);
    // Sampling several sequences per prompt repeats each prompt row (repeat_interleave).
    let expand = if cfg.do_sample {
        cfg.num_return_sequences
    } else {
        1
    };
    let rows = prompts.len() * expand;
    let source = |r: usize| r / expand;

    let processors = Processors::new(cfg, prompt_len, 1);
    let mut tokens: Vec<Vec<i64>> = (0..rows).map(|r| prompts[source(r)].ids.clone()).collect();
    let mut rngs: Vec<Rng> = (0..rows).map(|r| Rng::new(seed, r as u64)).collect();
    let mut unfinished = vec![true; rows];
    let mut out = StepOutput::Logits(first_logits);
    let mut first = true;
    let mut scores = vec![0f32; vocab];
    loop {
        let mut next = Vec::with_capacity(rows);
        for r in 0..rows {
            if !unfinished[r] {
                next.push(pad);
                continue;
            }
            let pick = match &out {
                // The model picked it (asked for only when no processor reads the scores).
                StepOutput::Argmax(picks) => picks[r],
                // Its best candidates, while the minimum length bans the eos tokens: the
                // best one that is not an eos (eos.len() + 1 candidates hold one).
                StepOutput::TopLogProbs { ids, .. } => {
                    *ids.row(r).iter().find(|t| !eos.contains(t)).expect("a candidate that is not an eos")
                }
                StepOutput::Logits(logits) => {
                    // The prefill logits have one row per prompt; later steps one per expanded row.
                    let row = logits.row(if first { source(r) } else { r });
                    for (s, &l) in scores.iter_mut().zip(row.iter()) {
                        *s = l;
                    }
                    processors.apply(&tokens[r], prompts[source(r)].padding, &mut scores);
                    (if cfg.do_sample {
                        sample_one(&scores, &mut rngs[r])
                    } else {
                        argmax(&scores)
                    }) as i64
                }
            };
            tokens[r].push(pick);
            next.push(pick);
            let is_eos = eos.contains(&pick);
            let watched = is_eos || observer(source(r), r % expand, pick);
            if tokens[r].len() >= max_len || is_eos || !watched {
                unfinished[r] = false;
            }
        }
        if !unfinished.iter().any(|&u| u) {
            break;
        }
        if first && expand > 1 {
            let map: Vec<usize> = (0..rows).map(source).collect();
            model.select_rows(&map).map_err(GenerationError::Model)?;
        }
        first = false;
        // Every unfinished row has the same length: the prompt plus the picks so far.
        let len = tokens.iter().zip(&unfinished).find(|(_, &u)| u).map_or(0, |(t, _)| t.len());
        let want = match processors.model_side(len) {
            _ if cfg.do_sample => Want::Logits,
            Some(false) => Want::Argmax,
            Some(true) if eos.len() < vocab => Want::TopLogProbs(eos.len() + 1),
            _ => Want::Logits,
        };
        out = step(model, &next, vocab, want)?;
    }

    Ok(tokens
        .chunks(expand)
        .map(|group| {
            group
                .iter()
                .map(|t| new_tokens(t, prompt_len, eos))
                .collect()
        })
        .collect())
}
