use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{ActivationQuantization, Dtype, EncoderQuantization, Family, Quantization};

/// Version of the manifest layout; `infer` refuses manifests it does not know.
/// 2: OPT decoders embed only the prompt's image slots; `--target cuda` graphs take
/// `top_k` as int64 [1] and Flan-T5's decoder positions as host-side inputs.
pub const MANIFEST_VERSION: u32 = 2;

/// Everything `infer` needs to know about an exported model, written by `export`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub manifest_version: u32,
    /// The source checkpoint (Hub id or folder) and the revision when known.
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Language-model family: "opt" (decoder-only) or "t5" (encoder-decoder).
    pub family: Family,
    /// Weight dtype of the vision encoder and language model ("fp32" or "fp16").
    /// The Q-Former always runs in fp32.
    pub dtype: Dtype,
    /// Weight-only quantization of the vision encoder and language model ("int8",
    /// "int4"), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<Quantization>,
    /// Quantization of the vision encoder's and Q-Former's projections: "int8-dynamic"
    /// (int8 weights per output channel, activations quantized to int8 per call), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_quantization: Option<EncoderQuantization>,
    /// Quantization of the language model's activations: "int8-per-row" (each row's
    /// projections in int8 with the row's own scale; the LM head stays weight-only), if
    /// any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lm_activation_quantization: Option<ActivationQuantization>,
    /// Which runtime the graphs are built for: the portable standard-operator graphs
    /// (the default, left out of the file) or ONNX Runtime's CUDA provider.
    #[serde(default, skip_serializing_if = "Target::is_portable")]
    pub target: Target,
    pub graphs: Graphs,
    pub tokens: SpecialTokens,
    pub num_query_tokens: usize,
    pub image: ImageConfig,
    pub text: TextConfig,
    pub prompts: PromptTemplates,
    pub generation: GenerationDefaults,
    /// Tokenizer file inside the model folder.
    pub tokenizer_file: String,
}

/// What an export's graphs are built for (`blip2-ort export --target`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Standard ONNX operators (plus com.microsoft ones only when quantized): any ONNX
    /// Runtime build and provider; a language model whose KV cache grows by one
    /// position a step.
    #[default]
    Portable,
    /// ONNX Runtime's fused contrib operators for its CUDA provider: the language model
    /// attends with GroupQueryAttention over a KV buffer of fixed length that it updates
    /// in place (rows right-padded, one length per row), picks tokens on the device
    /// (ArgMax, LogSoftmax + TopK), and a small graph reorders cache rows for beams.
    Cuda,
}

impl Target {
    pub fn is_portable(&self) -> bool {
        *self == Target::Portable
    }

