//! Flan-T5's decoder: the text encoder runs once per prompt and also returns every decoder
//! layer's cross-attention keys and values. On a portable export the decoder's
//! self-attention cache grows by one position a step; on a CUDA-target export it is a
//! buffer per layer of a fixed length (the start token plus the new tokens), written in
//! place; the encoder runs once for the batch and leaves the cross-attention caches
//! where the decoder runs, where beams reorder both with the `kv_reorder` graph.

use blip2_core::io;
use ndarray::{Array2, ArrayD, Axis, IxDyn};
use ort::memory::Allocator;
use ort::value::{DynValue, Tensor};

use crate::error::{ort_err, RuntimeError};
use crate::generation::{StepOutput, Want};
use crate::kv_cache::{select_rows_of, KvCache};
use crate::model::{float_value, to_f32, Blip2Model};
use crate::state::opt::{kv_spec, run_decoder};
use crate::state::{run_selecting, DecoderState, Joined};

/// Encoder-decoder (T5) state: the cross-attention cache the text encoder computed once,
/// the encoder mask, and the decoder's self-attention cache.
pub struct T5State {
    /// cross.{i}.key, cross.{i}.value per decoder layer, as a cache of rows.
    cross: KvCache,
    enc_mask: Array2<i64>,
    cache: KvCache,
    /// The decoder picks tokens itself (`--target cuda`).
    selects: bool,
    /// Fixed-length self-attention buffers (`--target cuda`): the positions each row
    /// holds, the buffers' length, their allocator, and the previous buffer sets after a
    /// beam reorder (self-attention, cross-attention), reused by the next one.
    fixed: Option<Fixed>,
    /// The last step's logits where the decoder left them, when only part came back.
    last_logits: Option<DynValue>,
    /// Portable decoders with `decoder_attention_mask`: per row, which positions of the
    /// self-attention cache it holds (0: left padding from joining a longer batch).
    self_mask: Option<Vec<Vec<i64>>>,
}

struct Fixed {
    len: usize,
    capacity: usize,
    allocator: Allocator,
    spare: Option<KvCache>,
    cross_spare: Option<KvCache>,
    /// Newcomers can join: the decoder takes `decoder_attention_mask` and the export
    /// has its `kv_join` graph (exports made before either run their batches apart).
    joins: bool,
}

/// Positions a server's CUDA-target batch makes room for ([`DecoderState::make_room`]):
/// newcomers join while the running rows have used fewer than this less their own
/// start and new tokens. The fused attention reads only the positions up to the
/// current one, so room costs memory, not time.
pub const ROOM: usize = 256;

impl T5State {
    /// Runs the text encoder ([`encode_rows`] on a portable export, [`encode_batch`] on
    /// a CUDA-target one), then the decoder's first step from `decoder_start`. Returns
    /// the state and `[rows, vocab]` logits.
    /// `max_new_tokens` sizes the self-attention buffers of a CUDA-target export.
    pub fn prefill(
        m: &mut Blip2Model,
        ids: &[Vec<i64>],
        mask: &[Vec<i64>],
        image_embeds: ArrayD<f32>,
        decoder_start: i64,
        max_new_tokens: usize,
    ) -> Result<(Self, Array2<f32>), RuntimeError> {
        let rows = ids.len();
        let spec = kv_spec(m);
        let selects = crate::state::selects_tokens(m);
        let fixed = m.signature.cache == crate::model::CacheLayout::StaticShared;
        let real = crate::prompt::unpadded(ids, mask);
        let lens: Vec<usize> = real.iter().map(Vec::len).collect();
        let longest = lens.iter().copied().max().unwrap_or(0);
        let enc_mask = Array2::from_shape_fn((rows, longest), |(r, j)| i64::from(j < lens[r]));
        let cross = if fixed {
            encode_batch(m, &real, &enc_mask, image_embeds)?
        } else {
            encode_rows(m, &real, image_embeds)?
        };
        let (cache, fixed) = if fixed {
            // The start token and every new token.
            let capacity = 1 + max_new_tokens;
            let allocator = m.cache_allocator()?;
            let cache = KvCache::allocate(spec, rows, capacity, &allocator)?;
            let joins = m.signature.decoder_mask && m.kv_join.is_some();
            let f = Fixed { len: 0, capacity, allocator, spare: None, cross_spare: None, joins };
            (cache, Some(f))
        } else {
            (KvCache::empty(spec, rows)?, None)
        };
        let self_mask = m.signature.decoder_mask.then(|| vec![Vec::new(); rows]);
        let mut st = Self { cross, enc_mask, cache, selects, fixed, last_logits: None, self_mask };
        let logits = st.step(m, &vec![decoder_start; rows])?;
        Ok((st, logits))
    }

