//! The tasks, end to end: images and prompts in, generated tokens and text out. Wires
//! preprocessing, prompt assembly, the model state and the search together.

use std::path::Path;

use image::DynamicImage;

use crate::error::RuntimeError;
use crate::generation::{self, GenerationConfig, GenerationError, Prompt, StepModel};
use crate::model::{to_f32, Blip2Model, LmState, SessionFactory, T5State};
use crate::preprocess::{self, ImageLimits};
use crate::prompt::Prompter;

/// One generated sequence.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Generated {
    pub text: String,
    /// The new tokens only: no prompt, no final eos.
    pub token_ids: Vec<i64>,
}

pub struct Pipeline {
    pub model: Blip2Model,
    pub prompter: Prompter,
    pub limits: ImageLimits,
}

impl StepModel for LmState<'_> {
    type Error = RuntimeError;
    fn step(&mut self, tokens: &[i64]) -> Result<ndarray::Array2<f32>, RuntimeError> {
        LmState::step(self, tokens)
    }
    fn select_rows(&mut self, rows: &[usize]) -> Result<(), RuntimeError> {
        LmState::select_rows(self, rows)
    }
}

impl StepModel for T5State<'_> {
    type Error = RuntimeError;
    fn step(&mut self, tokens: &[i64]) -> Result<ndarray::Array2<f32>, RuntimeError> {
        T5State::step(self, tokens)
    }
    fn select_rows(&mut self, rows: &[usize]) -> Result<(), RuntimeError> {
        T5State::select_rows(self, rows)
    }
}

fn search_err(e: GenerationError<RuntimeError>) -> RuntimeError {
    match e {
        GenerationError::Model(m) => m,
        other => RuntimeError::Input(other.to_string()),
    }
}

impl Pipeline {
    pub fn load(dir: &Path, factory: &mut SessionFactory<'_>) -> Result<Self, RuntimeError> {
        let model = Blip2Model::load(dir, factory)?;
        let prompter = Prompter::load(dir, &model.manifest)?;
        Ok(Self { model, prompter, limits: ImageLimits::default() })
    }

    /// The search settings this model defaults to: generation_config.json's values over
    /// transformers' defaults, with the model's eos and pad ids.
    pub fn default_config(&self) -> GenerationConfig {
        let m = &self.model.manifest;
        let g = &m.generation;
        let d = GenerationConfig::default();
        GenerationConfig {
            max_new_tokens: g.max_new_tokens.unwrap_or(d.max_new_tokens),
            min_new_tokens: g.min_new_tokens.unwrap_or(d.min_new_tokens),
            num_beams: g.num_beams.unwrap_or(d.num_beams),
            length_penalty: g.length_penalty.map(f64::from).unwrap_or(d.length_penalty),
            early_stopping: g.early_stopping.map(Into::into).unwrap_or(d.early_stopping),
            repetition_penalty: g.repetition_penalty.map(f64::from).unwrap_or(d.repetition_penalty),
            no_repeat_ngram_size: g.no_repeat_ngram_size.unwrap_or(d.no_repeat_ngram_size),
            do_sample: g.do_sample.unwrap_or(d.do_sample),
            temperature: g.temperature.map(f64::from).unwrap_or(d.temperature),
            top_k: g.top_k.unwrap_or(d.top_k),
            top_p: g.top_p.map(f64::from).unwrap_or(d.top_p),
            seed: None,
            num_return_sequences: g.num_return_sequences.unwrap_or(d.num_return_sequences),
            eos_token_ids: m.tokens.eos_token_id.clone(),
            pad_token_id: m.tokens.pad_token_id,
        }
    }

    pub fn load_image(&self, path: &Path) -> Result<DynamicImage, RuntimeError> {
        preprocess::load_image(path, &self.limits).map_err(|e| RuntimeError::Input(e.to_string()))
    }

    /// Runs one batch: image i with prompt i. Returns, per row, `num_return_sequences`
    /// results. Rows are left-padded together exactly as transformers' processor does.
    pub fn generate(
        &mut self,
        images: &[DynamicImage],
        prompts: &[String],
        cfg: &GenerationConfig,
    ) -> Result<Vec<Vec<Generated>>, RuntimeError> {
        if images.len() != prompts.len() {
            return Err(RuntimeError::Input(format!("{} images but {} prompts", images.len(), prompts.len())));
        }
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let pixels = preprocess::preprocess_batch(images, &self.model.manifest.image)
            .map_err(|e| RuntimeError::Input(e.to_string()))?;
        self.generate_pixels(pixels, prompts, cfg)
    }

    /// [`Pipeline::generate`] on pixel values already made, `[B, 3, H, W]`.
    pub fn generate_pixels(
        &mut self,
        pixels: ndarray::Array4<f32>,
        prompts: &[String],
        cfg: &GenerationConfig,
    ) -> Result<Vec<Vec<Generated>>, RuntimeError> {
        let rows = pixels.shape()[0];
        if rows != prompts.len() {
            return Err(RuntimeError::Input(format!("{rows} images but {} prompts", prompts.len())));
        }
        if rows == 0 {
            return Ok(Vec::new());
        }
        generation::validate(cfg).map_err(|e| RuntimeError::Input(e.to_string()))?;
        let mut texts = Vec::with_capacity(prompts.len());
        for p in prompts {
            texts.push(self.prompter.check_fits(p)?);
        }
        let batch = self.prompter.assemble(&texts);
        let len = batch.ids[0].len();
        let limit = self.model.manifest.text.max_position_embeddings;
        if len + cfg.max_new_tokens > limit {
            return Err(RuntimeError::Input(format!(
                "the prompt ({len} tokens) plus --max-new-tokens {} exceeds the language model's {limit} positions",
                cfg.max_new_tokens
            )));
        }
        let embeds = self.model.encode_images(pixels)?;
        let out = if self.model.manifest.family == "t5" {
            // The search sees the decoder's ids, as transformers' processors do for
            // encoder-decoder models.
            let start = self.model.manifest.tokens.decoder_start_token_id.unwrap_or(0);
            let prompts = vec![Prompt::new(vec![start]); rows];
            let embeds = to_f32(&embeds)?;
            let (mut state, logits) = T5State::prefill(&mut self.model, &batch.ids, &batch.mask, embeds, start)?;
            generation::generate(&mut state, &prompts, logits, cfg).map_err(search_err)?
        } else {
            let prompts: Vec<Prompt> =
                batch.ids.iter().zip(&batch.mask).map(|(ids, m)| Prompt::with_attention_mask(ids.clone(), m)).collect();
            let (mut state, logits) = LmState::prefill(&mut self.model, &batch.ids, &batch.mask, embeds)?;
            let logits = crate::model::last_position(&logits);
            generation::generate(&mut state, &prompts, logits, cfg).map_err(search_err)?
        };
        let mut res = Vec::with_capacity(out.len());
        for row in out {
            let mut seqs = Vec::with_capacity(row.len());
            for ids in row {
                seqs.push(Generated { text: self.prompter.decode(&ids)?, token_ids: ids });
            }
            res.push(seqs);
        }
        Ok(res)
    }
}
