//! OPT on the portable graph: transformers' own layout. Rows are left-padded with an
//! attention mask, positions count each row's real tokens, and the KV cache grows by one
//! position a step (`present.*` fed back as `past_key_values.*`).

use blip2_core::io;
use ndarray::{Array2, Array3, Axis};
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::value::{DynValue, Tensor};

use crate::error::{ort_err, RuntimeError};
use crate::generation::{StepOutput, Want};
use crate::kv_cache::{KvCache, KvSpec};
use crate::model::Blip2Model;
use crate::state::{DecoderState, Joined};

pub struct OptState {
    cache: KvCache,
    mask: Vec<Vec<i64>>,
    next_pos: Vec<i64>,
}

/// The KV cache shape of the export's language model.
pub(crate) fn kv_spec(model: &Blip2Model) -> KvSpec {
    let t = &model.manifest.text;
    KvSpec { layers: t.num_layers, heads: t.num_heads, head_dim: t.head_dim, fp16: model.lm_fp16 }
}

impl OptState {
    /// Runs the prompt (prefill) and returns the state plus the logits of every prompt
    /// position, `[rows, len, vocab]`.
    ///
    /// `ids` and `mask` are rectangular (left-padded) `[rows, len]`; `image_embeds` is
    /// `[rows, num_query_tokens, hidden]`, matching the image tokens in `ids`.
    pub fn prefill(
        model: &mut Blip2Model,
        ids: &[Vec<i64>],
        mask: &[Vec<i64>],
        image_embeds: DynValue,
    ) -> Result<(Self, Array3<f32>), RuntimeError> {
        Self::prefill_logits(model, ids, mask, image_embeds, false)
    }

    /// [`OptState::prefill`] returning only the logits of the last prompt position,
    /// `[rows, vocab]`: all that generation needs, without copying the others out of
    /// ONNX Runtime (`[rows, len, vocab]` is 26 MB at batch 4 for OPT's vocabulary).
    pub fn prefill_last(
        model: &mut Blip2Model,
        ids: &[Vec<i64>],
        mask: &[Vec<i64>],
        image_embeds: DynValue,
    ) -> Result<(Self, Array2<f32>), RuntimeError> {
        let (st, logits) = Self::prefill_logits(model, ids, mask, image_embeds, true)?;
        Ok((st, logits.index_axis_move(Axis(1), 0)))
    }

    fn prefill_logits(
        model: &mut Blip2Model,
        ids: &[Vec<i64>],
        mask: &[Vec<i64>],
        image_embeds: DynValue,
        last_only: bool,
    ) -> Result<(Self, Array3<f32>), RuntimeError> {
        let rows = ids.len();
        let len = ids.first().map(Vec::len).unwrap_or(0);
        // Positions as transformers' generate() makes them: count of real tokens so far.
        let mut pos = Array2::<i64>::zeros((rows, len));
        let mut next_pos = Vec::with_capacity(rows);
        for r in 0..rows {
            let mut c = 0i64;
            for j in 0..len {
                c += mask[r][j];
                pos[[r, j]] = if mask[r][j] == 0 { 0 } else { c - 1 };
            }
            next_pos.push(c);
        }
        let cache = KvCache::empty(kv_spec(model), rows)?;
        let mut st = Self { cache, mask: mask.to_vec(), next_pos };
        let ids = Array2::from_shape_fn((rows, len), |(r, j)| ids[r][j]);
        let logits = st.run(model, ids, pos, image_embeds, last_only)?;
        Ok((st, logits))
    }

