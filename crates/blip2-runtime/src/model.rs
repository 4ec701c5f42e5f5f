//! The model state: the three ONNX Runtime sessions of an exported folder, described by
//! its manifest, and the language-model state ([`LmState`]) that owns the KV cache and
//! the attention mask between decode steps. Search talks to it through
//! [`crate::generation::StepModel`].

use std::path::{Path, PathBuf};

use blip2_core::{io, Manifest};
use ndarray::{Array2, Array3, Array4, ArrayD, Axis, IxDyn};
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::{DynTensorValueType, DynValue, Tensor};

use crate::error::RuntimeError;

/// Which graph a session is for, so a profile can place each on its own providers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphKind {
    VisionEncoder,
    QFormer,
    LanguageModel,
}

impl GraphKind {
    pub fn name(self) -> &'static str {
        match self {
            GraphKind::VisionEncoder => "vision_encoder",
            GraphKind::QFormer => "qformer",
            GraphKind::LanguageModel => "language_model",
        }
    }
}

/// Creates a session for one graph file; the caller decides providers and options.
pub type SessionFactory<'f> = dyn FnMut(GraphKind, &Path) -> Result<Session, RuntimeError> + 'f;

pub struct Blip2Model {
    pub manifest: Manifest,
    pub dir: PathBuf,
    vision: Session,
    qformer: Session,
    pub(crate) lm: Session,
    /// T5 only: the text encoder.
    pub(crate) text_encoder: Option<Session>,
    /// Whether the LM graph takes and returns fp16 tensors.
    pub(crate) lm_fp16: bool,
    /// Where the KV cache lives between decode steps (host memory unless set).
    pub(crate) kv_memory: MemoryInfo<'static>,
}

fn ort_err(what: impl Into<String>) -> impl FnOnce(ort::Error) -> RuntimeError {
    let what = what.into();
    move |source| RuntimeError::Ort { what, source }
}

