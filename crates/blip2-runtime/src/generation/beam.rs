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

/// The search's state over the whole batch: stepped by [`run`] for a batch, or from
/// outside as a [`BeamSearch`] (one prompt's beams, a group of rows in a server's batch).
struct Search {
    cfg: GenerationConfig,
    prompts: Vec<Prompt>,
    /// Candidates the processors keep per beam when sampling (see [`Processors::new`]).
    per_beam: usize,
    rngs: Vec<Rng>,
    vocab: usize,
    nb: usize,
    prompt_len: usize,
    max_len: usize,
    /// Candidates kept per prompt and step.
    keep: usize,
    running: Vec<Vec<Beam>>,
    finished: Vec<Vec<Hypothesis>>,
    /// Per prompt: may the running beams still improve on the finished store?
    improvable: Vec<bool>,
    /// Until the first reorder the model holds one row per prompt (the prefill); the
    /// beams of a prompt all read that row. Afterwards it holds batch * nb rows.
    expanded: bool,
    cur_len: usize,
    /// Scratch for one prompt's `[beams * vocab]` scores.
    acc: Vec<f32>,
}

pub(crate) fn run<M: StepModel + ?Sized>(
    model: &mut M,
    prompts: &[Prompt],
    first_logits: Array2<f32>,
    cfg: &GenerationConfig,
    seed: u64,
    wanted: &mut dyn FnMut() -> bool,
) -> Result<Vec<Vec<Vec<i64>>>, GenerationError<M::Error>> {
    let vocab = first_logits.ncols();
    let mut search =
        Search::new(prompts.to_vec(), vocab, cfg.clone(), seed).map_err(GenerationError::Input)?;
    let mut out = StepOutput::Logits(first_logits);
    // Stop when nothing can improve, or nobody wants the result any more.
    while let Some(next) = search.advance(&out) {
        if !wanted() {
            break;
        }
        model.select_rows(&next.rows).map_err(GenerationError::Model)?;
        out = step(model, &next.tokens, vocab, next.want)?;
    }
    Ok(search.results())
}

/// What a beam search asks of the model after a step: reorder the rows (new row `i` is
/// old row `rows[i]`), then step on `tokens` (one per new row) answering `want`.
#[derive(Clone, Debug, PartialEq)]
pub struct BeamStep {
    pub rows: Vec<usize>,
    pub tokens: Vec<i64>,
    pub want: Want,
}

/// One prompt's beam search (or beam sampling), stepped from outside: what a server's
/// running batch keeps for a request whose beams are a group of its rows. It picks
/// exactly what [`super::generate`] picks for the prompt alone (the prompt without
/// padding, the sampling stream that `generate` gives prompt 0 of `seed`).
pub struct BeamSearch {
    search: Search,
    finished: bool,
}

impl BeamSearch {
    /// `prompt`: the ids as alone (image-token placeholders included, no padding);
    /// `vocab`: the language model's vocabulary size.
    /// `stream`: the sampling stream of beam sampling, the prompt's index in the batch
    /// [`super::generate`] would run it in (0 alone).
    pub fn new(
        prompt: Vec<i64>,
        vocab: usize,
        cfg: &GenerationConfig,
        seed: u64,
        stream: u64,
    ) -> Result<Self, GenerationError<std::convert::Infallible>> {
        super::validate(cfg)?;
        if cfg.num_beams < 2 {
            return Err(GenerationError::Input("a beam search needs at least 2 beams".into()));
        }
        let mut search = Search::new(vec![Prompt::new(prompt)], vocab, cfg.clone(), seed)
            .map_err(GenerationError::Input)?;
        search.rngs = vec![Rng::new(seed, stream)];
        Ok(BeamSearch { search, finished: false })
    }

    /// Rows the search holds in the model now: the prompt's one row until the first
    /// reorder, then one per beam.
    pub fn rows(&self) -> usize {
        if self.search.expanded {
            self.search.nb
        } else {
            1
        }
    }

    /// Takes the step's answer for the search's rows (in row order) and returns what to
    /// run next, or `None` once the search has ended.
    pub fn advance(&mut self, out: &StepOutput) -> Option<BeamStep> {
        if self.finished {
            return None;
        }
        let next = self.search.advance(out);
        self.finished = next.is_none();
        next
    }

