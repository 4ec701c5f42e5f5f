//! OPT on a CUDA-target graph (`blip2-ort export --target cuda`): GroupQueryAttention
//! over per-layer KV buffers of a fixed length (the longest prompt plus the new tokens)
//! that are bound as both past and present and written in place, so nothing is copied
//! or reallocated between steps. Rows are right-padded: each row's prompt starts at
//! position 0 and its length is passed as `seqlens_k`, so every row gets exactly the
//! positions and keys it has under transformers' left padding. The graph also picks
//! tokens on the device: a step returns the logits, the argmax or the top-k
//! log-probabilities, whichever the search asks for.
//!
//! Rows live in the buffers' rows, "slots": row `i` of the state is slot `slot_of[i]`.
//! A decode step runs every slot (a free one with a pad token at position 0, its output
//! ignored), so the step's shapes stay the same while rows come and go: a row that ends
//! frees its slot and nothing moves; a newcomer's rows are copied into free slots (the
//! export's `kv_reorder` graph writing into views of the running buffers); a beam that
//! continues twice is copied into a free slot. Only the rows that move are copied, on
//! the device, and the buffers keep their addresses (one captured CUDA graph for the
//! running batch whatever its rows). A batch only grows into new buffers when it needs
//! more slots than it has (beams expanding the rows of `infer`'s batch, or a server's
//! batch made wider for newcomers that find no free slot: the engine starts a server's
//! batch as wide as the power of two that holds its rows and doubles it as needed, up
//! to `--max-batch`; [`DecoderState::make_room`], [`crate::engine::slot_width`]).
//!
//! When the model uses fixed step buffers ([`crate::model::Blip2Model::use_fixed_step_buffers`],
//! for CUDA graphs), the buffers come from the model's pool and every decode step binds
//! the same tensors; see [`crate::state::fixed`].

use blip2_core::io;
use ndarray::{Array1, Array2, ArrayD, Axis};
use ort::memory::Allocator;
use ort::value::{DynValue, Tensor};

use crate::error::{ort_err, RuntimeError};
use crate::generation::{StepOutput, Want};
use crate::kv_cache::KvCache;
use crate::model::{lm_value, Blip2Model};
use crate::prompt::Batch;
use crate::state::fixed::{pooled_capacity, StepBuffers, StepShape};
use crate::state::opt::{kv_spec, no_image_embeds};
use crate::state::{run_selecting, DecoderState, Joined};

/// Where a request's buffers come from.
enum Buffers {
    /// Allocated for the request; each step binds what it has.
    Own { cache: KvCache },
    /// Taken from the model's pool: every decode step binds the same tensors.
    Fixed(Box<StepBuffers>),
    /// Given back to the pool: the state has finished.
    Released,
}

pub struct OptStaticState {
    buffers: Buffers,
    /// The buffers' rows.
    slots: usize,
    /// Row `i` lives in slot `slot_of[i]`; the other slots are free.
    slot_of: Vec<usize>,
    /// Tokens each row holds in the cache.
    lens: Vec<usize>,
    /// What a free slot is fed in a decode step.
    pad: i64,
    capacity: usize,
    allocator: Allocator,
    /// The last step's logits where the decoder left them, when only part came back.
    last_logits: Option<DynValue>,
    /// Fixed buffers: the graph id of the last decode step, once one ran.
    last_graph_id: Option<i32>,
}

impl OptStaticState {
    /// Lays the left-padded `batch` out right-padded, allocates buffers for its longest
    /// row plus `max_new_tokens`, runs the prompt and returns the state with the logits
    /// of each row's last prompt token, `[rows, vocab]`.
    pub fn prefill(
        m: &mut Blip2Model,
        batch: &Batch,
        image_embeds: ArrayD<f32>,
        max_new_tokens: usize,
    ) -> Result<(Self, Array2<f32>), RuntimeError> {
        Self::prefill_within(m, batch, image_embeds, max_new_tokens, None)
    }