impl Blip2Model {
    pub fn load(dir: &Path, factory: &mut SessionFactory<'_>) -> Result<Self, RuntimeError> {
        let manifest = Manifest::load(dir)?;
        if manifest.family != "opt" && manifest.family != "t5" {
            return Err(RuntimeError::Unsupported(format!(
                "{}: model family \"{}\" is not supported by this build",
                dir.display(),
                manifest.family
            )));
        }
        let g = &manifest.graphs;
        let mut open = |kind: GraphKind, file: &str| -> Result<Session, RuntimeError> {
            let path = dir.join(file);
            if !path.exists() {
                return Err(RuntimeError::MissingFile(path));
            }
            factory(kind, &path)
        };
        let vision = open(GraphKind::VisionEncoder, &g.vision_encoder.file)?;
        let qformer = open(GraphKind::QFormer, &g.qformer.file)?;
        let text_encoder = match (&g.text_encoder, manifest.family.as_str()) {
            (Some(te), _) => Some(open(GraphKind::LanguageModel, &te.file)?),
            (None, "t5") => return Err(RuntimeError::Unsupported("a t5 manifest without text_encoder".into())),
            (None, _) => None,
        };
        let lm = open(GraphKind::LanguageModel, &g.language_model.file)?;
        // The Q-Former's output is in the language model's dtype.
        let lm_fp16 = g
            .qformer
            .outputs
            .iter()
            .find(|t| t.name == io::IMAGE_EMBEDS)
            .map(|t| t.dtype == "float16")
            .unwrap_or(false);
        let kv_memory = MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default)
            .map_err(ort_err("host memory info"))?;
        Ok(Self { manifest, dir: dir.into(), vision, qformer, lm, text_encoder, lm_fp16, kv_memory })
    }

    /// Vision encoder then Q-Former: pixel values `[B,3,H,W]` to the projected query
    /// embeddings `[B, num_query_tokens, hidden]`, kept as an ONNX value in the LM's dtype.
    pub fn encode_images(&mut self, pixels: Array4<f32>) -> Result<DynValue, RuntimeError> {
        if self.per_image_encoders() && pixels.shape()[0] > 1 {
            // Quantized encoders are fp32 throughout (the exporter refuses fp16 with them).
            return f32_value(self.one_image_at_a_time(pixels, |m, p| to_f32(&m.encode_images(p)?))?);
        }
        let px = Tensor::from_array(pixels).map_err(ort_err("pixel_values"))?;
        let mut out = self
            .vision
            .run(ort::inputs![io::PIXEL_VALUES => px])
            .map_err(ort_err("vision encoder"))?;
        let feats = out.remove(io::IMAGE_FEATURES).ok_or_else(|| RuntimeError::MissingOutput(io::IMAGE_FEATURES.into()))?;
        let mut out = self
            .qformer
            .run(ort::inputs![io::IMAGE_FEATURES => feats])
            .map_err(ort_err("Q-Former"))?;
        out.remove(io::IMAGE_EMBEDS).ok_or_else(|| RuntimeError::MissingOutput(io::IMAGE_EMBEDS.into()))
    }

    /// The vision encoder alone (benchmarks, parity tests).
    pub fn vision_features(&mut self, pixels: Array4<f32>) -> Result<ArrayD<f32>, RuntimeError> {
        if self.per_image_encoders() && pixels.shape()[0] > 1 {
            return self.one_image_at_a_time(pixels, Self::vision_features);
        }
        let px = Tensor::from_array(pixels).map_err(ort_err("pixel_values"))?;
        let out = self.vision.run(ort::inputs![io::PIXEL_VALUES => px]).map_err(ort_err("vision encoder"))?;
        to_f32(&out[io::IMAGE_FEATURES])
    }

    /// T5's text encoder alone: `encoder_hidden_states` for one batch (parity tests).
    pub fn text_encoder_hidden(&mut self, ids: Array2<i64>, mask: Array2<i64>, image_embeds: DynValue) -> Result<ArrayD<f32>, RuntimeError> {
        let enc = self.text_encoder.as_mut().ok_or_else(|| RuntimeError::Unsupported("no text encoder".into()))?;
        let out = enc
            .run(ort::inputs![
                io::INPUT_IDS => Tensor::from_array(ids).map_err(ort_err("input_ids"))?,
                io::IMAGE_EMBEDS => image_embeds,
                io::ATTENTION_MASK => Tensor::from_array(mask).map_err(ort_err("attention_mask"))?,
            ])
            .map_err(ort_err("text encoder"))?;
        to_f32(&out[io::ENCODER_HIDDEN_STATES])
    }

    /// Keeps the KV cache on a CUDA device between steps (for sessions on the CUDA or
    /// TensorRT providers); by default it stays in host memory.
    pub fn keep_cache_on_cuda(&mut self, device_id: i32) -> Result<(), RuntimeError> {
        self.kv_memory = MemoryInfo::new(AllocationDevice::CUDA, device_id, AllocatorType::Device, MemoryType::Default)
            .map_err(ort_err("CUDA memory info"))?;
        Ok(())
    }

    /// Whether the language model runs in fp16.
    pub fn is_fp16(&self) -> bool {
        self.lm_fp16
    }

    /// The Q-Former alone on given image features.
    pub fn qformer_embeds(&mut self, feats: ArrayD<f32>) -> Result<ArrayD<f32>, RuntimeError> {
        if self.per_image_encoders() && feats.shape()[0] > 1 {
            return self.one_image_at_a_time(feats, Self::qformer_embeds);
        }
        let t = Tensor::from_array(feats).map_err(ort_err("image_features"))?;
        let out = self.qformer.run(ort::inputs![io::IMAGE_FEATURES => t]).map_err(ort_err("Q-Former"))?;
        to_f32(&out[io::IMAGE_EMBEDS])
    }
}

