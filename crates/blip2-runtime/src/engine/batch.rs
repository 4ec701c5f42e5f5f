//! The scheduler: running batches of rows, each request's search over its rows, and the
//! admit / step / retire cycle.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use ndarray::{ArrayD, Axis, Slice};

use super::encode::encode_batch;
use super::text::{Settings, Stream};
use super::{EngineMetrics, Event, Queued};
use crate::embed_cache::EmbedCache;
use crate::error::panic_message;
use crate::error::RuntimeError;
use crate::generation::{
    self, BeamSearch, BeamStep, GenerationConfig, RowSearch, StepOutput, Want,
};
use crate::model::Blip2Model;
use crate::prompt::Prompter;
use crate::state::{self, DecoderState, Joined};

/// Rows a request takes in a batch: its beams, its samples, or one.
pub fn row_count(cfg: &GenerationConfig) -> usize {
    if cfg.num_beams > 1 {
        cfg.num_beams
    } else if cfg.do_sample {
        cfg.num_return_sequences
    } else {
        1
    }
}

/// The rows a server's batch of fixed buffers is made for when it holds `rows`: the
/// smallest power of two that holds them, at most `max_batch` (few distinct widths, so
/// few captured graphs and pooled buffer sets).
pub fn slot_width(rows: usize, max_batch: usize) -> usize {
    rows.max(1).next_power_of_two().min(max_batch.max(rows))
}

/// The one answer a step gives rows that want `wants`: what they all want, else the
/// logits (which every search can pick from); `None` for no rows.
fn common_want(wants: impl Iterator<Item = Want>) -> Option<Want> {
    wants.reduce(|have, w| if have == w { have } else { Want::Logits })
}

/// Running batches and the searches of their requests. Driven by one thread, which owns
/// the model it is handed at each call.
pub struct Scheduler {
    batches: Vec<RunBatch>,
    max_batch: usize,
    /// Whether batches make room for newcomers ([`Scheduler::with_room`]).
    room: bool,
    metrics: Arc<dyn EngineMetrics>,
}

/// A decoder state and the requests whose rows it holds, in row order.
struct RunBatch {
    state: Box<dyn DecoderState>,
    groups: Vec<Group>,
}

/// A request in a batch: its search and its sequences' streams.
struct Group {
    job: Queued,
    streams: Vec<Stream>,
    first_token: bool,
    search: Search,
    /// Rows of the batch this request holds now.
    held: usize,
}

enum Search {
    /// Greedy search or sampling: one row per sequence still going (its index among the
    /// request's sequences, its search, its row among the request's rows).
    Rows(Vec<(usize, RowSearch, usize)>),
    /// Beam search, and the step it asked for last.
    Beams(Box<BeamSearch>, Option<BeamStep>),
}

impl Search {
    /// The search a request's settings ask for, its prompt as alone (`prompt`), its
    /// sampling streams from `first_stream`.
    fn new(
        cfg: &GenerationConfig,
        first_stream: u64,
        prompt: Vec<i64>,
        vocab: usize,
    ) -> Result<Self, String> {
        let seed = cfg.seed.unwrap_or_else(generation::fresh_seed);
        if cfg.num_beams > 1 {
            let b = BeamSearch::new(prompt, vocab, cfg, seed, first_stream)
                .map_err(|e| e.to_string())?;
            return Ok(Search::Beams(Box::new(b), None));
        }
        (0..row_count(cfg))
            .map(|seq| {
                RowSearch::new(prompt.clone(), cfg, seed, first_stream + seq as u64)
                    .map(|s| s.with_vocab(vocab))
                    // Every sequence reads the prompt's one prefill row.
                    .map(|s| (seq, s, 0))
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Search::Rows)
    }
}

/// Why a request's search cannot go on (its own fault, not the model's).
struct SearchFault(String);

impl Scheduler {
    pub fn new(max_batch: usize, metrics: Arc<dyn EngineMetrics>) -> Self {
        Scheduler { batches: Vec::new(), max_batch: max_batch.max(1), room: false, metrics }
    }

