//! The generation engine behind the HTTP routes: admits requests into a bounded queue,
//! batches them into cohorts and runs the cohorts' decode steps in turns.
//!
//! Scheduling, in short:
//! - A dispatcher thread takes requests off the queue. When one arrives it waits up to
//!   `max_wait` for more (or until `max_batch` rows are waiting), then groups them into
//!   cohorts: requests whose search settings agree share one batch, left-padded as
//!   `infer batch` pads them, so each row gets exactly its single-request result.
//! - Each cohort runs in its own thread: vision encoder + Q-Former for its images (through
//!   the image-embedding cache), the language model's prefill, then the search, one decode
//!   step at a time.
//! - Every model call (a cohort's prefill, one decode step) takes a turn at a FIFO
//!   [`Turnstile`]. A cohort formed while others are generating therefore starts at the
//!   next step boundary, not when the running cohorts finish: its first token comes after
//!   its own prefill plus at most one step of each running cohort, as with continuous
//!   batching, where a newcomer's prefill also runs between two decode steps.
//! - Greedy and sampled rows report each token as it is picked (streaming), and a row
//!   that reaches its own `max_tokens` or a stop string leaves the search at once; a
//!   cohort's rows may ask for different `max_tokens`.
//! - On OPT's portable exports, greedy and sampled requests skip the cohorts: the
//!   dispatcher hands them to one running batch that they join at the next step
//!   ([`continuous`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use blip2_runtime::error::RuntimeError;
use blip2_runtime::generation::{
    self, GenerationConfig, GenerationError, StepModel, StepOutput, Want,
};
use blip2_runtime::model::{Blip2Model, ModelRef};
use blip2_runtime::pipeline::EmbedCache;
use blip2_runtime::prompt::Batch;
use blip2_runtime::prompt::Prompter;
use blip2_runtime::state::{self, Decoder};
use ndarray::{Array2, Array3, Array4, ArrayD, Axis};
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::Metrics;

mod continuous;

/// Why a sequence ended, in OpenAI's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// The eos token or a stop string.
    Stop,
    /// `max_tokens` new tokens.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What a request hears from the engine, in order: deltas and ends per sequence
/// (`index` counts the request's `n` sequences), then `Done`, or `Failed` instead.
#[derive(Debug)]
pub enum Event {
    /// More text of sequence `index`. The deltas of a sequence add up to its final text.
    Delta { index: usize, text: String },
    /// Sequence `index` is complete: its whole text, why it ended, tokens generated.
    End { index: usize, text: String, finish: Finish, completion_tokens: usize },
    /// Every sequence has ended.
    Done { prompt_tokens: usize },
    /// The request could not be completed (an ONNX Runtime failure); nothing more follows.
    Failed(String),
}

/// One request, checked and preprocessed: everything the engine needs.
pub struct Job {
    /// Pixel values `[3, H, W]`.
    pub pixels: Array3<f32>,
    /// The prompt's text ids (as [`Prompter::check_fits`] returns them).
    pub text_ids: Vec<i64>,
    /// The search, with `max_new_tokens` set to this request's `max_tokens`.
    pub cfg: GenerationConfig,
    /// Text that ends a sequence where it first appears (not included).
    pub stop: Vec<String>,
    pub events: UnboundedSender<Event>,
}

/// A job in the queue, with what the engine keeps track of.
struct Queued {
    job: Job,
    enqueued: Instant,
    /// Releases the request's place in the queue when the request is over.
    _place: Place,
}

/// One admitted request's place; dropping it frees the place.
struct Place(Arc<Admission>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.admitted.fetch_sub(1, Ordering::SeqCst);
        self.0.metrics.in_flight.dec();
    }
}

struct Admission {
    admitted: AtomicUsize,
    max_queue: usize,
    metrics: Arc<Metrics>,
}

/// Why a request was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is at its limit of {0} requests in flight; retry later")]
    Full(usize),
    #[error("the server is shutting down")]
    Closed,
}