    fn run(
        &mut self,
        m: &mut Blip2Model,
        ids: Array2<i64>,
        pos: Array2<i64>,
        image_embeds: DynValue,
        last_only: bool,
    ) -> Result<Array3<f32>, RuntimeError> {
        let rows = ids.nrows();
        let total = self.mask.first().map(Vec::len).unwrap_or(0);
        let mask = Array2::from_shape_fn((rows, total), |(r, j)| self.mask[r][j]);
        let seq = ids.ncols();
        let mut inputs = vec![
            (io::INPUT_IDS, Tensor::from_array(ids).map_err(ort_err("input_ids"))?.into_dyn()),
            (io::IMAGE_EMBEDS, image_embeds),
            (
                io::ATTENTION_MASK,
                Tensor::from_array(mask).map_err(ort_err("attention_mask"))?.into_dyn(),
            ),
            (
                io::POSITION_IDS,
                Tensor::from_array(pos).map_err(ort_err("position_ids"))?.into_dyn(),
            ),
        ];
        if last_only && seq > 1 && m.lm_takes_logits_to_keep() {
            // The LM head runs for the last position only.
            let keep =
                Tensor::from_array(ndarray::arr0(1i64)).map_err(ort_err("logits_to_keep"))?;
            inputs.push((io::LOGITS_TO_KEEP, keep.into_dyn()));
        }
        let refs: Vec<(&str, &DynValue)> = inputs.iter().map(|(n, v)| (*n, v)).collect();
        m.note_lm_run();
        run_decoder(&mut m.lm, &m.kv_memory, &refs, &mut self.cache, "language model", last_only)
    }

    /// Feeds one token per row and returns the logits of the new position.
    pub fn step(
        &mut self,
        model: &mut Blip2Model,
        tokens: &[i64],
    ) -> Result<Array2<f32>, RuntimeError> {
        let rows = tokens.len();
        for m in &mut self.mask {
            m.push(1);
        }
        let pos = Array2::from_shape_fn((rows, 1), |(r, _)| self.next_pos[r]);
        for p in &mut self.next_pos {
            *p += 1;
        }
        let ids = Array2::from_shape_fn((rows, 1), |(r, _)| tokens[r]);
        let no_images = no_image_embeds(model, rows)?;
        Ok(self.run(model, ids, pos, no_images, true)?.index_axis_move(Axis(1), 0))
    }
}

impl OptState {
    /// Rows in the state.
    pub fn rows(&self) -> usize {
        self.mask.len()
    }

    /// Appends `other`'s rows after these (a server's continuous batch taking in newly
    /// prefilled rows): caches and masks are left-padded to the longer of the two, so
    /// each row keeps its own positions and attends to exactly what it did before. The
    /// caches join where they lie with the export's `kv_join` graph (through host memory
    /// for exports made before it).
    pub fn join(&mut self, model: &mut Blip2Model, other: OptState) -> Result<(), RuntimeError> {
        let (mine, theirs) =
            (self.mask.first().map_or(0, Vec::len), other.mask.first().map_or(0, Vec::len));
        let len = mine.max(theirs);
        let pad = |m: Vec<i64>, have: usize| -> Vec<i64> {
            std::iter::repeat_n(0, len - have).chain(m).collect()
        };
        let OptState { cache, mask, next_pos, .. } = other;
        self.mask = std::mem::take(&mut self.mask)
            .into_iter()
            .map(|m| pad(m, mine))
            .chain(mask.into_iter().map(|m| pad(m, theirs)))
            .collect();
        self.next_pos.extend(next_pos);
        self.cache.join(cache, model.join_on())
    }

    /// Drops the leading positions that are padding in every row (left behind when the
    /// rows that needed them have left), so later steps attend over fewer positions.
    pub fn compact(&mut self, model: &mut Blip2Model) -> Result<(), RuntimeError> {
        let len = self.mask.first().map_or(0, Vec::len);
        let unused = (0..len).take_while(|&j| self.mask.iter().all(|m| m[j] == 0)).count();
        if unused == 0 || self.mask.is_empty() {
            return Ok(());
        }
        for m in &mut self.mask {
            m.drain(..unused);
        }
        self.cache.drop_front(unused, model.join_on())
    }
}

