//! `blip2-ort infer`: caption, vqa, chat and batch over an exported model.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use blip2_core::{EarlyStoppingSetting, GenerationDefaults};
use blip2_runtime::generation::{EarlyStopping, GenerationConfig};
use blip2_runtime::pipeline::{Generated, Pipeline};
use blip2_runtime::preprocess::load_and_preprocess;
use blip2_runtime::prompt::Prompter;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::session::SessionOptions;
use crate::UsageError;

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
    /// Images per batch for caption and batch (images or texts per call for the retrieval tasks).
    #[arg(long, global = true, default_value_t = 8, value_parser = crate::args::positive)]
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
    /// Retrieval exports: image-text matching probability (ITM) and ITC score of an image with each text.
    Itm(crate::retrieval_cmd::ItmArgs),
    /// Retrieval exports: normalized query embeddings of images (one row per query).
    EmbedImage(crate::retrieval_cmd::EmbedImageArgs),
    /// Retrieval exports: normalized text embeddings.
    EmbedText(crate::retrieval_cmd::EmbedTextArgs),
    /// Retrieval exports: images ordered by ITC score with a text, optionally reranked by ITM.
    Rank(crate::retrieval_cmd::RankArgs),
}

/// Generation flags; unset ones come from the model's generation_config.json, then
/// transformers' defaults.
#[derive(Args, Debug, Default)]
pub struct GenArgs {
    /// At most this many new tokens [default: 20].
    #[arg(long, global = true, value_parser = crate::args::max_new_tokens)]
    pub max_new_tokens: Option<usize>,
    /// No eos before this many new tokens [default: 0].
    #[arg(long, global = true, value_parser = crate::args::count)]
    pub min_new_tokens: Option<usize>,
    /// Beam search with this many beams [default: 1].
    #[arg(long, global = true, value_parser = crate::args::num_beams)]
    pub num_beams: Option<usize>,
    /// Beam scores are divided by length^penalty [default: 1.0].
    #[arg(long, global = true, value_parser = crate::args::length_penalty)]
    pub length_penalty: Option<f64>,
    /// Beam search stop rule: true, false or never [default: false].
    #[arg(long, global = true)]
    pub early_stopping: Option<String>,
    /// Penalise tokens already present (1.0 = off) [default: 1.0].
    #[arg(long, global = true, value_parser = crate::args::repetition_penalty)]
    pub repetition_penalty: Option<f64>,
    /// Never repeat an n-gram of this size (0 = off) [default: 0].
    #[arg(long, global = true, value_parser = crate::args::count)]
    pub no_repeat_ngram_size: Option<usize>,
    /// Sample instead of taking the most likely tokens.
    #[arg(long, global = true)]
    pub do_sample: bool,
    /// Sampling temperature [default: 1.0].
    #[arg(long, global = true, value_parser = crate::args::temperature)]
    pub temperature: Option<f64>,
    /// Sample among the k most likely tokens (0 = off) [default: 50].
    #[arg(long, global = true, value_parser = crate::args::count)]
    pub top_k: Option<usize>,
    /// Sample among the tokens holding this much probability [default: 1.0].
    #[arg(long, global = true, value_parser = crate::args::top_p)]
    pub top_p: Option<f64>,
    /// Seed for sampling: the same seed gives the same output.
    #[arg(long, global = true, value_parser = crate::args::seed)]
    pub seed: Option<u64>,
    /// Sequences per input (beams or samples) [default: 1].
    #[arg(long, global = true, value_parser = crate::args::num_return_sequences)]
    pub num_return_sequences: Option<usize>,
}

impl GenArgs {
    /// The settings these flags set, to lay over the model's.
    pub fn settings(&self) -> Result<GenerationDefaults> {
        let early_stopping = match &self.early_stopping {
            None => None,
            Some(v) => Some(match v.parse::<EarlyStopping>()? {
                EarlyStopping::True => EarlyStoppingSetting::Flag(true),
                EarlyStopping::False => EarlyStoppingSetting::Flag(false),
                EarlyStopping::Never => EarlyStoppingSetting::Word(blip2_core::Never::Never),
            }),
        };
        Ok(GenerationDefaults {
            max_new_tokens: self.max_new_tokens,
            max_length: None,
            min_new_tokens: self.min_new_tokens,
            num_beams: self.num_beams,
            length_penalty: self.length_penalty,
            early_stopping,
            repetition_penalty: self.repetition_penalty,
            no_repeat_ngram_size: self.no_repeat_ngram_size,
            do_sample: self.do_sample.then_some(true),
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            num_return_sequences: self.num_return_sequences,
            seed: self.seed,
        })
    }