/// Scheduling limits.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Rows (sequences) a cohort batches at most.
    pub max_batch: usize,
    /// How long the first request of a cohort waits for others to join it.
    pub max_wait: Duration,
    /// Requests admitted at once, waiting or generating; more are refused (503).
    pub max_queue: usize,
}

/// The model and what cohorts share.
struct Shared {
    model: Arc<Mutex<Blip2Model>>,
    prompter: Arc<Prompter>,
    embeds: Mutex<EmbedCache>,
    turn: Turnstile,
    metrics: Arc<Metrics>,
    /// OPT on the portable graph: greedy and sampled requests join one running batch
    /// ([`continuous`]).
    continuous: bool,
}

pub struct Engine {
    queue: Mutex<Option<SyncSender<Queued>>>,
    admission: Arc<Admission>,
    pub prompter: Arc<Prompter>,
    /// The model's search defaults (its generation_config.json over transformers').
    pub defaults: GenerationConfig,
    pub manifest: blip2_core::Manifest,
    pub limits: blip2_runtime::preprocess::ImageLimits,
    dispatcher: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Engine {
    /// Takes over a loaded pipeline and starts the dispatcher.
    pub fn start(
        pipeline: blip2_runtime::pipeline::Pipeline,
        opts: EngineOptions,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let defaults = pipeline.default_config();
        let blip2_runtime::pipeline::Pipeline { model, prompter, limits, .. } = pipeline;
        let manifest = model.manifest.clone();
        let prompter = Arc::new(prompter);
        let continuous = manifest.family == blip2_core::Family::Opt && !state::is_static(&model);
        let shared = Arc::new(Shared {
            continuous,
            model: Arc::new(Mutex::new(model)),
            prompter: prompter.clone(),
            embeds: Mutex::new(EmbedCache::new(blip2_runtime::pipeline::DEFAULT_EMBED_CACHE)),
            turn: Turnstile::default(),
            metrics: metrics.clone(),
        });
        let (tx, rx) = mpsc::sync_channel(opts.max_queue.max(1));
        let admission = Arc::new(Admission {
            admitted: AtomicUsize::new(0),
            max_queue: opts.max_queue.max(1),
            metrics,
        });
        let dispatcher = std::thread::Builder::new()
            .name("blip2-dispatch".into())
            .spawn(move || dispatch(rx, shared, opts))
            .expect("spawning the dispatcher thread");
        Arc::new(Self {
            queue: Mutex::new(Some(tx)),
            admission,
            prompter,
            defaults,
            manifest,
            limits,
            dispatcher: Mutex::new(Some(dispatcher)),
        })
    }

    /// Queues a request, or refuses it when `max_queue` requests are in flight.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        let a = &self.admission;
        if a.admitted.fetch_add(1, Ordering::SeqCst) >= a.max_queue {
            a.admitted.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Full(a.max_queue));
        }
        a.metrics.in_flight.inc();
        let place = Place(a.clone());
        a.metrics.queue_depth.inc();
        let queued = Queued { job, enqueued: Instant::now(), _place: place };
        let guard = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = guard.as_ref() else {
            a.metrics.queue_depth.dec();
            return Err(SubmitError::Closed);
        };
        match tx.try_send(queued) {
            Ok(()) => Ok(()),
            // The channel holds max_queue and admission keeps fewer in flight.
            Err(TrySendError::Full(_)) => {
                a.metrics.queue_depth.dec();
                Err(SubmitError::Full(a.max_queue))
            }
            Err(TrySendError::Disconnected(_)) => {
                a.metrics.queue_depth.dec();
                Err(SubmitError::Closed)
            }
        }
    }

    /// Stops taking requests and waits until every admitted one has been answered.
    pub fn shutdown(&self) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(d) = self.dispatcher.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = d.join();
        }
    }
}