    /// Ends the search now (its clients have gone): [`BeamSearch::results`] has what it
    /// finished so far.
    pub fn finish(&mut self) {
        self.finished = true;
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The finished hypotheses, `num_return_sequences` of them, best first, as new tokens.
    pub fn results(&self) -> Vec<Vec<i64>> {
        self.search.results().into_iter().next().unwrap_or_default()
    }
}

impl Search {
    fn new(
        prompts: Vec<Prompt>,
        vocab: usize,
        cfg: GenerationConfig,
        seed: u64,
    ) -> Result<Self, String> {
        let nb = cfg.num_beams;
        let prompt_len = prompts[0].ids.len();
        let per_beam = (1 + cfg.eos_token_ids.len()).max(2);
        let keep = per_beam * nb;
        if keep > nb * vocab {
            return Err(format!(
                "beam search keeps {keep} candidates per step but there are only {} (vocabulary {vocab})",
                nb * vocab
            ));
        }
        // Only the first beam starts live: the others are copies and would repeat its
        // candidates.
        let running = prompts
            .iter()
            .map(|p| {
                (0..nb)
                    .map(|j| Beam { tokens: p.ids.clone(), score: if j == 0 { 0.0 } else { MASK } })
                    .collect()
            })
            .collect();
        let finished = prompts
            .iter()
            .map(|p| vec![Hypothesis { tokens: p.ids.clone(), score: MASK, done: false }; nb])
            .collect();
        let n = prompts.len();
        Ok(Self {
            // Beam sampling keeps at least (eos count + 1) tokens per beam through top-k/top-p.
            per_beam,
            rngs: (0..n).map(|b| Rng::new(seed, b as u64)).collect(),
            vocab,
            nb,
            prompt_len,
            max_len: prompt_len + cfg.max_new_tokens,
            keep,
            running,
            finished,
            improvable: vec![true; n],
            expanded: false,
            cur_len: prompt_len,
            acc: vec![0f32; nb * vocab],
            cfg,
            prompts,
        })
    }

    fn processors(&self) -> Processors<'_> {
        Processors::new(&self.cfg, self.prompt_len, self.per_beam)
    }

    /// One step of every prompt's search on the model's answer `out`: steps 1-4, then
    /// step 5's verdict: `None` when the search ends, else the reorder and the step to
    /// run next.
    fn advance(&mut self, out: &StepOutput) -> Option<BeamStep> {
        // 1-2. candidates per prompt
        let candidates: Vec<Vec<Candidate>> =
            (0..self.prompts.len()).map(|b| self.candidates(b, out)).collect();
        let all_done = candidates.iter().flatten().all(|c| c.done);
        // 3-4. the next running beams and the finished store
        let sources: Vec<Vec<usize>> =
            candidates.iter().enumerate().map(|(b, c)| self.advance_prompt(b, c)).collect();
        self.cur_len += 1;
        // 5. stop when nothing can improve
        if self.stops(all_done) {
            return None;
        }
        Some(self.next_step(&sources))
    }