    /// [`OptStaticState::prefill`] with buffers of `capacity` positions when the rows fit
    /// in that many (newcomers to a running batch of that capacity, so that they can
    /// join it); otherwise as long as they need.
    pub fn prefill_within(
        m: &mut Blip2Model,
        batch: &Batch,
        image_embeds: ArrayD<f32>,
        max_new_tokens: usize,
        capacity: Option<usize>,
    ) -> Result<(Self, Array2<f32>), RuntimeError> {
        let rows = batch.ids.len();
        let real = batch.unpadded();
        let lens: Vec<usize> = real.iter().map(Vec::len).collect();
        let longest = lens.iter().copied().max().unwrap_or(0);
        if lens.contains(&0) {
            return Err(RuntimeError::Input("a prompt row has no tokens".into()));
        }
        let pad = m.manifest.tokens.pad_token_id.unwrap_or(0);
        let ids =
            Array2::from_shape_fn((rows, longest), |(r, j)| real[r].get(j).copied().unwrap_or(pad));
        // Padding positions are never attended to; any valid position will do.
        let pos =
            Array2::from_shape_fn((rows, longest), |(r, j)| if j < lens[r] { j as i64 } else { 0 });
        let allocator = m.cache_allocator()?;
        let shape = step_shape(m);
        let need = longest + max_new_tokens;
        // Lengths rounded up (to 64 positions), so that newcomers with somewhat longer
        // prompts or limits still fit a running batch's buffers and can join it.
        let capacity = capacity.filter(|&c| c >= need).unwrap_or_else(|| pooled_capacity(need));
        let buffers = match m.step_pool.as_mut() {
            Some(pool) => Buffers::Fixed(Box::new(pool.take(shape, rows, capacity, &allocator)?)),
            None => {
                Buffers::Own { cache: KvCache::allocate(shape.kv, rows, capacity, &allocator)? }
            }
        };
        let embeds = lm_value(m, image_embeds)?;
        let mut st = Self {
            buffers,
            slots: rows,
            slot_of: (0..rows).collect(),
            lens: lens.clone(),
            pad,
            capacity,
            allocator,
            last_logits: None,
            last_graph_id: None,
        };
        let seqlens: Vec<i32> = lens.iter().map(|&n| n as i32 - 1).collect();
        let out = st.run(m, ids, pos, embeds, &seqlens, longest as i32, Want::Logits)?;
        match out {
            StepOutput::Logits(l) => Ok((st, l)),
            _ => unreachable!("asked for logits"),
        }
    }

    /// Runs the graph; `seqlens` are each row's length after this call minus one.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        m: &mut Blip2Model,
        ids: Array2<i64>,
        pos: Array2<i64>,
        image_embeds: DynValue,
        seqlens: &[i32],
        total: i32,
        want: Want,
    ) -> Result<StepOutput, RuntimeError> {
        let inputs = [
            (io::INPUT_IDS, Tensor::from_array(ids).map_err(ort_err("input_ids"))?.into_dyn()),
            (io::IMAGE_EMBEDS, image_embeds),
            (
                io::POSITION_IDS,
                Tensor::from_array(pos).map_err(ort_err("position_ids"))?.into_dyn(),
            ),
            (
                io::SEQLENS_K,
                Tensor::from_array(Array1::from(seqlens.to_vec()))
                    .map_err(ort_err("seqlens_k"))?
                    .into_dyn(),
            ),
            (
                io::TOTAL_SEQUENCE_LENGTH,
                Tensor::from_array(ndarray::arr0(total))
                    .map_err(ort_err("total_sequence_length"))?
                    .into_dyn(),
            ),
        ];
        let refs: Vec<(&str, &DynValue)> = inputs.iter().map(|(n, v)| (*n, v)).collect();
        let cache = match &mut self.buffers {
            Buffers::Own { cache, .. } => cache,
            Buffers::Fixed(b) => b.kv_mut(),
            Buffers::Released => return Err(released()),
        };
        m.note_lm_run();
        let (answer, logits) = run_selecting(
            &mut m.lm,
            &m.kv_memory,
            &refs,
            cache,
            want,
            m.signature.top_logits,
            "language model",
        )?;
        self.last_logits = logits;
        Ok(answer)
    }

    /// A decode step on the fixed buffers: inputs written into them, the step run under
    /// its graph id, `want` read from the output buffers.
    fn run_fixed(
        &mut self,
        m: &mut Blip2Model,
        tokens: &[i64],
        lens: &[usize],
        want: Want,
    ) -> Result<StepOutput, RuntimeError> {
        let Buffers::Fixed(b) = &mut self.buffers else { unreachable!("fixed buffers") };
        let (want, k) = crate::state::answerable(want, b.shape().top_logits);
        m.note_lm_run();
        b.write_step(tokens, lens)?;
        self.last_graph_id = Some(b.run(&mut m.lm, k, &self.allocator)?);
        b.answer(want)
    }

    #[cfg(any(test, feature = "test-support"))]
    /// Each row's length in the cache (tests).
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    #[cfg(any(test, feature = "test-support"))]
    /// Fixed buffers only: the set's number, the graph id of the last decode step (none
    /// before the first) and where its bound tensors lie (tests: a set keeps its
    /// addresses, and requests of one shape share sets and graphs).
    pub fn fixed_buffers(&self) -> Option<(u64, Option<i32>, Vec<usize>)> {
        match &self.buffers {
            Buffers::Fixed(b) => Some((b.id(), self.last_graph_id, b.addresses())),
            _ => None,
        }
    }

    #[cfg(any(test, feature = "test-support"))]
    /// Fixed buffers only: the host-device copies their set has made, and its steps.
    pub fn fixed_transfers(&self) -> Option<crate::state::fixed::Transfers> {
        match &self.buffers {
            Buffers::Fixed(b) => Some(b.transfers()),
            _ => None,
        }
    }
}