/// The dispatcher: forms cohorts from the queue and starts each in its own thread, until
/// the queue closes; then waits for the running cohorts.
fn dispatch(rx: Receiver<Queued>, shared: Arc<Shared>, opts: EngineOptions) {
    let mut running: Vec<std::thread::JoinHandle<()>> = Vec::new();
    let mut waiting: VecDeque<Queued> = VecDeque::new();
    // Greedy and sampled requests go to the continuous batch when the model has one.
    let batcher = shared.continuous.then(|| {
        let (tx, brx) = mpsc::channel::<Queued>();
        let (shared, opts) = (shared.clone(), opts.clone());
        let h = std::thread::Builder::new()
            .name("blip2-batch".into())
            .spawn(move || continuous::run(brx, &shared, &opts))
            .expect("spawning the batching thread");
        (tx, h)
    });
    let route = |q: Queued, waiting: &mut VecDeque<Queued>| match &batcher {
        Some((tx, _)) if q.job.cfg.num_beams == 1 => {
            if let Err(mpsc::SendError(q)) = tx.send(q) {
                let _ = q.job.events.send(Event::Failed("the batching thread has stopped".into()));
            }
        }
        _ => waiting.push_back(q),
    };
    let mut open = true;
    while open || !waiting.is_empty() {
        if waiting.is_empty() {
            match rx.recv() {
                Ok(q) => route(q, &mut waiting),
                Err(_) => break,
            }
            if waiting.is_empty() {
                continue;
            }
        }
        // Gather what else arrives within max_wait of the oldest waiting request.
        let deadline = waiting[0].enqueued + opts.max_wait;
        while rows(waiting.iter()) < opts.max_batch {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(q) => route(q, &mut waiting),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        // Also take whatever is already queued (it waited long enough).
        while let Ok(q) = rx.try_recv() {
            route(q, &mut waiting);
        }
        for cohort in form_cohorts(&mut waiting, &shared, opts.max_batch) {
            let shared = shared.clone();
            running.retain(|h| !h.is_finished());
            let h = std::thread::Builder::new()
                .name("blip2-cohort".into())
                .spawn(move || run_cohort(&shared, cohort))
                .expect("spawning a cohort thread");
            running.push(h);
        }
    }
    if let Some((tx, h)) = batcher {
        drop(tx);
        let _ = h.join();
    }
    for h in running {
        let _ = h.join();
    }
}

fn rows<'a>(jobs: impl Iterator<Item = &'a Queued>) -> usize {
    jobs.map(|q| row_count(&q.job.cfg)).sum()
}

/// Rows a request takes in a batch: its samples when sampling several, else one (beam
/// search expands inside the search, counted as one prompt row).
fn row_count(cfg: &GenerationConfig) -> usize {
    if cfg.do_sample && cfg.num_beams == 1 {
        cfg.num_return_sequences
    } else {
        1
    }
}

/// The settings rows must share to batch together. Greedy and sampled rows leave the
/// search on their own `max_tokens`, so only beam search needs the same limit; a seeded
/// sample draws from streams numbered by its row, so it never shares a batch.
fn batch_key(cfg: &GenerationConfig) -> Option<GenerationConfig> {
    if cfg.do_sample && cfg.seed.is_some() {
        return None;
    }
    let mut k = cfg.clone();
    if cfg.num_beams == 1 {
        k.max_new_tokens = 0;
    }
    Some(k)
}

/// Splits the waiting requests into cohorts, oldest first: a request joins the first
/// cohort with its settings that has room (`max_batch` rows, and the padded prompt plus
/// the new tokens within the language model's positions).
fn form_cohorts(
    waiting: &mut VecDeque<Queued>,
    shared: &Shared,
    max_batch: usize,
) -> Vec<Vec<Queued>> {
    /// A cohort being formed: its settings, requests, rows, longest prompt, most new tokens.
    struct Forming {
        key: Option<GenerationConfig>,
        jobs: Vec<Queued>,
        rows: usize,
        longest: usize,
        most_new: usize,
    }
    let mut cohorts: Vec<Forming> = Vec::new();
    let q = shared.prompter.num_query_tokens;
    while let Some(job) = waiting.pop_front() {
        let key = batch_key(&job.job.cfg);
        let len = q + job.job.text_ids.len();
        let new = job.job.cfg.max_new_tokens;
        let r = row_count(&job.job.cfg);
        let fits = |c: &Forming| {
            key.is_some()
                && c.key == key
                && c.rows + r <= max_batch
                && c.longest.max(len) + c.most_new.max(new) <= shared.prompter.max_positions
        };
        match cohorts.iter_mut().find(|c| fits(c)) {
            Some(c) => {
                c.rows += r;
                c.longest = c.longest.max(len);
                c.most_new = c.most_new.max(new);
                c.jobs.push(job);
            }
            None => {
                cohorts.push(Forming { key, jobs: vec![job], rows: r, longest: len, most_new: new })
            }
        }
    }
    cohorts.into_iter().map(|c| c.jobs).collect()
}

