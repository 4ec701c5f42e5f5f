//! Image encoding with faults kept to their request: the images of admitted requests
//! through the image-embedding cache and the encoders as one batch, and, should that
//! fail, each image alone, so a bad image (or a panic on it) fails only its request.
//! The image stage's thread and the engine thread (encoding inline) both use it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use ndarray::Axis;

use super::{EngineMetrics, Event, Queued};
use crate::embed_cache::EmbedCache;
use crate::error::{panic_message, RuntimeError};
use crate::model::EncodeImages;

/// Gives the `jobs` that have no query embeddings yet theirs: their images through the
/// cache and the encoders, as one batch. On an error none of them has changed.
fn embed(
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

/// Encodes the images of `jobs` as one batch (those that have query embeddings already
/// are left as they are). Should that fail, each request's image is encoded alone, so that a bad image (or a panic on it) fails its own request only; the
/// requests that failed are answered and leave `jobs`.
pub(super) fn encode_batch(
    encoders: &mut (impl EncodeImages + ?Sized),
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
    encoders: &mut (impl EncodeImages + ?Sized),
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

/// Sends `event` to the request's sink; a sink that panics does not take the thread
/// down with it.
pub(super) fn tell(job: &Queued, event: Event) {
    if catch_unwind(AssertUnwindSafe(|| job.req.sink.send(event))).is_err() {
        tracing::error!("a request's sink failed as it was told of its failure");
    }
}