    /// Feeds one decoder token per row and returns the logits of the new position.
    pub fn step(
        &mut self,
        m: &mut Blip2Model,
        tokens: &[i64],
    ) -> Result<Array2<f32>, RuntimeError> {
        match self.step_want(m, tokens, Want::Logits)? {
            StepOutput::Logits(l) => Ok(l),
            _ => unreachable!("asked for logits"),
        }
    }

    fn step_want(
        &mut self,
        m: &mut Blip2Model,
        tokens: &[i64],
        want: Want,
    ) -> Result<StepOutput, RuntimeError> {
        let rows = tokens.len();
        let ids = Array2::from_shape_fn((rows, 1), |(r, _)| tokens[r]);
        let ids = Tensor::from_array(ids).map_err(ort_err("input_ids"))?.into_dyn();
        let mask = Tensor::from_array(self.enc_mask.clone())
            .map_err(ort_err("encoder_attention_mask"))?
            .into_dyn();
        let past = match &self.fixed {
            Some(f) if f.len >= f.capacity => {
                return Err(RuntimeError::Input(format!(
                    "the KV buffers hold {} positions and they are full",
                    f.capacity
                )));
            }
            // Both in host memory, where the decoder's kernels read them.
            Some(f) => Some([
                Tensor::from_array(ndarray::arr0(f.len as i32))
                    .map_err(ort_err("past_sequence_length"))?
                    .into_dyn(),
                Tensor::from_array(ndarray::arr0(f.len as i64 + 1))
                    .map_err(ort_err("key_count"))?
                    .into_dyn(),
            ]),
            None => None,
        };
        let held = match &self.self_mask {
            Some(rows_held) => {
                let len = rows_held.first().map_or(0, Vec::len) + 1;
                let a = Array2::from_shape_fn((rows, len), |(r, j)| {
                    rows_held.get(r).and_then(|h| h.get(j)).copied().unwrap_or(1)
                });
                Some(Tensor::from_array(a).map_err(ort_err("decoder_attention_mask"))?.into_dyn())
            }
            None => None,
        };
        let mut inputs: Vec<(&str, &DynValue)> =
            vec![(io::INPUT_IDS, &ids), (io::ENCODER_ATTENTION_MASK, &mask)];
        if let Some(h) = &held {
            inputs.push((io::DECODER_ATTENTION_MASK, h));
        }
        if let Some([p, k]) = &past {
            inputs.push((io::PAST_SEQUENCE_LENGTH, p));
            inputs.push((io::KEY_COUNT, k));
        }
        let layers = kv_spec(m).layers;
        let names: Vec<[String; 2]> =
            (0..layers).map(|l| [io::cross_key(l), io::cross_value(l)]).collect();
        for (l, n) in names.iter().enumerate() {
            for (name, value) in n.iter().zip(self.cross.layer(l)) {
                inputs.push((name.as_str(), value));
            }
        }
        m.note_lm_run();
        if self.selects {
            let (answer, logits) = run_selecting(
                &mut m.lm,
                &m.kv_memory,
                &inputs,
                &mut self.cache,
                want,
                m.signature.top_logits,
                "text decoder",
            )?;
            self.last_logits = logits;
            self.stepped();
            return Ok(answer);
        }
        let logits =
            run_decoder(&mut m.lm, &m.kv_memory, &inputs, &mut self.cache, "text decoder", true)?;
        self.stepped();
        Ok(StepOutput::Logits(logits.index_axis_move(Axis(1), 0)))
    }

