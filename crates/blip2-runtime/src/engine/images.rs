//! The image stage: a thread that owns the vision encoder, the Q-Former and the
//! image-embedding cache, ahead of the engine thread. It takes submitted requests first,
//! encodes the images of those waiting as one batch (images seen recently come from the
//! cache) and hands each request on with its query embeddings, so the language model's
//! thread only prefills and decodes: the next requests' images are encoded while it
//! steps the running batch.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ndarray::Axis;

use super::batch::{panic_message, row_count};
use super::{EngineMetrics, Event, Queued};
use crate::embed_cache::EmbedCache;
use crate::error::RuntimeError;
use crate::model::{EncodeImages, ImageEncoders};

/// Gives the `jobs` that have no query embeddings yet theirs: their images through the
/// cache and the encoders, as one batch. On an error none of them has changed.
pub(super) fn embed(
    encoders: &mut (impl EncodeImages + ?Sized),
    cache: &mut EmbedCache,
    jobs: &mut [Queued],
) -> Result<(), RuntimeError> {
    let todo: Vec<usize> = (0..jobs.len()).filter(|&i| jobs[i].image_embeds.is_none()).collect();
    if todo.is_empty() {
        return Ok(());
    }
    let views: Vec<_> =
        todo.iter().map(|&i| jobs[i].req.pixels.view().insert_axis(Axis(0))).collect();
    let pixels = ndarray::concatenate(Axis(0), &views)
        .map_err(|e| RuntimeError::Input(format!("joining pixel values: {e}")))?;
    let embeds = cache.embed(encoders, pixels)?;
    for (k, &i) in todo.iter().enumerate() {
        jobs[i].image_embeds = Some(embeds.index_axis(Axis(0), k).to_owned());
    }
    Ok(())
}

/// What the image thread owns and where it hands requests on.
pub(super) struct Stage {
    /// Submitted requests (the engine's bounded queue).
    pub rx: Receiver<Queued>,
    /// Requests with their query embeddings, a batch at a time, to the engine thread.
    pub out: Sender<Vec<Queued>>,
    pub encoders: ImageEncoders,
    pub cache: EmbedCache,
    /// Rows (as the engine counts them) an encoder batch gathers at most.
    pub max_batch: usize,
    /// How long the first request to reach an idle engine waits for others.
    pub max_wait: Duration,
    /// Set by the engine thread while it has nothing to run.
    pub engine_idle: Arc<AtomicBool>,
    pub metrics: Arc<dyn EngineMetrics>,
}

/// The image thread: until the queue closes and is empty, takes what has arrived,
/// encodes it and hands it on. Returns the encoders (the engine gives them back to the
/// model as it shuts down).
pub(super) fn run(stage: Stage) -> ImageEncoders {
    let Stage { rx, out, mut encoders, mut cache, max_batch, max_wait, engine_idle, metrics } =
        stage;
    // Requests this thread holds; should it stop early (a panic, the engine thread gone),
    // they and those still queued are failed, never left without an answer.
    let mut held = Held { jobs: Vec::new(), rx: &rx, metrics: &*metrics };
    while let Ok(first) = rx.recv() {
        let mut rows = row_count(&first.req.cfg);
        let deadline = first.enqueued + max_wait;
        held.jobs.push(first);
        // An idle engine gives a burst max_wait to gather, so that its requests share an
        // encoder batch and a prefill; a busy one takes what has arrived, at once.
        let wait = engine_idle.load(Ordering::SeqCst);
        while rows < max_batch {
            let next = if wait {
                rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).ok()
            } else {
                rx.try_recv().ok()
            };
            let Some(q) = next else { break };
            rows += row_count(&q.req.cfg);
            held.jobs.push(q);
        }
        encode_batch(&mut encoders, &mut cache, &mut held.jobs, &*metrics);
        if held.jobs.is_empty() {
            continue;
        }
        if let Err(back) = out.send(std::mem::take(&mut held.jobs)) {
            // The engine thread has stopped: `held` fails these and the queued ones.
            held.jobs = back.0;
            break;
        }
    }
    drop(held);
    encoders
}

/// Encodes the images of `jobs` as one batch. Should that fail, each request's image is
/// encoded alone, so that a bad image (or a panic on it) fails its own request only; the
/// requests that failed are answered and leave `jobs`.
fn encode_batch(
    encoders: &mut ImageEncoders,
    cache: &mut EmbedCache,
    jobs: &mut Vec<Queued>,
    metrics: &dyn EngineMetrics,
) {
    let Err(e) = try_embed(encoders, cache, jobs) else { return };
    if jobs.len() == 1 {
        fail(jobs.remove(0), e, metrics);
        return;
    }
    tracing::warn!(
        "encoding the images of {} requests failed ({e}); encoding each alone",
        jobs.len()
    );
    let mut i = 0;
    while i < jobs.len() {
        match try_embed(encoders, cache, &mut jobs[i..=i]) {
            Ok(()) => i += 1,
            Err(e) => fail(jobs.remove(i), e, metrics),
        }
    }
}

/// [`embed`], with a panic turned into an error.
fn try_embed(
    encoders: &mut ImageEncoders,
    cache: &mut EmbedCache,
    jobs: &mut [Queued],
) -> Result<(), RuntimeError> {
    catch_unwind(AssertUnwindSafe(|| embed(encoders, cache, jobs))).unwrap_or_else(|p| {
        Err(RuntimeError::Fault(format!("the image encoders failed: {}", panic_message(&p))))
    })
}

/// Answers a request that never reached the engine thread with its failure.
fn fail(job: Queued, e: RuntimeError, metrics: &dyn EngineMetrics) {
    tracing::error!("a request's image could not be encoded: {e}");
    metrics.left_queue(1);
    tell(&job, Event::Failed(Arc::new(e)));
}

/// Sends `event` to the request's sink; a sink that panics does not take the image
/// thread down with it.
fn tell(job: &Queued, event: Event) {
    if catch_unwind(AssertUnwindSafe(|| job.req.sink.send(event))).is_err() {
        tracing::error!("a request's sink failed as it was told of its failure");
    }
}

/// The requests the image thread holds, and its queue: whatever is left when it is
/// dropped gets a failure.
struct Held<'a> {
    jobs: Vec<Queued>,
    rx: &'a Receiver<Queued>,
    metrics: &'a dyn EngineMetrics,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let why = if std::thread::panicking() {
            "the engine's image stage failed (see the server's log)"
        } else {
            "the engine thread has stopped (see the server's log)"
        };
        let left: Vec<Queued> = self.jobs.drain(..).chain(self.rx.try_iter()).collect();
        if left.is_empty() {
            return;
        }
        tracing::error!("{why}: failing the {} request(s) it held", left.len());
        let e = Arc::new(RuntimeError::Fault(why.into()));
        self.metrics.left_queue(left.len());
        for q in &left {
            tell(q, Event::Failed(e.clone()));
        }
    }
}
