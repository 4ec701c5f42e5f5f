//! Exports a Hugging Face BLIP-2 checkpoint to ONNX graphs (vision encoder, Q-Former
//! with projection, language model with past key values; plus the text encoder for
//! Flan-T5 and the KV reorder for `--target cuda`) and a manifest, with no Python and
//! no ONNX Runtime.
//!
//! Paper: BLIP-2, Li et al. 2023, <https://arxiv.org/abs/2301.12597>. Reference
//! implementation: transformers' `modeling_blip_2.py`.
//!
//! The export streams: weights are memory-mapped, converted chunk by chunk and written
//! front to back, so peak memory does not grow with the model. Output goes to a
//! temporary folder renamed into place at the end.

pub mod blocks;
pub mod builder;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod inspect;
mod layers;
pub mod onnx;
mod opt;
pub mod output;
mod qformer;
mod quantize;
mod retrieval;
mod source;
pub mod t5;
mod vision;

use std::path::{Path, PathBuf};

use blip2_core::{
    io, Dtype, EncoderQuantization, Family, GraphInfo, Graphs, Manifest, Quantization,
    RetrievalManifest, Target, TensorInfo, MANIFEST_VERSION,
};

pub use checkpoint::Checkpoint;
pub use error::{ExportError, Result};
pub use output::{acknowledge, interrupt, release_kept_locks, remove_partials, Interrupt};
pub use retrieval::is_retrieval;
pub use source::SourceFiles;

use crate::builder::{Builder, Projection};
use crate::config::{ModelConfig, TextModel};
use crate::error::write_err;
use crate::onnx::{Elem, Model, ValueInfo};

/// The context limit when `--max-context` is not given (or the LM's positions, if fewer).
pub const DEFAULT_MAX_CONTEXT: usize = 512;

/// T5 has relative positions only; prompts and outputs are bounded by the context limit.
const T5_MAX_POSITIONS: usize = 1 << 20;

/// The graphs' element type for a weight type.
pub(crate) fn elem(d: Dtype) -> Elem {
    match d {
        Dtype::Fp32 => Elem::F32,
        Dtype::Fp16 => Elem::F16,
    }
}

#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub dtype: Dtype,
    /// What the user asked for (Hub id or folder), recorded in the manifest.
    pub source_label: String,
    pub revision: Option<String>,
    /// Replace an existing export folder.
    pub force: bool,
    /// Context limit for prompts and chat history, in tokens (image tokens included).
    /// `None`: [`DEFAULT_MAX_CONTEXT`], lowered to the language model's positions. A value
    /// above the positions or too small for the image tokens is refused.
    pub max_context: Option<usize>,
    pub prompts: blip2_core::PromptTemplates,
    /// Put weights in external data files even when under 2 GB (tests use this).
    pub force_external_data: bool,
    /// Weight-only quantization of the vision encoder's and language model's projections.
    pub quantize: Option<Quantization>,
    /// int8 weights and dynamically quantized int8 activations in the vision encoder's and
    /// Q-Former's projections (`--quantize-encoders int8`).
    pub quantize_encoders: bool,
    /// int8 activations, quantized row by row, in the language model's projections
    /// (`--quantize-lm-activations int8`, with `--quantize int8`).
    pub quantize_lm_activations: bool,
    /// Which runtime the graphs are built for (`--target`).
    pub target: Target,
    /// Keep the output folder's lock ([`output::OutputLock`]) after a successful export
    /// returns, until [`acknowledge`] or the process ends: no other export into the same
    /// folder can then overtake the caller's report of this one (the command line sets
    /// it, so the export it prints is the one in the folder).
    pub keep_lock: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            dtype: Dtype::Fp32,
            source_label: String::new(),
            revision: None,
            force: false,
            max_context: None,
            prompts: Default::default(),
            force_external_data: false,
            quantize: None,
            quantize_encoders: false,
            quantize_lm_activations: false,
            target: Target::Portable,
            keep_lock: false,
        }
    }
}

/// Receives progress: one `stage` per graph with its weight bytes, then `advance`s.
pub trait Progress {
    fn stage(&mut self, name: &str, total_bytes: u64);
    fn advance(&mut self, bytes: u64);
    fn finish(&mut self) {}
    /// Another export into the same output folder is running; this one waits for it.
    fn waiting(&mut self, _output: &Path) {}
}

/// Progress that goes nowhere (`--quiet`, tests).
pub struct NoProgress;
impl Progress for NoProgress {
    fn stage(&mut self, _: &str, _: u64) {}
    fn advance(&mut self, _: u64) {}
}

