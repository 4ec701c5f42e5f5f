//! Continuous batching for OPT on the portable graph, greedy search and sampling: one
//! running batch that requests join at the next step and leave when they end.
//!
//! Each step, the batcher takes in what has been queued since (up to `max_batch` rows):
//! their images go through the vision encoder and Q-Former (the image-embedding cache
//! first), their prompts through one prefill, and the new rows' first tokens are picked
//! from it; their KV caches then join the running batch, left-padded to its length (the
//! mask hides the padding and each row keeps its own positions, exactly as rows of
//! different lengths share a batch in `infer batch`). Then one decode step runs for every
//! row. Rows that end (eos, their own `max_tokens`, a stop string, a client gone) leave
//! the batch at once, and positions no remaining row uses are dropped. Each row's search
//! ([`RowSearch`]) is the one its request would run alone, so its tokens are its
//! single-request tokens.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Instant;

use blip2_runtime::error::RuntimeError;
use blip2_runtime::generation::{RowSearch, StepModel};
use blip2_runtime::model::ModelRef;
use blip2_runtime::state::opt::OptState;
use ndarray::Array2;

use super::{assemble, encode, row_count, EngineOptions, Event, Queued, Shared, Stream};

/// A request in the running batch.
struct Live {
    q: Queued,
    streams: Vec<Stream>,
    /// Rows not ended yet.
    pending: usize,
    first_token: bool,
}

/// A row of the running batch: which request and which of its sequences.
struct Row {
    job: u64,
    seq: usize,
    search: RowSearch,
}

struct Batch {
    state: Option<OptState<'static>>,
    rows: Vec<Row>,
    live: HashMap<u64, Live>,
    next_id: u64,
}

