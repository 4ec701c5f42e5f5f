//! Score arithmetic shared by the searches: log-softmax, transformers' logits processors in the
//! order `GenerationMixin._get_logits_processor` builds them, and ordered selection.
//!
//! Everything stays in f32 like torch on CPU; the few constants transformers keeps as Python
//! floats are rounded to f32 where torch would (a Python scalar meeting a float32 tensor).

use std::cmp::Ordering;

use super::{GenerationConfig, Want};

/// Orders scores from high to low the way torch's topk/argmax/sort do: NaN counts as the largest.
pub(crate) fn desc(a: f32, b: f32) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        (false, false) => b.partial_cmp(&a).expect("no NaN here"),
    }
}

/// The index of the largest score, the first one on ties (`torch.argmax`).
pub(crate) fn argmax(scores: &[f32]) -> usize {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate().skip(1) {
        if desc(s, scores[best]) == Ordering::Less {
            best = i;
        }
    }
    best
}

/// The indices of the `k` largest scores, best first; equal scores keep index order.
/// (torch.topk leaves tie order unspecified; with real logits ties are vanishingly rare.)
pub(crate) fn top_k_indices(scores: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(scores.len());
    if k == 0 {
        return Vec::new();
    }
    // k is small (a few beams), so keep a sorted shortlist: most scores fail the first check.
    let mut best: Vec<usize> = Vec::with_capacity(k + 1);
    for (i, &s) in scores.iter().enumerate() {
        if best.len() == k && desc(s, scores[best[k - 1]]) != Ordering::Less {
            continue;
        }
        let at = best.partition_point(|&j| desc(scores[j], s) != Ordering::Greater);
        best.insert(at, i);
        best.truncate(k);
    }
    best
}

/// `torch.log_softmax` on one row: (x - max) - log(sum(exp(x - max))).
pub(crate) fn log_softmax(logits: impl IntoIterator<Item = f32> + Clone, out: &mut [f32]) {
    let max =
        logits
            .clone()
            .into_iter()
            .fold(f32::NEG_INFINITY, |m, x| if x > m || x.is_nan() { x } else { m });
    let sum: f64 = logits.clone().into_iter().map(|x| f64::from((x - max).exp())).sum();
    let log_sum = (sum as f32).ln();
    for (o, x) in out.iter_mut().zip(logits) {
        *o = (x - max) - log_sum;
    }
}

/// The processors a configuration turns on, ready to apply to one row at a time.
#[derive(Debug)]
pub(crate) struct Processors<'a> {
    repetition_penalty: Option<f32>,
    no_repeat_ngram_size: usize,
    min_new_tokens: usize,
    eos: &'a [i64],
    prompt_len: usize,
    temperature: Option<f32>,
    top_k: usize,
    top_p: Option<f64>,
    min_tokens_to_keep: usize,
}

impl<'a> Processors<'a> {
    /// `min_tokens_to_keep` is what top-k/top-p may never drop below: 1 for plain sampling,
    /// (eos count + 1, at least 2) for beam sampling so an eos cannot wipe out every continuation.
    pub(crate) fn new(
        cfg: &'a GenerationConfig,
        prompt_len: usize,
        min_tokens_to_keep: usize,
    ) -> Self {
        let sampling = cfg.do_sample;
        Processors {
            repetition_penalty: (cfg.repetition_penalty != 1.0)
                .then_some(cfg.repetition_penalty as f32),
            no_repeat_ngram_size: cfg.no_repeat_ngram_size,
            min_new_tokens: cfg.min_new_tokens,
            eos: &cfg.eos_token_ids,
            prompt_len,
            temperature: (sampling && cfg.temperature != 1.0).then_some(cfg.temperature as f32),
            top_k: if sampling { cfg.top_k } else { 0 },
            top_p: (sampling && cfg.top_p < 1.0).then_some(cfg.top_p),
            min_tokens_to_keep,
        }
    }

