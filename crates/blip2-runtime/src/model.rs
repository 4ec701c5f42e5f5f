//! The sessions of an exported folder, described by its manifest: the vision encoder and
//! Q-Former ([`ImageEncoders`], run here), and the decoder's graphs, which the decoder
//! states in [`crate::state`] drive step by step.

use std::path::{Path, PathBuf};

use blip2_core::{io, Family, Manifest};
use ndarray::{Array2, Array4, ArrayD, Axis};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::{DynValue, Tensor};

use crate::error::{ort_err, RuntimeError};

pub use blip2_core::GraphKind;

/// Creates a session for one graph file; the caller decides providers and options.
pub type SessionFactory<'f> = dyn FnMut(GraphKind, &Path) -> Result<Session, RuntimeError> + 'f;

/// How the export's language model keeps its KV cache between steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheLayout {
    /// Grows by one position a step (`present.*` fed back as `past_key_values.*`):
    /// the portable graphs.
    Growing,
    /// OPT `--target cuda`: fixed-length buffers written in place, each row's length
    /// passed as `seqlens_k`.
    StaticRows,
    /// Flan-T5 `--target cuda`: fixed-length buffers, one `past_sequence_length` for all
    /// rows.
    StaticShared,
}

/// The language model's signature, read once from the manifest at load: what the
/// decoder states bind and ask for, never probed again by name at each step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LmSignature {
    pub cache: CacheLayout,
    /// The graph picks tokens itself (`next_token`, `top_logprobs`, `top_ids`).
    pub selects_tokens: bool,
    /// Sampling's candidates (`top_logits`; exports made before it answer with logits).
    pub top_logits: bool,
    /// The prefill can compute the last position's logits alone (`logits_to_keep`).
    pub logits_to_keep: bool,
    /// The graph takes and returns fp16 tensors.
    pub fp16: bool,
    /// Flan-T5's portable decoder masks its self-attention per row
    /// (`decoder_attention_mask`; exports made before it take none), so rows join.
    pub decoder_mask: bool,
}

impl LmSignature {
    fn read(m: &Manifest) -> Self {
        let g = &m.graphs.language_model;
        let input = |n: &str| g.inputs.iter().any(|t| t.name == n);
        let output = |n: &str| g.outputs.iter().any(|t| t.name == n);
        let cache = if input(io::SEQLENS_K) {
            CacheLayout::StaticRows
        } else if input(io::PAST_SEQUENCE_LENGTH) {
            CacheLayout::StaticShared
        } else {
            CacheLayout::Growing
        };
        LmSignature {
            cache,
            selects_tokens: output(io::NEXT_TOKEN),
            top_logits: output(io::TOP_LOGITS),
            logits_to_keep: input(io::LOGITS_TO_KEEP),
            decoder_mask: input(io::DECODER_ATTENTION_MASK),
            fp16: m
                .graphs
                .qformer
                .outputs
                .iter()
                .any(|t| t.name == io::IMAGE_EMBEDS && t.dtype == "float16"),
        }
    }
}

/// The vision encoder and the Q-Former: pixel values to the query embeddings the language
/// model reads. [`Blip2Model`] holds them and runs them on its caller's thread (`infer`);
/// the server's engine takes them over ([`Blip2Model::take_image_encoders`]) and runs them
/// on a thread of their own, ahead of the language model.
pub struct ImageEncoders {
    vision: Session,
    qformer: Session,
    /// Whether the vision encoder's image features (the Q-Former's input) are fp16.
    vision_fp16: bool,
    /// `--quantize-encoders` exports: one image per call ([`ImageEncoders::encode_images`]).
    per_image: bool,
    /// The threads the encoders ran on (tests: the engine's image thread).
    #[cfg(any(test, feature = "test-support"))]
    threads: std::collections::HashSet<std::thread::ThreadId>,
    /// Called with the pixel values before each run of the vision encoder (tests: a slow
    /// or failing encoder).
    #[cfg(any(test, feature = "test-support"))]
    before_run: Option<Box<RunHook>>,
}

