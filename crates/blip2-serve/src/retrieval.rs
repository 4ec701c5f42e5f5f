//! The retrieval worker behind `/v1/embeddings`, `/v1/rerank`, `/v1/score` and
//! `/v1/search`: one thread owns the [`RetrievalModel`] and takes work over a channel.
//!
//! Requests arrive checked and preprocessed (images as pixel values, texts as token
//! rows; a bad image or text fails only its request, before it gets here). When work
//! arrives the worker waits up to `max_wait` for more, or until `max_batch` images and
//! texts are waiting, then runs all of it together: every text of every request through
//! the text-embedding graph, every image through the vision encoder and the
//! image-embedding graph, and every (image, text) pair to match through ITM, each in
//! calls of at most `max_batch` rows. Each request then gets its own rows back.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use blip2_core::RetrievalManifest;
use blip2_runtime::error::{panic_message, RuntimeError};
use blip2_runtime::preprocess::ImageLimits;
use blip2_runtime::retrieval::{
    itc, ImageFeatures, RetrievalModel, TextBatch, TextTokenizer, TokenRow,
};
use ndarray::{Array2, Array3};
use tokio::sync::oneshot;

use crate::engine::{EngineOptions, SubmitError};
use crate::metrics::Metrics;

/// What a request asks of the model: the embeddings of its texts and images, and the
/// ITM and ITC scores of the `(text, image)` pairs in `pairs` (indices into `texts` and
/// `images`).
#[derive(Default)]
pub struct Work {
    pub texts: Vec<TokenRow>,
    /// Pixel values `[3, H, W]` of each image.
    pub images: Vec<Array3<f32>>,
    pub pairs: Vec<(usize, usize)>,
}

impl Work {
    /// Images and texts: what `max_batch` counts.
    fn items(&self) -> usize {
        self.texts.len() + self.images.len()
    }
}

/// What the worker answers, in the order of the request's items.
#[derive(Debug)]
pub struct Output {
    /// Normalized text embeddings `[dim]`, one per text.
    pub texts: Vec<Vec<f32>>,
    /// Normalized query embeddings `[num_query_tokens, dim]`, one per image.
    pub images: Vec<Array2<f32>>,
    /// `(itm, itc)` per pair.
    pub scores: Vec<(f32, f32)>,
}

struct Job {
    work: Work,
    reply: oneshot::Sender<Result<Output, String>>,
    _place: Place,
}

struct Place(Arc<AtomicUsize>, Arc<Metrics>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
        self.1.in_flight.dec();
    }
}

/// The cloneable side of the worker: what request handlers need to prepare work, and
/// the queue to the worker.
pub struct Retrieval {
    pub manifest: RetrievalManifest,
    pub tokenizer: TextTokenizer,
    pub limits: ImageLimits,
    queue: Mutex<Option<Sender<Job>>>,
    admitted: Arc<AtomicUsize>,
    max_queue: usize,
    metrics: Arc<Metrics>,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Retrieval {
    /// Takes over the model and starts its thread.
    pub fn start(model: RetrievalModel, opts: EngineOptions, metrics: Arc<Metrics>) -> Arc<Self> {
        let (tx, rx) = mpsc::channel();
        let manifest = model.manifest.clone();
        let tokenizer = model.tokenizer().clone();
        let limits = model.limits;
        let m = metrics.clone();
        let max_queue = opts.max_queue.max(1);
        let worker = std::thread::Builder::new()
            .name("blip2-retrieval".into())
            .spawn(move || work(model, rx, opts, m))
            .expect("spawning the retrieval thread");
        Arc::new(Self {
            manifest,
            tokenizer,
            limits,
            queue: Mutex::new(Some(tx)),
            admitted: Arc::new(AtomicUsize::new(0)),
            max_queue,
            metrics,
            worker: Mutex::new(Some(worker)),
        })
    }

    /// Queues `work` (refused when `max_queue` requests are in flight) and waits for it.
    /// The error of a run that failed is the model's (a server fault).
    pub async fn run(&self, work: Work) -> Result<Result<Output, String>, SubmitError> {
        if self.admitted.fetch_add(1, Ordering::SeqCst) >= self.max_queue {
            self.admitted.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Full(self.max_queue));
        }
        self.metrics.in_flight.inc();
        let place = Place(self.admitted.clone(), self.metrics.clone());
        let (reply, answer) = oneshot::channel();
        {
            let guard = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            let tx = guard.as_ref().ok_or(SubmitError::Closed)?;
            // The queue is open, so its reader has stopped on a fault.
            tx.send(Job { work, reply, _place: place }).map_err(|_| SubmitError::Stopped)?;
        }
        // Shutdown answers all queued work first: an answer dropped unsent means the
        // worker stopped on a fault.
        answer.await.map_err(|_| SubmitError::Stopped)
    }

    /// Whether the worker thread is running (false once it stopped on a fault, and
    /// after shutdown).
    pub fn is_running(&self) -> bool {
        let w = self.worker.lock().unwrap_or_else(|e| e.into_inner());
        w.as_ref().is_some_and(|w| !w.is_finished())
    }

    /// Stops taking work and waits until all queued work has been answered.
    pub fn shutdown(&self) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = w.join();
        }
    }
}

