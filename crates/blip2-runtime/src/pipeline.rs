//! The tasks, end to end: images and prompts in, generated tokens and text out. Wires
//! preprocessing, prompt assembly, the model state and the search together.

use std::path::Path;

use image::DynamicImage;
use ndarray::{Array4, ArrayD, Axis};

use std::sync::Arc;

pub use crate::embed_cache::{EmbedCache, DEFAULT_EMBED_CACHE};
use crate::engine::{Event, NoMetrics, Queued, Request, Scheduler};
use crate::error::RuntimeError;
use crate::generation::{self, GenerationConfig};
use crate::model::{Blip2Model, SessionFactory};
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
    pub(crate) embed_cache: EmbedCache,
}

impl Pipeline {
    pub fn load(dir: &Path, factory: &mut SessionFactory<'_>) -> Result<Self, RuntimeError> {
        let model = Blip2Model::load(dir, factory)?;
        let prompter = Prompter::load(dir, &model.manifest)?;
        Ok(Self {
            model,
            prompter,
            limits: ImageLimits::default(),
            embed_cache: EmbedCache::new(DEFAULT_EMBED_CACHE),
        })
    }

    /// Vision encoder + Q-Former for a batch, `[B, num_query_tokens, hidden]` as f32.
    /// Images seen recently come from the cache; the others (each distinct one once) run
    /// as one batch.
    pub fn image_embeds(&mut self, pixels: Array4<f32>) -> Result<ArrayD<f32>, RuntimeError> {
        self.embed_cache.embed(&mut self.model, pixels)
    }

    /// The search settings this model defaults to: generation_config.json's values over
    /// transformers' defaults, with the model's eos and pad ids.
    pub fn default_config(&self) -> GenerationConfig {
        GenerationConfig::for_model(&self.model.manifest)
    }

    /// Hands the loaded model to an engine thread (the server's).
    pub fn into_engine(
        self,
        opts: crate::engine::EngineOptions,
        metrics: Arc<dyn crate::engine::EngineMetrics>,
    ) -> Result<Arc<crate::engine::Engine>, std::io::Error> {
        let defaults = self.default_config();
        let Pipeline { model, prompter, limits, embed_cache } = self;
        crate::engine::Engine::start(model, prompter, limits, embed_cache, defaults, opts, metrics)
    }

    pub fn load_image(&self, path: &Path) -> Result<DynamicImage, RuntimeError> {
        Ok(preprocess::load_image(path, &self.limits)?)
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
            return Err(RuntimeError::Input(format!(
                "{} images but {} prompts",
                images.len(),
                prompts.len()
            )));
        }
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let pixels = preprocess::preprocess_batch(images, &self.model.manifest.image)?;
        self.generate_pixels(pixels, prompts, cfg)
    }

    /// [`Pipeline::generate`] on pixel values already made, `[B, 3, H, W]`.
    pub fn generate_pixels(
        &mut self,
        pixels: Array4<f32>,
        prompts: &[String],
        cfg: &GenerationConfig,
    ) -> Result<Vec<Vec<Generated>>, RuntimeError> {
        // Counts, the empty batch and the config are checked by generate_text_ids.
        let texts =
            prompts.iter().map(|p| self.prompter.check_fits(p)).collect::<Result<Vec<_>, _>>()?;
        self.generate_text_ids(pixels, &texts, cfg)
    }

    /// [`Pipeline::generate_pixels`] on prompts already tokenized: each row's text ids as
    /// [`Prompter::text_ids`] gives them (special tokens included, image tokens not).
    /// Benchmarks use it to feed fixed token ids.
    pub fn generate_text_ids(
        &mut self,
        pixels: Array4<f32>,
        texts: &[Vec<i64>],
        cfg: &GenerationConfig,
    ) -> Result<Vec<Vec<Generated>>, RuntimeError> {
        let rows = pixels.shape()[0];
        if rows != texts.len() {
            return Err(RuntimeError::Input(format!("{rows} images but {} prompts", texts.len())));
        }
        if rows == 0 {
            return Ok(Vec::new());
        }
        generation::validate(cfg)?;
        generation::check_vocab(cfg, self.model.manifest.text.vocab_size)?;
        let batch = self.prompter.assemble(texts);
        self.prompter.check_room(batch.ids[0].len(), cfg.max_new_tokens)?;
        // One seed for the batch, its sampling streams numbered by row over the batch,
        // as generate() numbers them.
        let cfg = GenerationConfig {
            seed: Some(cfg.seed.unwrap_or_else(generation::fresh_seed)),
            ..cfg.clone()
        };
        let streams = if cfg.num_beams > 1 { 1 } else { crate::engine::batch_rows(&cfg) };
        let (tx, rx) = std::sync::mpsc::channel();
        let jobs = texts
            .iter()
            .enumerate()
            .map(|(r, text)| {
                Queued::new(Request {
                    pixels: pixels.index_axis(Axis(0), r).to_owned(),
                    text_ids: text.clone(),
                    cfg: cfg.clone(),
                    stop: Vec::new(),
                    first_stream: (r * streams) as u64,
                    sink: Box::new(RowSink(r, tx.clone())),
                })
            })
            .collect();
        drop(tx);
        let mut scheduler = Scheduler::new(usize::MAX, Arc::new(NoMetrics));
        scheduler.run_to_end(&mut self.model, &mut self.embed_cache, &self.prompter, jobs);
        let mut res: Vec<Vec<Option<Generated>>> = vec![vec![None; cfg.num_return_sequences]; rows];
        for (r, event) in rx {
            match event {
                Event::End { index, text, token_ids, .. } => {
                    res[r][index] = Some(Generated { text, token_ids })
                }
                Event::Failed(e) => {
                    return Err(Arc::try_unwrap(e).unwrap_or_else(RuntimeError::Shared))
                }
                Event::Delta { .. } | Event::Done { .. } => {}
            }
        }
        res.into_iter()
            .map(|row| {
                row.into_iter()
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| RuntimeError::Input("a sequence ended without a result".into()))
            })
            .collect()
    }
}

/// The events of row `.0` of a pipeline batch.
struct RowSink(usize, std::sync::mpsc::Sender<(usize, Event)>);

impl crate::engine::Sink for RowSink {
    fn send(&self, event: Event) {
        let _ = self.1.send((self.0, event));
    }

    fn wants_deltas(&self) -> bool {
        false
    }
}