/// A hook called with the pixel values before each run of a vision encoder
/// ([`ImageEncoders::before_each_run`], `RetrievalModel::before_each_run`).
#[cfg(any(test, feature = "test-support"))]
pub(crate) type RunHook = dyn FnMut(ndarray::ArrayView4<'_, f32>) + Send + Sync;

/// Something that turns pixel values `[B,3,H,W]` into query embeddings
/// `[B, num_query_tokens, hidden]` (an ONNX value in the language model's dtype): the
/// encoders, or a model that still holds them.
pub trait EncodeImages {
    fn encode_images(&mut self, pixels: Array4<f32>) -> Result<DynValue, RuntimeError>;
}

pub struct Blip2Model {
    pub manifest: Manifest,
    /// The language model's inputs, outputs and cache, resolved at load.
    pub signature: LmSignature,
    pub dir: PathBuf,
    /// None once handed over ([`Blip2Model::take_image_encoders`]).
    encoders: Option<ImageEncoders>,
    pub(crate) lm: Session,
    /// T5 only: the text encoder.
    pub(crate) text_encoder: Option<Session>,
    /// The KV cache's row reorder (beam search, rows leaving), where the cache lies.
    pub(crate) kv_reorder: Option<Session>,
    /// Portable exports: the growing KV cache's join of newcomer rows, where it lies.
    pub(crate) kv_join: Option<Session>,
    /// Whether the LM graph takes and returns fp16 tensors.
    pub(crate) lm_fp16: bool,
    /// Where the KV cache lives between decode steps (host memory unless set).
    pub(crate) kv_memory: MemoryInfo<'static>,
    /// Set by [`Blip2Model::use_fixed_step_buffers`]: decode steps bind the same buffers
    /// every time (CUDA graphs), and finished requests leave theirs here.
    pub(crate) step_pool: Option<crate::state::fixed::StepPool>,
    /// The threads the language model's graphs ran on (tests: one engine thread).
    #[cfg(any(test, feature = "test-support"))]
    lm_threads: std::collections::HashSet<std::thread::ThreadId>,
    /// Joins run by the `kv_join` graph (tests: the device path was taken).
    #[cfg(any(test, feature = "test-support"))]
    kv_join_runs: usize,
}

/// The session for graph `file` of the export in `dir`, or an error naming the missing file.
pub(crate) fn open_graph(
    dir: &Path,
    file: &str,
    kind: GraphKind,
    factory: &mut SessionFactory<'_>,
) -> Result<Session, RuntimeError> {
    let path = dir.join(file);
    if !path.exists() {
        return Err(RuntimeError::MissingFile(path));
    }
    factory(kind, &path)
}

/// Fails unless the session's graph has the inputs and outputs the manifest lists for it
/// (names, and sizes where both fix them): a graph file copied in from another export
/// is named, instead of ONNX Runtime's "Failed to find input name in the mapping" at the
/// first run.
pub(crate) fn check_graph_io(
    dir: &Path,
    info: &blip2_core::GraphInfo,
    session: &Session,
) -> Result<(), RuntimeError> {
    use blip2_core::Dim;
    let mismatch = |what: String| RuntimeError::GraphMismatch {
        path: dir.join(&info.file),
        manifest: dir.join(io::MANIFEST_FILE),
        what,
    };
    // The first few names: a language model has two past tensors per layer.
    let list = |v: &[&str]| {
        let mut l = v.iter().take(4).copied().collect::<Vec<_>>().join(", ");
        if v.len() > 4 {
            l.push_str(&format!(" and {} more", v.len() - 4));
        }
        l
    };
    for (side, listed, outlets) in
        [("input", &info.inputs, session.inputs()), ("output", &info.outputs, session.outputs())]
    {
        let in_graph: Vec<&str> = outlets.iter().map(|o| o.name()).collect();
        // Inputs with a default may be left out of a graph's inputs by ONNX Runtime.
        let missing: Vec<&str> = listed
            .iter()
            .filter(|t| !(side == "input" && t.optional))
            .map(|t| t.name.as_str())
            .filter(|n| !in_graph.contains(n))
            .collect();
        let extra: Vec<&str> =
            in_graph.iter().copied().filter(|n| !listed.iter().any(|t| t.name == *n)).collect();
        let mut what = Vec::new();
        if !missing.is_empty() {
            what.push(format!("it lacks the {side}s {} that the manifest lists", list(&missing)));
        }
        if !extra.is_empty() {
            what.push(format!("its {side}s {} are not in the manifest", list(&extra)));
        }
        if !what.is_empty() {
            return Err(mismatch(what.join("; ")));
        }
        for o in outlets {
            let (Some(t), Some(shape)) =
                (listed.iter().find(|t| t.name == o.name()), o.dtype().tensor_shape())
            else {
                continue;
            };
            let dims: &[i64] = shape;
            let differs = t.shape.len() != dims.len()
                || t.shape
                    .iter()
                    .zip(dims)
                    .any(|(m, &g)| matches!(m, Dim::Fixed(f) if g >= 0 && *f != g));
            if differs {
                let listed: Vec<String> = t
                    .shape
                    .iter()
                    .map(|d| match d {
                        Dim::Fixed(f) => f.to_string(),
                        Dim::Named(n) => n.clone(),
                    })
                    .collect();
                return Err(mismatch(format!(
                    "its {side} {} has shape {dims:?}, the manifest lists [{}]",
                    o.name(),
                    listed.join(", ")
                )));
            }
        }
    }
    Ok(())
}

impl Blip2Model {
    pub fn load(dir: &Path, factory: &mut SessionFactory<'_>) -> Result<Self, RuntimeError> {
        let manifest = Manifest::load(dir)?;
        let g = &manifest.graphs;
        let mut open = |kind: GraphKind, info: &blip2_core::GraphInfo| {
            let s = open_graph(dir, &info.file, kind, factory)?;
            check_graph_io(dir, info, &s)?;
            Ok::<_, RuntimeError>(s)
        };
        let vision = open(GraphKind::VisionEncoder, &g.vision_encoder)?;
        let qformer = open(GraphKind::QFormer, &g.qformer)?;
        let text_encoder = match (&g.text_encoder, manifest.family) {
            (Some(te), _) => Some(open(GraphKind::TextEncoder, te)?),
            (None, Family::T5) => {
                return Err(RuntimeError::Unsupported("a t5 manifest without text_encoder".into()))
            }
            (None, Family::Opt) => None,
        };
        let lm = open(GraphKind::LanguageModel, &g.language_model)?;
        let kv_reorder =
            g.kv_reorder.as_ref().map(|r| open(GraphKind::KvReorder, r)).transpose()?;
        let kv_join = g.kv_join.as_ref().map(|j| open(GraphKind::KvJoin, j)).transpose()?;
        let is_fp16 = |t: &[blip2_core::TensorInfo], name: &str| {
            t.iter().any(|t| t.name == name && t.dtype == "float16")
        };
        // The Q-Former's output is in the language model's dtype, its input in the vision encoder's.
        let signature = LmSignature::read(&manifest);
        let lm_fp16 = signature.fp16;
        let vision_fp16 = is_fp16(&g.qformer.inputs, io::IMAGE_FEATURES);
        let kv_memory =
            MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default)
                .map_err(ort_err("host memory info"))?;
        let encoders = ImageEncoders {
            vision,
            qformer,
            vision_fp16,
            per_image: manifest.encoder_quantization.is_some(),
            #[cfg(any(test, feature = "test-support"))]
            threads: Default::default(),
            #[cfg(any(test, feature = "test-support"))]
            before_run: None,
        };
        Ok(Self {
            manifest,
            signature,
            dir: dir.into(),
            encoders: Some(encoders),
            lm,
            text_encoder,
            kv_reorder,
            kv_join,
            lm_fp16,
            kv_memory,
            step_pool: None,
            #[cfg(any(test, feature = "test-support"))]
            lm_threads: Default::default(),
            #[cfg(any(test, feature = "test-support"))]
            kv_join_runs: 0,
        })
    }

    /// Vision encoder then Q-Former ([`ImageEncoders::encode_images`]).
    pub fn encode_images(&mut self, pixels: Array4<f32>) -> Result<DynValue, RuntimeError> {
        self.image_encoders()?.encode_images(pixels)
    }

    /// The vision encoder alone (benchmarks, parity tests).
    pub fn vision_features(&mut self, pixels: Array4<f32>) -> Result<ArrayD<f32>, RuntimeError> {
        self.image_encoders()?.vision_features(pixels)
    }

    /// The vision encoder and Q-Former, unless they were handed over.
    pub fn image_encoders(&mut self) -> Result<&mut ImageEncoders, RuntimeError> {
        self.encoders.as_mut().ok_or_else(|| {
            RuntimeError::Unsupported(
                "the vision encoder and Q-Former were handed to the engine's image stage".into(),
            )
        })
    }

    /// Hands the vision encoder and Q-Former over (to the engine's image thread); the
    /// model keeps the language model's graphs. None if they were handed over already.
    pub fn take_image_encoders(&mut self) -> Option<ImageEncoders> {
        self.encoders.take()
    }

    /// Takes the encoders back (the engine, as it shuts down).
    pub fn put_image_encoders(&mut self, encoders: ImageEncoders) {
        self.encoders = Some(encoders);
    }

    /// T5's text encoder alone: `encoder_hidden_states` for one batch (parity tests).
    pub fn text_encoder_hidden(
        &mut self,
        ids: Array2<i64>,
        mask: Array2<i64>,
        image_embeds: DynValue,
    ) -> Result<ArrayD<f32>, RuntimeError> {
        let enc = self
            .text_encoder
            .as_mut()
            .ok_or_else(|| RuntimeError::Unsupported("no text encoder".into()))?;
        let out = enc
            .run(ort::inputs![
                io::INPUT_IDS => Tensor::from_array(ids).map_err(ort_err("input_ids"))?,
                io::IMAGE_EMBEDS => image_embeds,
                io::ATTENTION_MASK => Tensor::from_array(mask).map_err(ort_err("attention_mask"))?,
            ])
            .map_err(ort_err("text encoder"))?;
        to_f32(&out[io::ENCODER_HIDDEN_STATES])
    }

    /// Places the decoder's state as `profile` runs it, decided once at load: the KV
    /// cache stays on the CUDA device between steps when the language model runs on CUDA
    /// or TensorRT, and every decode step binds fixed buffers when the profile captures
    /// CUDA graphs (`cuda_graph = true`).
    pub fn place_for(&mut self, profile: &crate::config::Profile) -> Result<(), RuntimeError> {
        use crate::config::Provider;
        let lm_accelerated = matches!(
            profile.providers_for(GraphKind::LanguageModel.name()).first(),
            Some(Provider::Cuda | Provider::TensorRt)
        );
        if lm_accelerated {
            self.keep_cache_on_cuda(profile.device_id)?;
        }
        if profile.cuda_graph {
            self.use_fixed_step_buffers()?;
        }
        Ok(())
    }

    /// Keeps the KV cache on a CUDA device between steps (for sessions on the CUDA or
    /// TensorRT providers); by default it stays in host memory.
    pub fn keep_cache_on_cuda(&mut self, device_id: i32) -> Result<(), RuntimeError> {
        self.kv_memory = MemoryInfo::new(
            AllocationDevice::CUDA,
            device_id,
            AllocatorType::Device,
            MemoryType::Default,
        )
        .map_err(ort_err("CUDA memory info"))?;
        Ok(())
    }

    /// Runs every decode step of a CUDA-target OPT export on the same buffers (inputs,
    /// outputs and KV cache at fixed addresses, `total_sequence_length` fixed at the
    /// buffers' length, one `gpu_graph_id` per buffer set and candidate count), as a
    /// language-model session that captures CUDA graphs needs; see
    /// [`crate::state::fixed`]. Finished requests leave their buffers for the next of the
    /// same shape. It works on every provider (the tests run it on the CPU); only a
    /// session created with the CUDA provider's `enable_cuda_graph` captures.
    pub fn use_fixed_step_buffers(&mut self) -> Result<(), RuntimeError> {
        crate::state::fixed::check_export(&self.manifest, &self.dir)?;
        self.step_pool.get_or_insert_with(Default::default);
        Ok(())
    }

    #[cfg(any(test, feature = "test-support"))]
    /// The pool of idle decode-step buffers, when [`Blip2Model::use_fixed_step_buffers`]
    /// is on.
    pub fn step_pool(&self) -> Option<&crate::state::fixed::StepPool> {
        self.step_pool.as_ref()
    }

    /// Called by the decoder states before each run of a language-model graph (the
    /// decoder, `kv_reorder`): under `test-support`, notes the thread it runs on.
    pub(crate) fn note_lm_run(&mut self) {
        #[cfg(any(test, feature = "test-support"))]
        self.lm_threads.insert(std::thread::current().id());
    }

    #[cfg(any(test, feature = "test-support"))]
    /// The threads the language model's graphs have run on, and forgets them.
    pub fn take_lm_threads(&mut self) -> Vec<std::thread::ThreadId> {
        self.lm_threads.drain().collect()
    }

    #[cfg(any(test, feature = "test-support"))]
    /// Closes the `kv_reorder` session, as for an export made before portable exports had
    /// one (tests: the host path against the device path).
    pub fn drop_kv_reorder(&mut self) {
        self.kv_reorder = None;
    }

    #[cfg(any(test, feature = "test-support"))]
    /// Closes the `kv_join` session, as for an export made before it (tests: the host
    /// path against the device path).
    pub fn drop_kv_join(&mut self) {
        self.kv_join = None;
    }

    #[cfg(any(test, feature = "test-support"))]
    /// How many joins (and position drops) the `kv_join` graph has run.
    pub fn kv_join_runs(&self) -> usize {
        self.kv_join_runs
    }

    /// Where the growing cache's joins run: the export's `kv_join` graph and the cache's
    /// memory (noted as a language-model run), or None for exports made before it.
    pub(crate) fn join_on(&mut self) -> Option<crate::kv_cache::JoinOn<'_>> {
        #[cfg(any(test, feature = "test-support"))]
        if self.kv_join.is_some() {
            self.lm_threads.insert(std::thread::current().id());
            self.kv_join_runs += 1;
        }
        let session = self.kv_join.as_mut()?;
        Some(crate::kv_cache::JoinOn { session, memory: &self.kv_memory })
    }

    /// Allocates buffers where the decoder's cache lives (static KV caches).
    pub(crate) fn cache_allocator(&self) -> Result<Allocator, RuntimeError> {
        if self.kv_memory.is_cpu_accessible() {
            return Ok(Allocator::default());
        }
        Allocator::new(&self.lm, self.kv_memory.clone())
            .map_err(ort_err("the decoder's device allocator"))
    }

    /// The Q-Former alone on given image features ([`ImageEncoders::qformer_embeds`]).
    pub fn qformer_embeds(&mut self, feats: ArrayD<f32>) -> Result<ArrayD<f32>, RuntimeError> {
        self.image_encoders()?.qformer_embeds(feats)
    }

    #[cfg(any(test, feature = "test-support"))]
    /// The threads the vision encoder and Q-Former have run on, and forgets them.
    pub fn take_encoder_threads(&mut self) -> Vec<std::thread::ThreadId> {
        self.encoders.as_mut().map(|e| e.threads.drain().collect()).unwrap_or_default()
    }
}