    /// Whether no request is generating.
    pub fn is_idle(&self) -> bool {
        self.batches.is_empty()
    }

    /// Rows generating, over every batch.
    pub fn rows(&self) -> usize {
        self.batches.iter().map(|b| b.state.rows()).sum()
    }

    /// Batches make room for newcomers ([`DecoderState::make_room`]; a server, while
    /// `infer` keeps its batches as wide as their rows): a batch of fixed buffers starts
    /// [`slot_width`] rows wide, the power of two that holds its rows, and moves into
    /// buffers twice as wide, and so on up to `max_batch`, when newcomers find no free
    /// rows. A lone request's steps then run one row, not `max_batch` (on a GPU a step of
    /// 32 rows costs about 3.5 times a step of one), and each width's steps keep one
    /// captured CUDA graph.
    pub fn with_room(mut self) -> Self {
        self.room = true;
        self
    }

    /// The rows of each running batch's buffers (tests: batches grow as rows join).
    pub fn widths(&self) -> Vec<usize> {
        self.batches.iter().map(|b| b.state.slots()).collect()
    }

    /// Running batches (tests: newcomers joined the running one, or stepped beside it).
    pub fn batches(&self) -> usize {
        self.batches.len()
    }

    /// Takes from `waiting`, oldest first, the requests that fit beside the rows already
    /// generating (`max_batch`); a request wider than that goes alone.
    pub fn take_fitting(&self, waiting: &mut VecDeque<Queued>) -> Vec<Queued> {
        let mut rows = self.rows();
        let mut out = Vec::new();
        while let Some(q) = waiting.front() {
            let r = row_count(&q.req.cfg);
            if rows > 0 && rows + r > self.max_batch {
                break;
            }
            rows += r;
            out.push(waiting.pop_front().expect("front exists"));
        }
        out
    }

    /// Admits `jobs`: their images (through `embeds` and the model's encoders, as one
    /// batch, on this thread; should that fail, each image alone, so a bad image fails
    /// only its request) and one prefill of their prompts, their first tokens; then their
    /// rows join a running batch that takes rows in, or run as a batch of their own. A
    /// failure fails these requests only.
    pub fn admit(
        &mut self,
        model: &mut Blip2Model,
        embeds: &mut EmbedCache,
        prompter: &Prompter,
        jobs: Vec<Queued>,
    ) {
        self.take_in(model, Some(embeds), prompter, jobs);
    }

    /// [`Scheduler::admit`] for requests whose query embeddings the image stage made.
    pub(super) fn admit_encoded(
        &mut self,
        model: &mut Blip2Model,
        prompter: &Prompter,
        jobs: Vec<Queued>,
    ) {
        self.take_in(model, None, prompter, jobs);
    }

    /// [`Scheduler::admit`], encoding the images first when `embeds` is given; reports the
    /// admission's rows and time to the metrics.
    fn take_in(
        &mut self,
        model: &mut Blip2Model,
        embeds: Option<&mut EmbedCache>,
        prompter: &Prompter,
        mut jobs: Vec<Queued>,
    ) {
        if jobs.is_empty() {
            return;
        }
        let t = Instant::now();
        let rows: usize = jobs.iter().map(|q| row_count(&q.req.cfg)).sum();
        if let Some(embeds) = embeds {
            // A request whose image fails is answered (and leaves the queue) there.
            encode_batch(model, embeds, &mut jobs, &*self.metrics);
        }
        if !jobs.is_empty() {
            self.metrics.left_queue(jobs.len());
            self.start(model, prompter, jobs);
        }
        self.metrics.admitted(rows, t.elapsed());
    }