    /// Whether the model may pick the next token of rows with `len` ids so far on its own
    /// (its argmax or top-k of the raw scores): `None` when a processor reads every score
    /// (penalty, n-gram ban, sampling warpers); `Some(ban)` otherwise, `ban` being true
    /// while the minimum length still bans the eos tokens, which the search then skips
    /// among the model's candidates.
    pub(crate) fn model_side(&self, len: usize) -> Option<bool> {
        let plain = self.repetition_penalty.is_none()
            && self.no_repeat_ngram_size == 0
            && self.temperature.is_none()
            && self.top_k == 0
            && self.top_p.is_none();
        plain.then(|| {
            self.min_new_tokens > 0
                && !self.eos.is_empty()
                && len - self.prompt_len < self.min_new_tokens
        })
    }

    /// What a search needs of the next position's logits for a row with `len` ids (the
    /// same for the whole-batch search and a server's rows): the argmax when nothing
    /// reads the scores; while the minimum length bans the eos tokens, the `eos + 1` best
    /// log-probabilities (the best token that is not an eos is among them); sampling with
    /// top-k and no penalty, the `k + 1` best raw logits (`+ eos` while banned; the extra
    /// one tells whether tokens left out tie with the k-th); else all of them.
    /// Candidates only where the vocabulary holds more than them.
    pub(crate) fn want(&self, len: usize, do_sample: bool, vocab: usize) -> Want {
        let eos = self.eos.len();
        if do_sample {
            return match self.sampling_side(len) {
                Some((k, ban)) if k + usize::from(ban) * eos < vocab => {
                    Want::TopLogits(k + usize::from(ban) * eos + 1)
                }
                _ => Want::Logits,
            };
        }
        match self.model_side(len) {
            Some(false) => Want::Argmax,
            Some(true) if eos < vocab => Want::TopLogProbs(eos + 1),
            _ => Want::Logits,
        }
    }

    /// Sampling that reads only the best scores: `Some((k, ban))` when the processors are
    /// temperature, top-k (`k` candidates, with ties) and top-p, and the minimum length,
    /// which bans the eos tokens while `ban`; then the draw needs only the `k` best logits
    /// of the tokens not banned, and a model may return those instead of the vocabulary's.
    /// `None` when a processor reads every score, or top-k is off.
    pub(crate) fn sampling_side(&self, len: usize) -> Option<(usize, bool)> {
        let only_warpers =
            self.repetition_penalty.is_none() && self.no_repeat_ngram_size == 0 && self.top_k > 0;
        only_warpers.then(|| {
            let ban = self.min_new_tokens > 0
                && !self.eos.is_empty()
                && len - self.prompt_len < self.min_new_tokens;
            (self.top_k.max(self.min_tokens_to_keep), ban)
        })
    }

    /// [`Processors::apply_to_candidates`] for row `r` of a step's candidates (`ids` and
    /// their raw `logits`, `[rows, k]`, best first); `None` also when there is no row `r`.
    pub(crate) fn apply_to_row(
        &self,
        len: usize,
        logits: &ndarray::Array2<f32>,
        ids: &ndarray::Array2<i64>,
        r: usize,
    ) -> Option<Vec<(i64, f32)>> {
        let (l, i) = (logits.outer_iter().nth(r)?, ids.outer_iter().nth(r)?);
        let row: Vec<(i64, f32)> = i.iter().copied().zip(l.iter().copied()).collect();
        self.apply_to_candidates(len, &row)
    }

