//! `blip2-ort infer`: caption, vqa, chat and batch over an exported model.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use blip2_runtime::generation::{EarlyStopping, GenerationConfig};
use blip2_runtime::pipeline::{Generated, Pipeline};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::session::SessionOptions;

#[derive(Args, Debug)]
pub struct InferArgs {
    /// An exported model folder, a Hugging Face checkpoint folder, or a Hub id (the last
    /// two are exported once into the blip2-ort cache and reused).
    #[arg(long, global = true)]
    pub model: Option<String>,
    #[command(flatten)]
    pub session: SessionOptions,
    /// One JSON object per result per line on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// Images per batch for caption and batch.
    #[arg(long, global = true, default_value_t = 8)]
    pub batch_size: usize,
    #[command(flatten)]
    pub gen: GenArgs,
    #[command(subcommand)]
    pub task: Task,
}

#[derive(Subcommand, Debug)]
pub enum Task {
    /// Caption images, optionally continuing a prompt such as "a photo of".
    Caption {
        #[arg(required = true)]
        images: Vec<PathBuf>,
        #[arg(long, default_value = "")]
        prompt: String,
    },
    /// Answer a question about an image (the manifest's VQA template).
    Vqa {
        image: PathBuf,
        #[arg(long)]
        question: String,
    },
    /// Chat about an image: one question per line on stdin, earlier turns kept as context.
    Chat { image: PathBuf },
    /// Run a JSONL file of requests: {"image": PATH, "prompt": TEXT} or {"image": PATH, "question": TEXT}.
    Batch { requests: PathBuf },
}

/// Generation flags; unset ones come from the model's generation_config.json, then
/// transformers' defaults.
#[derive(Args, Debug, Default)]
pub struct GenArgs {
    /// At most this many new tokens [default: 20].
    #[arg(long, global = true)]
    pub max_new_tokens: Option<usize>,
    /// No eos before this many new tokens [default: 0].
    #[arg(long, global = true)]
    pub min_new_tokens: Option<usize>,
    /// Beam search with this many beams [default: 1].
    #[arg(long, global = true)]
    pub num_beams: Option<usize>,
    /// Beam scores are divided by length^penalty [default: 1.0].
    #[arg(long, global = true, allow_negative_numbers = true)]
    pub length_penalty: Option<f64>,
    /// Beam search stop rule: true, false or never [default: false].
    #[arg(long, global = true)]
    pub early_stopping: Option<String>,
    /// Penalise tokens already present (1.0 = off) [default: 1.0].
    #[arg(long, global = true)]
    pub repetition_penalty: Option<f64>,
    /// Never repeat an n-gram of this size (0 = off) [default: 0].
    #[arg(long, global = true)]
    pub no_repeat_ngram_size: Option<usize>,
    /// Sample instead of taking the most likely tokens.
    #[arg(long, global = true)]
    pub do_sample: bool,
    /// Sampling temperature [default: 1.0].
    #[arg(long, global = true)]
    pub temperature: Option<f64>,
    /// Sample among the k most likely tokens (0 = off) [default: 50].
    #[arg(long, global = true)]
    pub top_k: Option<usize>,
    /// Sample among the tokens holding this much probability [default: 1.0].
    #[arg(long, global = true)]
    pub top_p: Option<f64>,
    /// Seed for sampling: the same seed gives the same output.
    #[arg(long, global = true)]
    pub seed: Option<u64>,
    /// Sequences per input (beams or samples) [default: 1].
    #[arg(long, global = true)]
    pub num_return_sequences: Option<usize>,
}

impl GenArgs {
    pub fn apply(&self, mut c: GenerationConfig) -> Result<GenerationConfig> {
        if let Some(v) = self.max_new_tokens {
            c.max_new_tokens = v;
        }
        if let Some(v) = self.min_new_tokens {
            c.min_new_tokens = v;
        }
        if let Some(v) = self.num_beams {
            c.num_beams = v;
        }
        if let Some(v) = self.length_penalty {
            c.length_penalty = v;
        }
        if let Some(v) = &self.early_stopping {
            c.early_stopping = v.parse::<EarlyStopping>()?;
        }
        if let Some(v) = self.repetition_penalty {
            c.repetition_penalty = v;
        }
        if let Some(v) = self.no_repeat_ngram_size {
            c.no_repeat_ngram_size = v;
        }
        if self.do_sample {
            c.do_sample = true;
        }
        if let Some(v) = self.temperature {
            c.temperature = v;
        }
        if let Some(v) = self.top_k {
            c.top_k = v;
        }
        if let Some(v) = self.top_p {
            c.top_p = v;
        }
        if self.seed.is_some() {
            c.seed = self.seed;
        }
        if let Some(v) = self.num_return_sequences {
            c.num_return_sequences = v;
        }
        blip2_runtime::generation::validate(&c)?;
        Ok(c)
    }
}