impl Blip2Model {
    /// Peak bytes ONNX Runtime's allocators for `memory` held, summed over the graphs'
    /// sessions (each arena's `MaxInUse`): the GPU memory the model used on a CUDA
    /// profile (weights, activations, KV cache), as `torch.cuda.max_memory_allocated` is
    /// for transformers. None when no session's allocator for that memory keeps statistics
    /// (ONNX Runtime's CPU allocator without its arena, as the CPU profile runs).
    pub fn allocator_peak_bytes(&self, memory: &MemoryInfo<'_>) -> Option<u64> {
        let sessions = [&self.vision, &self.qformer, &self.lm].into_iter().chain(self.text_encoder.as_ref());
        sessions.filter_map(|s| allocator_peak(s, memory)).reduce(|a, b| a + b)
    }

    /// Encoders with dynamically quantized activations (`--quantize-encoders`) pick one
    /// quantization scale per call from the whole input; run one image per call so an
    /// image's result never depends on the others in its batch.
    fn per_image_encoders(&self) -> bool {
        self.manifest.encoder_quantization.is_some()
    }

    /// `encode` on each image of the batch `x` alone, the results joined along the batch.
    fn one_image_at_a_time<D: ndarray::RemoveAxis>(
        &mut self,
        x: ndarray::Array<f32, D>,
        encode: impl Fn(&mut Self, ndarray::Array<f32, D>) -> Result<ArrayD<f32>, RuntimeError>,
    ) -> Result<ArrayD<f32>, RuntimeError> {
        let rows = x
            .outer_iter()
            .map(|one| encode(self, one.insert_axis(Axis(0)).into_dimensionality::<D>().expect("same rank").to_owned()))
            .collect::<Result<Vec<_>, _>>()?;
        let views: Vec<_> = rows.iter().map(|r| r.view()).collect();
        ndarray::concatenate(Axis(0), &views).map_err(|e| RuntimeError::Unsupported(format!("joining per-image outputs: {e}")))
    }

    /// Whether the LM graph takes `logits_to_keep` (earlier exports computed every position).
    pub fn lm_takes_logits_to_keep(&self) -> bool {
        self.manifest.graphs.language_model.inputs.iter().any(|t| t.name == io::LOGITS_TO_KEEP)
    }
}

/// `MaxInUse` of `session`'s allocator for `memory`, if it keeps statistics.
pub fn allocator_peak(session: &Session, memory: &MemoryInfo<'_>) -> Option<u64> {
    use ort::AsPointer;
    let alloc = ort::memory::Allocator::new(session, memory.clone()).ok()?;
    let api = ort::api();
    let mut kvp: *mut ort::sys::OrtKeyValuePairs = std::ptr::null_mut();
    // SAFETY: `alloc` is a live allocator; on success `kvp` is a key-value list we own
    // and release below; the value string is read before that.
    unsafe {
        let status = (api.AllocatorGetStats)(alloc.ptr(), &mut kvp);
        if !status.0.is_null() {
            (api.ReleaseStatus)(status.0);
            return None;
        }
        if kvp.is_null() {
            return None;
        }
        let v = (api.GetKeyValue)(kvp, c"MaxInUse".as_ptr());
        let peak = if v.is_null() { None } else { std::ffi::CStr::from_ptr(v).to_str().ok().and_then(|s| s.parse().ok()) };
        (api.ReleaseKeyValuePairs)(kvp);
        peak
    }
}

/// ONNX Runtime's device memory on CUDA device `id` (where its CUDA arenas allocate).
pub fn cuda_memory(id: i32) -> Result<MemoryInfo<'static>, RuntimeError> {
    MemoryInfo::new(AllocationDevice::CUDA, id, AllocatorType::Arena, MemoryType::Default).map_err(ort_err("CUDA memory info"))
}

/// Reads a float tensor (f32 or f16) as f32.
pub fn to_f32(v: &DynValue) -> Result<ArrayD<f32>, RuntimeError> {
    if let Ok(a) = v.try_extract_array::<f32>() {
        return Ok(a.to_owned());
    }
    let a = v.try_extract_array::<half::f16>().map_err(ort_err("reading an output"))?;
    Ok(a.mapv(|x| x.to_f32()))
}

