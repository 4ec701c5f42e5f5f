//! The engine: one thread owns the loaded language model and runs every request's
//! generation on it, batching continuously. `infer` (through
//! [`crate::pipeline::Pipeline`]) and `serve` both drive the same [`Scheduler`]; the
//! server through [`Engine`], which runs it on its own thread behind a bounded queue.
//!
//! The server's [`Engine`] is one thread by default, which encodes images as it admits
//! requests, or two with [`ImageStage::Thread`] (measured slower on a CPU and on a GPU,
//! see [`ImageStage::Auto`]):
//! - **`blip2-images`** (the image stage, `images.rs`) owns the vision encoder, the
//!   Q-Former ([`ImageEncoders`]) and the image-embedding cache. It takes submitted
//!   requests first, encodes the images of those waiting as one batch, and hands each
//!   request with its query embeddings to the engine thread. Should the batch fail, each
//!   image is encoded alone, so a bad image fails only its own request.
//! - **`blip2-engine`** owns the rest of the model (the language model, T5's text
//!   encoder, `kv_reorder`) and only prefills and decodes, so it never waits for pixels:
//!   the next requests' images are encoded while it steps the running batch.
//!
//! `infer` runs both on one thread: [`Scheduler::admit`] encodes the images it is given
//! through the model's own encoders before the prefill.
//!
//! Scheduling, in short (as in vLLM and TGI):
//! - **admit**: requests that arrived since the last step are prefilled together (their
//!   query embeddings, made by the image stage or at admission, then one prefill of their
//!   prompts), and each picks its first token.
//! - **step**: one decode step for every row of a running batch. Each request keeps its
//!   own search: greedy search and sampling per row ([`RowSearch`]), beam search as a
//!   group of rows ([`BeamSearch`]) with its per-search reorder. A request therefore gets
//!   exactly its single-request tokens whoever shares its batch.
//! - **retire**: rows whose sequence ended (an eos, their own `max_tokens`, a stop
//!   string, a client gone) leave the batch at once ([`DecoderState::select_rows`]).
//! - Newcomers join the running batch when its decoder state takes rows in
//!   ([`DecoderState::join`]: OPT's portable graph, left-padded; OPT's CUDA-target graph,
//!   rows copied into free rows of the running batch's fixed buffers, which the engine
//!   makes wider, up to `max_batch` rows, when none is free, [`Scheduler::with_room`]);
//!   otherwise they form a batch
//!   of their own that steps in turn with the others on the same thread.
//! - A fault in one request's search (an error or a panic) fails that request alone; a
//!   fault in a model run fails the rows of that run, and the engine goes on.
//!
//! Every language-model run happens on the thread that drives the scheduler, so a CUDA
//! provider's per-thread state (captured graphs, cuBLAS handles) is made once. With the
//! image stage, the vision encoder and Q-Former run on its thread: their sessions
//! capture no CUDA graphs (only the language model's does), and a CUDA provider makes
//! their per-thread state on that thread once.

mod batch;
mod encode;
mod images;
mod text;

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ndarray::{Array3, ArrayD};

pub use batch::{row_count as batch_rows, slot_width, Scheduler};

use crate::embed_cache::EmbedCache;
use crate::error::RuntimeError;
use crate::generation::GenerationConfig;
#[allow(unused_imports)] // named in the docs above
use crate::generation::{BeamSearch, RowSearch};
use crate::model::{Blip2Model, ImageEncoders};
use crate::prompt::Prompter;
#[allow(unused_imports)] // named in the docs above
use crate::state::DecoderState;

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
    /// Sequence `index` is complete: its whole text, why it ended, its new token ids
    /// (cut as the text is), and the tokens generated (an ending eos counted).
    End {
        index: usize,
        text: String,
        finish: Finish,
        token_ids: Vec<i64>,
        completion_tokens: usize,
    },
    /// Every sequence has ended.
    Done { prompt_tokens: usize },
    /// The request could not be completed; nothing more follows. The error may be
    /// shared by the requests of one model run.
    Failed(Arc<RuntimeError>),
}

