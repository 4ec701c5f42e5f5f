//! The image stage: a thread that owns the vision encoder, the Q-Former and the
//! image-embedding cache, ahead of the engine thread. It takes submitted requests first,
//! encodes the images of those waiting as one batch (images seen recently come from the
//! cache) and hands each request on with its query embeddings, so the language model's
//! thread only prefills and decodes: the next requests' images are encoded while it
//! steps the running batch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::batch::row_count;
use super::encode::{encode_batch, tell};
use super::{EngineMetrics, Event, Queued};
use crate::embed_cache::EmbedCache;
use crate::error::RuntimeError;
use crate::model::ImageEncoders;

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