    /// [`Processors::apply`] for a row of rows with `len` ids, given only its best
    /// logits (`candidates`: (id, logit), best first, ties to the lower id; see
    /// [`Processors::sampling_side`]). Returns the tokens the full processing leaves
    /// with a finite score, in id order, with those scores, so a draw over them picks
    /// what the same draw over the full scores picks; `None` when the candidates cannot
    /// tell: the last of them ties with the k-th kept score, so tokens left out may tie
    /// too.
    pub(crate) fn apply_to_candidates(
        &self,
        len: usize,
        candidates: &[(i64, f32)],
    ) -> Option<Vec<(i64, f32)>> {
        let (k, ban) = self.sampling_side(len)?;
        let temper = |l: f32| self.temperature.map_or(l, |t| l / t);
        let scored: Vec<(i64, f32)> = candidates
            .iter()
            .filter(|(id, _)| !(ban && self.eos.contains(id)))
            .map(|&(id, l)| (id, temper(l)))
            .collect();
        let kth = scored.get(k - 1)?.1;
        let last = temper(candidates.last()?.1);
        // Every token left out scores at most `last`; top-k keeps ties with the k-th. (A NaN
        // score cannot tell either.)
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        if !(last < kth) {
            return None;
        }
        let mut kept: Vec<(i64, f32)> = scored.into_iter().filter(|&(_, s)| s >= kth).collect();
        kept.sort_by_key(|&(id, _)| id);
        if let Some(p) = self.top_p {
            let mut scores: Vec<f32> = kept.iter().map(|e| e.1).collect();
            top_p_filter(&mut scores, p, self.min_tokens_to_keep);
            for (e, s) in kept.iter_mut().zip(scores) {
                e.1 = s;
            }
        }
        Some(kept)
    }

    /// Applies every enabled processor, in transformers' order, to the scores of the next token
    /// of a row whose ids so far (prompt included) are `tokens`. `padding` leading prompt
    /// positions are padding, which the repetition penalty skips (as transformers does with the
    /// attention mask).
    pub(crate) fn apply(&self, tokens: &[i64], padding: usize, scores: &mut [f32]) {
        if let Some(penalty) = self.repetition_penalty {
            repetition_penalty(&tokens[padding.min(tokens.len())..], penalty, scores);
        }
        if self.no_repeat_ngram_size > 0 {
            no_repeat_ngram(tokens, self.no_repeat_ngram_size, scores);
        }
        // MinLengthLogitsProcessor (min_length = prompt + min_new_tokens) and
        // MinNewTokensLengthLogitsProcessor test the same condition here.
        if self.min_new_tokens > 0 && tokens.len() - self.prompt_len < self.min_new_tokens {
            for &e in self.eos {
                if let Some(s) = slot(scores, e) {
                    *s = f32::NEG_INFINITY;
                }
            }
        }
        if let Some(t) = self.temperature {
            for s in scores.iter_mut() {
                *s /= t;
            }
        }
        if self.top_k > 0 {
            top_k_filter(scores, self.top_k.max(self.min_tokens_to_keep));
        }
        if let Some(p) = self.top_p {
            top_p_filter(scores, p, self.min_tokens_to_keep);
        }
    }
}

/// The score of token `id`, if the id is inside the vocabulary (transformers ignores the rest).
fn slot(scores: &mut [f32], id: i64) -> Option<&mut f32> {
    usize::try_from(id).ok().and_then(|i| scores.get_mut(i))
}

/// RepetitionPenaltyLogitsProcessor: every distinct id seen gets its score pushed away from
/// zero-probability once: multiplied by the penalty when negative, divided when not.
fn repetition_penalty(seen: &[i64], penalty: f32, scores: &mut [f32]) {
    let mut ids: Vec<i64> = seen.to_vec();
    ids.sort_unstable();
    ids.dedup();
    for id in ids {
        if let Some(s) = slot(scores, id) {
            *s = if *s < 0.0 { *s * penalty } else { *s / penalty };
        }
    }
}

/// NoRepeatNGramLogitsProcessor: bans every token that would complete an n-gram already present
/// anywhere in the row (prompt included).
fn no_repeat_ngram(tokens: &[i64], n: usize, scores: &mut [f32]) {
    let len = tokens.len();
    if len < n {
        return;
    }
    let prefix = &tokens[len + 1 - n..];
    for window in tokens.windows(n) {
        if &window[..n - 1] == prefix {
            if let Some(s) = slot(scores, window[n - 1]) {
                *s = f32::NEG_INFINITY;
            }
        }
    }
}