/// Where a request's events go. `is_closed` says its client has gone: its sequences
/// end at the next token.
pub trait Sink: Send {
    fn send(&self, event: Event);
    fn is_closed(&self) -> bool {
        false
    }
    /// Whether it reads [`Event::Delta`]s; a sink that waits for the ends spares the
    /// engine decoding text at every token.
    fn wants_deltas(&self) -> bool {
        true
    }
}

impl Sink for mpsc::Sender<Event> {
    fn send(&self, event: Event) {
        let _ = mpsc::Sender::send(self, event);
    }
}

/// One request, checked and preprocessed: everything the engine needs.
pub struct Request {
    /// Pixel values `[3, H, W]`.
    pub pixels: Array3<f32>,
    /// The prompt's text ids (as [`Prompter::check_fits`] returns them).
    pub text_ids: Vec<i64>,
    /// The search, with `max_new_tokens` set to this request's limit.
    pub cfg: GenerationConfig,
    /// Text that ends a sequence where it first appears (not included).
    pub stop: Vec<String>,
    /// The sampling stream of the request's first sequence: `generate()` numbers streams
    /// by row over its whole batch, and `infer batch` keeps its results that way; 0 alone.
    pub first_stream: u64,
    pub sink: Box<dyn Sink>,
}

/// What the engine reports as it works; every method does nothing unless overridden.
pub trait EngineMetrics: Send + Sync {
    /// A request was admitted to the queue.
    fn queued(&self) {}
    /// Requests left the queue (for a batch, or refused after all).
    fn left_queue(&self, _requests: usize) {}
    /// Rows of a batch after new rows joined it.
    fn batch_rows(&self, _rows: usize) {}
    /// Newcomers' rows (this many) joined a running batch instead of starting one.
    fn joined(&self, _rows: usize) {}
    /// Requests with this many rows in all were taken in together (their images encoded
    /// on the engine thread unless the image stage did it, one prefill, their rows
    /// joining a batch or starting one); the engine thread spent `took` on it.
    fn admitted(&self, _rows: usize, _took: Duration) {}
    /// A running batch of this many rows made one decode step, picks included.
    fn stepped(&self, _rows: usize, _took: Duration) {}
    /// A request's first token, this long after it was queued.
    fn first_token(&self, _since_queued: Duration) {}
    /// A token was generated.
    fn token(&self) {}
    /// A request has all its results, this long after it was queued.
    fn finished(&self, _since_queued: Duration) {}
    /// A request is over (answered or failed): its place in the queue is free.
    fn released(&self) {}
}

/// Metrics that go nowhere.
pub struct NoMetrics;
impl EngineMetrics for NoMetrics {}

/// A request in the engine, with when it was queued and its place in the queue.
pub struct Queued {
    pub req: Request,
    pub enqueued: Instant,
    /// Its image's query embeddings `[num_query_tokens, hidden]`, once made (by the image
    /// stage, or at admission); the prefill takes them.
    image_embeds: Option<ArrayD<f32>>,
    place: Option<Place>,
}

impl Queued {
    /// A request outside any queue (a [`Scheduler`] driven directly).
    pub fn new(req: Request) -> Self {
        Queued { req, enqueued: Instant::now(), image_embeds: None, place: None }
    }

    /// Frees its place in the queue (it is answered).
    fn release_place(&mut self) {
        self.place = None;
    }
}

/// One admitted request's place; dropping it frees the place.
struct Place(Arc<Admission>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.admitted.fetch_sub(1, Ordering::SeqCst);
        self.0.metrics.released();
    }
}

struct Admission {
    admitted: AtomicUsize,
    max_queue: usize,
    metrics: Arc<dyn EngineMetrics>,
}

/// Why a request was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is at its limit of {0} requests in flight; retry later")]
    Full(usize),
    #[error("the server is shutting down")]
    Closed,
    /// The engine's threads stopped on a fault (logged); nothing more will run.
    #[error("the generation engine stopped after an internal fault (see the server's log); restart the server")]
    Stopped,
}