/// Exports the checkpoint in `src` into the folder `out`, atomically (see [`output`]).
pub fn export(
    src: &Path,
    out: &Path,
    opts: &ExportOptions,
    progress: &mut dyn Progress,
) -> Result<Manifest> {
    output::check_output(out, opts.force)?;
    if retrieval::is_retrieval(src)? {
        return Err(ExportError::Config {
            path: src.into(),
            message: "an image-text retrieval checkpoint (Blip2ForImageTextRetrieval) has no language model; \
                      export it with export_any (as blip2-ort export does)"
                .into(),
        });
    }
    // Everything about the source is checked before anything is written.
    let files = SourceFiles::read(src)?;
    let ck = Checkpoint::open(src)?;
    check_layer_counts(&files.config, &ck)?;
    in_partial_folder(out, opts, progress, |dir, progress| {
        write_all(&files, &ck, dir, opts, progress)
    })
}

/// Every layer stack's count in config.json against the layers the weights hold.
fn check_layer_counts(cfg: &config::ModelConfig, ck: &Checkpoint) -> Result<()> {
    use layers::Stack;
    let b = &cfg.blip;
    let mut stacks = vec![
        Stack {
            prefix: "vision_model.encoder.layers.",
            key: "vision_config.num_hidden_layers",
            count: b.vision_config.num_hidden_layers,
        },
        Stack {
            prefix: "qformer.encoder.layer.",
            key: "qformer_config.num_hidden_layers",
            count: b.qformer_config.num_hidden_layers,
        },
    ];
    match &cfg.text {
        TextModel::Opt(t) => stacks.push(Stack {
            prefix: "language_model.model.decoder.layers.",
            key: "text_config.num_hidden_layers",
            count: t.num_hidden_layers,
        }),
        TextModel::T5(t) => {
            stacks.push(Stack {
                prefix: "language_model.encoder.block.",
                key: "text_config.num_layers",
                count: t.num_layers,
            });
            stacks.push(Stack {
                prefix: "language_model.decoder.block.",
                key: if t.num_decoder_layers.is_some() {
                    "text_config.num_decoder_layers"
                } else {
                    "text_config.num_layers"
                },
                count: t.num_decoder_layers.unwrap_or(t.num_layers),
            });
        }
    }
    layers::check(&cfg.path, ck, &stacks)
}

/// Runs `write` on a partial folder beside `out`, then puts it in place (see [`output`]).
fn in_partial_folder<M>(
    out: &Path,
    opts: &ExportOptions,
    progress: &mut dyn Progress,
    write: impl FnOnce(&Path, &mut dyn Progress) -> Result<M>,
) -> Result<M> {
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(write_err(parent))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "export".into());
    // Exports into one folder take turns; the first check (before the sources were read)
    // is repeated under the lock, as another export may have written the folder since.
    let lock = output::OutputLock::acquire(parent, &name, &mut || progress.waiting(out))?;
    output::check_output(out, opts.force)?;
    output::remove_stale_partials(parent, &name);
    let partial =
        output::Partial::create(parent.join(output::partial_name(&name, std::process::id())))?;
    let manifest = write(&partial.path, progress)?;
    output::put_in_place(partial, out)?;
    progress.finish();
    if opts.keep_lock {
        lock.keep();
    }
    Ok(manifest)
}

/// What [`export_any`] wrote: a captioning export or an image-text retrieval one.
#[allow(clippy::large_enum_variant)] // made once per export
#[derive(Debug, Clone)]
pub enum Exported {
    Captioning(Manifest),
    Retrieval(RetrievalManifest),
}

impl Exported {
    pub fn family(&self) -> &str {
        match self {
            Exported::Captioning(m) => m.family.name(),
            Exported::Retrieval(m) => &m.family,
        }
    }
    pub fn dtype(&self) -> Dtype {
        match self {
            Exported::Captioning(m) => m.dtype,
            Exported::Retrieval(m) => m.dtype,
        }
    }
    /// Files of the export folder, for listings.
    pub fn files(&self) -> Vec<PathBuf> {
        match self {
            Exported::Captioning(m) => export_files(m),
            Exported::Retrieval(m) => {
                let g = &m.graphs;
                let mut v = Vec::new();
                for g in [&g.vision_encoder, &g.image_embedding, &g.text_embedding, &g.itm] {
                    v.push(PathBuf::from(&g.file));
                    v.extend(g.external_data.as_ref().map(PathBuf::from));
                }
                v.push(PathBuf::from(io::MANIFEST_FILE));
                v.push(PathBuf::from(&m.tokenizer_file));
                v
            }
        }
    }
}