    /// The prefill of `jobs` (each with its query embeddings) and their first tokens; then
    /// their rows join a running batch, or run as a batch of their own.
    fn start(&mut self, model: &mut Blip2Model, prompter: &Prompter, jobs: Vec<Queued>) {
        let Some(mut fresh) = self.prefill(model, prompter, jobs) else { return };
        if fresh.groups.is_empty() {
            fresh.state.release(model);
            return;
        }
        // The first running batch that takes the rows in; else a batch of their own.
        let mut state = fresh.state;
        let newcomers = state.rows();
        for i in 0..self.batches.len() {
            if !self.batches[i].state.joins() {
                continue;
            }
            let running = &mut self.batches[i];
            let rows = running.state.rows() + newcomers;
            if self.room && rows <= self.max_batch && running.state.accepts(model, &*state) {
                // Wider buffers when the newcomers do not fit. Should that fail (memory),
                // the batch is as it was, and the newcomers go on to the next one or alone.
                if running.state.make_room(model, slot_width(rows, self.max_batch)).is_err() {
                    continue;
                }
            }
            match running.state.join(model, state) {
                Ok(()) => {
                    running.groups.append(&mut fresh.groups);
                    self.metrics.joined(newcomers);
                    self.metrics.batch_rows(running.state.rows());
                    return;
                }
                Err(Joined::Refused(back)) => state = back,
                Err(Joined::Failed(e)) => {
                    // Both states' rows are lost: fail the requests of both.
                    let mut running = self.batches.remove(i);
                    running.state.release(model);
                    running.groups.append(&mut fresh.groups);
                    fail_groups(running.groups, e);
                    return;
                }
            }
        }
        let mut batch = RunBatch { state, groups: fresh.groups };
        if self.room {
            let width = slot_width(batch.state.rows(), self.max_batch);
            if let Err(e) = batch.state.make_room(model, width) {
                batch.state.release(model);
                fail_groups(batch.groups, e);
                return;
            }
        }
        let rows = batch.state.rows();
        self.batches.push(batch);
        self.metrics.batch_rows(rows);
    }

    /// The newcomers' prefill, their first picks, and their rows selected: a batch of
    /// their own (their groups that have not ended already).
    fn prefill(
        &mut self,
        model: &mut Blip2Model,
        prompter: &Prompter,
        mut jobs: Vec<Queued>,
    ) -> Option<RunBatch> {
        // Taken out of the requests: the prefill's state keeps what it needs of them.
        let embeds: Option<Vec<ArrayD<f32>>> =
            jobs.iter_mut().map(|q| q.image_embeds.take()).collect();
        let prefilled = (|| -> Result<state::Prefilled, RuntimeError> {
            let embeds = embeds.ok_or_else(|| {
                RuntimeError::Fault(
                    "a request reached the prefill without its image's embeddings".into(),
                )
            })?;
            let views: Vec<_> = embeds.iter().map(|e| e.view().insert_axis(Axis(0))).collect();
            let image_embeds = ndarray::concatenate(Axis(0), &views)
                .map_err(|e| RuntimeError::Input(format!("joining image embeddings: {e}")))?;
            let texts: Vec<Vec<i64>> = jobs.iter().map(|q| q.req.text_ids.clone()).collect();
            let batch = prompter.assemble(&texts);
            let most_new = jobs.iter().map(|q| q.req.cfg.max_new_tokens).max().unwrap_or(1);
            // Buffers as long as a running batch's that takes rows in, so they can join it.
            let running =
                self.batches.iter().filter(|b| b.state.joins()).find_map(|b| b.state.capacity());
            state::prefill_beside(model, &batch, image_embeds, most_new, running)
        })();
        let p = match prefilled {
            Ok(p) => p,
            Err(e) => {
                fail_jobs(&jobs, e);
                return None;
            }
        };
        let vocab = p.logits.ncols();
        let mut groups = Vec::with_capacity(jobs.len());
        for (j, job) in jobs.into_iter().enumerate() {
            // The row's prompt as it is alone: without the padding.
            let prompt = p.prompts[j].ids[p.prompts[j].padding..].to_vec();
            match Search::new(&job.req.cfg, job.req.first_stream, prompt, vocab) {
                Ok(search) => groups.push(Group::new(job, search)),
                Err(e) => {
                    job.req.sink.send(Event::Failed(Arc::new(RuntimeError::Search(e))));
                    // Its prefill row stays until the selection below drops it.
                    groups.push(Group::failed(job));
                }
            }
        }
        let mut batch = RunBatch { state: p.state, groups };
        let out = StepOutput::Logits(p.logits);
        match batch.consume(model, prompter, &*self.metrics, &out) {
            Ok(()) => Some(batch),
            Err(e) => {
                fail_groups(batch.groups, e);
                None
            }
        }
    }