/// Scheduling limits.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Rows (sequences, beams) in generation at once; newcomers wait for room (a request
    /// wider than this runs alone). The image stage encodes batches of as many rows.
    pub max_batch: usize,
    /// How long the first request to an idle engine waits for others to join it (in an
    /// encoder batch and a prefill).
    pub max_wait: Duration,
    /// Requests admitted at once, waiting or generating; more are refused.
    pub max_queue: usize,
    /// Where images are encoded.
    pub image_stage: ImageStage,
    /// While batches generate, how long newcomers may wait (from their admission to the
    /// queue) for others to be taken in with them, so that they share an encoder batch
    /// and a prefill ([`holds_newcomers`]); zero takes them in at the next step.
    pub admit_wait: Duration,
}

/// Whether the engine thread leaves the newcomers waiting for now, while `running_rows`
/// rows generate: it takes them in once they hold at least half as many rows as are
/// running (at least one), or once the first of them has waited `admit_wait`; never
/// when nothing runs.
pub fn holds_newcomers(
    running_rows: usize,
    waiting_rows: usize,
    first_waited: Duration,
    admit_wait: Duration,
) -> bool {
    running_rows > 0
        && waiting_rows > 0
        && waiting_rows < running_rows.div_ceil(2)
        && first_waited < admit_wait
}

/// Where the server's engine encodes images (vision encoder, Q-Former).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImageStage {
    /// The setting measured fastest: today [`ImageStage::Inline`] on every profile. On
    /// a CPU the two threads share the same cores and ONNX Runtime's thread pool, so
    /// encoding ahead gains nothing and slows the steps; on an H200 (opt-2.7b shapes) the
    /// stage's thread answered as many or fewer requests a second at 1, 8 and 32 clients
    /// (14.4 against 20.3 at 8), with a later first token: the encoders and the language
    /// model share one GPU, and the stage encodes the few images that arrived at a time.
    #[default]
    Auto,
    /// On the image stage's thread, ahead of the language model.
    Thread,
    /// On the engine thread, as it admits requests (an idle engine gives a burst
    /// `max_wait` to gather into one encoder batch).
    Inline,
}

/// The engine's threads (the image stage, then the engine thread) and its queue.
pub struct Engine {
    queue: Mutex<Option<SyncSender<Queued>>>,
    admission: Arc<Admission>,
    pub prompter: Arc<Prompter>,
    /// The model's search defaults (its generation_config.json over transformers').
    pub defaults: GenerationConfig,
    pub manifest: blip2_core::Manifest,
    pub limits: crate::preprocess::ImageLimits,
    threads: Mutex<Option<Threads>>,
}

/// The image stage's thread (none when images are encoded inline) and the engine thread.
struct Threads {
    images: Option<std::thread::JoinHandle<ImageEncoders>>,
    engine: std::thread::JoinHandle<Blip2Model>,
}

