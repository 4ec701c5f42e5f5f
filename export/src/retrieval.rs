//! Image-text retrieval checkpoints (`Blip2ForImageTextRetrieval`, as
//! Salesforce/blip2-itm-vit-g and blip2-itm-vit-g-coco): a vision encoder, the Q-Former
//! with its text embeddings, `vision_projection`, `text_projection` and `itm_head`, and no
//! language model. They export to four graphs, so one ViT pass per image feeds both ITC
//! and ITM:
//!
//! ```text
//!   pixel_values ──vision_encoder──▶ image_features ──image_embedding──▶ image_embeddings [B,Q,E]
//!                                                   └─itm (+ input_ids)──▶ itm_logits [B,2]
//!   input_ids ──text_embedding──▶ text_embeddings [B,E]
//! ```

use std::path::Path;

use blip2_core::{
    io, RetrievalGraphs, RetrievalManifest, RetrievalText, MANIFEST_VERSION, RETRIEVAL_FAMILY,
};
use serde::Deserialize;
use serde_json::Value;

use crate::builder::Builder;
use crate::config::{read_json, QFormerConfig, VisionConfig};
use crate::error::{write_err, ExportError, Result};
use crate::onnx::Elem;
use crate::{elem, qformer, vision, Checkpoint, ExportOptions, Progress};

/// Classes whose checkpoints hold the retrieval heads.
const ARCHITECTURES: [&str; 3] = [
    "Blip2ForImageTextRetrieval",
    "Blip2TextModelWithProjection",
    "Blip2VisionModelWithProjection",
];

/// config.json of a retrieval checkpoint.
#[derive(Debug, Clone, Deserialize)]
struct RetrievalConfig {
    #[serde(default = "d_num_query_tokens")]
    num_query_tokens: usize,
    #[serde(default, alias = "image_token_id")]
    image_token_index: Option<i64>,
    #[serde(default = "d_embed")]
    image_text_hidden_size: usize,
    #[serde(default)]
    vision_config: VisionConfig,
    #[serde(default)]
    qformer_config: QFormerConfig,
}

/// The Q-Former text-embedding settings (`Blip2QFormerConfig`), beside [`QFormerConfig`].
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
struct QFormerText {
    vocab_size: usize,
    max_position_embeddings: usize,
    pad_token_id: Option<i64>,
    position_embedding_type: String,
}

impl Default for QFormerText {
    fn default() -> Self {
        Self {
            vocab_size: 30522,
            max_position_embeddings: 512,
            pad_token_id: Some(0),
            position_embedding_type: "absolute".into(),
        }
    }
}

fn d_num_query_tokens() -> usize {
    32
}
fn d_embed() -> usize {
    256
}

/// Whether the checkpoint in `dir` is an image-text retrieval one: config.json names a
/// retrieval class in `architectures`, or (configs without it) the weights hold
/// `itm_head` and no language model.
pub fn is_retrieval(dir: &Path) -> Result<bool> {
    let path = dir.join("config.json");
    if !path.exists() {
        return Ok(false);
    }
    let v = read_json(&path, "the model configuration")?;
    if let Some(a) = v.get("architectures").and_then(Value::as_array) {
        if a.iter().filter_map(Value::as_str).any(|s| ARCHITECTURES.contains(&s)) {
            return Ok(true);
        }
        if !a.is_empty() {
            return Ok(false);
        }
    }
    let Ok(ck) = Checkpoint::open(dir) else { return Ok(false) };
    Ok(ck.contains("itm_head.weight") && !ck.names().any(|n| n.starts_with("language_model.")))
}

fn bad(path: &Path, message: String) -> ExportError {
    ExportError::Config { path: path.into(), message }
}

