//! Decoder states: what a language model keeps between generation steps (its KV cache,
//! positions, masks or row lengths), behind the one interface the search drives,
//! [`StepModel`]. The pipeline and the benchmarks start one with [`prefill`] and never
//! look at the family or the kind of export:
//!
//! - [`opt::OptState`]: OPT on the portable graph, a growing cache and left padding,
//!   exactly transformers' layout;
//! - [`opt_static::OptStaticState`]: OPT on a CUDA-target graph, fixed-length KV buffers
//!   written in place, rows right-padded, token selection on the device; with
//!   [`fixed`] buffers for every step when its session captures CUDA graphs;
//! - [`t5::T5State`]: Flan-T5's decoder, the cross-attention cache computed once.

pub mod fixed;
pub mod opt;
pub mod opt_static;
pub mod packed;
pub mod t5;

use blip2_core::io;
use ndarray::{Array2, ArrayD, Axis};
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::{DynValue, Tensor};

use crate::error::{ort_err, RuntimeError};
use crate::generation::{Prompt, StepModel, StepOutput, Want};
use crate::kv_cache::KvCache;
use crate::model::Blip2Model;
use crate::prompt::Batch;

/// What a language model keeps between generation steps, for a batch of rows. It holds
/// no model: every call is given the one that made it (so a single engine thread owns
/// the model and any number of states, and nothing is locked).
pub trait DecoderState {
    /// Rows in the state.
    fn rows(&self) -> usize;

    /// Appends one token to every row (`tokens.len()` is the row count) and returns what
    /// `want` asks of the new position's logits (a state that cannot pick tokens where it
    /// runs returns the logits, which serve any want).
    fn step_for(
        &mut self,
        model: &mut Blip2Model,
        tokens: &[i64],
        want: Want,
    ) -> Result<StepOutput, RuntimeError>;

    /// Re-arranges the rows: new row `i` is old row `rows[i]`. Rows may repeat or be
    /// dropped (beams expanded or reordered, rows leaving a running batch).
    fn select_rows(&mut self, model: &mut Blip2Model, rows: &[usize]) -> Result<(), RuntimeError>;

    /// The full logits `[rows, vocab]` of the last step, when [`DecoderState::step_for`]
    /// returned only part of them (see [`StepModel::last_logits`]).
    fn last_logits(
        &mut self,
        _model: &mut Blip2Model,
    ) -> Option<Result<Array2<f32>, RuntimeError>> {
        None
    }

    /// Appends the rows of `other`, a state of the same kind prefilled since, after these:
    /// newcomers joining a running batch, each row keeping exactly what it would have
    /// alone. States that cannot take rows in refuse and hand `other` back.
    fn join(
        &mut self,
        _model: &mut Blip2Model,
        other: Box<dyn DecoderState>,
    ) -> Result<(), Joined> {
        Err(Joined::Refused(other))
    }

    /// Whether [`DecoderState::join`] takes rows in.
    fn joins(&self) -> bool {
        false
    }

    /// Whether [`DecoderState::join`] would take `other`'s rows given room for them
    /// ([`DecoderState::make_room`]), so that room is only made for rows that will come.
    fn accepts(&self, _model: &Blip2Model, _other: &dyn DecoderState) -> bool {
        self.joins()
    }

    /// Makes room for `rows` rows in all, so that newcomers can [`DecoderState::join`]
    /// without new buffers (a server's batch, as wide as [`crate::engine::slot_width`]
    /// says). States that grow as rows join have nothing to do.
    fn make_room(&mut self, _model: &mut Blip2Model, _rows: usize) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// The rows each step runs: [`DecoderState::rows`], or more for states whose
    /// buffers keep free rows for newcomers.
    fn slots(&self) -> usize {
        self.rows()
    }

    /// Positions each row's buffers hold, for states whose buffers are of a fixed
    /// length: rows join only buffers of their own length (see [`prefill_beside`]).
    fn capacity(&self) -> Option<usize> {
        None
    }

    /// Gives what the state borrowed from the model back to it (pooled step buffers); the
    /// state is finished afterwards.
    fn release(&mut self, _model: &mut Blip2Model) {}

    /// For [`DecoderState::join`]: the concrete state behind the box.
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any>;

    /// For [`DecoderState::join`]: the concrete state's type.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// Why [`DecoderState::join`] did not take the rows.
pub enum Joined {
    /// This kind of state takes no rows in (or not of that kind): here they are back.
    Refused(Box<dyn DecoderState>),
    /// Joining failed part way; both states' rows are lost.
    Failed(RuntimeError),
}

/// A state with its model: what the search ([`crate::generation::generate`]) drives.
pub struct Bound<'a> {
    pub model: &'a mut Blip2Model,
    pub state: &'a mut dyn DecoderState,
}