impl Engine {
    /// Takes over a loaded model and starts the engine's threads: the image stage with
    /// the model's vision encoder, Q-Former and `embed_cache`, the engine thread with the
    /// rest (see [`crate::pipeline::Pipeline::into_engine`]).
    pub fn start(
        mut model: Blip2Model,
        prompter: Prompter,
        limits: crate::preprocess::ImageLimits,
        embed_cache: EmbedCache,
        defaults: GenerationConfig,
        opts: EngineOptions,
        metrics: Arc<dyn EngineMetrics>,
    ) -> Result<Arc<Self>, std::io::Error> {
        let manifest = model.manifest.clone();
        let prompter = Arc::new(prompter);
        let (tx, rx) = mpsc::sync_channel(opts.max_queue.max(1));
        let admission = Arc::new(Admission {
            admitted: AtomicUsize::new(0),
            max_queue: opts.max_queue.max(1),
            metrics: metrics.clone(),
        });
        let threaded = match opts.image_stage {
            ImageStage::Thread => true,
            ImageStage::Auto | ImageStage::Inline => false,
        };
        let spawn_engine = |intake: Intake, model: Blip2Model| {
            let (p, opts, metrics) = (prompter.clone(), opts.clone(), metrics.clone());
            std::thread::Builder::new()
                .name("blip2-engine".into())
                .spawn(move || run(intake, model, p, opts, metrics))
        };
        let threads = if threaded {
            let encoders = model.take_image_encoders().ok_or_else(|| {
                std::io::Error::other(
                    "the model's vision encoder and Q-Former were handed over already",
                )
            })?;
            let (encoded_tx, encoded_rx) = mpsc::channel();
            let engine_idle = Arc::new(AtomicBool::new(true));
            let stage = images::Stage {
                rx,
                out: encoded_tx,
                encoders,
                cache: embed_cache,
                max_batch: opts.max_batch.max(1),
                max_wait: opts.max_wait,
                engine_idle: engine_idle.clone(),
                metrics: metrics.clone(),
            };
            let engine =
                spawn_engine(Intake::Encoded { rx: encoded_rx, idle: engine_idle }, model)?;
            // Should this fail, the stage is dropped with its sender: the engine thread ends.
            let images = std::thread::Builder::new()
                .name("blip2-images".into())
                .spawn(move || images::run(stage))?;
            Threads { images: Some(images), engine }
        } else {
            let engine = spawn_engine(Intake::Raw { rx, cache: embed_cache }, model)?;
            Threads { images: None, engine }
        };
        Ok(Arc::new(Self {
            queue: Mutex::new(Some(tx)),
            admission,
            prompter,
            defaults,
            manifest,
            limits,
            threads: Mutex::new(Some(threads)),
        }))
    }

    /// Queues a request, or refuses it when `max_queue` requests are in flight.
    pub fn submit(&self, req: Request) -> Result<(), SubmitError> {
        let a = &self.admission;
        if a.admitted.fetch_add(1, Ordering::SeqCst) >= a.max_queue {
            a.admitted.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Full(a.max_queue));
        }
        a.metrics.queued();
        let queued = Queued {
            req,
            enqueued: Instant::now(),
            image_embeds: None,
            place: Some(Place(a.clone())),
        };
        let refused = |e| {
            a.metrics.left_queue(1);
            Err(e)
        };
        let guard = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = guard.as_ref() else { return refused(SubmitError::Closed) };
        match tx.try_send(queued) {
            Ok(()) => Ok(()),
            // The channel holds max_queue and admission keeps fewer in flight.
            Err(TrySendError::Full(_)) => refused(SubmitError::Full(a.max_queue)),
            // The queue is open, so the image stage has stopped on a fault.
            Err(TrySendError::Disconnected(_)) => refused(SubmitError::Stopped),
        }
    }

    /// Whether the engine's threads are running: false once one of them has stopped on
    /// a fault (requests then fail; the server's `/health` says so) and after shutdown.
    pub fn is_running(&self) -> bool {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        threads.as_ref().is_some_and(|t| {
            !t.engine.is_finished() && t.images.as_ref().is_none_or(|h| !h.is_finished())
        })
    }

    /// Stops taking requests and waits until every admitted one has been answered.
    pub fn shutdown(&self) {
        self.stop();
    }

    /// [`Engine::shutdown`], returning the model the engine's threads owned (its
    /// encoders back in it, unless the image stage failed). The image stage encodes what
    /// is queued and ends; then the engine thread runs every request to its end.
    fn stop(&self) -> Option<Blip2Model> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
        let t = self.threads.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        let encoders = t.images.and_then(|h| h.join().ok());
        let mut model = t.engine.join().ok()?;
        if let Some(e) = encoders {
            model.put_image_encoders(e);
        }
        Some(model)
    }

    #[cfg(any(test, feature = "test-support"))]
    /// [`Engine::shutdown`], handing back the model (tests read what ran where).
    pub fn shutdown_into_model(&self) -> Option<Blip2Model> {
        self.stop()
    }
}