/// The decode step's shapes for the fixed buffers.
fn step_shape(m: &crate::model::Blip2Model) -> StepShape {
    StepShape {
        kv: kv_spec(m),
        hidden: m.manifest.text.hidden_size,
        vocab: m.manifest.text.vocab_size,
        top_logits: m.signature.top_logits,
    }
}

impl OptStaticState {
    /// The step's answer for the rows, from the answer for every slot.
    fn rows_of(&self, out: StepOutput) -> StepOutput {
        if self.slot_of.len() == self.slots && self.slot_of.iter().enumerate().all(|(i, &s)| i == s)
        {
            return out;
        }
        let pick = &self.slot_of;
        match out {
            StepOutput::Logits(l) => StepOutput::Logits(l.select(Axis(0), pick)),
            StepOutput::Argmax(a) => StepOutput::Argmax(pick.iter().map(|&s| a[s]).collect()),
            StepOutput::TopLogProbs { logprobs, ids } => StepOutput::TopLogProbs {
                logprobs: logprobs.select(Axis(0), pick),
                ids: ids.select(Axis(0), pick),
            },
            StepOutput::TopLogits { logits, ids } => StepOutput::TopLogits {
                logits: logits.select(Axis(0), pick),
                ids: ids.select(Axis(0), pick),
            },
        }
    }

    fn free_slots(&self) -> Vec<usize> {
        let mut used = vec![false; self.slots];
        for &s in &self.slot_of {
            used[s] = true;
        }
        (0..self.slots).filter(|&s| !used[s]).collect()
    }

    /// New buffers of `slots` slots, slot `i` holding the old slot `from[i]`, on the
    /// device; the state's rows become `rows` (new row i = old row `rows[i]`) in slots
    /// `0..rows.len()`.
    fn regather(
        &mut self,
        m: &mut Blip2Model,
        from: &[usize],
        slots: usize,
        rows: &[usize],
    ) -> Result<(), RuntimeError> {
        m.note_lm_run();
        let spec = kv_spec(m);
        let reorder = m.kv_reorder.as_mut().ok_or_else(no_reorder)?;
        match &mut self.buffers {
            Buffers::Own { cache } => {
                let next = KvCache::allocate(spec, slots, self.capacity, &self.allocator)?;
                cache.copy_rows_into(reorder, from, &next, 0)?;
                *cache = next;
            }
            Buffers::Fixed(b) => {
                let pool = m.step_pool.as_mut().expect("fixed buffers come from the pool");
                let next = pool.take(b.shape(), slots, self.capacity, &self.allocator)?;
                b.kv().copy_rows_into(reorder, from, next.kv(), 0)?;
                pool.put(std::mem::replace(&mut **b, next));
                pool.release_captured(&mut m.lm);
            }
            Buffers::Released => return Err(released()),
        }
        self.lens = rows.iter().map(|&r| self.lens[r]).collect();
        self.slots = slots;
        self.slot_of = (0..rows.len()).collect();
        // The last step's outputs belong to the old buffers.
        self.last_logits = None;
        self.last_graph_id = None;
        Ok(())
    }