    /// After a step: every row holds one more position.
    fn stepped(&mut self) {
        if let Some(f) = &mut self.fixed {
            f.len += 1;
        }
        if let Some(rows_held) = &mut self.self_mask {
            for h in rows_held {
                h.push(1);
            }
        }
    }

    /// Drops the leading self-attention positions that every row has as padding (left
    /// behind when the rows that needed them have left).
    fn compact(&mut self, model: &mut Blip2Model) -> Result<(), RuntimeError> {
        let Some(rows_held) = &mut self.self_mask else { return Ok(()) };
        let len = rows_held.first().map_or(0, Vec::len);
        let unused = (0..len).take_while(|&j| rows_held.iter().all(|h| h[j] == 0)).count();
        if unused == 0 || rows_held.is_empty() {
            return Ok(());
        }
        for h in rows_held.iter_mut() {
            h.drain(..unused);
        }
        self.cache.drop_front(unused, model.join_on())
    }

    /// [`DecoderState::join`] once checked: `other`'s rows after these. Self-attention
    /// caches and their masks are left-padded to the longer of the two (each row keeps
    /// the distances between its positions, all T5's position bias reads), the
    /// cross-attention caches and the encoder mask right-padded; where the caches lie
    /// with the export's `kv_join` graph (through host memory for exports made before it).
    fn join_rows(&mut self, model: &mut Blip2Model, other: T5State) -> Result<(), RuntimeError> {
        let T5State { cross, enc_mask, cache, self_mask, .. } = other;
        let (mine, theirs) =
            (self.self_mask.as_mut().expect("checked"), self_mask.expect("checked"));
        let (a, b) = (mine.first().map_or(0, Vec::len), theirs.first().map_or(0, Vec::len));
        let len = a.max(b);
        let pad = |h: Vec<i64>, have: usize| -> Vec<i64> {
            std::iter::repeat_n(0, len - have).chain(h).collect()
        };
        *mine = std::mem::take(mine)
            .into_iter()
            .map(|h| pad(h, a))
            .chain(theirs.into_iter().map(|h| pad(h, b)))
            .collect();
        self.cache.join(cache, model.join_on())?;
        self.cross.join_right_padded(cross, model.join_on())?;
        self.join_enc_mask(&enc_mask);
        Ok(())
    }

    /// `enc_mask`'s rows after these, both right-padded with zeros to the longer.
    fn join_enc_mask(&mut self, enc_mask: &Array2<i64>) {
        let cols = self.enc_mask.ncols().max(enc_mask.ncols());
        let (ra, rb) = (self.enc_mask.nrows(), enc_mask.nrows());
        let old = std::mem::replace(&mut self.enc_mask, Array2::zeros((ra + rb, cols)));
        self.enc_mask.slice_mut(ndarray::s![..ra, ..old.ncols()]).assign(&old);
        self.enc_mask.slice_mut(ndarray::s![ra.., ..enc_mask.ncols()]).assign(enc_mask);
    }

