//! Greedy search and multinomial sampling: transformers' `_sample`.
//!
//! Each row picks its next token from the processed raw logits (no log-softmax here, unlike beam
//! search). A row that produces an eos, or reaches the length limit, is finished: it is fed the
//! pad token from then on and its picks no longer count. Generation ends when every row is
//! finished, without a model step after the last pick.

use ndarray::Array2;

use super::processors::{argmax, Processors};
use super::rng::{sample_one, Rng};
use super::{
    new_tokens, step, GenerationConfig, GenerationError, Observer, Prompt, StepModel, StepOutput,
    Want,
};

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
    let pad = cfg.pad_token_id.or_else(|| eos.first().copied()).unwrap_or(0);
    // Sampling several sequences per prompt repeats each prompt row (repeat_interleave).
    let expand = if cfg.do_sample { cfg.num_return_sequences } else { 1 };
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
        // Sampling's processed candidates per row, when the step returned only those.
        let mut candidates: Option<Vec<Vec<(i64, f32)>>> = None;
        if let StepOutput::TopLogits { logits, ids } = &out {
            // Sampling's candidates, processed here; a row whose candidates cannot tell
            // (a tie at their edge) needs the full logits, and then every row takes them.
            let len = tokens.iter().zip(&unfinished).find(|(_, &u)| u).map_or(0, |(t, _)| t.len());
            let mut settled = Vec::with_capacity(rows);
            for (r, &open) in unfinished.iter().enumerate().take(rows) {
                settled.push(if open {
                    processors.apply_to_row(len, logits, ids, r)
                } else {
                    Some(Vec::new())
                });
            }
            if settled.iter().all(Option::is_some) {
                candidates = Some(settled.into_iter().map(|c| c.expect("checked")).collect());
            } else {
                let full = model.last_logits().ok_or_else(|| {
                    GenerationError::Input(
                        "the model returned sampling candidates but cannot give the full logits"
                            .into(),
                    )
                })?;
                out = StepOutput::Logits(full.map_err(GenerationError::Model)?);
            }
        }
        let mut next = Vec::with_capacity(rows);
        for r in 0..rows {
            if !unfinished[r] {
                next.push(pad);
                continue;
            }
            let pick = match (&out, &candidates) {
                // Sampling's processed candidates, in id order: the draw picks what it
                // picks over the full scores.
                (_, Some(kept)) => {
                    let scores: Vec<f32> = kept[r].iter().map(|c| c.1).collect();
                    kept[r][sample_one(&scores, &mut rngs[r])].0
                }
                // The model picked it (asked for only when no processor reads the scores).
                (StepOutput::Argmax(picks), _) => picks[r],
                // Its best candidates, while the minimum length bans the eos tokens: the
                // best one that is not an eos (eos.len() + 1 candidates hold one).
                (StepOutput::TopLogProbs { ids, .. }, _) => *ids
                    .row(r)
                    .iter()
                    .find(|t| !eos.contains(t))
                    .expect("a candidate that is not an eos"),
                (StepOutput::TopLogits { .. }, None) => unreachable!("settled above"),
                (StepOutput::Logits(logits), _) => {
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
        let want = processors.want(len, cfg.do_sample, vocab);
        out = step(model, &next, vocab, want)?;
    }

    Ok(tokens
        .chunks(expand)
        .map(|group| group.iter().map(|t| new_tokens(t, prompt_len, eos)).collect())
        .collect())
}

/// One sequence of greedy search or sampling, stepped from outside: what a server's
/// continuous batch keeps per row, so rows can join and leave a running batch. Fed the
/// logits of its next position, it picks exactly what [`super::generate`] picks for the
/// same row when the prompt runs alone (the prompt without padding, its own
/// `max_new_tokens`, the sampling stream `seed`/`stream` that `generate` gives row
/// `stream`).
#[derive(Debug)]
pub struct RowSearch {
    cfg: GenerationConfig,
    tokens: Vec<i64>,
    prompt_len: usize,
    rng: Rng,
    finished: bool,
    scores: Vec<f32>,
    /// The model's vocabulary, when known ([`RowSearch::with_vocab`]): the row may then
    /// ask for its best candidates instead of every logit.
    vocab: usize,
}

impl RowSearch {
    /// `prompt`: the row's ids as alone (image-token placeholders included, no padding).
    pub fn new(
        prompt: Vec<i64>,
        cfg: &GenerationConfig,
        seed: u64,
        stream: u64,
    ) -> Result<Self, super::ConfigError> {
        super::validate(cfg)?;
        if cfg.num_beams > 1 {
            return Err(super::ConfigError::plain(
                super::Setting::NumBeams,
                "a row search is greedy search or sampling",
            ));
        }
        Ok(RowSearch {
            cfg: cfg.clone(),
            prompt_len: prompt.len(),
            tokens: prompt,
            rng: Rng::new(seed, stream),
            finished: false,
            scores: Vec::new(),
            vocab: 0,
        })
    }

    /// The model's vocabulary size: with it the row asks for its best candidates where
    /// they are enough ([`RowSearch::want`]); without, for every logit then.
    pub fn with_vocab(mut self, vocab: usize) -> Self {
        self.vocab = vocab;
        self
    }

    /// Picks the next token from the logits of the row's next position and appends it.
    /// The row is finished after an eos or its `max_new_tokens`-th token.
    pub fn pick(&mut self, logits: ndarray::ArrayView1<'_, f32>) -> i64 {
        debug_assert!(!self.finished, "a finished row picks nothing");
        self.scores.clear();
        self.scores.extend(logits.iter().copied());
        Processors::new(&self.cfg, self.prompt_len, 1).apply(&self.tokens, 0, &mut self.scores);
        let pick = (if self.cfg.do_sample {
            sample_one(&self.scores, &mut self.rng)
        } else {
            argmax(&self.scores)
        }) as i64;
        self.push(pick);
        pick
    }

    /// What the row needs of its next position's logits, as [`super::generate`] asks
    /// ([`Processors::want`]): the argmax, the best candidates, or every logit (always,
    /// when the vocabulary's size is unknown).
    pub fn want(&self) -> Want {
        Processors::new(&self.cfg, self.prompt_len, 1).want(
            self.tokens.len(),
            self.cfg.do_sample,
            self.vocab,
        )
    }

    /// Whether [`RowSearch::pick_from`] can pick from row `row` of `out`: false only for
    /// sampling candidates that cannot tell (a tie at their edge), which need the step's
    /// full logits.
    pub fn settles(&self, out: &StepOutput, row: usize) -> bool {
        match (out, self.want()) {
            (StepOutput::TopLogits { logits, ids }, Want::TopLogits(_)) => {
                self.sampling_candidates(logits, ids, row).is_some()
            }
            _ => true,
        }
    }

    /// Row `row` of sampling candidates, processed: the tokens the draw chooses among,
    /// in id order ([`Processors::apply_to_row`]).
    fn sampling_candidates(
        &self,
        logits: &Array2<f32>,
        ids: &Array2<i64>,
        row: usize,
    ) -> Option<Vec<(i64, f32)>> {
        Processors::new(&self.cfg, self.prompt_len, 1).apply_to_row(
            self.tokens.len(),
            logits,
            ids,
            row,
        )
    }

    /// [`RowSearch::pick`] from row `row` of a step's answer: its logits, or what
    /// [`RowSearch::want`] asked for (the model's argmax; the best candidate that is not
    /// an eos; a draw among the sampling candidates). `None` when the answer holds none
    /// of them (a step asked for something else) or cannot tell
    /// ([`RowSearch::settles`]).
    pub fn pick_from(&mut self, out: &StepOutput, row: usize) -> Option<i64> {
        let pick = match (out, self.want()) {
            (StepOutput::Logits(l), _) => return Some(self.pick(l.row(row))),
            (StepOutput::Argmax(picks), Want::Argmax) => *picks.get(row)?,
            (StepOutput::TopLogProbs { ids, .. }, Want::TopLogProbs(k)) if ids.ncols() >= k => {
                let eos = &self.cfg.eos_token_ids;
                *ids.outer_iter().nth(row)?.iter().find(|t| !eos.contains(t))?
            }
            (StepOutput::TopLogits { logits, ids }, Want::TopLogits(k)) if ids.ncols() >= k => {
                let kept = self.sampling_candidates(logits, ids, row)?;
                let scores: Vec<f32> = kept.iter().map(|c| c.1).collect();
                kept[sample_one(&scores, &mut self.rng)].0
            }
            _ => return None,
        };
        self.push(pick);
        Some(pick)
    }

    fn push(&mut self, pick: i64) {
        self.tokens.push(pick);
        if self.cfg.eos_token_ids.contains(&pick)
            || self.tokens.len() - self.prompt_len >= self.cfg.max_new_tokens
        {
            self.finished = true;
        }
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Ends the row now (a stop string, a client gone).
    pub fn finish(&mut self) {
        self.finished = true;
    }

    /// The last token picked.
    pub fn last(&self) -> Option<i64> {
        (self.tokens.len() > self.prompt_len).then(|| self.tokens[self.tokens.len() - 1])
    }

    /// The new tokens so far, without a final eos.
    pub fn new_tokens(&self) -> Vec<i64> {
        new_tokens(&self.tokens, self.prompt_len, &self.cfg.eos_token_ids)
    }

    /// Whether the row ended on an eos.
    pub fn ended_on_eos(&self) -> bool {
        self.last().is_some_and(|t| self.cfg.eos_token_ids.contains(&t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::arr2;

    /// While the minimum length bans the eos tokens, a greedy row asks the model for its
    /// best `eos + 1` candidates, not the vocabulary's logits, and takes the best one that
    /// is not an eos; afterwards it asks for the argmax.
    #[test]
    fn a_banned_eos_asks_for_candidates_not_logits() {
        let cfg = GenerationConfig {
            max_new_tokens: 4,
            min_new_tokens: 2,
            eos_token_ids: vec![2, 3],
            ..GenerationConfig::default()
        };
        let mut row = RowSearch::new(vec![5, 6], &cfg, 0, 0).unwrap().with_vocab(100);
        assert_eq!(row.want(), Want::TopLogProbs(3));
        // Row 1 of the answer: the eos tokens come first, 9 is the best one left.
        let out = StepOutput::TopLogProbs {
            logprobs: arr2(&[[-0.1, -0.2, -0.3], [-0.5, -0.6, -0.9]]),
            ids: arr2(&[[7, 8, 9], [3, 2, 9]]),
        };
        assert_eq!(row.pick_from(&out, 1), Some(9));
        assert_eq!(row.want(), Want::TopLogProbs(3));
        // Candidates of another count are not what it asked for.
        let short = StepOutput::TopLogProbs { logprobs: arr2(&[[-0.1]]), ids: arr2(&[[4]]) };
        assert_eq!(row.pick_from(&short, 0), None);
        assert_eq!(row.pick_from(&out, 0), Some(7));
        // Two new tokens: eos may end the row now, the model's argmax is enough.
        assert_eq!(row.want(), Want::Argmax);
        assert_eq!(row.pick_from(&StepOutput::Argmax(vec![2]), 0), Some(2));
        assert!(row.is_finished() && row.ended_on_eos());
        assert_eq!(row.new_tokens(), vec![9, 7]);
    }

    /// A sampled row asks for its `k + 1` best raw logits and draws among its
    /// candidates exactly what the same draw picks over the full logits; candidates with
    /// a tie at their edge cannot tell, and the row then needs the full logits.
    #[test]
    fn a_sampled_row_draws_from_its_candidates_as_from_the_full_logits() {
        let cfg = GenerationConfig {
            do_sample: true,
            top_k: 3,
            temperature: 0.7,
            eos_token_ids: vec![0],
            ..GenerationConfig::default()
        };
        let vocab = 10;
        let full: Vec<f32> = vec![0.5, 2.0, -1.0, 1.5, 3.0, 0.1, -0.5, 1.0, 0.2, 0.3];
        // The 4 best, best first: ids 4, 1, 3, 7.
        let out = StepOutput::TopLogits {
            logits: arr2(&[[3.0, 2.0, 1.5, 1.0]]),
            ids: arr2(&[[4, 1, 3, 7]]),
        };
        for seed in 0..40 {
            let mut a = RowSearch::new(vec![5], &cfg, seed, 1).unwrap().with_vocab(vocab);
            let mut b = RowSearch::new(vec![5], &cfg, seed, 1).unwrap().with_vocab(vocab);
            assert_eq!(a.want(), Want::TopLogits(4));
            assert!(a.settles(&out, 0));
            let from_candidates = a.pick_from(&out, 0).unwrap();
            let from_logits = b.pick(ndarray::ArrayView1::from(&full));
            assert_eq!(from_candidates, from_logits, "seed {seed}");
        }
        // The 4th candidate ties with the 3rd (the k-th): a token left out may tie too.
        let tied = StepOutput::TopLogits {
            logits: arr2(&[[3.0, 2.0, 1.5, 1.5]]),
            ids: arr2(&[[4, 1, 3, 7]]),
        };
        let mut a = RowSearch::new(vec![5], &cfg, 0, 1).unwrap().with_vocab(vocab);
        assert!(!a.settles(&tied, 0));
        assert_eq!(a.pick_from(&tied, 0), None);
        // Without the vocabulary's size the row asks for every logit.
        let c = RowSearch::new(vec![5], &cfg, 0, 1).unwrap();
        assert_eq!(c.want(), Want::Logits);
    }
}
