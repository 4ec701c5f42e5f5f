//! The manifest of an image-text retrieval export (family `"retrieval"`): the
//! `Blip2ForImageTextRetrieval` checkpoints (Salesforce/blip2-itm-vit-g), which have no
//! language model. It shares the file name, `manifest_version` and the common fields
//! (source, dtype, image settings, tokenizer) with the captioning [`crate::Manifest`];
//! each loader names the other kind of export when given one.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{GraphInfo, ImageConfig, ManifestError, MANIFEST_VERSION};

/// `family` of a retrieval export.
pub const RETRIEVAL_FAMILY: &str = "retrieval";

/// The infer tasks each kind of export supports, for error messages.
pub const RETRIEVAL_TASKS: &str = "itm, embed-image, embed-text and rank";
pub const CAPTIONING_TASKS: &str = "caption, vqa, chat and batch";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RetrievalManifest {
    pub manifest_version: u32,
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Always `"retrieval"`.
    pub family: String,
    /// Weight dtype of the vision encoder ("fp32" or "fp16"); the Q-Former graphs are fp32.
    pub dtype: crate::Dtype,
    pub graphs: RetrievalGraphs,
    pub num_query_tokens: usize,
    /// Width of the image and text embeddings (`image_text_hidden_size`).
    pub embedding_dim: usize,
    pub image: ImageConfig,
    pub text: RetrievalText,
    /// Tokenizer file inside the model folder (BERT WordPiece).
    pub tokenizer_file: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RetrievalGraphs {
    /// Pixel values to image features, computed once per image for ITC and ITM.
    pub vision_encoder: GraphInfo,
    /// Image features to normalized query embeddings (Q-Former, vision_projection).
    pub image_embedding: GraphInfo,
    /// Token ids to a normalized text embedding (Q-Former text pass, text_projection).
    pub text_embedding: GraphInfo,
    /// Image features and token ids to the two ITM logits.
    pub itm: GraphInfo,
}

/// How texts become token ids: the tokenizer's `[CLS] text [SEP]`, at most `max_length`
/// ids (the Q-Former's position table), right-padded with `pad_token_id`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RetrievalText {
    pub vocab_size: usize,
    pub max_length: usize,
    pub pad_token_id: i64,
    /// config.json's `image_token_index`, when set: transformers' processor then prepends
    /// num_query_tokens of it to the text and the model strips them again, so the graphs
    /// never see it. Recorded for reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_token_index: Option<i64>,
}

/// The two fields every manifest starts with, read before the rest.
#[derive(Deserialize)]
struct Head {
    manifest_version: u32,
    #[serde(default)]
    family: String,
}

/// The `family` of the manifest in `model_dir`, after checking its version.
pub fn manifest_family(model_dir: &Path) -> Result<String, ManifestError> {
    let path = model_dir.join(crate::io::MANIFEST_FILE);
    let p = path.display().to_string();
    let text = std::fs::read_to_string(&path)
        .map_err(|source| ManifestError::Io { path: p.clone(), source })?;
    let head: Head = serde_json::from_str(&text)
        .map_err(|source| ManifestError::Parse { path: p.clone(), source })?;
    if head.manifest_version != MANIFEST_VERSION {
        return Err(ManifestError::Version { path: p, found: head.manifest_version });
    }
    Ok(head.family)
}

impl RetrievalManifest {
    /// Reads `blip2_manifest.json` of a retrieval export; a captioning export is refused
    /// with the tasks it does support.
    pub fn load(model_dir: &Path) -> Result<Self, ManifestError> {
        let path = model_dir.join(crate::io::MANIFEST_FILE);
        let p = path.display().to_string();
        let family = manifest_family(model_dir)?;
        if family != RETRIEVAL_FAMILY {
            return Err(ManifestError::WrongKind {
                path: p,
                message: format!(
                    "a captioning export (family \"{family}\"): it supports the infer tasks {CAPTIONING_TASKS}; \
                     {RETRIEVAL_TASKS} need an image-text retrieval export (e.g. of Salesforce/blip2-itm-vit-g)"
                ),
            });
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|source| ManifestError::Io { path: p.clone(), source })?;
        serde_json::from_str(&text).map_err(|source| ManifestError::Parse { path: p, source })
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("manifest serializes")
    }
}