/// Language-model state between steps: the KV cache (as ONNX values fed straight back
/// in), the attention mask and the next position of each row.
pub struct LmState<'m> {
    model: &'m mut Blip2Model,
    /// `present.*` of the last step, in layer order: key, value, key, value, ...
    cache: Vec<DynValue>,
    mask: Vec<Vec<i64>>,
    next_pos: Vec<i64>,
    hidden: usize,
}

impl<'m> LmState<'m> {
    /// Runs the prompt (prefill) and returns the state plus the logits of every prompt
    /// position, `[rows, len, vocab]` (see [`last_position`]).
    ///
    /// `ids` and `mask` are rectangular (left-padded) `[rows, len]`; `image_embeds` is
    /// `[rows, num_query_tokens, hidden]`, matching the image tokens in `ids`.
    pub fn prefill(
        model: &'m mut Blip2Model,
        ids: &[Vec<i64>],
        mask: &[Vec<i64>],
        image_embeds: DynValue,
    ) -> Result<(Self, Array3<f32>), RuntimeError> {
        Self::prefill_logits(model, ids, mask, image_embeds, false)
    }

    /// [`LmState::prefill`] returning only the logits of the last prompt position,
    /// `[rows, vocab]`: all that generation needs, without copying the others out of
    /// ONNX Runtime (`[rows, len, vocab]` is 26 MB at batch 4 for OPT's vocabulary).
    pub fn prefill_last(
        model: &'m mut Blip2Model,
        ids: &[Vec<i64>],
        mask: &[Vec<i64>],
        image_embeds: DynValue,
    ) -> Result<(Self, Array2<f32>), RuntimeError> {
        let (st, logits) = Self::prefill_logits(model, ids, mask, image_embeds, true)?;
        Ok((st, logits.index_axis_move(Axis(1), 0)))
    }

    fn prefill_logits(
        model: &'m mut Blip2Model,
        ids: &[Vec<i64>],
        mask: &[Vec<i64>],
        image_embeds: DynValue,
        last_only: bool,
    ) -> Result<(Self, Array3<f32>), RuntimeError> {
        let rows = ids.len();
        let len = ids.first().map(Vec::len).unwrap_or(0);
        let t = &model.manifest.text;
        let (heads, head_dim, layers, hidden) = (t.num_heads, t.head_dim, t.num_layers, t.hidden_size);
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
        let mut cache = Vec::with_capacity(2 * layers);
        for _ in 0..2 * layers {
            cache.push(empty_kv(model.lm_fp16, rows, heads, head_dim)?);
        }
        let mut st = Self { model, cache, mask: mask.to_vec(), next_pos, hidden };
        let ids = Array2::from_shape_fn((rows, len), |(r, j)| ids[r][j]);
        let logits = st.run(ids, pos, image_embeds, last_only)?;
        Ok((st, logits))
    }

    fn run(
        &mut self,
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
            (io::ATTENTION_MASK, Tensor::from_array(mask).map_err(ort_err("attention_mask"))?.into_dyn()),
            (io::POSITION_IDS, Tensor::from_array(pos).map_err(ort_err("position_ids"))?.into_dyn()),
        ];
        if last_only && seq > 1 && self.model.lm_takes_logits_to_keep() {
            // The LM head runs for the last position only.
            let keep = Tensor::from_array(ndarray::arr0(1i64)).map_err(ort_err("logits_to_keep"))?;
            inputs.push((io::LOGITS_TO_KEEP, keep.into_dyn()));
        }
        let refs: Vec<(String, &DynValue)> = inputs.iter().map(|(n, v)| (n.to_string(), v)).collect();
        let m = &mut *self.model;
        run_decoder(&mut m.lm, &m.kv_memory, &refs, &mut self.cache, "language model", last_only)
    }

    /// Feeds one token per row and returns the logits of the new position.
    pub fn step(&mut self, tokens: &[i64]) -> Result<Array2<f32>, RuntimeError> {
        let rows = tokens.len();
        for m in &mut self.mask {
            m.push(1);
        }
        let pos = Array2::from_shape_fn((rows, 1), |(r, _)| self.next_pos[r]);
        for p in &mut self.next_pos {
            *p += 1;
        }
        let ids = Array2::from_shape_fn((rows, 1), |(r, _)| tokens[r]);
        let no_images = empty_images(self.model.lm_fp16, rows, self.hidden)?;
        Ok(self.run(ids, pos, no_images, true)?.index_axis_move(Axis(1), 0))
    }

    /// New row i is old row `rows[i]` (expansion into beams, beam reordering).
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<(), RuntimeError> {
        self.mask = rows.iter().map(|&r| self.mask[r].clone()).collect();
        self.next_pos = rows.iter().map(|&r| self.next_pos[r]).collect();
        let fp16 = self.model.lm_fp16;
        for v in &mut self.cache {
            *v = if fp16 { select::<half::f16>(v, rows)? } else { select::<f32>(v, rows)? };
        }
        Ok(())
    }
}