    /// Fails every request of the running batches with `e` and drops the batches (the
    /// engine thread is stopping on a fault).
    pub(super) fn fail_all(&mut self, e: RuntimeError) {
        let groups: Vec<Group> = self.batches.drain(..).flat_map(|b| b.groups).collect();
        if !groups.is_empty() {
            fail_groups(groups, e);
        }
    }

    /// One decode step of every running batch, each followed by its picks and the rows
    /// that leave. A batch whose model run fails fails its requests and is dropped.
    pub fn step(&mut self, model: &mut Blip2Model, prompter: &Prompter) {
        let mut i = 0;
        while i < self.batches.len() {
            let b = &mut self.batches[i];
            let (t, rows) = (Instant::now(), b.state.rows());
            let result =
                b.step(model).and_then(|out| b.consume(model, prompter, &*self.metrics, &out));
            self.metrics.stepped(rows, t.elapsed());
            match result {
                Ok(()) if !b.groups.is_empty() => i += 1,
                Ok(()) => {
                    let mut b = self.batches.remove(i);
                    b.state.release(model);
                }
                Err(e) => {
                    let mut b = self.batches.remove(i);
                    b.state.release(model);
                    fail_groups(b.groups, e);
                }
            }
        }
    }

    /// Runs `jobs` to their end on this thread, admitted together (a whole `infer batch`).
    pub fn run_to_end(
        &mut self,
        model: &mut Blip2Model,
        embeds: &mut EmbedCache,
        prompter: &Prompter,
        jobs: Vec<Queued>,
    ) {
        self.admit(model, embeds, prompter, jobs);
        while !self.is_idle() {
            self.step(model, prompter);
        }
    }
}

impl RunBatch {
    /// Runs the decode step the groups asked for: their tokens in row order, and what
    /// they want of the logits (all of them unless every group wants the same).
    fn step(&mut self, model: &mut Blip2Model) -> Result<StepOutput, RuntimeError> {
        let mut tokens = Vec::with_capacity(self.state.rows());
        let want =
            common_want(self.groups.iter().map(|g| g.next(&mut tokens))).unwrap_or(Want::Logits);
        let out = self.state.step_for(model, &tokens, want)?;
        if matches!(out, StepOutput::TopLogits { .. }) {
            // Sampling candidates that cannot tell (a tie at their edge): every row takes
            // the step's full logits, which stayed where the decoder ran.
            let mut offset = 0;
            let mut settled = true;
            for g in &self.groups {
                settled &= g.settles(&out, offset);
                offset += g.held;
            }
            if !settled {
                let full = self.state.last_logits(model).ok_or_else(|| {
                    RuntimeError::Unsupported(
                        "the decoder answered sampling candidates but cannot give the full logits"
                            .into(),
                    )
                })??;
                return Ok(StepOutput::Logits(full));
            }
        }
        Ok(out)
    }

