//! Search: picks the generated tokens from the language model's logits, reproducing
//! Hugging Face transformers' `GenerationMixin.generate` (5.24) for a decoder-only model:
//! greedy search, multinomial sampling, beam search and beam sampling, with the logits
//! processors repetition penalty, no-repeat n-gram, min new tokens, temperature, top-k and top-p.
//!
//! The search never sees the model: it talks to it through [`StepModel`], which owns the
//! sessions, the KV cache and the attention mask. The caller runs the prefill itself and hands
//! over the logits of the last prompt position, one row per prompt.
//!
//! Lengths: transformers counts `max_length` including the prompt and, when neither
//! `max_length` nor `max_new_tokens` is given, generates 20 new tokens. Here there is only
//! [`GenerationConfig::max_new_tokens`] (default 20): the prompt length is that of the padded
//! prompt rows, as in transformers, so every row gets at most that many new tokens.
//!
//! Not covered: the other processors (bad words, forced tokens, suppress tokens, min_p, typical,
//! epsilon/eta, exponential decay, sequence bias, ...), constrained/group/contrastive search,
//! assisted decoding, stop strings and `max_time`.

mod beam;
mod greedy;

pub use beam::{BeamSearch, BeamStep};
pub use greedy::RowSearch;
mod processors;
pub mod rng;

use std::fmt;
use std::str::FromStr;

use ndarray::Array2;

/// The model side of generation: owns the sessions, the KV cache and the attention mask.
///
/// Rows are independent sequences. The search starts with one row per prompt (the caller has
/// already run the prefill) and may re-arrange them with [`StepModel::select_rows`] to expand a
/// prompt into beams or samples and to reorder beams.
pub trait StepModel {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Appends one token to every current row (`tokens.len()` is the row count) and returns
    /// the logits of that new position, shape `[rows, vocab]`.
    fn step(&mut self, tokens: &[i64]) -> Result<Array2<f32>, Self::Error>;

    /// Re-arranges the rows of the state (KV cache, masks): new row `i` is old row `rows[i]`.
    /// Rows may repeat or be dropped; the row count becomes `rows.len()`.
    fn select_rows(&mut self, rows: &[usize]) -> Result<(), Self::Error>;

    /// [`StepModel::step`] for a search that needs only `want` from the logits. A model
    /// that can pick tokens where it runs (on a GPU) returns just those, so the vocabulary's
    /// logits never cross to the host; the default returns the logits, which serve any want.
    fn step_for(&mut self, tokens: &[i64], want: Want) -> Result<StepOutput, Self::Error> {
        let _ = want;
        self.step(tokens).map(StepOutput::Logits)
    }

    /// The full logits `[rows, vocab]` of the last step, when [`StepModel::step_for`]
    /// returned only part of them: the search asks when the part cannot settle a pick
    /// (sampling's candidates tie with tokens left out). `None` when the model cannot give
    /// them; a model that ever answers [`Want::TopLogits`] with its candidates must.
    fn last_logits(&mut self) -> Option<Result<Array2<f32>, Self::Error>> {
        None
    }
}

/// What the search needs from a step's logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// All of them (a logits processor or sampling reads every score).
    Logits,
    /// Each row's most likely token, the first on ties (greedy search).
    Argmax,
    /// Each row's `k` largest log-softmax values with their ids, best first, ties to the
    /// lower id (beam search keeps the best `k` continuations over all beams, and those
    /// are always among each beam's own best `k`).
    TopLogProbs(usize),
    /// Each row's `k` largest raw logits with their ids, best first, ties to the lower id
    /// (sampling draws among its top-k candidates, which are always among them).
    TopLogits(usize),
}

/// What a step returned: the logits, or only what [`Want`] asked for.
#[derive(Clone, Debug, PartialEq)]
pub enum StepOutput {
    /// `[rows, vocab]`.
    Logits(Array2<f32>),
    /// One token per row.
    Argmax(Vec<i64>),
    /// `[rows, k]` log-probabilities and their token ids.
    TopLogProbs { logprobs: Array2<f32>, ids: Array2<i64> },
    /// `[rows, k]` raw logits and their token ids.
    TopLogits { logits: Array2<f32>, ids: Array2<i64> },
}