    /// [`DecoderState::join`] of a CUDA-target decoder, once checked: `other` (just
    /// prefilled, its first tokens picked) joins with its start step run again at the
    /// running rows' last position, all earlier positions masked for it. T5's position
    /// bias depends only on distances, so its rows attend to what they attended to
    /// alone, and the next step feeds their first tokens beside the running rows'. The
    /// fused attention writes its keys in a layout of its own, so no position is ever
    /// copied: the start step is computed again (one small step), and rows move only
    /// whole (the `kv_join` graph concatenating the running rows' buffers and the
    /// newcomers', and their cross-attention caches right-padded).
    fn join_fixed(&mut self, m: &mut Blip2Model, other: T5State) -> Result<(), RuntimeError> {
        let f = self.fixed.as_ref().expect("checked by join");
        let (len, capacity) = (f.len, f.capacity);
        let rows = other.cache.rows();
        let start = decoder_start(m);
        let allocator = m.cache_allocator()?;
        let joins = f.joins;
        let T5State { cross, enc_mask, selects, .. } = other;
        let mut newcomer = T5State {
            cross,
            enc_mask,
            cache: zeroed(m, rows, capacity)?,
            selects,
            fixed: Some(Fixed {
                len: len - 1,
                capacity,
                allocator,
                spare: None,
                cross_spare: None,
                joins,
            }),
            last_logits: None,
            self_mask: Some(vec![vec![0; len - 1]; rows]),
        };
        newcomer.step_want(m, &vec![start; rows], Want::Argmax)?;
        let T5State { cross, enc_mask, cache, self_mask, .. } = newcomer;
        self.cache.join_right_padded(cache, m.join_on())?;
        self.cross.join_right_padded(cross, m.join_on())?;
        if let (Some(mine), Some(theirs)) = (&mut self.self_mask, self_mask) {
            mine.extend(theirs);
        }
        self.join_enc_mask(&enc_mask);
        let f = self.fixed.as_mut().expect("checked by join");
        (f.spare, f.cross_spare) = (None, None);
        self.last_logits = None;
        Ok(())
    }
}

impl DecoderState for T5State {
    fn rows(&self) -> usize {
        self.enc_mask.nrows()
    }

    fn step_for(
        &mut self,
        m: &mut Blip2Model,
        tokens: &[i64],
        want: Want,
    ) -> Result<StepOutput, RuntimeError> {
        self.step_want(m, tokens, if self.selects { want } else { Want::Logits })
    }

    fn last_logits(&mut self, _m: &mut Blip2Model) -> Option<Result<Array2<f32>, RuntimeError>> {
        self.last_logits.as_ref().map(crate::state::last_position)
    }

    /// New row i is old row `rows[i]`: on the host for a portable export, with the
    /// `kv_reorder` graph where the decoder runs for a CUDA-target one.
    fn select_rows(&mut self, m: &mut Blip2Model, rows: &[usize]) -> Result<(), RuntimeError> {
        self.enc_mask = self.enc_mask.select(Axis(0), rows);
        m.note_lm_run();
        match &mut self.fixed {
            Some(f) => {
                let reorder = m.kv_reorder.as_mut().ok_or_else(no_reorder)?;
                self.cross.reorder_on_device(reorder, rows, &mut f.cross_spare, &f.allocator)?;
                self.cache.reorder_on_device(reorder, rows, &mut f.spare, &f.allocator)?;
            }
            None if m.kv_reorder.is_some() => {
                let reorder = m.kv_reorder.as_mut().expect("checked");
                self.cross.select_rows_on_device(reorder, rows, &m.kv_memory)?;
                self.cache.select_rows_on_device(reorder, rows, &m.kv_memory)?;
            }
            None => {
                let fp16 = m.lm_fp16;
                let spec = kv_spec(m);
                let mut layers = Vec::with_capacity(spec.layers);
                for l in 0..spec.layers {
                    let kv = self.cross.layer(l);
                    layers.push([
                        select_rows_of(&kv[0], rows, fp16)?,
                        select_rows_of(&kv[1], rows, fp16)?,
                    ]);
                }
                self.cross = KvCache::from_tensors(spec, rows.len(), self.enc_mask.ncols(), layers);
                self.cache.select_rows(rows)?;
            }
        }
        if let Some(rows_held) = &mut self.self_mask {
            *rows_held = rows.iter().map(|&r| rows_held[r].clone()).collect();
        }
        // Fixed buffers keep every position (the fused attention's own layout): only a
        // growing cache drops the positions no row uses any more.
        if self.fixed.is_some() {
            return Ok(());
        }
        self.compact(m)
    }