/// A FIFO lock over the model: turns are served in the order they were asked for, so a
/// cohort that just finished a step cannot take the next turn before the others waiting.
#[derive(Default)]
pub struct Turnstile {
    /// (next ticket to hand out, ticket being served)
    state: Mutex<(u64, u64)>,
    served: Condvar,
}

pub struct Turn<'a>(&'a Turnstile);

impl Turnstile {
    pub fn enter(&self) -> Turn<'_> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let ticket = s.0;
        s.0 += 1;
        while s.1 != ticket {
            s = self.served.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        Turn(self)
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        s.1 += 1;
        self.0.served.notify_all();
    }
}

/// A decoder whose every call takes a turn.
struct Turned<'a> {
    inner: Decoder<'static>,
    turn: &'a Turnstile,
}

impl StepModel for Turned<'_> {
    type Error = RuntimeError;

    fn step(&mut self, tokens: &[i64]) -> Result<Array2<f32>, RuntimeError> {
        let _t = self.turn.enter();
        self.inner.step(tokens)
    }

    fn select_rows(&mut self, rows: &[usize]) -> Result<(), RuntimeError> {
        let _t = self.turn.enter();
        self.inner.select_rows(rows)
    }

    fn step_for(&mut self, tokens: &[i64], want: Want) -> Result<StepOutput, RuntimeError> {
        let _t = self.turn.enter();
        self.inner.step_for(tokens, want)
    }

    fn last_logits(&mut self) -> Option<Result<Array2<f32>, RuntimeError>> {
        let _t = self.turn.enter();
        self.inner.last_logits()
    }
}

/// A sequence's text as it grows, and what of it has been sent.
struct Stream {
    ids: Vec<i64>,
    sent: String,
    /// Set when a stop string or the request's max_tokens ended it.
    ended: Option<Finish>,
    /// The text up to the stop string, when one ended it.
    stopped_text: Option<String>,
}

impl Stream {
    fn new() -> Self {
        Stream { ids: Vec::new(), sent: String::new(), ended: None, stopped_text: None }
    }

    /// Takes the sequence's next token: sends the text that has become final, and says
    /// whether the sequence goes on (not past its `max_tokens`, no stop string, the client
    /// still there).
    fn push(
        &mut self,
        token: i64,
        seq: usize,
        job: &Job,
        prompter: &Prompter,
        metrics: &Metrics,
    ) -> bool {
        metrics.tokens.inc();
        self.ids.push(token);
        // A client that went away gets nothing more.
        if job.events.is_closed() {
            self.ended = Some(Finish::Stop);
            return false;
        }
        let Ok(text) = prompter.decode(&self.ids) else { return true };
        if let Some(at) = find_stop(&text, &job.stop) {
            self.ended = Some(Finish::Stop);
            self.stopped_text = Some(text[..at].to_string());
            return false;
        }
        let hold = job.stop.iter().map(|x| x.chars().count()).max().unwrap_or(0).saturating_sub(1);
        // Decoding all but the last 3 tokens again only matters behind a replacement character.
        let settled = (text.ends_with('\u{FFFD}') && self.ids.len() > 3)
            .then(|| prompter.decode(&self.ids[..self.ids.len() - 3]).ok())
            .flatten();
        let ready = stable_prefix(&text, settled.as_deref(), hold);
        if ready.len() > self.sent.len() && ready.starts_with(self.sent.as_str()) {
            let delta = ready[self.sent.len()..].to_string();
            self.sent.push_str(&delta);
            let _ = job.events.send(Event::Delta { index: seq, text: delta });
        }
        if self.ids.len() >= job.cfg.max_new_tokens {
            self.ended = Some(Finish::Length);
            return false;
        }
        true
    }