/// transformers' `early_stopping`: when beam search may stop before `max_new_tokens`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EarlyStopping {
    /// `False` (the default): stop once a heuristic says the running beams cannot beat the
    /// finished ones, judging them at the current length.
    #[default]
    False,
    /// `True`: stop as soon as `num_beams` hypotheses have finished.
    True,
    /// `"never"`: judge the running beams at the best length they could reach (canonical beam
    /// search, with `length_penalty` 0).
    Never,
}

impl From<bool> for EarlyStopping {
    fn from(b: bool) -> Self {
        if b {
            EarlyStopping::True
        } else {
            EarlyStopping::False
        }
    }
}

impl From<blip2_core::EarlyStoppingSetting> for EarlyStopping {
    fn from(s: blip2_core::EarlyStoppingSetting) -> Self {
        match s {
            blip2_core::EarlyStoppingSetting::Flag(b) => b.into(),
            blip2_core::EarlyStoppingSetting::Word(blip2_core::Never::Never) => {
                EarlyStopping::Never
            }
        }
    }
}

impl FromStr for EarlyStopping {
    type Err = ConfigError;

    /// Accepts `true`, `false` and `never` (any case).
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s.to_ascii_lowercase().as_str() {
            "true" => Ok(EarlyStopping::True),
            "false" => Ok(EarlyStopping::False),
            "never" => Ok(EarlyStopping::Never),
            _ => Err(ConfigError::plain(
                Setting::EarlyStopping,
                format!("must be true, false or never, not {s:?}"),
            )),
        }
    }
}

impl fmt::Display for EarlyStopping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EarlyStopping::False => "false",
            EarlyStopping::True => "true",
            EarlyStopping::Never => "never",
        })
    }
}

/// The search settings, named and defaulted as in transformers' `GenerationConfig`.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
    /// At most this many new tokens per sequence (transformers' default amounts to 20).
    pub max_new_tokens: usize,
    /// The eos tokens are banned until this many new tokens exist.
    pub min_new_tokens: usize,
    /// Beam search when above 1.
    pub num_beams: usize,
    /// Finished beams score `sum of logprobs / new_tokens ^ length_penalty` (the eos counts).
    pub length_penalty: f64,
    pub early_stopping: EarlyStopping,
    /// 1.0 is off; above 1 penalises ids already in the row (prompt included, padding not).
    pub repetition_penalty: f64,
    /// 0 is off; otherwise no n-gram of this size may occur twice in a row (prompt included).
    pub no_repeat_ngram_size: usize,
    /// Multinomial sampling (beam sampling with `num_beams` > 1).
    pub do_sample: bool,
    /// Sampling only: logits are divided by it.
    pub temperature: f64,
    /// Sampling only: keep the k most likely tokens; 0 is off. transformers defaults to 50.
    pub top_k: usize,
    /// Sampling only: keep the most likely tokens whose probabilities add up to top_p; 1.0 is off.
    pub top_p: f64,
    /// Sampling only: the same seed gives the same tokens (not torch's, which cannot be matched);
    /// `None` draws a fresh seed.
    pub seed: Option<u64>,
    /// Sequences returned per prompt: the best beams, or independent samples.
    pub num_return_sequences: usize,
    /// A sequence ends when it produces one of these; empty means only `max_new_tokens` stops.
    pub eos_token_ids: Vec<i64>,
    /// Fed to rows that have finished while others go on; defaults to the first eos id.
    pub pad_token_id: Option<i64>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 20,
            min_new_tokens: 0,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::False,
            repetition_penalty: 1.0,
            no_repeat_ngram_size: 0,
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            seed: None,
            num_return_sequences: 1,
            eos_token_ids: Vec::new(),
            pad_token_id: None,
        }
    }
}

impl GenerationConfig {
    /// The search settings a model defaults to: its generation_config.json's values over
    /// transformers' defaults, with its eos and pad ids.
    pub fn for_model(m: &blip2_core::Manifest) -> Self {
        GenerationConfig {
            eos_token_ids: m.tokens.eos_token_id.clone(),
            pad_token_id: m.tokens.pad_token_id,
            ..GenerationConfig::default()
        }
        .overridden(&m.generation)
    }