/// Encoder-decoder (T5) state: the cross-attention cache the text encoder computed once,
/// the encoder mask, and the decoder's self-attention cache.
pub struct T5State<'m> {
    model: &'m mut Blip2Model,
    /// cross.{i}.key, cross.{i}.value, ... per decoder layer.
    cross: Vec<DynValue>,
    enc_mask: Array2<i64>,
    cache: Vec<DynValue>,
}

impl<'m> T5State<'m> {
    /// Runs the encoder on each row alone (so a batch row sees exactly the positions it
    /// sees alone: T5's relative positions would shift with padding), pads the rows'
    /// cross-attention caches on the right with a zero mask, then runs the decoder's
    /// first step from `decoder_start`. Returns the state and `[rows, vocab]` logits.
    pub fn prefill(
        model: &'m mut Blip2Model,
        ids: &[Vec<i64>],
        mask: &[Vec<i64>],
        image_embeds: ArrayD<f32>,
        decoder_start: i64,
    ) -> Result<(Self, Array2<f32>), RuntimeError> {
        let rows = ids.len();
        let t = &model.manifest.text;
        let (heads, head_dim, layers) = (t.num_heads, t.head_dim, t.num_layers);
        let fp16 = model.lm_fp16;
        let encoder = model.text_encoder.as_mut().ok_or_else(|| RuntimeError::Unsupported("no text encoder".into()))?;
        // Per row: the unpadded ids and its cross caches as f32 arrays.
        let mut per_row: Vec<Vec<ArrayD<f32>>> = Vec::with_capacity(rows);
        let mut lens = Vec::with_capacity(rows);
        for r in 0..rows {
            let keep: Vec<i64> = ids[r].iter().zip(&mask[r]).filter(|(_, &m)| m != 0).map(|(&i, _)| i).collect();
            let n = keep.len();
            let row_ids = Array2::from_shape_vec((1, n), keep).expect("row shape");
            let row_mask = Array2::<i64>::ones((1, n));
            let img = image_embeds.index_axis(Axis(0), r).insert_axis(Axis(0)).to_owned();
            let img = if fp16 { half_value(img)? } else { f32_value(img)? };
            let out = encoder
                .run(ort::inputs![
                    io::INPUT_IDS => Tensor::from_array(row_ids).map_err(ort_err("input_ids"))?,
                    io::IMAGE_EMBEDS => img,
                    io::ATTENTION_MASK => Tensor::from_array(row_mask).map_err(ort_err("attention_mask"))?,
                ])
                .map_err(ort_err("text encoder"))?;
            let mut caches = Vec::with_capacity(2 * layers);
            for l in 0..layers {
                for name in [io::cross_key(l), io::cross_value(l)] {
                    let v = out.get(name.as_str()).ok_or(RuntimeError::MissingOutput(name))?;
                    caches.push(to_f32(v)?);
                }
            }
            per_row.push(caches);
            lens.push(n);
        }
        let longest = lens.iter().copied().max().unwrap_or(0);
        let enc_mask = Array2::from_shape_fn((rows, longest), |(r, j)| i64::from(j < lens[r]));
        let mut cross = Vec::with_capacity(2 * layers);
        for c in 0..2 * layers {
            let mut a = ArrayD::<f32>::zeros(IxDyn(&[rows, heads, longest, head_dim]));
            for r in 0..rows {
                let src = &per_row[r][c];
                a.slice_mut(ndarray::s![r, .., ..lens[r], ..]).assign(&src.index_axis(Axis(0), 0));
            }
            cross.push(if fp16 { half_value(a)? } else { f32_value(a)? });
        }
        let mut cache = Vec::with_capacity(2 * layers);
        for _ in 0..2 * layers {
            cache.push(empty_kv(fp16, rows, heads, head_dim)?);
        }
        let mut st = Self { model, cross, enc_mask, cache };
        let logits = st.step(&vec![decoder_start; rows])?;
        Ok((st, logits))
    }