    /// Every group picks from its rows of `out`; groups that have ended get their
    /// results and leave; the state keeps the rows still going.
    fn consume(
        &mut self,
        model: &mut Blip2Model,
        prompter: &Prompter,
        metrics: &dyn EngineMetrics,
        out: &StepOutput,
    ) -> Result<(), RuntimeError> {
        let mut offset = 0;
        let mut keep = Vec::with_capacity(self.state.rows());
        for g in &mut self.groups {
            let held = g.held;
            let picked =
                catch_unwind(AssertUnwindSafe(|| g.consume(out, offset, prompter, metrics)));
            match picked {
                Ok(Ok(rows)) => keep.extend(rows.into_iter().map(|r| offset + r)),
                Ok(Err(SearchFault(e))) => g.fail(&e),
                Err(panic) => g.fail(&format!("the search failed: {}", panic_message(&panic))),
            }
            offset += held;
        }
        let mut i = 0;
        while i < self.groups.len() {
            if self.groups[i].is_over() {
                self.groups.remove(i).finish(prompter, metrics);
            } else {
                i += 1;
            }
        }
        if self.groups.is_empty() {
            return Ok(());
        }
        if keep.len() != self.state.rows() || keep.iter().enumerate().any(|(i, &r)| i != r) {
            self.state.select_rows(model, &keep)?;
        }
        Ok(())
    }
}

impl Group {
    fn new(job: Queued, search: Search) -> Self {
        let k = job.req.cfg.num_return_sequences;
        Group {
            job,
            streams: (0..k).map(|_| Stream::new()).collect(),
            first_token: false,
            search,
            held: 1,
        }
    }

    /// A request that failed before its search began, holding its prefill row.
    fn failed(job: Queued) -> Self {
        Group {
            job,
            streams: Vec::new(),
            first_token: true,
            search: Search::Rows(Vec::new()),
            held: 1,
        }
    }

    /// Whether every row of this group (they start at `offset`) can pick from `out`.
    fn settles(&self, out: &StepOutput, offset: usize) -> bool {
        match &self.search {
            Search::Rows(rows) => rows.iter().all(|(_, s, row)| s.settles(out, offset + row)),
            Search::Beams(..) => true,
        }
    }

    /// Appends the tokens of this group's rows for the next step; returns what it wants.
    fn next(&self, tokens: &mut Vec<i64>) -> Want {
        match &self.search {
            Search::Rows(rows) => common_want(rows.iter().map(|(_, s, _)| {
                tokens.push(s.last().expect("a row in a batch has picked"));
                s.want()
            }))
            .unwrap_or(Want::Argmax),
            Search::Beams(_, next) => {
                let next = next.as_ref().expect("a running beam search asked for a step");
                tokens.extend_from_slice(&next.tokens);
                next.want
            }
        }
    }

    /// Picks from this group's rows of `out` (they start at `offset`), tells the request,
    /// and returns the rows it keeps (within its own, in their new order).
    fn consume(
        &mut self,
        out: &StepOutput,
        offset: usize,
        prompter: &Prompter,
        metrics: &dyn EngineMetrics,
    ) -> Result<Vec<usize>, SearchFault> {
        let settings = Settings {
            stop: &self.job.req.stop,
            max_new_tokens: self.job.req.cfg.max_new_tokens,
            sink: &*self.job.req.sink,
            prompter,
        };
        if !self.first_token {
            self.first_token = true;
            metrics.first_token(self.job.enqueued.elapsed());
        }
        match &mut self.search {
            Search::Rows(rows) => {
                for (seq, s, row) in rows.iter_mut() {
                    let token = s.pick_from(out, offset + *row).ok_or_else(|| {
                        SearchFault("the model's step answered neither logits nor tokens".into())
                    })?;
                    if s.ended_on_eos() {
                        continue;
                    }
                    metrics.token();
                    if !self.streams[*seq].push(token, *seq, &settings) {
                        s.finish();
                    }
                }
                let mut kept = Vec::with_capacity(rows.len());
                for (seq, s, row) in std::mem::take(rows) {
                    if s.is_finished() {
                        self.streams[seq].end(s.new_tokens(), seq, &settings);
                    } else {
                        kept.push(row);
                        rows.push((seq, s, kept.len() - 1));
                    }
                }
                self.held = kept.len();
                Ok(kept)
            }
            Search::Beams(search, next) => {
                let mine = slice_rows(out, offset, self.held)?;
                // Beam search streams nothing until it ends: it stops when its client is gone.
                if self.job.req.sink.is_closed() {
                    search.finish();
                }
                *next = search.advance(&mine);
                match next {
                    Some(step) => {
                        self.held = step.rows.len();
                        Ok(step.rows.clone())
                    }
                    None => {
                        for (i, ids) in search.results().into_iter().enumerate() {
                            self.streams[i].end(ids, i, &settings);
                        }
                        self.held = 0;
                        Ok(Vec::new())
                    }
                }
            }
        }
    }