fn work(mut model: RetrievalModel, rx: Receiver<Job>, opts: EngineOptions, metrics: Arc<Metrics>) {
    let max_batch = opts.max_batch.max(1);
    while let Ok(first) = rx.recv() {
        let deadline = Instant::now() + opts.max_wait;
        let mut items = first.work.items();
        let mut jobs = vec![first];
        while items < max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(j) => {
                    items += j.work.items();
                    jobs.push(j);
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        // A client that went away no longer waits for its answer.
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        let works: Vec<&Work> = jobs.iter().map(|j| &j.work).collect();
        // A panic in the model's run fails this batch's requests, with its reason; the
        // worker goes on with the next.
        let ran = catch_unwind(AssertUnwindSafe(|| run(&mut model, &works, max_batch, &metrics)))
            .unwrap_or_else(|p| {
                Err(RuntimeError::Fault(format!(
                    "the retrieval model failed: {}",
                    panic_message(&p)
                )))
            });
        match ran {
            Ok(outs) => {
                for (j, o) in jobs.into_iter().zip(outs) {
                    let _ = j.reply.send(Ok(o));
                }
            }
            Err(e) => {
                tracing::error!("retrieval batch failed: {e}");
                for j in jobs {
                    let _ = j.reply.send(Err(e.to_string()));
                }
            }
        }
    }
}

/// Runs the work of several requests together; one output per request.
fn run(
    m: &mut RetrievalModel,
    works: &[&Work],
    max_batch: usize,
    metrics: &Metrics,
) -> Result<Vec<Output>, RuntimeError> {
    // Every text and image of every request, in request order, and where each request's
    // start.
    let texts: Vec<&TokenRow> = works.iter().flat_map(|w| &w.texts).collect();
    let images: Vec<&Array3<f32>> = works.iter().flat_map(|w| &w.images).collect();
    let mut starts = Vec::with_capacity(works.len());
    let (mut t0, mut i0) = (0, 0);
    for w in works {
        starts.push((t0, i0));
        t0 += w.texts.len();
        i0 += w.images.len();
    }
    let pad = m.tokenizer().pad_token_id();
    let mut text_emb: Vec<Vec<f32>> = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(max_batch) {
        metrics.retrieval_batch_items.observe(chunk.len() as f64);
        let rows: Vec<TokenRow> = chunk.iter().map(|r| (*r).clone()).collect();
        let e = m.embed_text_batch(&TextBatch::from_rows(&rows, pad))?;
        text_emb.extend(e.outer_iter().map(|r| r.to_vec()));
    }
    // The vision encoder's features are kept, by call, where ITM pairs an image of it.
    let mut paired = vec![false; images.len()];
    for (w, &(_, i0)) in works.iter().zip(&starts) {
        for &(_, i) in &w.pairs {
            paired[i0 + i] = true;
        }
    }
    let mut image_emb: Vec<Array2<f32>> = Vec::with_capacity(images.len());
    let mut feats: Vec<Option<ImageFeatures>> = Vec::new();
    for (c, chunk) in images.chunks(max_batch).enumerate() {
        metrics.retrieval_batch_items.observe(chunk.len() as f64);
        let f = m.image_features(RetrievalModel::stack_pixels(chunk)?)?;
        let e = m.embed_image_features(&f)?;
        image_emb.extend(e.outer_iter().map(|r| r.to_owned()));
        let keep = paired[c * max_batch..c * max_batch + chunk.len()].contains(&true);
        feats.push(keep.then_some(f));
    }
    // ITM over every request's pairs, `max_batch` pairs per call.
    let pairs: Vec<(usize, usize)> = works
        .iter()
        .zip(&starts)
        .flat_map(|(w, &(t0, i0))| w.pairs.iter().map(move |&(t, i)| (t0 + t, i0 + i)))
        .collect();
    let mut itm = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(max_batch) {
        metrics.retrieval_batch_items.observe(chunk.len() as f64);
        let rows: Vec<(&ImageFeatures, usize)> = chunk
            .iter()
            .map(|&(_, i)| {
                let f = feats[i / max_batch].as_ref().expect("features kept for paired images");
                (f, i % max_batch)
            })
            .collect();
        let f = ImageFeatures::gather(&rows)?;
        let t: Vec<TokenRow> = chunk.iter().map(|&(t, _)| texts[t].clone()).collect();
        itm.extend(m.itm_pairs(&f, &TextBatch::from_rows(&t, pad))?);
    }
    let mut itm = itm.into_iter();
    let mut outs = Vec::with_capacity(works.len());
    for (w, &(t0, i0)) in works.iter().zip(&starts) {
        let scores = w
            .pairs
            .iter()
            .map(|&(t, i)| {
                let text = ndarray::ArrayView1::from(&text_emb[t0 + t][..]);
                let s = itc(image_emb[i0 + i].view(), text);
                (itm.next().expect("one ITM score per pair"), s)
            })
            .collect();
        outs.push(Output {
            texts: text_emb[t0..t0 + w.texts.len()].to_vec(),
            images: image_emb[i0..i0 + w.images.len()].to_vec(),
            scores,
        });
    }
    Ok(outs)
}