/// Exports a captioning checkpoint as [`export`] does, or an image-text retrieval one
/// (Salesforce/blip2-itm-vit-g) to its own graphs; the config decides which.
pub fn export_any(
    src: &Path,
    out: &Path,
    opts: &ExportOptions,
    progress: &mut dyn Progress,
) -> Result<Exported> {
    output::check_output(out, opts.force)?;
    if !retrieval::is_retrieval(src)? {
        return export(src, out, opts, progress).map(Exported::Captioning);
    }
    let ck = Checkpoint::open(src)?;
    in_partial_folder(out, opts, progress, |dir, progress| {
        retrieval::write_all(src, &ck, dir, opts, progress)
    })
    .map(Exported::Retrieval)
}

/// The context limit to record: the one asked for if the language model has that many
/// positions and it leaves room for the image tokens and some text.
fn max_context(asked: Option<usize>, text: &TextModel, num_query_tokens: usize) -> Result<usize> {
    let positions = match text {
        TextModel::Opt(t) => Some(t.max_position_embeddings),
        TextModel::T5(_) => None,
    };
    let Some(n) = asked else {
        return Ok(positions.map_or(DEFAULT_MAX_CONTEXT, |p| p.min(DEFAULT_MAX_CONTEXT)));
    };
    let bad = |message: String| ExportError::Flag { flag: "--max-context", message };
    if let Some(p) = positions.filter(|&p| n > p) {
        return Err(bad(format!(
            "{n} is more than the language model's {p} positions (text_config.max_position_embeddings); use at most {p}"
        )));
    }
    if n <= num_query_tokens {
        return Err(bad(format!(
            "{n} leaves no room for a prompt after the {num_query_tokens} image tokens; use more than {num_query_tokens}"
        )));
    }
    Ok(n)
}

fn tensor_infos(v: &[ValueInfo]) -> Vec<TensorInfo> {
    v.iter()
        .map(|x| TensorInfo {
            name: x.name.clone(),
            dtype: x.elem.name().into(),
            shape: x.dims.clone(),
            optional: false,
        })
        .collect()
}

/// The head sizes ONNX Runtime's CUDA kernels of DecoderMaskedMultiHeadAttention are
/// built for (Flan-T5-XL and -XXL have 64).
pub const DMMHA_HEAD_SIZES: [usize; 3] = [32, 64, 128];

fn write_graph(
    b: Builder<'_>,
    name: &str,
    file: &str,
    dir: &Path,
    opts: &ExportOptions,
    progress: &mut dyn Progress,
) -> Result<GraphInfo> {
    progress.stage(name, b.weight_bytes);
    let graph = b.finish(name);
    if opts.target == Target::Cuda {
        let violations = inspect::host_read_violations(&graph);
        if !violations.is_empty() {
            let violations = violations.iter().map(ToString::to_string).collect();
            return Err(ExportError::HostReads { graph: name.into(), violations });
        }
    }
    let mut opsets = vec![(String::new(), onnx::OPSET)];
    if graph.nodes.iter().any(|n| n.domain == builder::MS_DOMAIN) {
        opsets.push((builder::MS_DOMAIN.to_string(), 1));
    }
    let mut inputs = tensor_infos(&graph.inputs);
    // Inputs that are also initializers have a default (ONNX IR >= 4) and may be left out.
    for t in &mut inputs {
        t.optional = graph.initializers.iter().any(|i| i.name == t.name);
    }
    let outputs = tensor_infos(&graph.outputs);
    let model = Model {
        graph,
        opsets,
        producer: "blip2-ort".into(),
        metadata: vec![("source".into(), opts.source_label.clone())],
    };
    let external_name = format!("{file}.data");
    let path = dir.join(file);
    onnx::write_model(&model, &path, &external_name, opts.force_external_data, &mut |n| {
        progress.advance(n)
    })
    .map_err(write_err(&path))?;
    let has_external = dir.join(&external_name).exists();
    Ok(GraphInfo {
        file: file.into(),
        external_data: has_external.then_some(external_name),
        inputs,
        outputs,
    })
}

