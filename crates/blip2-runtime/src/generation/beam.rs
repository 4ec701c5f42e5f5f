//! Beam search and beam sampling: transformers' vectorised `_beam_search` (5.x).
//!
//! Per prompt there are `num_beams` running beams and a store of `num_beams` finished
//! hypotheses. Each step:
//! 1. every running beam's logits go through log-softmax, then the processors, and its running
//!    score is added;
//! 2. the best K = max(2, 1 + eos count) * num_beams continuations over all beams are kept
//!    (drawn without replacement when sampling), best first: K is large enough that at least
//!    `num_beams` of them do not end in an eos;
//! 3. a continuation is "done" when it ends in an eos or reaches the length limit; the best
//!    `num_beams` not-done continuations become the running beams;
//! 4. done continuations among the first `num_beams` of K compete for the finished store with
//!    the score `sum_logprobs / new_tokens ^ length_penalty` (new tokens counting the eos);
//! 5. the search stops when no running beam can beat the finished store (see `early_stopping`),
//!    or every continuation was done.
//!
//! transformers masks rather than branches: whatever must lose gets -1e9 added to its score.
//! That is reproduced as is, since those sums decide ties between "impossible" entries.

use ndarray::Array2;

use super::processors::{desc, log_softmax, top_k_indices, Processors};
use super::rng::{sample_without_replacement, Rng};
use super::{
    new_tokens, step, EarlyStopping, GenerationConfig, GenerationError, Prompt, StepModel,
    StepOutput, Want,
};

/// What transformers adds to a score to rule an entry out.
const MASK: f32 = -1.0e9;

#[derive(Clone, Debug)]
struct Beam {
    /// Prompt and new tokens.
    tokens: Vec<i64>,
    /// Sum of the processed log-probabilities (plus masks).
    score: f32,
}

#[derive(Clone, Debug)]
struct Hypothesis {
    tokens: Vec<i64>,
    /// Length-penalised score (plus masks).
    score: f32,
    /// Whether this entry really is a finished hypothesis (not a placeholder).
    done: bool,
}

#[derive(Clone, Copy, Debug)]
struct Candidate {
    beam: usize,
    token: i64,
    score: f32,
    /// Hits a stopping criterion: an eos, or the length limit.
    done: bool,
}