    /// Decoders with a self-attention mask take newcomers in: portable ones by padding
    /// (see [`T5State::join_rows`]), CUDA-target ones by running the newcomers' start
    /// step again beside the running rows (see [`T5State::join_fixed`]) when their
    /// buffers have the positions left.
    fn join(&mut self, m: &mut Blip2Model, other: Box<dyn DecoderState>) -> Result<(), Joined> {
        let fits = match other.as_any().downcast_ref::<T5State>() {
            Some(o) if self.joins() && o.joins() => match (&self.fixed, &o.fixed) {
                (None, None) => true,
                // The newcomer's positions, from the start step it runs again at
                // position len - 1, fit in the running buffers.
                (Some(f), Some(n)) => {
                    n.len == 1 && f.len >= 1 && f.len - 1 + n.capacity <= f.capacity
                }
                _ => false,
            },
            _ => false,
        };
        if !fits {
            return Err(Joined::Refused(other));
        }
        let other = other.into_any().downcast::<T5State>().expect("checked above");
        if self.fixed.is_some() {
            return self.join_fixed(m, *other).map_err(Joined::Failed);
        }
        self.join_rows(m, *other).map_err(Joined::Failed)
    }

    fn joins(&self) -> bool {
        self.self_mask.is_some() && self.fixed.as_ref().is_none_or(|f| f.joins)
    }