    /// Feeds one decoder token per row and returns the logits of the new position.
    pub fn step(&mut self, tokens: &[i64]) -> Result<Array2<f32>, RuntimeError> {
        let rows = tokens.len();
        let ids = Array2::from_shape_fn((rows, 1), |(r, _)| tokens[r]);
        let ids = Tensor::from_array(ids).map_err(ort_err("input_ids"))?.into_dyn();
        let mask = Tensor::from_array(self.enc_mask.clone()).map_err(ort_err("encoder_attention_mask"))?.into_dyn();
        let mut refs: Vec<(String, &DynValue)> =
            vec![(io::INPUT_IDS.to_string(), &ids), (io::ENCODER_ATTENTION_MASK.to_string(), &mask)];
        for (i, v) in self.cross.iter().enumerate() {
            let name = if i % 2 == 0 { io::cross_key(i / 2) } else { io::cross_value(i / 2) };
            refs.push((name, v));
        }
        let m = &mut *self.model;
        let logits = run_decoder(&mut m.lm, &m.kv_memory, &refs, &mut self.cache, "text decoder", true)?;
        Ok(logits.index_axis_move(Axis(1), 0))
    }

    /// New row i is old row `rows[i]`.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<(), RuntimeError> {
        self.enc_mask = self.enc_mask.select(Axis(0), rows);
        let fp16 = self.model.lm_fp16;
        for v in self.cache.iter_mut().chain(self.cross.iter_mut()) {
            *v = if fp16 { select::<half::f16>(v, rows)? } else { select::<f32>(v, rows)? };
        }
        Ok(())
    }
}

fn half_value(a: ArrayD<f32>) -> Result<DynValue, RuntimeError> {
    Ok(Tensor::from_array(a.mapv(half::f16::from_f32)).map_err(ort_err("tensor"))?.into_dyn())
}

/// Runs a decoder graph with its KV cache through an IO binding: `cache` (present.* of
/// the last step, key then value per layer) is bound as `past_key_values.*` where it
/// lies, and this step's `present.*` are allocated on `kv_memory` (the GPU for CUDA
/// profiles), so the cache never crosses to the host between steps; only the logits come
/// back to host memory. Returns the logits `[rows, seq, vocab]`, or with `last_only`
/// those of the last position, `[rows, 1, vocab]`: the only copy made of them.
fn run_decoder(
    session: &mut Session,
    kv_memory: &MemoryInfo,
    inputs: &[(String, &DynValue)],
    cache: &mut Vec<DynValue>,
    what: &str,
    last_only: bool,
) -> Result<Array3<f32>, RuntimeError> {
    let layers = cache.len() / 2;
    let bind_err = ort_err(format!("{what}: binding inputs and outputs"));
    let mut binding = session.create_binding().map_err(ort_err(format!("{what}: creating an IO binding")))?;
    let bound = (|| -> Result<(), ort::Error> {
        for (name, v) in inputs {
            binding.bind_input(name.as_str(), *v)?;
        }
        for (i, v) in cache.iter().enumerate() {
            let name = if i % 2 == 0 { io::past_key(i / 2) } else { io::past_value(i / 2) };
            binding.bind_input(name, v)?;
        }
        for l in 0..layers {
            binding.bind_output_to_device(io::present_key(l), kv_memory)?;
            binding.bind_output_to_device(io::present_value(l), kv_memory)?;
        }
        let host = MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default)?;
        binding.bind_output_to_device(io::LOGITS, &host)?;
        Ok(())
    })();
    bound.map_err(bind_err)?;
    let mut out = session.run_binding(&binding).map_err(ort_err(what))?;
    let mut next = Vec::with_capacity(2 * layers);
    for l in 0..layers {
        for name in [io::present_key(l), io::present_value(l)] {
            next.push(out.remove(name.as_str()).ok_or(RuntimeError::MissingOutput(name))?);
        }
    }
    let logits = out.get(io::LOGITS).ok_or_else(|| RuntimeError::MissingOutput(io::LOGITS.into()))?;
    let a = logits.try_extract_array::<f32>().map_err(ort_err("logits"))?;
    let a = a.into_dimensionality::<ndarray::Ix3>().map_err(|_| RuntimeError::MissingOutput("3-D logits".into()))?;
    let seq = a.shape()[1];
    let a = if last_only && seq > 1 { a.slice(ndarray::s![.., seq - 1.., ..]).to_owned() } else { a.to_owned() };
    *cache = next;
    Ok(a)
}