pub(crate) fn run<M: StepModel + ?Sized>(
    model: &mut M,
    prompts: &[Prompt],
    first_logits: Array2<f32>,
    cfg: &GenerationConfig,
    seed: u64,
) -> Result<Vec<Vec<Vec<i64>>>, GenerationError<M::Error>> {
    let vocab = first_logits.ncols();
    let batch = prompts.len();
    let nb = cfg.num_beams;
    let prompt_len = prompts[0].ids.len();
    let max_len = prompt_len + cfg.max_new_tokens;
    let eos = &cfg.eos_token_ids;
    let per_beam = (1 + eos.len()).max(2);
    let keep = per_beam * nb;
    if keep > nb * vocab {
        return Err(GenerationError::Input(format!(
            "beam search keeps {keep} candidates per step but there are only {} (vocabulary {vocab})",
            nb * vocab
        )));
    }
    // Beam sampling keeps at least (eos count + 1) tokens per beam through top-k/top-p.
    let processors = Processors::new(cfg, prompt_len, per_beam);
    let mut rngs: Vec<Rng> = (0..batch).map(|b| Rng::new(seed, b as u64)).collect();

    // Only the first beam starts live: the others are copies and would repeat its candidates.
    let mut running: Vec<Vec<Beam>> = prompts
        .iter()
        .map(|p| {
            (0..nb)
                .map(|j| Beam { tokens: p.ids.clone(), score: if j == 0 { 0.0 } else { MASK } })
                .collect()
        })
        .collect();
    let mut finished: Vec<Vec<Hypothesis>> = prompts
        .iter()
        .map(|p| vec![Hypothesis { tokens: p.ids.clone(), score: MASK, done: false }; nb])
        .collect();
    // Per prompt: may the running beams still improve on the finished store?
    let mut improvable = vec![true; batch];

    // Until the first reorder the model holds one row per prompt (the prefill); the beams of a
    // prompt all read that row. Afterwards it holds batch * nb rows.
    let mut expanded = false;
    let mut out = StepOutput::Logits(first_logits);
    let mut cur_len = prompt_len;
    let mut acc = vec![0f32; nb * vocab];
    loop {
        // 1-2. candidates per prompt: (index into the [beams * vocab] scores, score)
        let mut candidates: Vec<Vec<Candidate>> = Vec::with_capacity(batch);
        for b in 0..batch {
            let picked: Vec<(usize, f32)> = match &out {
                StepOutput::Logits(logits) => {
                    for (j, beam) in running[b].iter().enumerate() {
                        let row = logits.row(if expanded { b * nb + j } else { b });
                        let scores = &mut acc[j * vocab..(j + 1) * vocab];
                        log_softmax(row.iter().copied(), scores);
                        processors.apply(&beam.tokens, prompts[b].padding, scores);
                        for s in scores.iter_mut() {
                            *s += beam.score;
                        }
                    }
                    let picked = if cfg.do_sample {
                        let mut drawn = sample_without_replacement(&acc, keep, &mut rngs[b]);
                        // Sorted best first; the stable sort keeps draw order among equal scores.
                        drawn.sort_by(|&x, &y| desc(acc[x], acc[y]));
                        drawn
                    } else {
                        top_k_indices(&acc, keep)
                    };
                    picked.into_iter().map(|i| (i, acc[i])).collect()
                }
                // The model's per-beam best `keep` log-probabilities (processors inert):
                // the best `keep` over all beams are among them. Laid out in index order
                // so equal scores resolve as over the full scores.
                // While the minimum length bans the eos tokens, the model returned that many
                // more candidates and the eos ones are dropped here.
                StepOutput::TopLogProbs { logprobs, ids } => {
                    let ban = processors.model_side(cur_len) == Some(true);
                    let mut entries: Vec<(usize, f32)> = Vec::with_capacity(nb * logprobs.ncols());
                    for (j, beam) in running[b].iter().enumerate() {
                        let r = b * nb + j;
                        for t in 0..logprobs.ncols() {
                            if ban && eos.contains(&ids[[r, t]]) {
                                continue;
                            }
                            entries.push((
                                j * vocab + ids[[r, t]] as usize,
                                logprobs[[r, t]] + beam.score,
                            ));
                        }
                    }
                    entries.sort_by_key(|e| e.0);
                    let scores: Vec<f32> = entries.iter().map(|e| e.1).collect();
                    top_k_indices(&scores, keep).into_iter().map(|i| entries[i]).collect()
                }
                StepOutput::Argmax(_) | StepOutput::TopLogits { .. } => {
                    unreachable!("beam search asks for log-probabilities or logits")
                }
            };
            candidates.push(
                picked
                    .into_iter()
                    .map(|(i, score)| {
                        let token = (i % vocab) as i64;
                        Candidate {
                            beam: i / vocab,
                            token,
                            score,
                            done: cur_len + 1 >= max_len || eos.contains(&token),
                        }
                    })
                    .collect(),
            );
        }
        let all_done = candidates.iter().flatten().all(|c| c.done);

        // Length penalty of anything finishing now: all new tokens, this one included.
        let penalty = ((cur_len + 1 - prompt_len) as f64).powf(cfg.length_penalty) as f32;
        let mut sources: Vec<Vec<usize>> = Vec::with_capacity(batch);
        for b in 0..batch {
            let cands = &candidates[b];
            let extend = |c: &Candidate| {
                let mut t = running[b][c.beam].tokens.clone();
                t.push(c.token);
                t
            };

            // 3. the next running beams: the best not-done continuations
            let run_scores: Vec<f32> =
                cands.iter().map(|c| if c.done { c.score + MASK } else { c.score }).collect();
            let next: Vec<usize> = top_k_indices(&run_scores, nb);

            // 4. the finished store: old entries and the done top-nb continuations compete
            let full =
                cfg.early_stopping == EarlyStopping::True && finished[b].iter().all(|h| h.done);
            let mut merged: Vec<f32> = finished[b].iter().map(|h| h.score).collect();
            for (i, c) in cands.iter().enumerate() {
                let mut s = c.score / penalty;
                if full {
                    s += MASK;
                }
                if !improvable[b] {
                    s += MASK;
                }
                if !(c.done && i < nb) {
                    s += MASK;
                }
                merged.push(s);
            }
            let best = top_k_indices(&merged, nb);
            let store: Vec<Hypothesis> = best
                .into_iter()
                .map(|m| {
                    if m < nb {
                        finished[b][m].clone()
                    } else {
                        let i = m - nb;
                        Hypothesis {
                            tokens: extend(&cands[i]),
                            score: merged[m],
                            done: cands[i].done && i < nb,
                        }
                    }
                })
                .collect();

            let beams: Vec<Beam> = next
                .iter()
                .map(|&i| Beam { tokens: extend(&cands[i]), score: run_scores[i] })
                .collect();
            sources.push(next.iter().map(|&i| cands[i].beam).collect());
            running[b] = beams;
            finished[b] = store;
        }
        cur_len += 1;

        // 5. can the best running beam still beat the worst finished hypothesis?
        for b in 0..batch {
            if !improvable[b] {
                continue;
            }
            let best_len = if cfg.early_stopping == EarlyStopping::Never && cfg.length_penalty > 0.0
            {
                max_len - prompt_len
            } else {
                cur_len - prompt_len
            };
            let best_possible =
                running[b][0].score / ((best_len as f64).powf(cfg.length_penalty) as f32);
            let worst = finished[b].iter().map(|h| h.score).fold(f32::INFINITY, f32::min);
            improvable[b] =
                finished[b].iter().any(|h| best_possible > if h.done { worst } else { MASK });
        }
        let all_stored = finished.iter().flatten().all(|h| h.done);
        let stop = !improvable.iter().any(|&i| i)
            || (cfg.early_stopping == EarlyStopping::True && all_stored)
            || all_done;
        if stop {
            break;
        }

        // Reorder the model rows to follow the beams, then feed each beam its new token.
        let rows: Vec<usize> = sources
            .iter()
            .enumerate()
            .flat_map(|(b, src)| src.iter().map(move |&j| if expanded { b * nb + j } else { b }))
            .collect();
        model.select_rows(&rows).map_err(GenerationError::Model)?;
        expanded = true;
        let last: Vec<i64> = running
            .iter()
            .flatten()
            .map(|beam| *beam.tokens.last().expect("beam has tokens"))
            .collect();
        // Every running beam has cur_len ids.
        let want = match processors.model_side(cur_len) {
            _ if cfg.do_sample => Want::Logits,
            Some(false) if keep <= vocab => Want::TopLogProbs(keep),
            Some(true) if keep + eos.len() <= vocab => Want::TopLogProbs(keep + eos.len()),
            _ => Want::Logits,
        };
        out = step(model, &last, vocab, want)?;
    }

    Ok(finished
        .iter()
        .map(|store| {
            store
                .iter()
                .take(cfg.num_return_sequences)
                .map(|h| new_tokens(&h.tokens, prompt_len, eos))
                .collect()
        })
        .collect())
}