    /// [`DecoderState::join`] once checked: `other`'s rows into the `free` slots, each run
    /// of consecutive slots with one copy.
    fn take_in(
        &mut self,
        m: &mut Blip2Model,
        other: &mut OptStaticState,
        free: &[usize],
    ) -> Result<(), RuntimeError> {
        let n = other.lens.len();
        let to = &free[..n];
        m.note_lm_run();
        let reorder = m.kv_reorder.as_mut().expect("checked by join");
        let (mine, theirs) = match (&self.buffers, &other.buffers) {
            (Buffers::Own { cache, .. }, Buffers::Own { cache: theirs, .. }) => (cache, theirs),
            (Buffers::Fixed(b), Buffers::Fixed(t)) => (b.kv(), t.kv()),
            _ => unreachable!("checked by join"),
        };
        let mut i = 0;
        while i < n {
            let mut j = i + 1;
            while j < n && to[j] == to[j - 1] + 1 {
                j += 1;
            }
            theirs.copy_rows_into(reorder, &other.slot_of[i..j], mine, to[i])?;
            i = j;
        }
        self.slot_of.extend_from_slice(to);
        self.lens.append(&mut other.lens);
        other.slot_of.clear();
        other.release_buffers(m);
        // The last step's outputs do not cover the newcomers.
        self.last_logits = None;
        self.last_graph_id = None;
        Ok(())
    }

    /// Fixed buffers go back to the model's pool for the next request of their shape.
    fn release_buffers(&mut self, m: &mut Blip2Model) {
        if let Buffers::Fixed(b) = std::mem::replace(&mut self.buffers, Buffers::Released) {
            if let Some(pool) = m.step_pool.as_mut() {
                pool.put(*b);
                pool.release_captured(&mut m.lm);
            }
        }
    }
}

impl DecoderState for OptStaticState {
    fn rows(&self) -> usize {
        self.lens.len()
    }

    fn step_for(
        &mut self,
        m: &mut Blip2Model,
        tokens: &[i64],
        want: Want,
    ) -> Result<StepOutput, RuntimeError> {
        let rows = tokens.len();
        if rows != self.lens.len() {
            return Err(RuntimeError::Input(format!("{rows} tokens for {} rows", self.lens.len())));
        }
        if self.lens.iter().any(|&n| n >= self.capacity) {
            return Err(RuntimeError::Input(format!(
                "the KV buffers hold {} positions and a row is full",
                self.capacity
            )));
        }
        // Every slot steps: a free one holds nothing and is fed a pad token at position 0.
        let (mut slot_tokens, mut slot_lens) = (vec![self.pad; self.slots], vec![0; self.slots]);
        for (i, &s) in self.slot_of.iter().enumerate() {
            slot_tokens[s] = tokens[i];
            slot_lens[s] = self.lens[i];
        }
        let out = if matches!(self.buffers, Buffers::Fixed(_)) {
            self.run_fixed(m, &slot_tokens, &slot_lens, want)?
        } else {
            let slots = self.slots;
            let ids = Array2::from_shape_fn((slots, 1), |(s, _)| slot_tokens[s]);
            let pos = Array2::from_shape_fn((slots, 1), |(s, _)| slot_lens[s] as i64);
            let seqlens: Vec<i32> = slot_lens.iter().map(|&n| n as i32).collect();
            let total = self.lens.iter().copied().max().unwrap_or(0) as i32 + 1;
            let no_images = no_image_embeds(m, slots)?;
            self.run(m, ids, pos, no_images, &seqlens, total, want)?
        };
        for n in &mut self.lens {
            *n += 1;
        }
        Ok(self.rows_of(out))
    }

    fn last_logits(&mut self, _m: &mut Blip2Model) -> Option<Result<Array2<f32>, RuntimeError>> {
        let slots = match &mut self.buffers {
            Buffers::Fixed(b) => self.last_graph_id.map(|_| b.logits()),
            _ => self.last_logits.as_ref().map(crate::state::last_position),
        }?;
        Some(slots.map(|l| l.select(Axis(0), &self.slot_of)))
    }

