//! OPT on a CUDA-target graph (`blip2-ort export --target cuda`): GroupQueryAttention
//! over per-layer KV buffers of a fixed length (the longest prompt plus the new tokens)
//! that are bound as both past and present and written in place, so nothing is copied
//! or reallocated between steps. Rows are right-padded: each row's prompt starts at
//! position 0 and its length is passed as `seqlens_k`, so every row gets exactly the
//! positions and keys it has under transformers' left padding. The graph also picks
//! tokens on the device: a step returns the logits, the argmax or the top-k
//! log-probabilities, whichever the search asks for.

use blip2_core::io;
use ndarray::{Array1, Array2, ArrayD};
use ort::memory::Allocator;
use ort::value::{DynValue, Tensor};

use crate::error::RuntimeError;
use crate::generation::{StepModel, StepOutput, Want};
use crate::kv_cache::KvCache;
use crate::model::{lm_value, ort_err, ModelRef};
use crate::prompt::Batch;
use crate::state::opt::{kv_spec, no_image_embeds};
use crate::state::run_selecting;

pub struct OptStaticState<'m> {
    model: ModelRef<'m>,
    cache: KvCache,
    /// The previous buffers after a beam reorder, reused by the next one.
    spare: Option<KvCache>,
    /// Tokens each row holds in the cache.
    lens: Vec<usize>,
    capacity: usize,
    allocator: Allocator,
    /// The last step's logits where the decoder left them, when only part came back.
    last_logits: Option<DynValue>,
}

impl<'m> OptStaticState<'m> {
    /// Lays the left-padded `batch` out right-padded, allocates buffers for its longest
    /// row plus `max_new_tokens`, runs the prompt and returns the state with the logits
    /// of each row's last prompt token, `[rows, vocab]`.
    pub fn prefill(
        model: impl Into<ModelRef<'m>>,
        batch: &Batch,
        image_embeds: ArrayD<f32>,
        max_new_tokens: usize,
    ) -> Result<(Self, Array2<f32>), RuntimeError> {
        let rows = batch.ids.len();
        let real: Vec<Vec<i64>> =
            batch.ids.iter().zip(&batch.mask).map(|(ids, m)| ids.iter().zip(m).filter(|(_, &m)| m != 0).map(|(&i, _)| i).collect()).collect();
        let lens: Vec<usize> = real.iter().map(Vec::len).collect();
        let longest = lens.iter().copied().max().unwrap_or(0);
        if lens.contains(&0) {
            return Err(RuntimeError::Input("a prompt row has no tokens".into()));
        }
        let mut model = model.into();
        let m = model.get();
        let pad = m.manifest.tokens.pad_token_id.unwrap_or(0);
        let ids = Array2::from_shape_fn((rows, longest), |(r, j)| real[r].get(j).copied().unwrap_or(pad));
        // Padding positions are never attended to; any valid position will do.
        let pos = Array2::from_shape_fn((rows, longest), |(r, j)| if j < lens[r] { j as i64 } else { 0 });
        let capacity = longest + max_new_tokens;
        let allocator = m.cache_allocator()?;
        let cache = KvCache::allocate(kv_spec(&m), rows, capacity, &allocator)?;
        let embeds = lm_value(&m, image_embeds)?;
        drop(m);
        let mut st = Self { model, cache, spare: None, lens: lens.clone(), capacity, allocator, last_logits: None };
        let seqlens: Vec<i32> = lens.iter().map(|&n| n as i32 - 1).collect();
        let out = st.run(ids, pos, embeds, &seqlens, longest as i32, Want::Logits)?;
        match out {
            StepOutput::Logits(l) => Ok((st, l)),
            _ => unreachable!("asked for logits"),
        }
    }

    /// Runs the graph; `seqlens` are each row's length after this call minus one.
    fn run(
        &mut self,
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
            (io::POSITION_IDS, Tensor::from_array(pos).map_err(ort_err("position_ids"))?.into_dyn()),
            (io::SEQLENS_K, Tensor::from_array(Array1::from(seqlens.to_vec())).map_err(ort_err("seqlens_k"))?.into_dyn()),
            (io::TOTAL_SEQUENCE_LENGTH, Tensor::from_array(ndarray::arr0(total)).map_err(ort_err("total_sequence_length"))?.into_dyn()),
        ];
        let refs: Vec<(&str, &DynValue)> = inputs.iter().map(|(n, v)| (*n, v)).collect();
        let mut g = self.model.get();
        let m = &mut *g;
        let (answer, logits) = run_selecting(&mut m.lm, &m.kv_memory, &refs, &mut self.cache, want, "language model")?;
        self.last_logits = logits;
        Ok(answer)
    }

    /// Each row's length in the cache (tests).
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }
}

impl StepModel for OptStaticState<'_> {
    type Error = RuntimeError;

    fn step(&mut self, tokens: &[i64]) -> Result<Array2<f32>, RuntimeError> {
        match self.step_for(tokens, Want::Logits)? {
            StepOutput::Logits(l) => Ok(l),
            _ => unreachable!("asked for logits"),
        }
    }

    fn step_for(&mut self, tokens: &[i64], want: Want) -> Result<StepOutput, RuntimeError> {
        let rows = tokens.len();
        if rows != self.lens.len() {
            return Err(RuntimeError::Input(format!("{rows} tokens for {} rows", self.lens.len())));
        }
        if self.lens.iter().any(|&n| n >= self.capacity) {
            return Err(RuntimeError::Input(format!("the KV buffers hold {} positions and a row is full", self.capacity)));
        }
        let ids = Array2::from_shape_fn((rows, 1), |(r, _)| tokens[r]);
        let pos = Array2::from_shape_fn((rows, 1), |(r, _)| self.lens[r] as i64);
        let seqlens: Vec<i32> = self.lens.iter().map(|&n| n as i32).collect();
        let total = self.lens.iter().copied().max().unwrap_or(0) as i32 + 1;
        let no_images = no_image_embeds(&self.model.get(), rows)?;
        let out = self.run(ids, pos, no_images, &seqlens, total, want)?;
        for n in &mut self.lens {
            *n += 1;
        }
        Ok(out)
    }

    fn last_logits(&mut self) -> Option<Result<Array2<f32>, RuntimeError>> {
        self.last_logits.as_ref().map(crate::state::last_position)
    }

    /// New row i is old row `rows[i]`: the buffers are gathered on the device by the
    /// export's `kv_reorder` graph.
    fn select_rows(&mut self, rows: &[usize]) -> Result<(), RuntimeError> {
        let mut m = self.model.get();
        let reorder = m.kv_reorder.as_mut().ok_or_else(|| {
            RuntimeError::Unsupported("this CUDA-target export has no kv_reorder graph; export it again".into())
        })?;
        self.cache.reorder_on_device(reorder, rows, &mut self.spare, &self.allocator)?;
        self.lens = rows.iter().map(|&r| self.lens[r]).collect();
        Ok(())
    }
}