    /// These settings with every field `s` sets replaced by its value.
    pub fn overridden(mut self, s: &blip2_core::GenerationDefaults) -> Self {
        fn set<T: Copy>(field: &mut T, v: Option<T>) {
            if let Some(v) = v {
                *field = v;
            }
        }
        set(&mut self.max_new_tokens, s.max_new_tokens);
        set(&mut self.min_new_tokens, s.min_new_tokens);
        set(&mut self.num_beams, s.num_beams);
        set(&mut self.length_penalty, s.length_penalty);
        set(&mut self.early_stopping, s.early_stopping.map(Into::into));
        set(&mut self.repetition_penalty, s.repetition_penalty);
        set(&mut self.no_repeat_ngram_size, s.no_repeat_ngram_size);
        set(&mut self.do_sample, s.do_sample);
        set(&mut self.temperature, s.temperature);
        set(&mut self.top_k, s.top_k);
        set(&mut self.top_p, s.top_p);
        set(&mut self.num_return_sequences, s.num_return_sequences);
        if s.seed.is_some() {
            self.seed = s.seed;
        }
        self
    }
}

/// One prompt row exactly as transformers' `generate` sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prompt {
    /// The full token ids: image-token placeholders and left padding included. The repetition
    /// penalty and the n-gram ban look at them as transformers does.
    pub ids: Vec<i64>,
    /// How many leading positions are padding (masked out). transformers' repetition penalty
    /// skips them; the n-gram ban does not.
    pub padding: usize,
}

impl Prompt {
    /// A prompt without padding.
    pub fn new(ids: Vec<i64>) -> Self {
        Prompt { ids, padding: 0 }
    }

    /// A prompt with its attention mask; the padding is the index of the first non-zero mask
    /// entry (0 when there is none), as transformers computes it.
    pub fn with_attention_mask(ids: Vec<i64>, attention_mask: &[i64]) -> Self {
        let padding = attention_mask.iter().position(|&m| m != 0).unwrap_or(0);
        Prompt { ids, padding }
    }
}

/// A generation setting. Errors carry these, not names: each front end names them in its
/// own words ([`Names`]: command-line flags, a server's request parameters, Python's
/// keyword arguments).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Setting {
    MaxNewTokens,
    MinNewTokens,
    NumBeams,
    NumReturnSequences,
    RepetitionPenalty,
    LengthPenalty,
    Temperature,
    TopP,
    DoSample,
    EarlyStopping,
}

impl Setting {
    /// The command-line flag.
    pub fn flag(self) -> &'static str {
        match self {
            Setting::MaxNewTokens => "--max-new-tokens",
            Setting::MinNewTokens => "--min-new-tokens",
            Setting::NumBeams => "--num-beams",
            Setting::NumReturnSequences => "--num-return-sequences",
            Setting::RepetitionPenalty => "--repetition-penalty",
            Setting::LengthPenalty => "--length-penalty",
            Setting::Temperature => "--temperature",
            Setting::TopP => "--top-p",
            Setting::DoSample => "--do-sample",
            Setting::EarlyStopping => "--early-stopping",
        }
    }
}

/// How a front end names the settings in its messages.
pub trait Names {
    /// The setting's name (`--top-p`, `top_p`).
    fn setting(&self, s: Setting) -> String;
    /// How greedy search is asked for (`no --do-sample, --num-beams 1`).
    fn greedy(&self) -> String;
}

/// The command line's names: flags.
pub struct Flags;

impl Names for Flags {
    fn setting(&self, s: Setting) -> String {
        s.flag().to_string()
    }
    fn greedy(&self) -> String {
        "no --do-sample, --num-beams 1".into()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Name(Setting),
    Greedy,
}

/// A message that names settings, worded by each front end ([`Message::in_words`]); its
/// `Display` uses the command line's flags.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Message(Vec<Piece>);

impl Message {
    pub fn text(mut self, t: impl Into<String>) -> Self {
        self.0.push(Piece::Text(t.into()));
        self
    }
    pub fn name(mut self, s: Setting) -> Self {
        self.0.push(Piece::Name(s));
        self
    }
    pub fn greedy(mut self) -> Self {
        self.0.push(Piece::Greedy);
        self
    }
    /// The message with `names`' names for the settings.
    pub fn in_words(&self, names: &dyn Names) -> String {
        self.0
            .iter()
            .map(|p| match p {
                Piece::Text(t) => t.clone(),
                Piece::Name(s) => names.setting(*s),
                Piece::Greedy => names.greedy(),
            })
            .collect()
    }
}

impl std::fmt::Display for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.in_words(&Flags))
    }
}