    /// Ends the sequence with the search's token ids: sends the rest of its text and its
    /// `End`.
    fn end(&mut self, ids: Vec<i64>, seq: usize, job: &Job, prompter: &Prompter) {
        let (text, finish, ids, eos) = finish_sequence(prompter, job, self, ids);
        if text.len() > self.sent.len() && text.starts_with(self.sent.as_str()) {
            let _ = job
                .events
                .send(Event::Delta { index: seq, text: text[self.sent.len()..].to_string() });
        } else if !text.starts_with(self.sent.as_str()) {
            tracing::warn!("streamed text of a sequence is not a prefix of its final text");
        }
        // The eos counts as generated, as the other servers count it.
        let completion_tokens = ids.len() + usize::from(eos);
        let _ = job.events.send(Event::End { index: seq, text, finish, completion_tokens });
    }
}

/// The part of `text` that can be sent now: not a trailing replacement character (half
/// of a character whose other bytes come with the next token), and not the last
/// `hold` characters, which could be the start of a stop string. `settled` is the text
/// of all but the last 3 tokens: a character's bytes span at most 4 tokens, so a
/// replacement character in it is final (random weights make such text) and is sent.
fn stable_prefix<'a>(text: &'a str, settled: Option<&str>, hold: usize) -> &'a str {
    let mut t = text.trim_end_matches('\u{FFFD}');
    if let Some(s) = settled {
        if s.len() > t.len() && text.starts_with(s) {
            t = &text[..s.len()];
        }
    }
    if hold == 0 {
        return t;
    }
    let cut = t.char_indices().rev().nth(hold - 1).map_or(0, |(i, _)| i);
    &t[..cut]
}

/// The first stop string in `text`: where the text is cut.
fn find_stop(text: &str, stop: &[String]) -> Option<usize> {
    stop.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min()
}

/// The requests' prompts left-padded into one batch (as `infer batch` pads), and their
/// pixel values `[B, 3, H, W]`.
fn assemble(shared: &Shared, jobs: &[Queued]) -> Result<(Batch, Array4<f32>), RuntimeError> {
    let views: Vec<_> = jobs.iter().map(|q| q.job.pixels.view().insert_axis(Axis(0))).collect();
    let pixels = ndarray::concatenate(Axis(0), &views)
        .map_err(|e| RuntimeError::Input(format!("joining pixel values: {e}")))?;
    let texts: Vec<Vec<i64>> = jobs.iter().map(|q| q.job.text_ids.clone()).collect();
    Ok((shared.prompter.assemble(&texts), pixels))
}

/// Vision encoder and Q-Former for a batch of pixel values, through the image-embedding
/// cache: `[B, num_query_tokens, hidden]` as f32. Call it holding a turn.
fn encode(shared: &Shared, pixels: Array4<f32>) -> Result<ArrayD<f32>, RuntimeError> {
    let mut m = shared.model.lock().unwrap_or_else(|e| e.into_inner());
    shared.embeds.lock().unwrap_or_else(|e| e.into_inner()).embed(&mut m, pixels)
}

