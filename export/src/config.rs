//! config.json of a BLIP-2 checkpoint, mirrored as serde structs. Fields a checkpoint
//! leaves out take transformers' defaults (Blip2VisionConfig, Blip2QFormerConfig,
//! OPTConfig), since older Hub configs list only what differs from them.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{io_err, ExportError, Result};

#[derive(Debug, Clone, Deserialize)]
pub struct Blip2Config {
    pub model_type: Option<String>,
    #[serde(default = "d_num_query_tokens")]
    pub num_query_tokens: usize,
    #[serde(default, alias = "image_token_id")]
    pub image_token_index: Option<i64>,
    #[serde(default)]
    pub vision_config: VisionConfig,
    #[serde(default)]
    pub qformer_config: QFormerConfig,
    pub text_config: serde_json::Value,
}

fn d_num_query_tokens() -> usize {
    32
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub qkv_bias: bool,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 1408,
            intermediate_size: 6144,
            num_hidden_layers: 39,
            num_attention_heads: 16,
            image_size: 224,
            patch_size: 14,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-6,
            qkv_bias: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct QFormerConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub cross_attention_frequency: usize,
    pub encoder_hidden_size: usize,
}

impl Default for QFormerConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-12,
            cross_attention_frequency: 2,
            encoder_hidden_size: 1408,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct OptConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub ffn_dim: usize,
    pub max_position_embeddings: usize,
    pub do_layer_norm_before: bool,
    #[serde(rename = "_remove_final_layer_norm")]
    pub remove_final_layer_norm: bool,
    pub word_embed_proj_dim: Option<usize>,
    pub num_attention_heads: usize,
    pub activation_function: String,
    pub layer_norm_elementwise_affine: bool,
    pub enable_bias: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<serde_json::Value>,
    pub pad_token_id: Option<i64>,
}

impl TextModel {
    /// The width of the embeddings the Q-Former projection must produce.
    pub fn hidden_size(&self) -> usize {
        match self {
            TextModel::Opt(c) => c.hidden_size,
            TextModel::T5(c) => c.d_model,
        }
    }
    pub fn vocab_size(&self) -> usize {
        match self {
            TextModel::Opt(c) => c.vocab_size,
            TextModel::T5(c) => c.vocab_size,
        }
    }
}

impl Default for OptConfig {
    fn default() -> Self {
        Self {
            vocab_size: 50272,
            hidden_size: 768,
            num_hidden_layers: 12,
            ffn_dim: 3072,
            max_position_embeddings: 2048,
            do_layer_norm_before: true,
            remove_final_layer_norm: false,
            word_embed_proj_dim: None,
            num_attention_heads: 12,
            activation_function: "relu".into(),
            layer_norm_elementwise_affine: true,
            enable_bias: true,
            tie_word_embeddings: true,
            bos_token_id: Some(2),
            eos_token_id: Some(serde_json::json!(2)),
            pad_token_id: Some(1),
        }
    }
}

/// A parsed checkpoint configuration with the language model resolved.
pub struct ModelConfig {
    pub path: PathBuf,
    pub blip: Blip2Config,
    pub text: TextModel,
}

pub enum TextModel {
    Opt(OptConfig),
    T5(T5Config),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_decoder_layers: Option<usize>,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f64,
    pub feed_forward_proj: String,
    /// transformers scales the decoder output by d_model^-0.5 unless this is false
    /// (T5 v1.1 and Flan-T5 set it false).
    pub tie_word_embeddings: Option<bool>,
    /// Written by transformers 5; when present it decides the scaling.
    pub scale_decoder_outputs: Option<bool>,
    pub decoder_start_token_id: Option<i64>,
    pub eos_token_id: Option<serde_json::Value>,
    pub pad_token_id: Option<i64>,
}

impl Default for T5Config {
    fn default() -> Self {
        Self {
            vocab_size: 32128,
            d_model: 512,
            d_kv: 64,
            d_ff: 2048,
            num_layers: 6,
            num_decoder_layers: None,
            num_heads: 8,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "relu".into(),
            tie_word_embeddings: None,
            scale_decoder_outputs: None,
            decoder_start_token_id: None,
            eos_token_id: Some(serde_json::json!(1)),
            pad_token_id: Some(0),
        }
    }
}