    /// CUDA-target decoders: buffers [`ROOM`] positions long (when the rows need fewer),
    /// so that newcomers arriving later still fit; the start step runs again in them.
    fn make_room(&mut self, m: &mut Blip2Model, _rows: usize) -> Result<(), RuntimeError> {
        let Some(f) = &self.fixed else { return Ok(()) };
        if !self.joins() || f.len != 1 || f.capacity >= ROOM {
            return Ok(());
        }
        let rows = self.cache.rows();
        let fresh = zeroed(m, rows, ROOM)?;
        self.cache = fresh;
        let f = self.fixed.as_mut().expect("checked above");
        f.len = 0;
        f.capacity = ROOM;
        f.spare = None;
        if let Some(rows_held) = &mut self.self_mask {
            rows_held.iter_mut().for_each(Vec::clear);
        }
        let start = decoder_start(m);
        // The same start step as the prefill's (its picks are made already).
        let last = self.last_logits.take();
        self.step_want(m, &vec![start; rows], Want::Argmax)?;
        self.last_logits = last;
        Ok(())
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The cross-attention caches of each row run alone through the text encoder (so a row
/// sees exactly the positions it sees alone), padded on the right to the longest row in
/// host memory.
fn encode_rows(
    m: &mut Blip2Model,
    real: &[Vec<i64>],
    image_embeds: ArrayD<f32>,
) -> Result<KvCache, RuntimeError> {
    let spec = kv_spec(m);
    let fp16 = m.lm_fp16;
    let rows = real.len();
    let longest = real.iter().map(Vec::len).max().unwrap_or(0);
    let encoder = m.text_encoder.as_mut().ok_or_else(no_encoder)?;
    // Per row: its cross caches as f32 arrays, key and value per layer.
    let mut per_row: Vec<Vec<[ArrayD<f32>; 2]>> = Vec::with_capacity(rows);
    for (r, keep) in real.iter().enumerate() {
        let n = keep.len();
        let row_ids = Array2::from_shape_vec((1, n), keep.clone()).expect("row shape");
        let row_mask = Array2::<i64>::ones((1, n));
        let img = image_embeds.index_axis(Axis(0), r).insert_axis(Axis(0)).to_owned();
        let out = encoder
            .run(ort::inputs![
                io::INPUT_IDS => Tensor::from_array(row_ids).map_err(ort_err("input_ids"))?,
                io::IMAGE_EMBEDS => float_value(fp16, img)?,
                io::ATTENTION_MASK => Tensor::from_array(row_mask).map_err(ort_err("attention_mask"))?,
            ])
            .map_err(ort_err("text encoder"))?;
        let mut caches = Vec::with_capacity(spec.layers);
        for l in 0..spec.layers {
            let get = |name: String| -> Result<ArrayD<f32>, RuntimeError> {
                to_f32(out.get(name.as_str()).ok_or(RuntimeError::MissingOutput(name.clone()))?)
            };
            caches.push([get(io::cross_key(l))?, get(io::cross_value(l))?]);
        }
        per_row.push(caches);
    }
    let mut layers = Vec::with_capacity(spec.layers);
    for l in 0..spec.layers {
        let padded = |which: usize| -> Result<DynValue, RuntimeError> {
            let mut a = ArrayD::<f32>::zeros(IxDyn(&[rows, spec.heads, longest, spec.head_dim]));
            for (r, row) in per_row.iter().enumerate() {
                let src = &row[l][which];
                a.slice_mut(ndarray::s![r, .., ..real[r].len(), ..])
                    .assign(&src.index_axis(Axis(0), 0));
            }
            float_value(fp16, a)
        };
        layers.push([padded(0)?, padded(1)?]);
    }
    Ok(KvCache::from_tensors(spec, rows, longest, layers))
}

/// The cross-attention caches of every row from one run of the text encoder, rows
/// right-padded and masked, left where the decoder runs. Each row's tokens sit at the
/// positions they have alone and T5's position bias depends only on the distance
/// between positions, so a row gets the caches it gets alone.
fn encode_batch(
    m: &mut Blip2Model,
    real: &[Vec<i64>],
    enc_mask: &Array2<i64>,
    image_embeds: ArrayD<f32>,
) -> Result<KvCache, RuntimeError> {
    let spec = kv_spec(m);
    let (rows, longest) = enc_mask.dim();
    let pad = m.manifest.tokens.pad_token_id.unwrap_or(0);
    let ids =
        Array2::from_shape_fn((rows, longest), |(r, j)| real[r].get(j).copied().unwrap_or(pad));
    let inputs = [
        (io::INPUT_IDS, Tensor::from_array(ids).map_err(ort_err("input_ids"))?.into_dyn()),
        (io::IMAGE_EMBEDS, float_value(m.lm_fp16, image_embeds)?),
        (
            io::ATTENTION_MASK,
            Tensor::from_array(enc_mask.clone()).map_err(ort_err("attention_mask"))?.into_dyn(),
        ),
    ];
    let memory = m.kv_memory.clone();
    let encoder = m.text_encoder.as_mut().ok_or_else(no_encoder)?;
    let outputs: Vec<String> = encoder.outputs().iter().map(|o| o.name().to_string()).collect();
    let mut binding =
        encoder.create_binding().map_err(ort_err("text encoder: creating an IO binding"))?;
    (|| -> Result<(), ort::Error> {
        for (name, v) in &inputs {
            binding.bind_input(*name, v)?;
        }
        for name in &outputs {
            binding.bind_output_to_device(name, &memory)?;
        }
        Ok(())
    })()
    .map_err(ort_err("text encoder: binding inputs and outputs"))?;
    let mut out = encoder.run_binding(&binding).map_err(ort_err("text encoder"))?;
    let mut layers = Vec::with_capacity(spec.layers);
    for l in 0..spec.layers {
        let mut take =
            |name: String| out.remove(name.as_str()).ok_or(RuntimeError::MissingOutput(name));
        layers.push([take(io::cross_key(l))?, take(io::cross_value(l))?]);
    }
    Ok(KvCache::from_tensors(spec, rows, longest, layers))
}

/// Self-attention buffers of `rows` rows and `capacity` positions, zeros, where the
/// decoder's cache lives: made by the `kv_join` graph (padding zero positions), since a
/// masked position is still read and must hold a number.
fn zeroed(m: &mut Blip2Model, rows: usize, capacity: usize) -> Result<KvCache, RuntimeError> {
    let spec = kv_spec(m);
    let on = m.join_on().ok_or_else(|| {
        RuntimeError::Unsupported("this export has no kv_join graph; export it again".into())
    })?;
    KvCache::zeros_on_device(spec, rows, capacity, on)
}

/// The token every decoder row starts from: the manifest's, else 0.
pub(crate) fn decoder_start(m: &Blip2Model) -> i64 {
    m.manifest.tokens.decoder_start_token_id.unwrap_or(0)
}

fn no_encoder() -> RuntimeError {
    RuntimeError::Unsupported("no text encoder".into())
}

fn no_reorder() -> RuntimeError {
    RuntimeError::Unsupported(
        "this CUDA-target export has no kv_reorder graph; export it again".into(),
    )
}