    /// `c` with these flags laid over it, checked.
    pub fn apply(&self, c: GenerationConfig) -> Result<GenerationConfig> {
        let c = c.overridden(&self.settings()?);
        blip2_runtime::generation::validate(&c)?;
        Ok(c)
    }
}

struct Out {
    json: bool,
    /// Generated ids the tokenizer has no token for (left out of the text).
    unknown: std::cell::RefCell<std::collections::BTreeSet<i64>>,
}

impl Out {
    fn new(json: bool) -> Self {
        Out { json, unknown: Default::default() }
    }

    fn emit(&self, image: &Path, prompt: &str, results: &[Generated], prompter: &Prompter) {
        for g in results {
            self.unknown.borrow_mut().extend(prompter.unknown_ids(&g.token_ids));
        }
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

    /// Says once, at the end, that the text left out tokens the tokenizer does not have:
    /// the random-weight checkpoints' tokenizers are smaller than their vocabularies, so
    /// their captions are often empty while `token_ids` are not.
    fn warn_unknown(&self, prompter: &Prompter, vocab: usize) {
        let unknown = self.unknown.borrow();
        if unknown.is_empty() {
            return;
        }
        let shown: Vec<String> = unknown.iter().take(5).map(i64::to_string).collect();
        let more = if unknown.len() > 5 {
            format!(" and {} more", unknown.len() - 5)
        } else {
            String::new()
        };
        eprintln!(
            "warning: generated token id(s) {}{more} have no token in tokenizer.json ({} tokens; the language model \
             has {vocab}), so the text leaves them out (token_ids in --json keep them). Random-weight checkpoints \
             (the test fixtures, scripts/random_checkpoint.py) have such small tokenizers; real checkpoints do not",
            shown.join(", "),
            prompter.tokenizer_size()
        );
    }

    /// A question that got no answer: with --json a line `{"image", "line", "error"}` keeps
    /// one stdout line per question; the text output leaves it to stderr.
    fn emit_error(&self, image: &Path, line: usize, error: &str) {
        if self.json {
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(
                stdout,
                "{}",
                json!({"image": image.display().to_string(), "line": line, "error": error})
            );
            let _ = stdout.flush();
        }
    }
}

pub fn run(a: &InferArgs, quiet: bool) -> Result<i32> {
    let Some(model) = a.model.as_deref() else {
        return Err(UsageError(
            "--model is required: an exported folder, a checkpoint folder or a Hub id".into(),
        )
        .into());
    };
    let dir = crate::session::resolve_model(model, quiet)?;
    let retrieval = match &a.task {
        Task::Itm(t) => Some(crate::retrieval_cmd::Task::Itm(t)),
        Task::EmbedImage(t) => Some(crate::retrieval_cmd::Task::EmbedImage(t)),
        Task::EmbedText(t) => Some(crate::retrieval_cmd::Task::EmbedText(t)),
        Task::Rank(t) => Some(crate::retrieval_cmd::Task::Rank(t)),
        _ => None,
    };
    if let Some(task) = retrieval {
        return crate::retrieval_cmd::run(task, &dir, &a.session, a.json, a.batch_size);
    }
    let mut pipe = crate::session::load_pipeline(&dir, &a.session)?;
    let cfg = a.gen.apply(pipe.default_config())?;
    blip2_runtime::generation::check_vocab(&cfg, pipe.model.manifest.text.vocab_size)?;
    let out = Out::new(a.json);
    let res = run_task(a, &mut pipe, &cfg, &out);
    out.warn_unknown(&pipe.prompter, pipe.model.manifest.text.vocab_size);
    res
}

fn run_task(a: &InferArgs, pipe: &mut Pipeline, cfg: &GenerationConfig, out: &Out) -> Result<i32> {
    match &a.task {
        Task::Caption { images, prompt } => {
            // Every image is read before anything is printed, so an unreadable one (the
            // first in argument order) fails the command with nothing on stdout. Only the
            // pixel values are kept; the machine's cores decode and resize in turn.
            let paths: Vec<&Path> = images.iter().map(PathBuf::as_path).collect();
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let mut pixels = Vec::with_capacity(images.len());
            let loaded =
                load_and_preprocess(&paths, &pipe.limits, &pipe.model.manifest.image, threads);
            for (p, r) in images.iter().zip(loaded) {
                pixels.push(r.map_err(|e| {
                    let (msg, name) = (e.to_string(), p.display().to_string());
                    if msg.starts_with(&name) {
                        anyhow::anyhow!(msg)
                    } else {
                        anyhow::anyhow!("{name}: {msg}")
                    }
                })?);
            }
            for (chunk, px) in images.chunks(a.batch_size).zip(pixels.chunks(a.batch_size)) {
                let views: Vec<_> = px.iter().map(|p| p.view()).collect();
                let batch = ndarray::concatenate(ndarray::Axis(0), &views)
                    .context("joining the batch's pixel values")?;
                let prompts = vec![prompt.clone(); chunk.len()];
                let res = pipe.generate_pixels(batch, &prompts, cfg)?;
                for (p, r) in chunk.iter().zip(&res) {
                    out.emit(p, prompt, r, &pipe.prompter);
                }
            }
            Ok(0)
        }
        Task::Vqa { image, question } => {
            let img = pipe.load_image(image)?;
            let prompt = pipe.prompter.vqa_prompt(question);
            let res = pipe.generate(&[img], std::slice::from_ref(&prompt), cfg)?;
            out.emit(image, &prompt, &res[0], &pipe.prompter);
            Ok(0)
        }
        Task::Chat { image } => chat(pipe, image, cfg, out),
        Task::Batch { requests } => crate::batch::run(pipe, requests, cfg, a.batch_size),
        Task::Itm(_) | Task::EmbedImage(_) | Task::EmbedText(_) | Task::Rank(_) => {
            unreachable!("run by retrieval_cmd above")
        }
    }
}

/// Answers one question per stdin line. The context keeps as many of the latest turns as
/// fit with room for --max-new-tokens; a question too long on its own fails only its
/// line (exit status 1 at the end), and the session goes on.
fn chat(pipe: &mut Pipeline, image: &Path, cfg: &GenerationConfig, out: &Out) -> Result<i32> {
    let img = pipe.load_image(image)?;
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    let mut history = blip2_runtime::prompt::Chat::default();
    let mut lines = stdin.lock();
    let mut buf = Vec::new();
    let mut line_no = 0;
    let mut failed = false;
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        buf.clear();
        if lines.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        line_no += 1;
        let Ok(line) = std::str::from_utf8(&buf) else {
            // A line that fails, as a question too long does: the session goes on, every
            // question line gets its stdout line with --json, and the exit status is 1.
            failed = true;
            eprintln!("error: line {line_no}: not UTF-8; the line was skipped");
            out.emit_error(image, line_no, "not UTF-8; the line was skipped");
            continue;
        };
        let q = line.trim();
        if q.is_empty() {
            continue;
        }
        let (prompt, dropped) = match history.fit(&pipe.prompter, q, cfg.max_new_tokens) {
            Ok(fit) => fit,
            Err(e) => {
                failed = true;
                eprintln!("error: line {line_no}: {e}");
                out.emit_error(image, line_no, &e.to_string());
                continue;
            }
        };
        if dropped > 0 {
            // An encoder-decoder model's answer does not share the prompt's positions.
            let why = if pipe.model.manifest.family == blip2_core::Family::T5 {
                format!("to stay within the context limit of {} tokens", pipe.prompter.max_context)
            } else {
                format!(
                    "to leave room for --max-new-tokens {} (context limit {} tokens, {} positions)",
                    cfg.max_new_tokens, pipe.prompter.max_context, pipe.prompter.max_positions
                )
            };
            eprintln!("warning: dropped the {dropped} oldest turn(s) {why}");
        }
        let res = pipe.generate(std::slice::from_ref(&img), std::slice::from_ref(&prompt), cfg)?;
        out.emit(image, &prompt, &res[0], &pipe.prompter);
        history.push(q, &res[0][0].text);
    }
    Ok(if failed { 1 } else { 0 })
}
