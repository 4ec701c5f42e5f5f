//! The non-weight files of a checkpoint folder, in both layouts found on the Hub:
//! the older one (flat `preprocessor_config.json`, `processor_config.json` holding only
//! `num_query_tokens`) and the one transformers 5 writes (`processor_config.json` with a
//! nested `image_processor`).

use std::path::{Path, PathBuf};

use blip2_core::{GenerationDefaults, ImageConfig, SpecialTokens};
use serde_json::Value;

use crate::config::{read_json, ModelConfig, TextModel};
use crate::error::{write_err, ExportError, Result};

/// The checkpoint's files an export copies beside its graphs (those that exist).
pub const RUNTIME_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
];

pub struct SourceFiles {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub image: ImageConfig,
    pub num_query_tokens: usize,
    pub image_token_id: i64,
    pub eos: Vec<i64>,
    pub bos: Option<i64>,
    pub pad: Option<i64>,
    pub decoder_start: Option<i64>,
    pub generation: GenerationDefaults,
}

/// BLIP's defaults (OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, bicubic, 1/255).
const MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
// Written as transformers writes them, though f32 keeps fewer digits.
#[allow(clippy::excessive_precision)]
const STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

fn ids(v: Option<&Value>) -> Vec<i64> {
    match v {
        Some(Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_i64).collect(),
        _ => Vec::new(),
    }
}

impl SourceFiles {
    pub fn read(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ExportError::MissingFile {
                path: dir.into(),
                why: "the checkpoint folder",
            });
        }
        let config = ModelConfig::load(dir)?;
        let (vocab_size, text_eos, text_bos, text_pad) = match &config.text {
            TextModel::Opt(t) => {
                (t.vocab_size, t.eos_token_id.clone(), t.bos_token_id, t.pad_token_id)
            }
            TextModel::T5(t) => (t.vocab_size, t.eos_token_id.clone(), None, t.pad_token_id),
        };

        let proc_path = dir.join("processor_config.json");
        let pre_path = dir.join("preprocessor_config.json");
        let (image, proc_query_tokens) = image_settings(dir)?;
        let num_query_tokens = proc_query_tokens.unwrap_or(config.blip.num_query_tokens);
        if num_query_tokens != config.blip.num_query_tokens {
            return Err(ExportError::Config {
                path: proc_path,
                message: format!(
                    "num_query_tokens {num_query_tokens} differs from config.json's {}",
                    config.blip.num_query_tokens
                ),
            });
        }
        let v = &config.blip.vision_config;
        if image.height as usize != v.image_size || image.width as usize != v.image_size {
            return Err(ExportError::Config {
                path: pre_path,
                message: format!(
                    "image size {}x{} differs from vision_config.image_size {}",
                    image.width, image.height, v.image_size
                ),
            });
        }

        let tok_path = dir.join("tokenizer.json");
        let tokenizer = read_json(&tok_path, "the fast tokenizer file that infer uses")?;
        check_tokenizer(&tok_path)?;
        let image_token_id = match config.blip.image_token_index {
            Some(id) => id,
            None => match tokenizer
                .get("added_tokens")
                .and_then(Value::as_array)
                .and_then(|a| {
                    a.iter().find(|t| t.get("content").and_then(Value::as_str) == Some("<image>"))
                })
                .and_then(|t| t.get("id").and_then(Value::as_i64))
            {
                Some(id) => id,
                // Older checkpoints have neither: transformers' Blip2Processor then adds
                // <image> to the tokenizer, which gives it the next free id.
                None => next_free_id(&tokenizer),
            },
        };
        if image_token_id < 0 || image_token_id as usize >= vocab_size {
            return Err(ExportError::Config {
                path: config.path.clone(),
                message: format!(
                    "image_token_index {image_token_id} is outside the vocabulary of {vocab_size}"
                ),
            });
        }

        let gen_path = dir.join("generation_config.json");
        let gen = if gen_path.exists() {
            read_json(&gen_path, "generation settings")?
        } else {
            Value::Null
        };
        let mut eos = ids(gen.get("eos_token_id"));
        if eos.is_empty() {
            eos = ids(text_eos.as_ref());
        }
        let bos = gen.get("bos_token_id").and_then(Value::as_i64).or(text_bos);
        let pad = gen.get("pad_token_id").and_then(Value::as_i64).or(text_pad);
        let decoder_start = match &config.text {
            TextModel::T5(t) => Some(
                gen.get("decoder_start_token_id")
                    .and_then(Value::as_i64)
                    .or(t.decoder_start_token_id)
                    .or(pad)
                    .unwrap_or(0),
            ),
            TextModel::Opt(_) => None,
        };
        // Absent, the file gives no settings; present, it must read as one.
        let generation: GenerationDefaults = if gen.is_null() {
            GenerationDefaults::default()
        } else {
            serde_json::from_value(gen.clone()).map_err(|e| {
                // Name the key: the first one that does not read on its own.
                let key = gen.as_object().and_then(|o| {
                    o.iter().find(|(k, v)| {
                        serde_json::from_value::<GenerationDefaults>(serde_json::json!({ *k: v }))
                            .is_err()
                    })
                });
                let message = match key {
                    Some((k, v)) => {
                        format!("\"{k}\": {v} is not a value transformers would read ({e})")
                    }
                    None => format!("not a generation config transformers would read: {e}"),
                };
                ExportError::Config { path: gen_path.clone(), message }
            })?
        };
        Ok(Self {
            dir: dir.into(),
            config,
            image,
            num_query_tokens,
            image_token_id,
            eos,
            bos,
            pad,
            decoder_start,
            generation,
        })
    }

    pub fn special_tokens(&self) -> SpecialTokens {
        SpecialTokens {
            bos_token_id: self.bos,
            eos_token_id: self.eos.clone(),
            pad_token_id: self.pad,
            image_token_id: self.image_token_id,
            decoder_start_token_id: self.decoder_start,
        }
    }

    /// Copies what `infer` reads (the tokenizer) and, for provenance, the source's own
    /// configuration files.
    pub fn copy_runtime_files(&self, out: &Path) -> Result<()> {
        copy_files(&self.dir, out)
    }
}