/// TopKLogitsWarper: drops every score below the k-th largest (ties with it survive).
fn top_k_filter(scores: &mut [f32], k: usize) {
    let k = k.min(scores.len());
    if k == 0 || k == scores.len() {
        return;
    }
    let mut sorted = scores.to_vec();
    sorted.select_nth_unstable_by(k - 1, |&a, &b| desc(a, b));
    let kth = sorted[k - 1];
    for s in scores.iter_mut() {
        if *s < kth {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// TopPLogitsWarper: sorted from least to most likely, drops tokens while the cumulative
/// probability stays at or below 1 - top_p, always keeping the `min_keep` most likely.
fn top_p_filter(scores: &mut [f32], top_p: f64, min_keep: usize) {
    let v = scores.len();
    let mut order: Vec<usize> = (0..v).collect();
    // Ascending; the stable sort keeps lower indices first among equal scores.
    order.sort_by(|&a, &b| desc(scores[b], scores[a]));
    let max = order.last().map_or(0.0, |&i| scores[i]);
    let exps: Vec<f32> = order.iter().map(|&i| (scores[i] - max).exp()).collect();
    let sum = exps.iter().map(|&e| f64::from(e)).sum::<f64>() as f32;
    // torch's CPU cumsum accumulates in double and rounds each output to float.
    let threshold = (1.0 - top_p) as f32;
    let mut cum = 0.0f64;
    let mut remove = Vec::new();
    for (rank, (&i, &e)) in order.iter().zip(&exps).enumerate() {
        cum += f64::from(e / sum);
        if (cum as f32) <= threshold && rank < v.saturating_sub(min_keep) {
            remove.push(i);
        }
    }
    for i in remove {
        scores[i] = f32::NEG_INFINITY;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_indices_orders_and_breaks_ties_by_index() {
        let s = [1.0, 3.0, 3.0, f32::NEG_INFINITY, 2.0, 5.0];
        assert_eq!(top_k_indices(&s, 4), vec![5, 1, 2, 4]);
        assert_eq!(top_k_indices(&s, 10).len(), 6);
        assert_eq!(argmax(&s), 5);
        assert_eq!(argmax(&[1.0, 4.0, 4.0]), 1);
    }

    #[test]
    fn log_softmax_normalises() {
        let x = [1.0f32, 2.0, 3.0, -1.0];
        let mut out = [0.0f32; 4];
        log_softmax(x.iter().copied(), &mut out);
        // torch.log_softmax(torch.tensor([1., 2., 3., -1.]), -1), float32
        let torch =
            [-2.4197165966033936f64, -1.4197165966033936, -0.41971665620803833, -4.419716835021973];
        assert_eq!(out, torch.map(|v| v as f32));
    }

    #[test]
    fn ngram_bans_completions_only() {
        let mut s = vec![0.0f32; 6];
        // bigrams seen: (1,2) (2,3) (3,1); the row ends in 1, so 2 is banned
        no_repeat_ngram(&[1, 2, 3, 1], 2, &mut s);
        assert_eq!(s.iter().filter(|v| v.is_infinite()).count(), 1);
        assert!(s[2].is_infinite());
    }

    #[test]
    fn repetition_penalty_once_per_token() {
        let mut s = vec![2.0f32, -2.0, 2.0];
        repetition_penalty(&[0, 0, 1, 7, -3], 2.0, &mut s);
        assert_eq!(s, vec![1.0, -4.0, 2.0]);
    }

    #[test]
    fn top_p_keeps_the_smallest_covering_set() {
        // probabilities ~ [0.0321, 0.0871, 0.2369, 0.6439]
        let mut s = vec![0.0f32, 1.0, 2.0, 3.0];
        top_p_filter(&mut s, 0.7, 1);
        assert_eq!(s.iter().filter(|v| v.is_finite()).count(), 2);
        let mut s = vec![0.0f32, 1.0, 2.0, 3.0];
        top_p_filter(&mut s, 0.01, 3);
        assert_eq!(s.iter().filter(|v| v.is_finite()).count(), 3);
    }
}