/// The logits of the last position of each row, `[rows, vocab]`.
pub fn last_position(logits: &Array3<f32>) -> Array2<f32> {
    let seq = logits.shape()[1];
    logits.index_axis(Axis(1), seq - 1).to_owned()
}

fn select<T>(v: &DynValue, rows: &[usize]) -> Result<DynValue, RuntimeError>
where
    T: ort::value::PrimitiveTensorElementType + Clone + std::fmt::Debug + 'static,
{
    // A cache kept on a GPU comes to the host for reordering (beam search only).
    let tensor = v.view().downcast::<DynTensorValueType>().map_err(ort_err("KV cache"))?;
    let host;
    let v = if tensor.memory_info().is_cpu_accessible() {
        v
    } else {
        host = tensor.to(AllocationDevice::CPU, 0).map_err(ort_err("copying the KV cache to the host"))?.into_dyn();
        &host
    };
    let a = v.try_extract_array::<T>().map_err(ort_err("KV cache"))?;
    let picked = a.select(Axis(0), rows);
    Ok(Tensor::from_array(picked).map_err(ort_err("KV cache"))?.into_dyn())
}

fn empty_kv(fp16: bool, rows: usize, heads: usize, head_dim: usize) -> Result<DynValue, RuntimeError> {
    let shape = IxDyn(&[rows, heads, 0, head_dim]);
    Ok(if fp16 {
        Tensor::from_array(ArrayD::<half::f16>::from_elem(shape, half::f16::ZERO)).map_err(ort_err("past_key_values"))?.into_dyn()
    } else {
        Tensor::from_array(ArrayD::<f32>::zeros(shape)).map_err(ort_err("past_key_values"))?.into_dyn()
    })
}

fn empty_images(fp16: bool, rows: usize, hidden: usize) -> Result<DynValue, RuntimeError> {
    let shape = IxDyn(&[rows, 0, hidden]);
    Ok(if fp16 {
        Tensor::from_array(ArrayD::<half::f16>::from_elem(shape, half::f16::ZERO)).map_err(ort_err("image_embeds"))?.into_dyn()
    } else {
        Tensor::from_array(ArrayD::<f32>::zeros(shape)).map_err(ort_err("image_embeds"))?.into_dyn()
    })
}

/// Wraps an f32 array as an ONNX value in the LM's dtype.
pub fn lm_value(model: &Blip2Model, a: ArrayD<f32>) -> Result<DynValue, RuntimeError> {
    if model.lm_fp16 {
        half_value(a)
    } else {
        f32_value(a)
    }
}

/// Wraps an f32 array as an ONNX value (tests and callers that hold embeddings as arrays).
pub fn f32_value(a: ArrayD<f32>) -> Result<DynValue, RuntimeError> {
    Ok(Tensor::from_array(a).map_err(ort_err("tensor"))?.into_dyn())
}