    pub fn name(self) -> &'static str {
        match self {
            Target::Portable => "portable",
            Target::Cuda => "cuda",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Graphs {
    pub vision_encoder: GraphInfo,
    pub qformer: GraphInfo,
    /// The decoder with past key values (OPT's whole LM; T5's decoder).
    pub language_model: GraphInfo,
    /// T5 only: the text encoder, which also returns the decoder's cross-attention cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_encoder: Option<GraphInfo>,
    /// CUDA-target exports only: reorders the rows of every layer's KV buffer on the
    /// device (beam search), `rows` picking the source row of each new row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_reorder: Option<GraphInfo>,
    /// Portable exports: joins newcomer rows to the growing KV cache (and drops
    /// positions every row pads) on the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_join: Option<GraphInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GraphInfo {
    /// File name inside the model folder.
    pub file: String,
    /// External weight file beside the graph, when the graph is over 2 GB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_data: Option<String>,
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
}

/// One graph input or output: its name, element type and shape, where a dimension is
/// either a fixed size or a symbolic name from [`crate::io`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<Dim>,
    /// An input with a default value in the graph, which callers may leave out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Dim {
    Fixed(i64),
    Named(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SpecialTokens {
    #[serde(default)]
    pub bos_token_id: Option<i64>,
    /// From generation_config.json (falling back to config.json's text_config).
    pub eos_token_id: Vec<i64>,
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    pub image_token_id: i64,
    /// T5 only: the first decoder token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder_start_token_id: Option<i64>,
}

/// How images become pixel values, mirroring BlipImageProcessor's settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageConfig {
    pub height: u32,
    pub width: u32,
    pub do_resize: bool,
    /// PIL resampling filter number (3 = bicubic, 2 = bilinear, 0 = nearest).
    pub resample: u32,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub do_convert_rgb: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub head_dim: usize,
    /// The context limit prompts and chat history are kept within.
    pub max_context: usize,
    /// Position-embedding table size: prompt plus new tokens can never exceed it.
    pub max_position_embeddings: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PromptTemplates {
    /// `{}` is replaced by the question.
    pub vqa: String,
    /// One earlier chat turn: `{q}` and `{a}` are replaced.
    pub chat_turn: String,
    /// The current chat question.
    pub chat_question: String,
}

impl Default for PromptTemplates {
    fn default() -> Self {
        Self {
            vqa: "Question: {} Answer:".into(),
            chat_turn: "Question: {q} Answer: {a}.".into(),
            chat_question: "Question: {q} Answer:".into(),
        }
    }
}

/// Generation settings, every one optional: what generation_config.json sets (kept in the
/// manifest), what the command line's flags set, what a recorded transformers call
/// passed. Each layer overrides the one under it; unset fields fall through to
/// transformers' defaults (the runtime's `GenerationConfig::overridden`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GenerationDefaults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_new_tokens: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_beams: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stopping: Option<EarlyStoppingSetting>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_repeat_ngram_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub do_sample: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_return_sequences: Option<usize>,
    /// Sampling seed (never in generation_config.json; the command line's `--seed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: cannot read the manifest: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: not a blip2-ort manifest: {source}")]
    Parse { path: String, source: serde_json::Error },
    #[error("{path}: manifest version {found} is not supported (this build reads version {MANIFEST_VERSION}); re-export the model")]
    Version { path: String, found: u32 },
    /// The folder holds the other kind of export (captioning vs retrieval).
    #[error("{path}: {message}")]
    WrongKind { path: String, message: String },
}

impl Manifest {
    /// Reads `blip2_manifest.json` from an exported model folder.
    pub fn load(model_dir: &Path) -> Result<Self, ManifestError> {
        let path = model_dir.join(crate::io::MANIFEST_FILE);
        let p = path.display().to_string();
        if crate::manifest_family(model_dir)? == crate::RETRIEVAL_FAMILY {
            return Err(ManifestError::WrongKind {
                path: p,
                message: format!(
                    "an image-text retrieval export: it supports the infer tasks {}; {} need a captioning export \
                     (e.g. of Salesforce/blip2-opt-2.7b)",
                    crate::RETRIEVAL_TASKS,
                    crate::CAPTIONING_TASKS
                ),
            });
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|source| ManifestError::Io { path: p.clone(), source })?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|source| ManifestError::Parse { path: p.clone(), source })?;
        if m.manifest_version != MANIFEST_VERSION {
            return Err(ManifestError::Version { path: p, found: m.manifest_version });
        }
        Ok(m)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("manifest serializes")
    }
}

/// generation_config.json's `early_stopping`: `true`, `false` or `"never"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EarlyStoppingSetting {
    Flag(bool),
    Word(Never),
}

/// The word `"never"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Never {
    Never,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_stopping_reads_as_transformers_writes_it() {
        let g: GenerationDefaults =
            serde_json::from_str(r#"{"early_stopping": "never", "num_beams": 4}"#).unwrap();
        assert_eq!(g.early_stopping, Some(EarlyStoppingSetting::Word(Never::Never)));
        let g: GenerationDefaults = serde_json::from_str(r#"{"early_stopping": true}"#).unwrap();
        assert_eq!(g.early_stopping, Some(EarlyStoppingSetting::Flag(true)));
        assert_eq!(
            serde_json::to_string(&EarlyStoppingSetting::Word(Never::Never)).unwrap(),
            "\"never\""
        );
        assert!(serde_json::from_str::<GenerationDefaults>(r#"{"early_stopping": "sometimes"}"#)
            .is_err());
    }
}