impl Blip2Model {
    /// Peak bytes ONNX Runtime's allocators for `memory` held, summed over the graphs'
    /// sessions (each arena's `MaxInUse`): the GPU memory the model used on a CUDA
    /// profile (weights, activations, KV cache), as `torch.cuda.max_memory_allocated` is
    /// for transformers. None when no session's allocator for that memory keeps statistics
    /// (ONNX Runtime's CPU allocator without its arena, as the CPU profile runs).
    pub fn allocator_peak_bytes(&self, memory: &MemoryInfo<'_>) -> Option<u64> {
        let encoders = self.encoders.iter().flat_map(|e| [&e.vision, &e.qformer]);
        let sessions = encoders
            .chain([&self.lm])
            .chain(self.text_encoder.as_ref())
            .chain(self.kv_reorder.as_ref());
        sessions.filter_map(|s| allocator_peak(s, memory)).reduce(|a, b| a + b)
    }

    /// Whether the LM graph takes `logits_to_keep` (earlier exports computed every position).
    pub fn lm_takes_logits_to_keep(&self) -> bool {
        self.signature.logits_to_keep
    }
}

impl ImageEncoders {
    /// Vision encoder then Q-Former: pixel values `[B,3,H,W]` to the projected query
    /// embeddings `[B, num_query_tokens, hidden]`, kept as an ONNX value in the LM's dtype.
    pub fn encode_images(&mut self, pixels: Array4<f32>) -> Result<DynValue, RuntimeError> {
        if self.per_image && pixels.shape()[0] > 1 {
            // Quantized encoders are fp32 throughout (the exporter refuses fp16 with them).
            return f32_value(
                self.one_image_at_a_time(pixels, |m, p| to_f32(&m.encode_images(p)?))?,
            );
        }
        self.note_run(Some(pixels.view()));
        let px = Tensor::from_array(pixels).map_err(ort_err("pixel_values"))?;
        let mut out = self
            .vision
            .run(ort::inputs![io::PIXEL_VALUES => px])
            .map_err(ort_err("vision encoder"))?;
        let feats = out
            .remove(io::IMAGE_FEATURES)
            .ok_or_else(|| RuntimeError::MissingOutput(io::IMAGE_FEATURES.into()))?;
        let mut out = self
            .qformer
            .run(ort::inputs![io::IMAGE_FEATURES => feats])
            .map_err(ort_err("Q-Former"))?;
        out.remove(io::IMAGE_EMBEDS)
            .ok_or_else(|| RuntimeError::MissingOutput(io::IMAGE_EMBEDS.into()))
    }