/// The image processor settings of the checkpoint in `dir`, from `processor_config.json`'s
/// nested `image_processor` (transformers 5) or the flat `preprocessor_config.json`
/// (older Hub layout), and the processor's `num_query_tokens` when it records one.
pub(crate) fn image_settings(dir: &Path) -> Result<(ImageConfig, Option<usize>)> {
    let proc_path = dir.join("processor_config.json");
    let pre_path = dir.join("preprocessor_config.json");
    let proc =
        if proc_path.exists() { Some(read_json(&proc_path, "processor settings")?) } else { None };
    let image_proc = match proc.as_ref().and_then(|p| p.get("image_processor")) {
        Some(v) => v.clone(),
        None => read_json(
            &pre_path,
            "the image processor settings (or processor_config.json with image_processor)",
        )?,
    };
    let image = image_config(&image_proc, &pre_path)?;
    let num_query_tokens = proc
        .as_ref()
        .and_then(|p| p.get("num_query_tokens"))
        .and_then(Value::as_u64)
        .map(|n| n as usize);
    Ok((image, num_query_tokens))
}

/// Copies what `infer` reads (the tokenizer) and, for provenance, the source's own
/// configuration files ([`RUNTIME_FILES`]) from the checkpoint folder `dir` into `out`.
pub(crate) fn copy_files(dir: &Path, out: &Path) -> Result<()> {
    for f in RUNTIME_FILES {
        let src = dir.join(f);
        if src.exists() {
            let dst = out.join(f);
            std::fs::copy(&src, &dst).map_err(write_err(&dst))?;
        }
    }
    Ok(())
}

/// Fails unless `path` loads as a tokenizer the way `infer` loads it (the tokenizers
/// crate), so a damaged or foreign `tokenizer.json` is refused at export, naming the
/// file, rather than at the first `infer`.
pub fn check_tokenizer(path: &Path) -> Result<()> {
    if !path.exists() {
        return Err(ExportError::MissingFile {
            path: path.into(),
            why: "the fast tokenizer file that infer uses",
        });
    }
    tokenizers::Tokenizer::from_file(path).map(drop).map_err(|e| ExportError::Config {
        path: path.into(),
        message: format!(
            "not a tokenizer infer can load ({e}); copy the checkpoint's tokenizer.json again \
             (a Hugging Face fast tokenizer file)"
        ),
    })
}

/// The id a token added to this tokenizer would get: one past the largest id in use.
fn next_free_id(tokenizer: &Value) -> i64 {
    let vocab = tokenizer.pointer("/model/vocab");
    let from_vocab = match vocab {
        Some(Value::Object(m)) => m.values().filter_map(Value::as_i64).max(),
        // Unigram vocabularies are [piece, score] lists indexed by id.
        Some(Value::Array(a)) => Some(a.len() as i64 - 1),
        _ => None,
    };
    let from_added = tokenizer
        .get("added_tokens")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().filter_map(|t| t.get("id").and_then(Value::as_i64)).max());
    from_vocab.into_iter().chain(from_added).max().map(|m| m + 1).unwrap_or(0)
}

fn image_config(v: &Value, path: &Path) -> Result<ImageConfig> {
    let bad = |m: String| ExportError::Config { path: path.into(), message: m };
    let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(true);
    let (height, width) = match v.get("size") {
        Some(Value::Object(s)) => {
            match (s.get("height").and_then(Value::as_u64), s.get("width").and_then(Value::as_u64))
            {
                (Some(h), Some(w)) => (h as u32, w as u32),
                _ => match s.get("shortest_edge").and_then(Value::as_u64) {
                    Some(e) => (e as u32, e as u32),
                    None => {
                        return Err(bad(format!(
                            "size {} has neither height/width nor shortest_edge",
                            Value::Object(s.clone())
                        )))
                    }
                },
            }
        }
        Some(Value::Number(n)) => {
            let e = n.as_u64().ok_or_else(|| bad("size is not a positive integer".into()))? as u32;
            (e, e)
        }
        _ => (384, 384),
    };
    let triple = |k: &str, d: [f32; 3]| -> Result<[f32; 3]> {
        match v.get(k) {
            None | Some(Value::Null) => Ok(d),
            Some(Value::Array(a)) if a.len() == 3 => {
                let mut o = [0f32; 3];
                for (i, x) in a.iter().enumerate() {
                    o[i] = x.as_f64().ok_or_else(|| bad(format!("{k} holds a non-number")))? as f32;
                }
                Ok(o)
            }
            Some(Value::Number(n)) => Ok([n.as_f64().unwrap_or(0.0) as f32; 3]),
            Some(other) => Err(bad(format!("{k} = {other} is not a list of three numbers"))),
        }
    };
    Ok(ImageConfig {
        height,
        width,
        do_resize: flag("do_resize"),
        resample: v.get("resample").and_then(Value::as_u64).unwrap_or(3) as u32,
        do_rescale: flag("do_rescale"),
        rescale_factor: v.get("rescale_factor").and_then(Value::as_f64).unwrap_or(1.0 / 255.0),
        do_normalize: flag("do_normalize"),
        image_mean: triple("image_mean", MEAN)?,
        image_std: triple("image_std", STD)?,
        do_convert_rgb: flag("do_convert_rgb"),
    })
}