impl StepModel for Bound<'_> {
    type Error = RuntimeError;

    fn step(&mut self, tokens: &[i64]) -> Result<Array2<f32>, RuntimeError> {
        match self.state.step_for(self.model, tokens, Want::Logits)? {
            StepOutput::Logits(l) => Ok(l),
            _ => Err(RuntimeError::MissingOutput("the logits a step was asked for".into())),
        }
    }

    fn select_rows(&mut self, rows: &[usize]) -> Result<(), RuntimeError> {
        self.state.select_rows(self.model, rows)
    }

    fn step_for(&mut self, tokens: &[i64], want: Want) -> Result<StepOutput, RuntimeError> {
        self.state.step_for(self.model, tokens, want)
    }

    fn last_logits(&mut self) -> Option<Result<Array2<f32>, RuntimeError>> {
        self.state.last_logits(self.model)
    }
}

/// A decoder after its prefill.
pub struct Prefilled {
    pub state: Box<dyn DecoderState>,
    /// The search's view of each row, as transformers' `generate()` sees it.
    pub prompts: Vec<Prompt>,
    /// The logits of each row's next token, `[rows, vocab]`.
    pub logits: Array2<f32>,
}

/// Runs the prefill of a prompt batch (`batch`: left-padded as Blip2Processor pads;
/// `image_embeds` `[rows, num_query_tokens, hidden]`) on the decoder the export has, with
/// room for `max_new_tokens` new tokens per row.
pub fn prefill(
    model: &mut Blip2Model,
    batch: &Batch,
    image_embeds: ArrayD<f32>,
    max_new_tokens: usize,
) -> Result<Prefilled, RuntimeError> {
    prefill_beside(model, batch, image_embeds, max_new_tokens, None)
}

/// [`prefill`] for newcomers to a running batch whose buffers hold `running_capacity`
/// positions a row ([`DecoderState::capacity`]): a state of fixed-length buffers makes
/// its own that long when its rows fit, so that it can [`DecoderState::join`] the
/// running batch.
pub fn prefill_beside(
    model: &mut Blip2Model,
    batch: &Batch,
    image_embeds: ArrayD<f32>,
    max_new_tokens: usize,
    running_capacity: Option<usize>,
) -> Result<Prefilled, RuntimeError> {
    let family = model.manifest.family;
    let start = t5::decoder_start(model);
    if family == blip2_core::Family::T5 {
        // The search sees the decoder's ids, as transformers' processors do for
        // encoder-decoder models.
        let prompts = vec![Prompt::new(vec![start]); batch.ids.len()];
        let (state, logits) = t5::T5State::prefill(
            model,
            &batch.ids,
            &batch.mask,
            image_embeds,
            start,
            max_new_tokens,
        )?;
        return Ok(Prefilled { state: Box::new(state), prompts, logits });
    }
    let prompts = batch
        .ids
        .iter()
        .zip(&batch.mask)
        .map(|(ids, m)| Prompt::with_attention_mask(ids.clone(), m))
        .collect();
    if is_static(model) {
        let (state, logits) = opt_static::OptStaticState::prefill_within(
            model,
            batch,
            image_embeds,
            max_new_tokens,
            running_capacity,
        )?;
        return Ok(Prefilled { state: Box::new(state), prompts, logits });
    }
    let embeds = crate::model::lm_value(model, image_embeds)?;
    let (state, logits) = opt::OptState::prefill_last(model, &batch.ids, &batch.mask, embeds)?;
    Ok(Prefilled { state: Box::new(state), prompts, logits })
}

/// Whether the export's language model keeps a static KV buffer with a length per row
/// (OPT `--target cuda`).
pub fn is_static(model: &Blip2Model) -> bool {
    model.signature.cache == crate::model::CacheLayout::StaticRows
}

/// Whether the export's decoder picks tokens itself (`next_token`, `top_logprobs`; the
/// `--target cuda` graphs).
pub fn selects_tokens(model: &Blip2Model) -> bool {
    model.signature.selects_tokens
}