    fn is_over(&self) -> bool {
        match &self.search {
            Search::Rows(rows) => rows.is_empty(),
            Search::Beams(b, _) => b.is_finished(),
        }
    }

    /// Fails the request: it holds no rows from now on.
    fn fail(&mut self, why: &str) {
        tracing::error!("a request failed: {why}");
        self.job.req.sink.send(Event::Failed(Arc::new(RuntimeError::Search(why.to_string()))));
        self.streams.clear();
        self.search = Search::Rows(Vec::new());
        self.held = 0;
    }

    /// A request whose sequences have all ended: `Done`, unless it failed.
    fn finish(self, prompter: &Prompter, metrics: &dyn EngineMetrics) {
        if self.streams.is_empty() {
            return;
        }
        metrics.finished(self.job.enqueued.elapsed());
        let prompt_tokens = prompter.num_query_tokens + self.job.req.text_ids.len();
        // Its place in the queue is free before its client hears it is done, so that the
        // client's next request finds it free.
        let mut job = self.job;
        job.release_place();
        job.req.sink.send(Event::Done { prompt_tokens });
    }
}

/// Fails every request of `jobs` with `e` (their encoder run or their prefill).
fn fail_jobs(jobs: &[Queued], e: RuntimeError) {
    tracing::error!("the prefill of {} request(s) failed: {e}", jobs.len());
    let e = Arc::new(e);
    for q in jobs {
        q.req.sink.send(Event::Failed(e.clone()));
    }
}

/// Fails every request of `groups` with `e` (a model run they shared).
fn fail_groups(groups: Vec<Group>, e: RuntimeError) {
    tracing::error!("generation failed for {} request(s): {e}", groups.len());
    let e = Arc::new(e);
    for g in groups {
        // A request that failed on its own has heard already.
        if !g.streams.is_empty() {
            g.job.req.sink.send(Event::Failed(e.clone()));
        }
    }
}

/// Rows `offset..offset + n` of a step's answer.
fn slice_rows(out: &StepOutput, offset: usize, n: usize) -> Result<StepOutput, SearchFault> {
    let s = Slice::from(offset..offset + n);
    let fits = |rows: usize| {
        if offset + n <= rows {
            Ok(())
        } else {
            Err(SearchFault(format!("the step answered {rows} rows, not {}", offset + n)))
        }
    };
    Ok(match out {
        StepOutput::Logits(l) => {
            fits(l.nrows())?;
            StepOutput::Logits(l.slice_axis(Axis(0), s).to_owned())
        }
        StepOutput::Argmax(t) => {
            fits(t.len())?;
            StepOutput::Argmax(t[offset..offset + n].to_vec())
        }
        StepOutput::TopLogProbs { logprobs, ids } => {
            fits(logprobs.nrows())?;
            StepOutput::TopLogProbs {
                logprobs: logprobs.slice_axis(Axis(0), s).to_owned(),
                ids: ids.slice_axis(Axis(0), s).to_owned(),
            }
        }
        StepOutput::TopLogits { logits, ids } => {
            fits(logits.nrows())?;
            StepOutput::TopLogits {
                logits: logits.slice_axis(Axis(0), s).to_owned(),
                ids: ids.slice_axis(Axis(0), s).to_owned(),
            }
        }
    })
}