    /// Steps 1-2 for prompt `b`: the best `keep` continuations over its beams (drawn when
    /// sampling), best first.
    fn candidates(&mut self, b: usize, out: &StepOutput) -> Vec<Candidate> {
        let (vocab, nb, keep) = (self.vocab, self.nb, self.keep);
        let eos = &self.cfg.eos_token_ids;
        let processors = Processors::new(&self.cfg, self.prompt_len, self.per_beam);
        // (index into the [beams * vocab] scores, score)
        let picked: Vec<(usize, f32)> = match out {
            StepOutput::Logits(logits) => {
                for (j, beam) in self.running[b].iter().enumerate() {
                    let row = logits.row(if self.expanded { b * nb + j } else { b });
                    let scores = &mut self.acc[j * vocab..(j + 1) * vocab];
                    log_softmax(row.iter().copied(), scores);
                    processors.apply(&beam.tokens, self.prompts[b].padding, scores);
                    for s in scores.iter_mut() {
                        *s += beam.score;
                    }
                }
                let acc = &self.acc;
                let picked = if self.cfg.do_sample {
                    let mut drawn = sample_without_replacement(acc, keep, &mut self.rngs[b]);
                    // Sorted best first; the stable sort keeps draw order among equal scores.
                    drawn.sort_by(|&x, &y| desc(acc[x], acc[y]));
                    drawn
                } else {
                    top_k_indices(acc, keep)
                };
                picked.into_iter().map(|i| (i, acc[i])).collect()
            }
            // The model's per-beam best `keep` log-probabilities (processors inert): the
            // best `keep` over all beams are among them. Laid out in index order so equal
            // scores resolve as over the full scores. While the minimum length bans the
            // eos tokens, the model returned that many more candidates and the eos ones
            // are dropped here.
            StepOutput::TopLogProbs { logprobs, ids } => {
                let ban = processors.model_side(self.cur_len) == Some(true);
                let mut entries: Vec<(usize, f32)> = Vec::with_capacity(nb * logprobs.ncols());
                for (j, beam) in self.running[b].iter().enumerate() {
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
        picked
            .into_iter()
            .map(|(i, score)| {
                let token = (i % vocab) as i64;
                Candidate {
                    beam: i / vocab,
                    token,
                    score,
                    done: self.cur_len + 1 >= self.max_len || eos.contains(&token),
                }
            })
            .collect()
    }

    /// Steps 3-4 for prompt `b`: the best not-done continuations become its running
    /// beams, and done ones among the first `nb` compete for its finished store. Returns
    /// the beam each new running beam continues.
    fn advance_prompt(&mut self, b: usize, cands: &[Candidate]) -> Vec<usize> {
        let (nb, cfg) = (self.nb, &self.cfg);
        // Length penalty of anything finishing now: all new tokens, this one included.
        let penalty = ((self.cur_len + 1 - self.prompt_len) as f64).powf(cfg.length_penalty) as f32;
        let running = &self.running[b];
        let extend = |c: &Candidate| {
            let mut t = running[c.beam].tokens.clone();
            t.push(c.token);
            t
        };

        // 3. the next running beams: the best not-done continuations
        let run_scores: Vec<f32> =
            cands.iter().map(|c| if c.done { c.score + MASK } else { c.score }).collect();
        let next: Vec<usize> = top_k_indices(&run_scores, nb);

        // 4. the finished store: old entries and the done top-nb continuations compete
        let full =
            cfg.early_stopping == EarlyStopping::True && self.finished[b].iter().all(|h| h.done);
        let mut merged: Vec<f32> = self.finished[b].iter().map(|h| h.score).collect();
        for (i, c) in cands.iter().enumerate() {
            let mut s = c.score / penalty;
            if full {
                s += MASK;
            }
            if !self.improvable[b] {
                s += MASK;
            }
            if !(c.done && i < nb) {
                s += MASK;
            }
            merged.push(s);
        }
        let store: Vec<Hypothesis> = top_k_indices(&merged, nb)
            .into_iter()
            .map(|m| {
                if m < nb {
                    self.finished[b][m].clone()
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
        self.running[b] = beams;
        self.finished[b] = store;
        next.iter().map(|&i| cands[i].beam).collect()
    }

    /// Step 5: whether the search ends, after updating which prompts can still improve
    /// (can the best running beam beat the worst finished hypothesis?).
    fn stops(&mut self, all_done: bool) -> bool {
        let cfg = &self.cfg;
        for b in 0..self.prompts.len() {
            if !self.improvable[b] {
                continue;
            }
            let best_len = if cfg.early_stopping == EarlyStopping::Never && cfg.length_penalty > 0.0
            {
                self.max_len - self.prompt_len
            } else {
                self.cur_len - self.prompt_len
            };
            let best_possible =
                self.running[b][0].score / ((best_len as f64).powf(cfg.length_penalty) as f32);
            let finished = &self.finished[b];
            let worst = finished.iter().map(|h| h.score).fold(f32::INFINITY, f32::min);
            self.improvable[b] =
                finished.iter().any(|h| best_possible > if h.done { worst } else { MASK });
        }
        let all_stored = self.finished.iter().flatten().all(|h| h.done);
        !self.improvable.iter().any(|&i| i)
            || (cfg.early_stopping == EarlyStopping::True && all_stored)
            || all_done
    }

    /// The reorder of the model's rows that follows the beams (`sources[b]`: the beam each
    /// of prompt b's running beams continues) and the next step on their new tokens.
    fn next_step(&mut self, sources: &[Vec<usize>]) -> BeamStep {
        let (nb, expanded) = (self.nb, self.expanded);
        let rows: Vec<usize> = sources
            .iter()
            .enumerate()
            .flat_map(|(b, src)| src.iter().map(move |&j| if expanded { b * nb + j } else { b }))
            .collect();
        self.expanded = true;
        let last: Vec<i64> = self
            .running
            .iter()
            .flatten()
            .map(|beam| *beam.tokens.last().expect("beam has tokens"))
            .collect();
        // Every running beam has cur_len ids.
        let (keep, vocab, eos) = (self.keep, self.vocab, &self.cfg.eos_token_ids);
        let want = match self.processors().model_side(self.cur_len) {
            _ if self.cfg.do_sample => Want::Logits,
            Some(false) if keep <= vocab => Want::TopLogProbs(keep),
            Some(true) if keep + eos.len() <= vocab => Want::TopLogProbs(keep + eos.len()),
            _ => Want::Logits,
        };
        BeamStep { rows, tokens: last, want }
    }

    /// The finished hypotheses, `num_return_sequences` per prompt, as new tokens.
    fn results(&self) -> Vec<Vec<Vec<i64>>> {
        let eos = &self.cfg.eos_token_ids;
        self.finished
            .iter()
            .map(|store| {
                store
                    .iter()
                    .take(self.cfg.num_return_sequences)
                    .map(|h| new_tokens(&h.tokens, self.prompt_len, eos))
                    .collect()
            })
            .collect()
    }
}