impl DecoderState for OptState {
    fn rows(&self) -> usize {
        self.mask.len()
    }

    fn step_for(
        &mut self,
        model: &mut Blip2Model,
        tokens: &[i64],
        _want: Want,
    ) -> Result<StepOutput, RuntimeError> {
        self.step(model, tokens).map(StepOutput::Logits)
    }

    /// New row i is old row `rows[i]` (expansion into beams, beam reordering, rows
    /// leaving a running batch); positions no row uses any more are dropped.
    /// On the device with the export's `kv_reorder` graph (exports made before portable
    /// exports had one: through host memory).
    fn select_rows(&mut self, model: &mut Blip2Model, rows: &[usize]) -> Result<(), RuntimeError> {
        self.mask = rows.iter().map(|&r| self.mask[r].clone()).collect();
        self.next_pos = rows.iter().map(|&r| self.next_pos[r]).collect();
        if model.kv_reorder.is_some() {
            model.note_lm_run();
        }
        match model.kv_reorder.as_mut() {
            Some(reorder) => self.cache.select_rows_on_device(reorder, rows, &model.kv_memory)?,
            None => self.cache.select_rows(rows)?,
        }
        self.compact(model)
    }

    fn join(&mut self, model: &mut Blip2Model, other: Box<dyn DecoderState>) -> Result<(), Joined> {
        if !other.as_any().is::<OptState>() {
            return Err(Joined::Refused(other));
        }
        let other = other.into_any().downcast::<OptState>().expect("an OptState");
        OptState::join(self, model, *other).map_err(Joined::Failed)
    }

    fn joins(&self) -> bool {
        true
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// `image_embeds` with no image tokens, `[rows, 0, hidden]`, for the decode steps.
pub(crate) fn no_image_embeds(model: &Blip2Model, rows: usize) -> Result<DynValue, RuntimeError> {
    let shape = ndarray::IxDyn(&[rows, 0, model.manifest.text.hidden_size]);
    crate::model::lm_value(model, ndarray::ArrayD::zeros(shape))
}

/// Runs a decoder graph with its KV cache through an IO binding: the cache is bound
/// where it lies (see [`KvCache::bind`]), so it never crosses to the host between
/// steps; only the logits come back to host memory. Returns the logits
/// `[rows, seq, vocab]`, or with `last_only` those of the last position,
/// `[rows, 1, vocab]`: the only copy made of them.
pub(crate) fn run_decoder(
    session: &mut ort::session::Session,
    kv_memory: &MemoryInfo,
    inputs: &[(&str, &DynValue)],
    cache: &mut KvCache,
    what: &str,
    last_only: bool,
) -> Result<Array3<f32>, RuntimeError> {
    let mut binding =
        session.create_binding().map_err(ort_err(format!("{what}: creating an IO binding")))?;
    (|| -> Result<(), ort::Error> {
        for (name, v) in inputs {
            binding.bind_input(*name, *v)?;
        }
        cache.bind(&mut binding, kv_memory)?;
        let host =
            MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default)?;
        binding.bind_output_to_device(io::LOGITS, &host)?;
        Ok(())
    })()
    .map_err(ort_err(format!("{what}: binding inputs and outputs")))?;
    let mut out = session.run_binding(&binding).map_err(ort_err(what))?;
    cache.take_present(&mut out)?;
    let logits =
        out.get(io::LOGITS).ok_or_else(|| RuntimeError::MissingOutput(io::LOGITS.into()))?;
    let a = logits.try_extract_array::<f32>().map_err(ort_err("logits"))?;
    let a = a
        .into_dimensionality::<ndarray::Ix3>()
        .map_err(|_| RuntimeError::MissingOutput("3-D logits".into()))?;
    let seq = a.shape()[1];
    Ok(if last_only && seq > 1 {
        a.slice(ndarray::s![.., seq - 1.., ..]).to_owned()
    } else {
        a.to_owned()
    })
}