    /// New row i is old row `rows[i]`. Rows keep their slots: a row dropped frees its
    /// slot, a row taken twice or more (a beam continued by several) is copied into free
    /// slots on the device by the export's `kv_reorder` graph. Only when the rows
    /// outnumber the slots does the batch move into new buffers with a slot each.
    fn select_rows(&mut self, m: &mut Blip2Model, rows: &[usize]) -> Result<(), RuntimeError> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.lens.len()) {
            return Err(RuntimeError::Input(format!(
                "row {bad} of a batch of {} rows",
                self.lens.len()
            )));
        }
        if matches!(self.buffers, Buffers::Released) {
            return Err(released());
        }
        if rows.len() > self.slots {
            let from: Vec<usize> = rows.iter().map(|&r| self.slot_of[r]).collect();
            return self.regather(m, &from, rows.len(), rows);
        }
        // The first row taken from each old row keeps its slot; the others get free ones.
        let mut taken = vec![false; self.slots];
        let mut slot_of = vec![usize::MAX; rows.len()];
        let mut first = vec![true; self.lens.len()];
        for (i, &r) in rows.iter().enumerate() {
            if std::mem::take(&mut first[r]) {
                slot_of[i] = self.slot_of[r];
                taken[self.slot_of[r]] = true;
            }
        }
        let mut free = (0..self.slots).filter(|&s| !taken[s]);
        let mut copies = Vec::new();
        for (i, &r) in rows.iter().enumerate() {
            if slot_of[i] == usize::MAX {
                let to = free.next().expect("no more rows than slots");
                copies.push((self.slot_of[r], to));
                slot_of[i] = to;
            }
        }
        if !copies.is_empty() {
            m.note_lm_run();
            let reorder = m.kv_reorder.as_mut().ok_or_else(no_reorder)?;
            let cache = match &self.buffers {
                Buffers::Own { cache, .. } => cache,
                Buffers::Fixed(b) => b.kv(),
                Buffers::Released => return Err(released()),
            };
            // Sources keep their slots and targets were free: no copy reads a row
            // another one writes.
            for (from, to) in copies {
                cache.copy_rows_into(reorder, &[from], cache, to)?;
            }
        }
        self.lens = rows.iter().map(|&r| self.lens[r]).collect();
        self.slot_of = slot_of;
        Ok(())
    }

    fn release(&mut self, m: &mut Blip2Model) {
        self.release_buffers(m);
    }

    /// Newcomers' rows join after these by taking free slots: their buffers' rows are
    /// copied there on the device by the export's `kv_reorder` graph (each row keeps its
    /// positions: rows are right-padded and carry their own lengths); no other row
    /// moves. Both states' buffers must be of one length and one kind (own or pooled),
    /// and enough slots free.
    fn join(&mut self, m: &mut Blip2Model, other: Box<dyn DecoderState>) -> Result<(), Joined> {
        let free = self.free_slots();
        if !self.accepts(m, &*other) || other.rows() > free.len() {
            return Err(Joined::Refused(other));
        }
        let mut other = other.into_any().downcast::<OptStaticState>().expect("checked above");
        self.take_in(m, &mut other, &free).map_err(Joined::Failed)
    }

    fn joins(&self) -> bool {
        !matches!(self.buffers, Buffers::Released)
    }

    /// Buffers of one length and one kind (own or pooled), and a `kv_reorder` to copy
    /// the rows with.
    fn accepts(&self, m: &Blip2Model, other: &dyn DecoderState) -> bool {
        other.as_any().downcast_ref::<OptStaticState>().is_some_and(|o| {
            self.joins()
                && o.capacity == self.capacity
                && m.kv_reorder.is_some()
                && matches!(
                    (&self.buffers, &o.buffers),
                    (Buffers::Own { .. }, Buffers::Own { .. })
                        | (Buffers::Fixed(_), Buffers::Fixed(_))
                )
        })
    }

    fn capacity(&self) -> Option<usize> {
        Some(self.capacity)
    }

    fn slots(&self) -> usize {
        self.slots
    }

    /// Moves the rows into buffers of `rows` slots when they have fewer, so newcomers
    /// find free slots.
    fn make_room(&mut self, m: &mut Blip2Model, rows: usize) -> Result<(), RuntimeError> {
        if rows <= self.slots {
            return Ok(());
        }
        let from = self.slot_of.clone();
        let keep: Vec<usize> = (0..self.lens.len()).collect();
        self.regather(m, &from, rows, &keep)
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

fn no_reorder() -> RuntimeError {
    RuntimeError::Unsupported(
        "this CUDA-target export has no kv_reorder graph; export it again".into(),
    )
}

fn released() -> RuntimeError {
    RuntimeError::Input("the state's KV buffers were given back to the pool".into())
}