pub(super) fn run(rx: Receiver<Queued>, shared: &Shared, opts: &EngineOptions) {
    let mut b = Batch { state: None, rows: Vec::new(), live: HashMap::new(), next_id: 0 };
    let mut waiting: VecDeque<Queued> = VecDeque::new();
    let mut open = true;
    loop {
        // Intake: when idle, block for a request and give others max_wait to join it;
        // when generating, take what has arrived and go on.
        if b.rows.is_empty() && waiting.is_empty() {
            if !open {
                break;
            }
            match rx.recv() {
                Ok(q) => waiting.push_back(q),
                Err(_) => break,
            }
            let deadline = waiting[0].enqueued + opts.max_wait;
            while waiting.iter().map(|q| row_count(&q.job.cfg)).sum::<usize>() < opts.max_batch {
                match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(q) => waiting.push_back(q),
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
        }
        loop {
            match rx.try_recv() {
                Ok(q) => waiting.push_back(q),
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        // Admit what fits in max_batch rows (a request wider than the batch goes alone).
        let mut newcomers = Vec::new();
        let mut rows = b.rows.len();
        while let Some(q) = waiting.front() {
            let r = row_count(&q.job.cfg);
            if rows > 0 && rows + r > opts.max_batch {
                break;
            }
            rows += r;
            newcomers.push(waiting.pop_front().expect("front exists"));
        }
        if !newcomers.is_empty() {
            admit(&mut b, shared, newcomers);
            retire(&mut b, shared);
        }
        if !b.rows.is_empty() {
            step(&mut b, shared);
            retire(&mut b, shared);
        }
    }
}

/// The newcomers' state after their prefill, the logits of each one's next token, and
/// each one's prompt as it is alone (no padding).
struct Prefilled {
    state: OptState<'static>,
    logits: Array2<f32>,
    prompts: Vec<Vec<i64>>,
}

/// Prefills the newcomers, picks their first tokens and joins them to the batch.
fn admit(b: &mut Batch, shared: &Shared, newcomers: Vec<Queued>) {
    shared.metrics.queue_depth.dec_by(newcomers.len() as i64);
    let rows: usize = newcomers.iter().map(|q| row_count(&q.job.cfg)).sum();
    shared.metrics.batch_rows.observe((b.rows.len() + rows) as f64);
    let prefilled = (|| -> Result<Prefilled, RuntimeError> {
        let (batch, pixels) = assemble(shared, &newcomers)?;
        let _t = shared.turn.enter();
        let embeds = encode(shared, pixels)?;
        let embeds = blip2_runtime::model::lm_value(
            &shared.model.lock().unwrap_or_else(|e| e.into_inner()),
            embeds,
        )?;
        let (state, logits) = OptState::prefill_last(
            ModelRef::Shared(shared.model.clone()),
            &batch.ids,
            &batch.mask,
            embeds,
        )?;
        // Each row's prompt as it is alone: without the padding.
        let prompts = batch.unpadded();
        Ok(Prefilled { state, logits, prompts })
    })();
    let Prefilled { mut state, logits, prompts } = match prefilled {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("the prefill of {} request(s) failed: {e}", newcomers.len());
            for q in &newcomers {
                let _ = q.job.events.send(Event::Failed(e.to_string()));
            }
            return;
        }
    };
    // Sampling n sequences repeats the prompt's row n times.
    let mut source = Vec::new();
    let mut new_rows = Vec::new();
    for (j, q) in newcomers.into_iter().enumerate() {
        let id = b.next_id;
        b.next_id += 1;
        let n = row_count(&q.job.cfg);
        let seed = q.job.cfg.seed.unwrap_or_else(blip2_runtime::generation::fresh_seed);
        for seq in 0..n {
            let search = RowSearch::new(prompts[j].clone(), &q.job.cfg, seed, seq as u64)
                .expect("settings checked when the request came in");
            new_rows.push(Row { job: id, seq, search });
            source.push(j);
        }
        let k = q.job.cfg.num_return_sequences;
        b.live.insert(
            id,
            Live {
                q,
                streams: (0..k).map(|_| Stream::new()).collect(),
                pending: n,
                first_token: false,
            },
        );
    }
    if source.len() != logits.nrows() {
        if let Err(e) = StepModel::select_rows(&mut state, &source) {
            fail_rows(b, &new_rows, &e);
            return;
        }
    }
    for (row, &src) in new_rows.iter_mut().zip(&source) {
        pick(b, shared, row, logits.row(src));
    }
    match b.state.as_mut() {
        Some(running) if !b.rows.is_empty() => {
            if let Err(e) = running.join(state) {
                fail_rows(b, &new_rows, &e);
                return;
            }
        }
        _ => b.state = Some(state),
    }
    b.rows.extend(new_rows);
}

/// Picks a row's next token from its logits and tells its request.
fn pick(b: &mut Batch, shared: &Shared, row: &mut Row, logits: ndarray::ArrayView1<'_, f32>) {
    let token = row.search.pick(logits);
    let live = b.live.get_mut(&row.job).expect("a row's request is live");
    if !live.first_token {
        live.first_token = true;
        shared.metrics.ttft.observe(live.q.enqueued.elapsed().as_secs_f64());
    }
    if row.search.ended_on_eos() {
        return;
    }
    let go_on =
        live.streams[row.seq].push(token, row.seq, &live.q.job, &shared.prompter, &shared.metrics);
    if !go_on {
        row.search.finish();
    }
}

/// One decode step for every row.
fn step(b: &mut Batch, shared: &Shared) {
    let tokens: Vec<i64> =
        b.rows.iter().map(|r| r.search.last().expect("a row in the batch has picked")).collect();
    let out = {
        let _t = shared.turn.enter();
        let state = b.state.as_mut().expect("rows have a state");
        state.step(&tokens)
    };
    match out {
        Ok(logits) => {
            let mut rows = std::mem::take(&mut b.rows);
            for (i, row) in rows.iter_mut().enumerate() {
                pick(b, shared, row, logits.row(i));
            }
            b.rows = rows;
        }
        Err(e) => {
            let rows = std::mem::take(&mut b.rows);
            b.state = None;
            fail_rows(b, &rows, &e);
        }
    }
}

/// Fails the requests of `rows`.
fn fail_rows(b: &mut Batch, rows: &[Row], e: &RuntimeError) {
    tracing::error!("generation failed: {e}");
    for r in rows {
        if let Some(live) = b.live.remove(&r.job) {
            let _ = live.q.job.events.send(Event::Failed(e.to_string()));
        }
    }
}

/// Takes the finished rows out of the batch; a request whose rows have all ended gets
/// its results.
fn retire(b: &mut Batch, shared: &Shared) {
    if b.rows.iter().all(|r| !r.search.is_finished()) {
        return;
    }
    let mut keep: Vec<(usize, Row)> = Vec::new();
    let mut done: Vec<Row> = Vec::new();
    for (i, row) in std::mem::take(&mut b.rows).into_iter().enumerate() {
        if row.search.is_finished() {
            done.push(row);
        } else {
            keep.push((i, row));
        }
    }
    for row in done {
        let Some(live) = b.live.get_mut(&row.job) else { continue };
        live.streams[row.seq].end(row.search.new_tokens(), row.seq, &live.q.job, &shared.prompter);
        live.pending -= 1;
        if live.pending == 0 {
            let live = b.live.remove(&row.job).expect("present");
            let elapsed = live.q.enqueued.elapsed().as_secs_f64();
            shared.metrics.request_latency.observe(elapsed);
            let prompt_tokens = shared.prompter.num_query_tokens + live.q.job.text_ids.len();
            let _ = live.q.job.events.send(Event::Done { prompt_tokens });
        }
    }
    let kept: Vec<usize> = keep.iter().map(|(i, _)| *i).collect();
    b.rows = keep.into_iter().map(|(_, r)| r).collect();
    if b.rows.is_empty() {
        b.state = None;
        return;
    }
    let state = b.state.as_mut().expect("rows have a state");
    let result = state.select_rows(&kept).and_then(|_| state.compact());
    if let Err(e) = result {
        let rows = std::mem::take(&mut b.rows);
        b.state = None;
        fail_rows(b, &rows, &e);
    }
}