    /// The vision encoder alone (benchmarks, parity tests).
    pub fn vision_features(&mut self, pixels: Array4<f32>) -> Result<ArrayD<f32>, RuntimeError> {
        if self.per_image && pixels.shape()[0] > 1 {
            return self.one_image_at_a_time(pixels, Self::vision_features);
        }
        self.note_run(Some(pixels.view()));
        let px = Tensor::from_array(pixels).map_err(ort_err("pixel_values"))?;
        let out = self
            .vision
            .run(ort::inputs![io::PIXEL_VALUES => px])
            .map_err(ort_err("vision encoder"))?;
        to_f32(&out[io::IMAGE_FEATURES])
    }

    /// The Q-Former alone on given image features (f32, converted to the vision
    /// encoder's dtype).
    pub fn qformer_embeds(&mut self, feats: ArrayD<f32>) -> Result<ArrayD<f32>, RuntimeError> {
        if self.per_image && feats.shape()[0] > 1 {
            return self.one_image_at_a_time(feats, Self::qformer_embeds);
        }
        self.note_run(None);
        let t = float_value(self.vision_fp16, feats)?;
        let out =
            self.qformer.run(ort::inputs![io::IMAGE_FEATURES => t]).map_err(ort_err("Q-Former"))?;
        to_f32(&out[io::IMAGE_EMBEDS])
    }