/// Writes the retrieval graphs and manifest of the checkpoint `src` into `dir`.
pub(crate) fn write_all(
    src: &Path,
    ck: &Checkpoint,
    dir: &Path,
    opts: &ExportOptions,
    progress: &mut dyn Progress,
) -> Result<RetrievalManifest> {
    let cfg_path = src.join("config.json");
    let value = read_json(&cfg_path, "the model configuration")?;
    let model_type = value.get("model_type").and_then(Value::as_str).unwrap_or("").to_string();
    if model_type != "blip-2" {
        return Err(ExportError::WrongModelType { path: cfg_path, found: model_type });
    }
    let cfg: RetrievalConfig =
        serde_json::from_value(value.clone()).map_err(|e| bad(&cfg_path, e.to_string()))?;
    let text: QFormerText =
        serde_json::from_value(value.get("qformer_config").cloned().unwrap_or(Value::Null))
            .map_err(|e| bad(&cfg_path, format!("qformer_config: {e}")))?;
    if opts.quantize.is_some() || opts.quantize_encoders || opts.quantize_lm_activations {
        let flag = if opts.quantize.is_some() {
            "--quantize"
        } else if opts.quantize_encoders {
            "--quantize-encoders"
        } else {
            "--quantize-lm-activations"
        };
        return Err(ExportError::Flag {
            flag,
            message: "retrieval exports are not quantized; leave it out".into(),
        });
    }
    if opts.target != blip2_core::Target::Portable {
        return Err(ExportError::Flag {
            flag: "--target",
            message: "retrieval exports have portable graphs only (they run on the cuda profile as they are); leave it out"
                .into(),
        });
    }
    let (v, q) = (&cfg.vision_config, &cfg.qformer_config);
    if v.patch_size == 0 || v.image_size % v.patch_size != 0 {
        return Err(bad(
            &cfg_path,
            format!(
                "vision_config: image_size {} is not a multiple of patch_size {}",
                v.image_size, v.patch_size
            ),
        ));
    }
    for (what, hidden, heads) in [
        ("vision_config", v.hidden_size, v.num_attention_heads),
        ("qformer_config", q.hidden_size, q.num_attention_heads),
    ] {
        if heads == 0 || hidden % heads != 0 {
            return Err(bad(
                &cfg_path,
                format!("{what}: hidden size {hidden} is not divisible by {heads} attention heads"),
            ));
        }
    }
    if q.cross_attention_frequency == 0 {
        return Err(bad(
            &cfg_path,
            "qformer_config: cross_attention_frequency must be at least 1".into(),
        ));
    }
    if q.encoder_hidden_size != v.hidden_size {
        return Err(bad(
            &cfg_path,
            format!(
                "qformer_config.encoder_hidden_size {} differs from vision_config.hidden_size {}",
                q.encoder_hidden_size, v.hidden_size
            ),
        ));
    }
    if text.position_embedding_type != "absolute" {
        return Err(bad(
            &cfg_path,
            format!(
                "qformer_config.position_embedding_type \"{}\" is not supported (absolute)",
                text.position_embedding_type
            ),
        ));
    }
    let (image, proc_nq) = crate::source::image_settings(src)?;
    if let Some(n) = proc_nq.filter(|&n| n != cfg.num_query_tokens) {
        return Err(bad(
            &src.join("processor_config.json"),
            format!("num_query_tokens {n} differs from config.json's {}", cfg.num_query_tokens),
        ));
    }
    if image.height as usize != v.image_size || image.width as usize != v.image_size {
        return Err(bad(
            &src.join("preprocessor_config.json"),
            format!(
                "image size {}x{} differs from vision_config.image_size {}",
                image.width, image.height, v.image_size
            ),
        ));
    }
    crate::source::check_tokenizer(&src.join("tokenizer.json"))?;

    let vision_float = elem(opts.dtype);
    let positions = (v.image_size / v.patch_size).pow(2) + 1;
    let mut b = Builder::new(ck, vision_float);
    vision::build(&mut b, v)?;
    let vision_encoder =
        crate::write_graph(b, "vision_encoder", io::VISION_ENCODER_FILE, dir, opts, progress)?;

    let mut b = Builder::new(ck, Elem::F32);
    qformer::build_image_embedding(
        &mut b,
        q,
        cfg.num_query_tokens,
        cfg.image_text_hidden_size,
        positions,
        vision_float,
    )?;
    let image_embedding =
        crate::write_graph(b, "image_embedding", io::IMAGE_EMBEDDING_FILE, dir, opts, progress)?;

    let mut b = Builder::new(ck, Elem::F32);
    qformer::build_text_embedding(
        &mut b,
        q,
        text.vocab_size,
        text.max_position_embeddings,
        cfg.image_text_hidden_size,
    )?;
    let text_embedding =
        crate::write_graph(b, "text_embedding", io::TEXT_EMBEDDING_FILE, dir, opts, progress)?;

    let mut b = Builder::new(ck, Elem::F32);
    qformer::build_itm(
        &mut b,
        q,
        cfg.num_query_tokens,
        text.vocab_size,
        text.max_position_embeddings,
        positions,
        vision_float,
    )?;
    let itm = crate::write_graph(b, "itm", io::ITM_FILE, dir, opts, progress)?;

    crate::source::copy_files(src, dir)?;
    let manifest = RetrievalManifest {
        manifest_version: MANIFEST_VERSION,
        source: opts.source_label.clone(),
        revision: opts.revision.clone(),
        family: RETRIEVAL_FAMILY.into(),
        dtype: opts.dtype,
        graphs: RetrievalGraphs { vision_encoder, image_embedding, text_embedding, itm },
        num_query_tokens: cfg.num_query_tokens,
        embedding_dim: cfg.image_text_hidden_size,
        image,
        text: RetrievalText {
            vocab_size: text.vocab_size,
            max_length: text.max_position_embeddings,
            pad_token_id: text.pad_token_id.unwrap_or(0),
            image_token_index: cfg.image_token_index,
        },
        tokenizer_file: "tokenizer.json".into(),
    };
    let path = dir.join(io::MANIFEST_FILE);
    std::fs::write(&path, manifest.to_json()).map_err(write_err(&path))?;
    Ok(manifest)
}