/// Where the engine thread's requests come from.
enum Intake {
    /// The image stage, which hands them on with their query embeddings; `idle` tells it
    /// when the engine thread waits for work.
    Encoded { rx: Receiver<Vec<Queued>>, idle: Arc<AtomicBool> },
    /// The queue itself: the engine thread encodes their images as it admits them,
    /// through the model's encoders and this cache.
    Raw { rx: Receiver<Queued>, cache: EmbedCache },
}

impl Intake {
    /// Blocks for work (the engine is idle) and gives a burst `max_wait` to gather (the
    /// image stage does that itself). False when the queue has closed and is empty.
    fn wait(&mut self, waiting: &mut VecDeque<Queued>, opts: &EngineOptions) -> bool {
        match self {
            Intake::Encoded { rx, idle } => {
                idle.store(true, Ordering::SeqCst);
                let next = rx.recv();
                idle.store(false, Ordering::SeqCst);
                next.map(|batch| waiting.extend(batch)).is_ok()
            }
            Intake::Raw { rx, .. } => {
                let Ok(first) = rx.recv() else { return false };
                let deadline = first.enqueued + opts.max_wait;
                let mut rows = batch::row_count(&first.req.cfg);
                waiting.push_back(first);
                while rows < opts.max_batch {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let Ok(q) = rx.recv_timeout(left) else { break };
                    rows += batch::row_count(&q.req.cfg);
                    waiting.push_back(q);
                }
                true
            }
        }
    }

    /// Takes what has arrived, without waiting.
    fn arrived(&mut self, waiting: &mut VecDeque<Queued>) {
        match self {
            Intake::Encoded { rx, .. } => waiting.extend(rx.try_iter().flatten()),
            Intake::Raw { rx, .. } => waiting.extend(rx.try_iter()),
        }
    }
}

/// The engine thread: admits what arrives, steps every running batch, until its intake
/// has closed and nothing is left.
fn run(
    mut intake: Intake,
    mut model: Blip2Model,
    prompter: Arc<Prompter>,
    opts: EngineOptions,
    metrics: Arc<dyn EngineMetrics>,
) -> Blip2Model {
    let mut sched = Scheduler::new(opts.max_batch, metrics.clone()).with_room();
    let mut waiting: VecDeque<Queued> = Default::default();
    let served = catch_unwind(AssertUnwindSafe(|| loop {
        // Intake: when idle, block for requests; when generating, take what has arrived
        // and go on.
        if sched.is_idle() && waiting.is_empty() && !intake.wait(&mut waiting, &opts) {
            break;
        }
        intake.arrived(&mut waiting);
        // Only with an admit wait: otherwise nothing is held and the rows are not counted.
        let held = !opts.admit_wait.is_zero()
            && waiting.front().is_some_and(|first| {
                let rows = waiting.iter().map(|q| batch::row_count(&q.req.cfg)).sum();
                holds_newcomers(sched.rows(), rows, first.enqueued.elapsed(), opts.admit_wait)
            });
        let newcomers = if held { Vec::new() } else { sched.take_fitting(&mut waiting) };
        if !newcomers.is_empty() {
            match &mut intake {
                Intake::Encoded { .. } => sched.admit_encoded(&mut model, &prompter, newcomers),
                Intake::Raw { cache, .. } => sched.admit(&mut model, cache, &prompter, newcomers),
            }
        }
        sched.step(&mut model, &prompter);
    }));
    // A fault outside any one request's search (a bug): the requests this thread holds
    // hear why, and the thread ends; the engine then refuses or fails later requests,
    // and `Engine::is_running` says it stopped.
    if let Err(p) = served {
        let why = format!("the generation engine failed: {}", crate::error::panic_message(&p));
        tracing::error!("{why}; failing the requests it held, and stopping");
        sched.fail_all(RuntimeError::Fault(why.clone()));
        intake.arrived(&mut waiting);
        let e = Arc::new(RuntimeError::Fault(why));
        metrics.left_queue(waiting.len());
        for q in waiting.drain(..) {
            q.req.sink.send(Event::Failed(e.clone()));
        }
    }
    model
}