/// A setting, or a combination of settings, that generation cannot run with: `setting` is
/// the one at fault. Its `Display` is the command line's (`--top-p: has to be ...`); other
/// front ends word it with [`ConfigError::in_words`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", setting.flag())]
pub struct ConfigError {
    pub setting: Setting,
    pub message: Message,
}

impl ConfigError {
    fn new(setting: Setting, message: Message) -> Self {
        ConfigError { setting, message }
    }

    fn plain(setting: Setting, text: impl Into<String>) -> Self {
        ConfigError { setting, message: Message::default().text(text) }
    }

    /// `setting: message`, both in `names`' words.
    pub fn in_words(&self, names: &dyn Names) -> String {
        format!("{}: {}", names.setting(self.setting), self.message.in_words(names))
    }
}

/// Why [`generate`] failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerationError<E: std::error::Error + 'static> {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The prompts or logits handed in do not fit together.
    #[error("generation input: {0}")]
    Input(String),
    /// The model returned logits of the wrong shape.
    #[error("the model returned logits of shape {got:?}, expected {expected:?}")]
    LogitsShape { expected: (usize, usize), got: (usize, usize) },
    #[error("the model failed during generation")]
    Model(#[source] E),
}

/// Checks the settings, with transformers' rules; the error names the flag at fault.
///
/// Every value is checked whether or not this search uses it: `--top-p 1.5` is refused
/// without `--do-sample` too (transformers only warns there, and ignores the value), so a
/// mistake never passes silently and turns up later, when sampling is switched on.
pub fn validate(cfg: &GenerationConfig) -> Result<(), ConfigError> {
    check_max_new_tokens(cfg.max_new_tokens)?;
    check_num_beams(cfg.num_beams)?;
    check_num_return_sequences(cfg.num_return_sequences)?;
    if cfg.num_return_sequences > 1 {
        if cfg.num_beams == 1 && !cfg.do_sample {
            return Err(ConfigError::new(
                Setting::NumReturnSequences,
                Message::default()
                    .text("greedy search (")
                    .greedy()
                    .text(format!(
                        ") returns exactly one sequence, got {}; use ",
                        cfg.num_return_sequences
                    ))
                    .name(Setting::NumBeams)
                    .text(" or ")
                    .name(Setting::DoSample)
                    .text(" for more"),
            ));
        }
        if cfg.num_beams > 1 && cfg.num_return_sequences > cfg.num_beams {
            return Err(ConfigError::new(
                Setting::NumReturnSequences,
                Message::default()
                    .text(format!("({}) has to be smaller or equal to ", cfg.num_return_sequences))
                    .name(Setting::NumBeams)
                    .text(format!(" ({})", cfg.num_beams)),
            ));
        }
    }
    if cfg.min_new_tokens > cfg.max_new_tokens {
        let (min, max) = (Setting::MinNewTokens, Setting::MaxNewTokens);
        return Err(ConfigError::new(
            min,
            Message::default()
                .text(format!("{} is more than ", cfg.min_new_tokens))
                .name(max)
                .text(format!(" ({}): generation stops at ", cfg.max_new_tokens))
                .name(max)
                .text(", so the minimum could never be met; lower ")
                .name(min)
                .text(" or raise ")
                .name(max),
        ));
    }
    check_repetition_penalty(cfg.repetition_penalty)?;
    check_length_penalty(cfg.length_penalty)?;
    check_temperature(cfg.temperature).map_err(|mut e| {
        if cfg.temperature == 0.0 {
            e.message = if cfg.do_sample {
                e.message.text("; for greedy search leave out ").name(Setting::DoSample)
            } else {
                e.message.text("; greedy search needs no temperature: leave it out")
            };
        }
        e
    })?;
    check_top_p(cfg.top_p)?;
    Ok(())
}