/// Resolves --model to an exported folder, exporting a checkpoint into the cache once.
pub fn resolve_model(model: &str, quiet: bool) -> Result<PathBuf> {
    let p = Path::new(model);
    if p.join(blip2_core::io::MANIFEST_FILE).exists() {
        return Ok(p.to_path_buf());
    }
    let (src, key) = if p.join("config.json").exists() {
        let canon = p.canonicalize().with_context(|| format!("{model}: cannot resolve the path"))?;
        (canon.clone(), format!("local/{}", sanitize(&canon.to_string_lossy())))
    } else if crate::hub::looks_like_hub_id(model) {
        (crate::hub::fetch(model, None, quiet)?, format!("hub/{}", sanitize(model)))
    } else if p.exists() {
        bail!("{model}: neither an exported model (no {}) nor a checkpoint folder (no config.json)", blip2_core::io::MANIFEST_FILE);
    } else {
        bail!("{model}: no such folder, and not a Hub id of the form owner/name");
    };
    let out = models_cache().join(key);
    if out.join(blip2_core::io::MANIFEST_FILE).exists() {
        return Ok(out);
    }
    if !quiet {
        eprintln!("exporting {model} into {} (once)", out.display());
    }
    let opts = blip2_export::ExportOptions { source_label: model.to_string(), ..Default::default() };
    blip2_export::export(&src, &out, &opts, &mut blip2_export::NoProgress)?;
    Ok(out)
}

fn models_cache() -> PathBuf {
    blip2_runtime::ort_env::cache_root().join("models")
}

fn sanitize(s: &str) -> String {
    s.trim_start_matches('/').chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' }).collect()
}

struct Out {
    json: bool,
}

impl Out {
    fn emit(&self, image: &Path, prompt: &str, results: &[Generated]) {
        let mut stdout = std::io::stdout().lock();
        for (i, g) in results.iter().enumerate() {
            if self.json {
                let mut o = json!({"image": image.display().to_string(), "prompt": prompt, "text": g.text, "token_ids": g.token_ids});
                if results.len() > 1 {
                    o["sequence"] = json!(i);
                }
                let _ = writeln!(stdout, "{o}");
            } else {
                let _ = writeln!(stdout, "{}", g.text);
            }
        }
        let _ = stdout.flush();
    }
}

pub fn run(a: &InferArgs, quiet: bool) -> Result<i32> {
    let Some(model) = a.model.as_deref() else {
        bail!("--model is required: an exported folder, a checkpoint folder or a Hub id");
    };
    let dir = resolve_model(model, quiet)?;
    let mut pipe = crate::session::load_pipeline(&dir, &a.session)?;
    let cfg = a.gen.apply(pipe.default_config())?;
    let out = Out { json: a.json };
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    match &a.task {
        Task::Caption { images, prompt } => {
            for chunk in images.chunks(a.batch_size) {
                let imgs = chunk.iter().map(|p| pipe.load_image(p)).collect::<Result<Vec<_>, _>>()?;
                let prompts = vec![prompt.clone(); chunk.len()];
                let res = pipe.generate(&imgs, &prompts, &cfg)?;
                for (p, r) in chunk.iter().zip(&res) {
                    out.emit(p, prompt, r);
                }
            }
            Ok(0)
        }
        Task::Vqa { image, question } => {
            let img = pipe.load_image(image)?;
            let prompt = pipe.prompter.vqa_prompt(question);
            let res = pipe.generate(&[img], std::slice::from_ref(&prompt), &cfg)?;
            out.emit(image, &prompt, &res[0]);
            Ok(0)
        }
        Task::Chat { image } => chat(&mut pipe, image, &cfg, &out),
        Task::Batch { requests } => crate::batch::run(&mut pipe, requests, &cfg, a.batch_size, true),
    }
}

fn chat(pipe: &mut Pipeline, image: &Path, cfg: &GenerationConfig, out: &Out) -> Result<i32> {
    let img = pipe.load_image(image)?;
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    let mut history = blip2_runtime::prompt::Chat::default();
    let mut lines = stdin.lock();
    let mut buf = Vec::new();
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        buf.clear();
        if lines.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        let Ok(line) = std::str::from_utf8(&buf) else {
            eprintln!("warning: skipped a line that is not UTF-8");
            continue;
        };
        let q = line.trim();
        if q.is_empty() {
            continue;
        }
        let (prompt, dropped) = history.fit(&pipe.prompter, q)?;
        if dropped > 0 {
            eprintln!("warning: dropped the {dropped} oldest turn(s) to stay within {} tokens", pipe.prompter.max_context);
        }
        let res = pipe.generate(std::slice::from_ref(&img), std::slice::from_ref(&prompt), cfg)?;
        out.emit(image, &prompt, &res[0]);
        history.push(q, &res[0][0].text);
    }
    Ok(0)
}