fn run_cohort(shared: &Shared, cohort: Vec<Queued>) {
    let n = cohort.len();
    shared.metrics.queue_depth.dec_by(n as i64);
    let started = Instant::now();
    let rows: usize = cohort.iter().map(|q| row_count(&q.job.cfg)).sum();
    shared.metrics.batch_rows.observe(rows as f64);
    let mut cfg = cohort[0].job.cfg.clone();
    cfg.max_new_tokens = cohort.iter().map(|q| q.job.cfg.max_new_tokens).max().unwrap_or(1);
    let streams_per_job: Vec<usize> =
        cohort.iter().map(|q| q.job.cfg.num_return_sequences).collect();
    let mut streams: Vec<Vec<Stream>> =
        streams_per_job.iter().map(|&k| (0..k).map(|_| Stream::new()).collect()).collect();
    let mut first_token: Vec<bool> = vec![false; n];
    let result = (|| -> Result<Vec<Vec<Vec<i64>>>, RuntimeError> {
        let (batch, pixels) = assemble(shared, &cohort)?;
        let p = {
            let _t = shared.turn.enter();
            let embeds = encode(shared, pixels)?;
            state::prefill(
                ModelRef::Shared(shared.model.clone()),
                &batch,
                embeds,
                cfg.max_new_tokens,
            )?
        };
        let mut decoder = Turned { inner: p.state, turn: &shared.turn };
        let prompter = &shared.prompter;
        let mut observer = |job: usize, seq: usize, token: i64| -> bool {
            let q = &cohort[job];
            if !first_token[job] {
                first_token[job] = true;
                shared.metrics.ttft.observe(q.enqueued.elapsed().as_secs_f64());
            }
            streams[job][seq].push(token, seq, &q.job, prompter, &shared.metrics)
        };
        // Beam search streams nothing until it ends: it stops when its clients are gone.
        let mut wanted = || cohort.iter().any(|q| !q.job.events.is_closed());
        generation::generate_while(
            &mut decoder,
            &p.prompts,
            p.logits,
            &cfg,
            &mut observer,
            &mut wanted,
        )
        .map_err(|e| match e {
            GenerationError::Model(m) => m,
            other => RuntimeError::Input(other.to_string()),
        })
    })();
    match result {
        Ok(out) => {
            for (j, (q, seqs)) in cohort.iter().zip(out).enumerate() {
                let prompt_tokens = shared.prompter.num_query_tokens + q.job.text_ids.len();
                for (i, ids) in seqs.into_iter().enumerate() {
                    streams[j][i].end(ids, i, &q.job, &shared.prompter);
                }
                if !first_token[j] {
                    shared.metrics.ttft.observe(q.enqueued.elapsed().as_secs_f64());
                }
                shared.metrics.request_latency.observe(q.enqueued.elapsed().as_secs_f64());
                let _ = q.job.events.send(Event::Done { prompt_tokens });
            }
        }
        Err(e) => {
            tracing::error!("a batch of {n} request(s) failed: {e}");
            for q in &cohort {
                let _ = q.job.events.send(Event::Failed(e.to_string()));
            }
        }
    }
    tracing::debug!(
        "cohort of {n} request(s), {rows} row(s) done in {:.0} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
}

/// A sequence's final text, why it ended, its token ids, and whether an eos ended it,
/// from what the search returned: cut at the request's own `max_tokens` (the observer
/// ends greedy and sampled rows there; beam cohorts share one limit) and at the first stop
/// string.
fn finish_sequence(
    prompter: &Prompter,
    job: &Job,
    s: &Stream,
    mut ids: Vec<i64>,
) -> (String, Finish, Vec<i64>, bool) {
    let max = job.cfg.max_new_tokens;
    let mut finish = if ids.len() >= max { Finish::Length } else { Finish::Stop };
    ids.truncate(max);
    // The search only ends a row short of its limit on an eos, unless the observer did.
    let mut eos = s.ended.is_none() && ids.len() < max;
    if let Some(e) = s.ended {
        finish = e;
    }
    let mut text = match &s.stopped_text {
        Some(t) => t.clone(),
        None => prompter.decode(&ids).unwrap_or_default(),
    };
    if s.stopped_text.is_none() {
        if let Some(at) = find_stop(&text, &job.stop) {
            text.truncate(at);
            finish = Finish::Stop;
            eos = false;
        }
    }
    (text, finish, ids, eos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_prefix_holds_back_half_characters_and_possible_stop_starts() {
        assert_eq!(stable_prefix("a cat\u{FFFD}", None, 0), "a cat");
        assert_eq!(stable_prefix("a cat", None, 2), "a c");
        assert_eq!(stable_prefix("ab", None, 5), "");
        // A replacement character older than 3 tokens is final.
        assert_eq!(stable_prefix("a \u{FFFD}\u{FFFD}", Some("a \u{FFFD}"), 0), "a \u{FFFD}");
        assert_eq!(stable_prefix("a \u{FFFD}", Some("b"), 0), "a ");
    }

    #[test]
    fn find_stop_takes_the_earliest() {
        let stop = vec!["dog".to_string(), "cat".to_string(), String::new()];
        assert_eq!(find_stop("a cat and a dog", &stop), Some(2));
        assert_eq!(find_stop("a bird", &stop), None);
    }

    #[test]
    fn turnstile_serves_in_arrival_order() {
        let t = Arc::new(Turnstile::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = t.enter();
        let mut hs = Vec::new();
        for i in 0..4 {
            let (t2, order) = (t.clone(), order.clone());
            hs.push(std::thread::spawn(move || {
                let _turn = t2.enter();
                order.lock().unwrap().push(i);
            }));
            // Each thread has taken its ticket before the next starts.
            while t.state.lock().unwrap().0 < i as u64 + 2 {
                std::thread::yield_now();
            }
        }
        drop(first);
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
    }

    /// A decoder that records which of its calls were made.
    struct Recording(Arc<Mutex<Vec<&'static str>>>);

    impl StepModel for Recording {
        type Error = RuntimeError;
        fn step(&mut self, tokens: &[i64]) -> Result<Array2<f32>, RuntimeError> {
            self.0.lock().unwrap().push("step");
            Ok(Array2::zeros((tokens.len(), 2)))
        }
        fn select_rows(&mut self, _rows: &[usize]) -> Result<(), RuntimeError> {
            self.0.lock().unwrap().push("select_rows");
            Ok(())
        }
        fn step_for(&mut self, tokens: &[i64], _want: Want) -> Result<StepOutput, RuntimeError> {
            self.0.lock().unwrap().push("step_for");
            Ok(StepOutput::Argmax(vec![0; tokens.len()]))
        }
        fn last_logits(&mut self) -> Option<Result<Array2<f32>, RuntimeError>> {
            self.0.lock().unwrap().push("last_logits");
            Some(Ok(Array2::ones((1, 2))))
        }
    }

    #[test]
    fn a_turned_decoder_forwards_every_call() {
        // Sampling on a CUDA-target export asks for the full logits when its candidates
        // tie at their edge; the server's wrapper must pass that on, not answer None.
        let calls = Arc::new(Mutex::new(Vec::new()));
        let turn = Turnstile::default();
        let mut d = Turned { inner: Box::new(Recording(calls.clone())), turn: &turn };
        d.step(&[1]).unwrap();
        d.step_for(&[1], Want::Argmax).unwrap();
        d.select_rows(&[0]).unwrap();
        assert_eq!(d.last_logits().expect("forwarded").unwrap(), Array2::<f32>::ones((1, 2)));
        assert_eq!(*calls.lock().unwrap(), ["step", "step_for", "select_rows", "last_logits"]);
    }

    #[test]
    fn seeded_samples_never_share_a_batch_and_greedy_rows_ignore_max_tokens() {
        let greedy = GenerationConfig { max_new_tokens: 5, ..GenerationConfig::default() };
        let longer = GenerationConfig { max_new_tokens: 9, ..greedy.clone() };
        assert_eq!(batch_key(&greedy), batch_key(&longer));
        let beams = GenerationConfig { num_beams: 3, ..greedy.clone() };
        assert_ne!(
            batch_key(&beams),
            batch_key(&GenerationConfig { max_new_tokens: 9, ..beams.clone() })
        );
        let seeded = GenerationConfig { do_sample: true, seed: Some(1), ..greedy };
        assert_eq!(batch_key(&seeded), None);
    }
}