/// The counts a model's vocabulary bounds: beam search starts from one sequence, whose
/// `vocab` continuations are all the first step can fill the beams with, so `--num-beams`
/// is at most the vocabulary size; `--num-return-sequences` (beams or samples per input)
/// is held to the same bound. Checked where the model is known (the search itself needs
/// no vocabulary).
pub fn check_vocab(cfg: &GenerationConfig, vocab: usize) -> Result<(), ConfigError> {
    for (setting, v, what) in [
        (Setting::NumBeams, cfg.num_beams, "beams"),
        (Setting::NumReturnSequences, cfg.num_return_sequences, "sequences per input"),
    ] {
        if v > vocab {
            return Err(ConfigError::plain(
                setting,
                format!(
                    "{v} {what} are more than the language model's vocabulary of {vocab} tokens allows; use at most {vocab}"
                ),
            ));
        }
    }
    Ok(())
}

/// `--max-new-tokens`: at least 1.
pub fn check_max_new_tokens(v: usize) -> Result<(), ConfigError> {
    if v == 0 {
        return Err(ConfigError::plain(Setting::MaxNewTokens, "must be greater than 0"));
    }
    Ok(())
}

/// `--num-beams`: at least 1.
pub fn check_num_beams(v: usize) -> Result<(), ConfigError> {
    if v == 0 {
        return Err(ConfigError::plain(Setting::NumBeams, "must be at least 1"));
    }
    Ok(())
}

/// `--num-return-sequences`: at least 1.
pub fn check_num_return_sequences(v: usize) -> Result<(), ConfigError> {
    if v == 0 {
        return Err(ConfigError::plain(Setting::NumReturnSequences, "must be at least 1"));
    }
    Ok(())
}

/// `--repetition-penalty`: a finite number above 0.
pub fn check_repetition_penalty(v: f64) -> Result<(), ConfigError> {
    if !(v > 0.0 && v.is_finite()) {
        return Err(ConfigError::plain(
            Setting::RepetitionPenalty,
            format!("has to be a strictly positive number, but is {v}"),
        ));
    }
    Ok(())
}

/// `--length-penalty`: finite (negative values favour shorter beams).
pub fn check_length_penalty(v: f64) -> Result<(), ConfigError> {
    if !v.is_finite() {
        return Err(ConfigError::plain(
            Setting::LengthPenalty,
            format!("has to be finite, but is {v}"),
        ));
    }
    Ok(())
}

/// `--temperature`: a finite number above 0.
pub fn check_temperature(v: f64) -> Result<(), ConfigError> {
    if !(v > 0.0 && v.is_finite()) {
        return Err(ConfigError::plain(
            Setting::Temperature,
            format!("has to be a strictly positive number, but is {v}"),
        ));
    }
    Ok(())
}

/// `--top-p`: in (0, 1].
pub fn check_top_p(v: f64) -> Result<(), ConfigError> {
    if !(v > 0.0 && v <= 1.0) {
        return Err(ConfigError::plain(Setting::TopP, format!("has to be in (0, 1], but is {v}")));
    }
    Ok(())
}

/// Watches greedy search and sampling as they go: called with (prompt index, sequence
/// index within that prompt, token) for each new token other than an eos, as soon as it is
/// picked. Returning `false` ends that sequence there, as an eos would, the token kept
/// (a server's stop strings and per-request token limits); the other sequences go on
/// exactly as before. Beam search settles its sequences only at the end and calls it for
/// none.
pub type Observer<'a> = dyn FnMut(usize, usize, i64) -> bool + 'a;

/// Generates tokens for every prompt row, as transformers' `generate()` would.
///
/// * `prompts`: one per input row, all the same length (left-padded), exactly as transformers'
///   generate sees them.
/// * `first_logits`: `[rows, vocab]`, the logits of the last prompt position of each row; the
///   model state holds these rows (the prefill is done).
///
/// Returns, per prompt, `num_return_sequences` sequences of new token ids: the prompt left
/// out, cut at the first eos (the eos itself excluded), no padding. Beams come best first.
pub fn generate<M: StepModel + ?Sized>(
    model: &mut M,
    prompts: &[Prompt],
    first_logits: Array2<f32>,
    cfg: &GenerationConfig,
) -> Result<Vec<Vec<Vec<i64>>>, GenerationError<M::Error>> {
    generate_observed(model, prompts, first_logits, cfg, &mut |_, _, _| true)
}