impl T5Config {
    pub fn decoder_layers(&self) -> usize {
        self.num_decoder_layers.unwrap_or(self.num_layers)
    }
    /// (gated, activation) from feed_forward_proj, as T5Config does ("gated-gelu" is gelu_new).
    pub fn feed_forward(&self) -> (bool, String) {
        let parts: Vec<&str> = self.feed_forward_proj.split('-').collect();
        let gated = parts.len() == 2 && parts[0] == "gated";
        let act = if self.feed_forward_proj == "gated-gelu" {
            "gelu_new"
        } else {
            parts[parts.len() - 1]
        };
        (gated, act.to_string())
    }
    /// Whether the decoder output is scaled by d_model^-0.5 before the LM head, as
    /// transformers decides it: its own `scale_decoder_outputs` when the config has one,
    /// else unless `tie_word_embeddings` is false (T5 v1.1 and Flan-T5 on the Hub).
    pub fn scale_output(&self) -> bool {
        self.scale_decoder_outputs.unwrap_or(self.tie_word_embeddings != Some(false))
    }
    pub fn inner_dim(&self) -> usize {
        self.num_heads * self.d_kv
    }
}

pub fn read_json(path: &Path, why: &'static str) -> Result<serde_json::Value> {
    if !path.exists() {
        return Err(ExportError::MissingFile { path: path.into(), why });
    }
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|source| ExportError::Json { path: path.into(), source })
}

impl ModelConfig {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let value = read_json(&path, "the model configuration")?;
        let model_type = value.get("model_type").and_then(|v| v.as_str()).unwrap_or("").to_string();
        if model_type != "blip-2" {
            return Err(ExportError::WrongModelType { path, found: model_type });
        }
        let blip: Blip2Config = serde_json::from_value(value)
            .map_err(|e| ExportError::Config { path: path.clone(), message: e.to_string() })?;
        let text_type =
            blip.text_config.get("model_type").and_then(|v| v.as_str()).unwrap_or("").to_string();
        let text = match text_type.as_str() {
            "opt" => {
                let opt: OptConfig =
                    serde_json::from_value(blip.text_config.clone()).map_err(|e| {
                        ExportError::Config {
                            path: path.clone(),
                            message: format!("text_config: {e}"),
                        }
                    })?;
                TextModel::Opt(opt)
            }
            "t5" => {
                let t5: T5Config =
                    serde_json::from_value(blip.text_config.clone()).map_err(|e| {
                        ExportError::Config {
                            path: path.clone(),
                            message: format!("text_config: {e}"),
                        }
                    })?;
                TextModel::T5(t5)
            }
            _ => return Err(ExportError::UnsupportedLanguageModel { path, found: text_type }),
        };
        let cfg = Self { path, blip, text };
        cfg.validate()?;
        Ok(cfg)
    }

    fn bad(&self, message: String) -> ExportError {
        ExportError::Config { path: self.path.clone(), message }
    }

    fn validate(&self) -> Result<()> {
        let v = &self.blip.vision_config;
        let q = &self.blip.qformer_config;
        let check_heads = |what: &str, hidden: usize, heads: usize| {
            if heads == 0 || !hidden.is_multiple_of(heads) {
                Err(self.bad(format!(
                    "{what}: hidden size {hidden} is not divisible by {heads} attention heads"
                )))
            } else {
                Ok(())
            }
        };
        check_heads("vision_config", v.hidden_size, v.num_attention_heads)?;
        check_heads("qformer_config", q.hidden_size, q.num_attention_heads)?;
        if v.patch_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
            return Err(self.bad(format!(
                "vision_config: image_size {} is not a multiple of patch_size {}",
                v.image_size, v.patch_size
            )));
        }
        if q.cross_attention_frequency == 0 {
            return Err(
                self.bad("qformer_config: cross_attention_frequency must be at least 1".into())
            );
        }
        if q.encoder_hidden_size != v.hidden_size {
            return Err(self.bad(format!(
                "qformer_config.encoder_hidden_size {} differs from vision_config.hidden_size {}",
                q.encoder_hidden_size, v.hidden_size
            )));
        }
        match &self.text {
            TextModel::Opt(t) => {
                check_heads("text_config", t.hidden_size, t.num_attention_heads)?;
                // transformers scatters the hidden_size-wide projected queries into the
                // word_embed_proj_dim-wide token embeddings; with different widths its
                // result is not a meaningful reference, so refuse rather than guess.
                if let Some(w) = t.word_embed_proj_dim {
                    if w != t.hidden_size {
                        return Err(self.bad(format!(
                            "text_config.word_embed_proj_dim {w} differs from hidden_size {}; BLIP-2 feeds \
                             hidden_size-wide query embeddings, so this combination is not supported",
                            t.hidden_size
                        )));
                    }
                }
            }
            TextModel::T5(t) => {
                let parts: Vec<&str> = t.feed_forward_proj.split('-').collect();
                if parts.len() > 2 || (parts.len() == 2 && parts[0] != "gated") {
                    return Err(self.bad(format!(
                        "text_config.feed_forward_proj \"{}\" is neither gated-ACT nor ACT",
                        t.feed_forward_proj
                    )));
                }
                if t.relative_attention_num_buckets < 4 || t.relative_attention_max_distance == 0 {
                    return Err(self.bad("text_config: relative attention needs at least 4 buckets and a max distance".into()));
                }
            }
        }
        Ok(())
    }
}