    /// Under `test-support`, before a run: notes the thread, and calls the hook with the
    /// pixel values of a vision-encoder run.
    fn note_run(&mut self, _pixels: Option<ndarray::ArrayView4<'_, f32>>) {
        #[cfg(any(test, feature = "test-support"))]
        {
            self.threads.insert(std::thread::current().id());
            if let (Some(hook), Some(px)) = (&mut self.before_run, _pixels) {
                hook(px);
            }
        }
    }

    #[cfg(any(test, feature = "test-support"))]
    /// Calls `hook` with the pixel values before each run of the vision encoder (tests:
    /// a slow encoder, or one that panics on a marked image).
    pub fn before_each_run(
        &mut self,
        hook: impl FnMut(ndarray::ArrayView4<'_, f32>) + Send + Sync + 'static,
    ) {
        self.before_run = Some(Box::new(hook));
    }

    /// `encode` on each image of the batch `x` alone, the results joined along the batch.
    /// Encoders with dynamically quantized activations (`--quantize-encoders`) pick one
    /// quantization scale per call from the whole input; one image per call keeps an
    /// image's result independent of the others in its batch.
    fn one_image_at_a_time<D: ndarray::RemoveAxis>(
        &mut self,
        x: ndarray::Array<f32, D>,
        encode: impl Fn(&mut Self, ndarray::Array<f32, D>) -> Result<ArrayD<f32>, RuntimeError>,
    ) -> Result<ArrayD<f32>, RuntimeError> {
        let rows = x
            .outer_iter()
            .map(|one| {
                encode(
                    self,
                    one.insert_axis(Axis(0))
                        .into_dimensionality::<D>()
                        .expect("same rank")
                        .to_owned(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let views: Vec<_> = rows.iter().map(|r| r.view()).collect();
        ndarray::concatenate(Axis(0), &views)
            .map_err(|e| RuntimeError::Unsupported(format!("joining per-image outputs: {e}")))
    }
}

impl EncodeImages for ImageEncoders {
    fn encode_images(&mut self, pixels: Array4<f32>) -> Result<DynValue, RuntimeError> {
        ImageEncoders::encode_images(self, pixels)
    }
}

impl EncodeImages for Blip2Model {
    fn encode_images(&mut self, pixels: Array4<f32>) -> Result<DynValue, RuntimeError> {
        Blip2Model::encode_images(self, pixels)
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
        let peak = if v.is_null() {
            None
        } else {
            std::ffi::CStr::from_ptr(v).to_str().ok().and_then(|s| s.parse().ok())
        };
        (api.ReleaseKeyValuePairs)(kvp);
        peak
    }
}

/// ONNX Runtime's device memory on CUDA device `id` (where its CUDA arenas allocate).
pub fn cuda_memory(id: i32) -> Result<MemoryInfo<'static>, RuntimeError> {
    MemoryInfo::new(AllocationDevice::CUDA, id, AllocatorType::Arena, MemoryType::Default)
        .map_err(ort_err("CUDA memory info"))
}

/// Reads a float tensor (f32 or f16) as f32.
pub fn to_f32(v: &DynValue) -> Result<ArrayD<f32>, RuntimeError> {
    if let Ok(a) = v.try_extract_array::<f32>() {
        return Ok(a.to_owned());
    }
    let a = v.try_extract_array::<half::f16>().map_err(ort_err("reading an output"))?;
    Ok(a.mapv(|x| x.to_f32()))
}

/// Wraps an f32 array as an ONNX value in fp16 or f32.
pub fn float_value(fp16: bool, a: ArrayD<f32>) -> Result<DynValue, RuntimeError> {
    if fp16 {
        Ok(Tensor::from_array(a.mapv(half::f16::from_f32)).map_err(ort_err("tensor"))?.into_dyn())
    } else {
        f32_value(a)
    }
}

/// Wraps an f32 array as an ONNX value in the LM's dtype.
pub fn lm_value(model: &Blip2Model, a: ArrayD<f32>) -> Result<DynValue, RuntimeError> {
    float_value(model.lm_fp16, a)
}

/// Wraps an f32 array as an ONNX value (tests and callers that hold embeddings as arrays).
pub fn f32_value(a: ArrayD<f32>) -> Result<DynValue, RuntimeError> {
    Ok(Tensor::from_array(a).map_err(ort_err("tensor"))?.into_dyn())
}