/// [`generate`], telling `observer` of each token as greedy search or sampling picks it.
pub fn generate_observed<M: StepModel + ?Sized>(
    model: &mut M,
    prompts: &[Prompt],
    first_logits: Array2<f32>,
    cfg: &GenerationConfig,
    observer: &mut Observer<'_>,
) -> Result<Vec<Vec<Vec<i64>>>, GenerationError<M::Error>> {
    generate_while(model, prompts, first_logits, cfg, observer, &mut || true)
}

/// [`generate_observed`], asking `wanted` before each step of beam search whether anyone
/// still wants its result: when not (a server's clients have all gone), the search ends
/// there and returns what it has finished so far. (Greedy search and sampling end each
/// sequence through `observer` instead.)
pub fn generate_while<M: StepModel + ?Sized>(
    model: &mut M,
    prompts: &[Prompt],
    first_logits: Array2<f32>,
    cfg: &GenerationConfig,
    observer: &mut Observer<'_>,
    wanted: &mut dyn FnMut() -> bool,
) -> Result<Vec<Vec<Vec<i64>>>, GenerationError<M::Error>> {
    validate(cfg)?;
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let prompt_len = prompts[0].ids.len();
    if prompts.iter().any(|p| p.ids.len() != prompt_len) {
        return Err(GenerationError::Input(
            "all prompt rows must have the same (padded) length".into(),
        ));
    }
    if prompts.iter().any(|p| p.padding > p.ids.len()) {
        return Err(GenerationError::Input("a prompt's padding is longer than the prompt".into()));
    }
    if first_logits.nrows() != prompts.len() {
        return Err(GenerationError::Input(format!(
            "{} prompt rows but {} rows of logits",
            prompts.len(),
            first_logits.nrows()
        )));
    }
    let vocab = first_logits.ncols();
    if vocab == 0 {
        return Err(GenerationError::Input("the logits have an empty vocabulary".into()));
    }
    // Sampling streams derive from one seed; without one, draw it.
    let seed = cfg.seed.unwrap_or_else(fresh_seed);
    if cfg.num_beams > 1 {
        beam::run(model, prompts, first_logits, cfg, seed, wanted)
    } else {
        greedy::run(model, prompts, first_logits, cfg, seed, observer)
    }
}

/// A seed for sampling without one given: the sampling streams of a search all derive
/// from it.
pub fn fresh_seed() -> u64 {
    rand::random()
}

/// The new tokens of a finished row: after the prompt, without a trailing eos.
fn new_tokens(tokens: &[i64], prompt_len: usize, eos: &[i64]) -> Vec<i64> {
    let mut out = tokens[prompt_len..].to_vec();
    if out.last().is_some_and(|t| eos.contains(t)) {
        out.pop();
    }
    out
}

/// Runs one model step and checks the shape of what comes back.
fn step<M: StepModel + ?Sized>(
    model: &mut M,
    tokens: &[i64],
    vocab: usize,
    want: Want,
) -> Result<StepOutput, GenerationError<M::Error>> {
    let out = model.step_for(tokens, want).map_err(GenerationError::Model)?;
    let rows = tokens.len();
    let shape_err = |got: (usize, usize), expected: (usize, usize)| {
        Err(GenerationError::LogitsShape { expected, got })
    };
    match &out {
        StepOutput::Logits(l) if l.dim() != (rows, vocab) => {
            return shape_err(l.dim(), (rows, vocab))
        }
        StepOutput::Argmax(t) if t.len() != rows || want != Want::Argmax => {
            return shape_err((t.len(), 1), (rows, 1))
        }
        StepOutput::TopLogProbs { logprobs, ids } => match want {
            Want::TopLogProbs(k) if logprobs.dim() == (rows, k) && ids.dim() == (rows, k) => {}
            Want::TopLogProbs(k) => return shape_err(logprobs.dim(), (rows, k)),
            _ => return shape_err(logprobs.dim(), (rows, vocab)),
        },
        StepOutput::TopLogits { logits, ids } => match want {
            Want::TopLogits(k) if logits.dim() == (rows, k) && ids.dim() == (rows, k) => {}
            Want::TopLogits(k) => return shape_err(logits.dim(), (rows, k)),
            _ => return shape_err(logits.dim(), (rows, vocab)),
        },
        _ => {}
    }
    Ok(out)
}