fn write_all(
    files: &SourceFiles,
    ck: &Checkpoint,
    dir: &Path,
    opts: &ExportOptions,
    progress: &mut dyn Progress,
) -> Result<Manifest> {
    let cfg: &ModelConfig = &files.config;
    let lm_float = elem(opts.dtype);
    let v = &cfg.blip.vision_config;
    let positions = (v.image_size / v.patch_size).pow(2) + 1;
    let text_hidden = cfg.text.hidden_size();

    if opts.quantize.is_some() && opts.dtype == Dtype::Fp16 {
        return Err(ExportError::Flag {
            flag: "--quantize",
            message: "quantized exports keep fp32 activations; use --dtype fp32 with --quantize"
                .into(),
        });
    }
    if opts.quantize_encoders && opts.dtype == Dtype::Fp16 {
        return Err(ExportError::Flag {
            flag: "--quantize-encoders",
            message:
                "int8 encoders take fp32 activations; use --dtype fp32 with --quantize-encoders"
                    .into(),
        });
    }
    if opts.quantize_encoders && opts.target == Target::Cuda {
        return Err(ExportError::Flag {
            flag: "--quantize-encoders",
            message: "int8 encoders (DynamicQuantizeMatMul) run on the CPU only; leave it out with --target cuda".into(),
        });
    }
    if opts.quantize_lm_activations && opts.quantize != Some(Quantization::Int8) {
        return Err(ExportError::Flag {
            flag: "--quantize-lm-activations",
            message: "int8 activations multiply int8 weights; add --quantize int8".into(),
        });
    }
    if opts.quantize_lm_activations && opts.target == Target::Cuda {
        return Err(ExportError::Flag {
            flag: "--quantize-lm-activations",
            message:
                "int8 activations (MatMulInteger) are for the CPU; leave it out with --target cuda"
                    .into(),
        });
    }
    if let (Target::Cuda, TextModel::T5(t)) = (opts.target, &cfg.text) {
        if !DMMHA_HEAD_SIZES.contains(&t.d_kv) {
            return Err(ExportError::Config {
                path: cfg.path.clone(),
                message: format!(
                    "text_config.d_kv {} is a head size ONNX Runtime's CUDA \
                     DecoderMaskedMultiHeadAttention does not have (\"Unsupported head size\"; it \
                     has {DMMHA_HEAD_SIZES:?}), so --target cuda cannot run this Flan-T5 decoder; \
                     export it without --target cuda",
                    t.d_kv
                ),
            });
        }
    }
    let max_context = max_context(opts.max_context, &cfg.text, files.num_query_tokens)?;
    // The vision encoder and language model take --quantize, the encoders
    // --quantize-encoders (which wins in the vision encoder).
    let weights = opts.quantize.map_or(Projection::Float, |q| {
        let (bits, block) = q.bits_block();
        Projection::NBits { bits, block }
    });
    let encoders = if opts.quantize_encoders { Projection::DynamicInt8 } else { Projection::Float };
    // The language model's projections: --quantize's weights, with row-int8 activations
    // under --quantize-lm-activations.
    let lm = if opts.quantize_lm_activations { Projection::RowInt8 } else { weights };
    let fused = opts.target == Target::Cuda;
    let builder = |float: Elem, projection: Projection| {
        Builder::new(ck, float).with_projection(projection).with_fused_operators(fused)
    };
    let mut b = builder(lm_float, if opts.quantize_encoders { encoders } else { weights });
    vision::build(&mut b, v)?;
    let vision_info =
        write_graph(b, "vision_encoder", io::VISION_ENCODER_FILE, dir, opts, progress)?;

    let mut b = builder(Elem::F32, encoders);
    qformer::build(
        &mut b,
        &cfg.blip.qformer_config,
        cfg.blip.num_query_tokens,
        text_hidden,
        positions,
        lm_float,
        lm_float,
    )?;
    let qformer_info = write_graph(b, "qformer", io::QFORMER_FILE, dir, opts, progress)?;

    let kv_reorder;
    let kv_join;
    let (family, text_encoder, lm_info, text_cfg) = match &cfg.text {
        TextModel::Opt(text) => {
            let mut b = builder(lm_float, lm);
            let image =
                opt::ImageTokens { id: files.image_token_id, count: files.num_query_tokens };
            if fused {
                opt::build_cuda(&mut b, text, image)?;
            } else {
                opt::build(&mut b, text, image)?;
            }
            let lm_info =
                write_graph(b, "language_model", io::LANGUAGE_MODEL_FILE, dir, opts, progress)?;
            // Beams and rows leaving reorder the cache where the decoder runs: the fixed
            // buffers of `--target cuda`, and the growing cache of the portable graph
            // (its inputs take any length).
            let mut b = builder(lm_float, Projection::Float);
            opt::build_kv_reorder(
                &mut b,
                text.num_hidden_layers,
                text.num_attention_heads,
                text.hidden_size / text.num_attention_heads,
            );
            kv_reorder =
                Some(write_graph(b, "kv_reorder", io::KV_REORDER_FILE, dir, opts, progress)?);
            // Newcomers join the growing cache of the portable graph where it lies.
            kv_join = if fused {
                None
            } else {
                let mut b = builder(lm_float, Projection::Float);
                opt::build_kv_join(
                    &mut b,
                    text.num_hidden_layers,
                    text.num_attention_heads,
                    text.hidden_size / text.num_attention_heads,
                );
                Some(write_graph(b, "kv_join", io::KV_JOIN_FILE, dir, opts, progress)?)
            };
            let tc = blip2_core::TextConfig {
                vocab_size: text.vocab_size,
                hidden_size: text.hidden_size,
                num_layers: text.num_hidden_layers,
                num_heads: text.num_attention_heads,
                head_dim: text.hidden_size / text.num_attention_heads,
                max_context,
                max_position_embeddings: text.max_position_embeddings,
            };
            (Family::Opt, None, lm_info, tc)
        }
        TextModel::T5(text) => {
            let mut b = builder(lm_float, lm);
            t5::build_encoder(&mut b, text, files.image_token_id)?;
            let enc_info =
                write_graph(b, "text_encoder", io::TEXT_ENCODER_FILE, dir, opts, progress)?;
            let mut b = builder(lm_float, lm);
            if fused {
                t5::build_decoder_cuda(&mut b, text, text.scale_output())?;
            } else {
                t5::build_decoder(&mut b, text, text.scale_output())?;
            }
            let lm_info =
                write_graph(b, "language_model", io::LANGUAGE_MODEL_FILE, dir, opts, progress)?;
            // Reorders the self-attention cache (fixed buffers or growing) for beams and
            // rows leaving, and the cross-attention caches too (its inputs take any length).
            let mut b = builder(lm_float, Projection::Float);
            opt::build_kv_reorder(&mut b, text.decoder_layers(), text.num_heads, text.d_kv);
            kv_reorder =
                Some(write_graph(b, "kv_reorder", io::KV_REORDER_FILE, dir, opts, progress)?);
            // Newcomers join both caches where they lie: the portable decoder's growing
            // ones, and the CUDA-target decoder's buffers (whole rows, never positions:
            // its fused attention keeps its keys in a layout of its own).
            let mut b = builder(lm_float, Projection::Float);
            opt::build_kv_join(&mut b, text.decoder_layers(), text.num_heads, text.d_kv);
            kv_join = Some(write_graph(b, "kv_join", io::KV_JOIN_FILE, dir, opts, progress)?);
            let tc = blip2_core::TextConfig {
                vocab_size: text.vocab_size,
                hidden_size: text.d_model,
                num_layers: text.decoder_layers(),
                num_heads: text.num_heads,
                head_dim: text.d_kv,
                max_context,
                // Relative positions have no table to run out of.
                max_position_embeddings: T5_MAX_POSITIONS,
            };
            (Family::T5, Some(enc_info), lm_info, tc)
        }
    };

    files.copy_runtime_files(dir)?;
    let manifest = Manifest {
        manifest_version: MANIFEST_VERSION,
        source: opts.source_label.clone(),
        revision: opts.revision.clone(),
        family,
        dtype: opts.dtype,
        quantization: opts.quantize,
        encoder_quantization: opts.quantize_encoders.then_some(EncoderQuantization::Int8Dynamic),
        lm_activation_quantization: opts
            .quantize_lm_activations
            .then_some(blip2_core::ActivationQuantization::Int8PerRow),
        target: opts.target,
        graphs: Graphs {
            vision_encoder: vision_info,
            qformer: qformer_info,
            language_model: lm_info,
            text_encoder,
            kv_reorder,
            kv_join,
        },
        tokens: files.special_tokens(),
        num_query_tokens: files.num_query_tokens,
        image: files.image.clone(),
        text: text_cfg,
        prompts: opts.prompts.clone(),
        generation: files.generation.clone(),
        tokenizer_file: "tokenizer.json".into(),
    };
    let path = dir.join(io::MANIFEST_FILE);
    std::fs::write(&path, manifest.to_json()).map_err(write_err(&path))?;
    Ok(manifest)
}

/// Files of an export folder, for listings and checks.
pub fn export_files(m: &Manifest) -> Vec<PathBuf> {
    let mut v = Vec::new();
    let g = &m.graphs;
    for g in [
        Some(&g.vision_encoder),
        Some(&g.qformer),
        g.text_encoder.as_ref(),
        Some(&g.language_model),
        g.kv_reorder.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        v.push(PathBuf::from(&g.file));
        if let Some(e) = &g.external_data {
            v.push(PathBuf::from(e));
        }
    }
    v.push(PathBuf::from(io::MANIFEST_FILE));
    v.push(PathBuf::from(&m.tokenizer_file));
    v
}