/// Runs one step of a decoder graph that picks tokens itself, with its KV cache bound
/// where it lies: only what `want` asks for comes back to host memory (the logits of
/// the one new position `[rows, vocab]`, the argmax, or the top-k log-probabilities or
/// logits); the other outputs stay where the decoder runs. Also returns the step's
/// logits as they lie there when they were not asked for, for
/// [`crate::generation::StepModel::last_logits`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_selecting(
    session: &mut Session,
    kv_memory: &MemoryInfo,
    inputs: &[(&str, &DynValue)],
    cache: &mut KvCache,
    want: Want,
    has_top_logits: bool,
    what: &str,
) -> Result<(StepOutput, Option<DynValue>), RuntimeError> {
    let (want, k) = answerable(want, has_top_logits);
    let top_k = top_k_value(k)?;
    let wanted: &[&str] = match want {
        Want::Logits => &[io::LOGITS],
        Want::Argmax => &[io::NEXT_TOKEN],
        Want::TopLogProbs(_) => &[io::TOP_LOGPROBS, io::TOP_IDS],
        Want::TopLogits(_) => &[io::TOP_LOGITS, io::TOP_IDS],
    };
    let mut binding =
        session.create_binding().map_err(ort_err(format!("{what}: creating an IO binding")))?;
    (|| -> Result<(), ort::Error> {
        for (name, v) in inputs {
            binding.bind_input(*name, *v)?;
        }
        binding.bind_input(io::TOP_K, &top_k)?;
        cache.bind(&mut binding, kv_memory)?;
        let host =
            MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default)?;
        for name in [io::LOGITS, io::NEXT_TOKEN, io::TOP_LOGPROBS, io::TOP_IDS, io::TOP_LOGITS] {
            if name == io::TOP_LOGITS && !has_top_logits {
                continue;
            }
            binding.bind_output_to_device(
                name,
                if wanted.contains(&name) { &host } else { kv_memory },
            )?;
        }
        Ok(())
    })()
    .map_err(ort_err(format!("{what}: binding inputs and outputs")))?;
    // Inputs and buffers that change from run to run: never captured as a CUDA graph.
    let mut out = session
        .run_binding_with_options(&binding, crate::kv_cache::no_capture()?)
        .map_err(ort_err(what))?;
    cache.take_present(&mut out)?;
    let get = |name: &str| out.get(name).ok_or_else(|| RuntimeError::MissingOutput(name.into()));
    let answer = match want {
        Want::Logits => StepOutput::Logits(last_position(get(io::LOGITS)?)?),
        Want::Argmax => {
            let a =
                get(io::NEXT_TOKEN)?.try_extract_array::<i64>().map_err(ort_err("next_token"))?;
            StepOutput::Argmax(a.iter().copied().collect())
        }
        Want::TopLogProbs(_) => {
            let (logprobs, ids) = candidates(get(io::TOP_LOGPROBS)?, get(io::TOP_IDS)?)?;
            StepOutput::TopLogProbs { logprobs, ids }
        }
        Want::TopLogits(_) => {
            let (logits, ids) = candidates(get(io::TOP_LOGITS)?, get(io::TOP_IDS)?)?;
            StepOutput::TopLogits { logits, ids }
        }
    };
    let logits = if want == Want::Logits { None } else { out.remove(io::LOGITS) };
    Ok((answer, logits))
}

/// What a decoder graph that picks tokens can answer for `want`, and the `top_k` to run
/// it with (1 when no candidates are wanted): exports made before `top_logits` answer
/// sampling's candidates with the logits.
pub(crate) fn answerable(want: Want, has_top_logits: bool) -> (Want, usize) {
    match want {
        Want::TopLogits(_) if !has_top_logits => (Want::Logits, 1),
        Want::TopLogProbs(k) | Want::TopLogits(k) => (want, k),
        Want::Logits | Want::Argmax => (want, 1),
    }
}

/// A step's `[rows, k]` candidate values (log-probabilities or logits) and their ids.
fn candidates(
    values: &DynValue,
    ids: &DynValue,
) -> Result<(Array2<f32>, Array2<i64>), RuntimeError> {
    let shape_err =
        |what: &str| RuntimeError::MissingOutput(format!("{what} of the expected rank"));
    let v = values.try_extract_array::<f32>().map_err(ort_err("top candidates"))?;
    let i = ids.try_extract_array::<i64>().map_err(ort_err("top_ids"))?;
    Ok((
        v.into_dimensionality::<ndarray::Ix2>()
            .map_err(|_| shape_err("top candidates"))?
            .to_owned(),
        i.into_dimensionality::<ndarray::Ix2>().map_err(|_| shape_err("top_ids"))?.to_owned(),
    ))
}

/// The logits of the last position of a `[rows, positions, vocab]` decoder output, in
/// host memory (copied over from a device).
pub(crate) fn last_position(logits: &DynValue) -> Result<Array2<f32>, RuntimeError> {
    let tensor =
        logits.view().downcast::<ort::value::DynTensorValueType>().map_err(ort_err("logits"))?;
    let host = crate::kv_cache::host_copy(&tensor, "logits")?;
    let a = match &host {
        Some(h) => h.try_extract_array::<f32>(),
        None => tensor.try_extract_array::<f32>(),
    }
    .map_err(ort_err("logits"))?;
    let a = a
        .into_dimensionality::<ndarray::Ix3>()
        .map_err(|_| RuntimeError::MissingOutput("logits of rank 3".into()))?;
    Ok(a.index_axis(Axis(1), a.shape()[1] - 1).to_owned())
}

/// The `top_k` input for `k` candidates: int64 `[1]` in host memory, where TopK reads it.
pub(crate) fn top_k_value(k: usize) -> Result<DynValue, RuntimeError> {
    Ok(Tensor::from_array(ndarray::arr1(&[k as i64])).map_err(ort_err("top_k"))?.into_dyn())
}
