//! `blip2-ort bench`: times an exported model the way `scripts/hf_generate_bench.py`
//! times transformers, so the two JSON objects compare key for key: whole caption
//! generation with exactly N new tokens per batch size (medians over --reps after a
//! warm-up), the vision encoder alone, decode ms per token at batch 1, peak RSS; plus what
//! only we can split out: session start-up, the Q-Former, the prefill, one decode step,
//! a generate whose image embeddings come from the cache.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Result};
use blip2_runtime::generation::{GenerationConfig, Want};
use blip2_runtime::pipeline::Pipeline;
use clap::Args;
use ndarray::Array4;
use serde_json::{json, Value};

use crate::session::SessionOptions;
use crate::stats::{median, round};
use crate::UsageError;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// An exported model folder (or a checkpoint folder / Hub id, exported once into the
    /// cache). Needed unless --image is given (then only its image size is read).
    #[arg(long, required_unless_present = "image")]
    pub model: Option<String>,
    /// Time reading and preprocessing this image file instead of the model (repeat the
    /// flag for several): ms per image on each --workers count, exact and --fast-decode.
    #[arg(long)]
    pub image: Vec<std::path::PathBuf>,
    /// With --image: worker thread counts to time, comma-separated (default 1, 2 and all
    /// cores).
    #[arg(long, value_delimiter = ',')]
    pub workers: Vec<usize>,
    #[command(flatten)]
    pub session: SessionOptions,
    /// Batch sizes to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub batch: Vec<usize>,
    /// New tokens per generate call (min = max, so the eos cannot stop it early).
    #[arg(long, default_value_t = 20)]
    pub new_tokens: usize,
    /// Text tokens after BOS in the prompt (ids 10, 11, ... as hf_generate_bench uses).
    #[arg(long, default_value_t = 0)]
    pub prompt_tokens: usize,
    /// Beam search with this many beams.
    #[arg(long, default_value_t = 1)]
    pub num_beams: usize,
    /// Timed repetitions after one warm-up; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Seed of the random pixel values.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// One JSON object on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Seeded standard-normal pixel values (as `torch.randn` gives hf_generate_bench):
/// splitmix64 into Box-Muller. The values only need to look like normalised pixels.
struct Randn(u64);

impl Randn {
    fn next_u64(&mut self) -> u64 {
        blip2_runtime::generation::rng::splitmix64(&mut self.0)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn pixels(&mut self, b: usize, size: usize) -> Array4<f32> {
        Array4::from_shape_simple_fn((b, 3, size, size), || {
            let (u, v) = (self.uniform(), self.uniform());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
    }
}

/// Peak and current resident set size in MB, from /proc/self/status (Linux only).
fn rss_mb(field: &str) -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some((kb / 1024.0 * 10.0).round() / 10.0)
}

/// Median wall milliseconds of `run(setup())` over `reps` runs after one warm-up; the
/// setup (fresh inputs) is not timed.
fn timed<I>(
    reps: usize,
    mut setup: impl FnMut() -> I,
    mut run: impl FnMut(I) -> Result<()>,
) -> Result<f64> {
    run(setup())?;
    let mut ts = Vec::with_capacity(reps);
    for _ in 0..reps {
        let input = setup();
        let t = Instant::now();
        run(input)?;
        ts.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(round(median(ts), 2))
}

struct Bench<'a> {
    pipe: Pipeline,
    rng: Randn,
    size: usize,
    text: Vec<i64>,
    args: &'a BenchArgs,
}

impl Bench<'_> {
    fn config(&self, n: usize) -> GenerationConfig {
        let mut c = self.pipe.default_config();
        c.max_new_tokens = n;
        c.min_new_tokens = n;
        c.num_beams = self.args.num_beams;
        c.num_return_sequences = 1;
        c.do_sample = false;
        c.repetition_penalty = 1.0;
        c.no_repeat_ngram_size = 0;
        c.length_penalty = 1.0;
        c
    }

    /// The vision encoder, the Q-Former, the prefill and one greedy decode step (each a
    /// median of --reps, after a warm-up) on `bs` rows, into `res` as `vision_b{bs}_ms`,
    /// `qformer_b{bs}_ms`, `prefill_b{bs}_ms` and `decode_step_b{bs}_ms`.
    fn pieces(&mut self, bs: usize, res: &mut BTreeMap<String, Value>) -> Result<()> {
        let (a, size) = (self.args, self.size);
        let (rng, pipe) = (&mut self.rng, &mut self.pipe);
        let vision = timed(
            a.reps,
            || rng.pixels(bs, size),
            |px| {
                pipe.model.vision_features(px)?;
                Ok(())
            },
        )?;
        res.insert(format!("vision_b{bs}_ms"), json!(vision));
        let feats = self.pipe.model.vision_features(self.rng.pixels(bs, size))?;
        let pipe = &mut self.pipe;
        let qformer = timed(
            a.reps,
            || feats.clone(),
            |f| {
                pipe.model.qformer_embeds(f)?;
                Ok(())
            },
        )?;
        res.insert(format!("qformer_b{bs}_ms"), json!(qformer));
        let embeds = self.pipe.model.qformer_embeds(feats)?;
        let batch = self.pipe.prompter.assemble(&vec![self.text.clone(); bs]);
        let model = &mut self.pipe.model;
        let mut prefill_times = Vec::new();
        let mut step_times = Vec::new();
        let tokens = vec![10; bs];
        // Decode steps at the benchmark's context length, after a prefill as generate
        // runs it (the first round is warm-up).
        for rep in 0..=a.reps {
            let e = embeds.clone();
            let t = Instant::now();
            let mut p = blip2_runtime::state::prefill(&mut *model, &batch, e, a.new_tokens)?;
            let dt = t.elapsed();
            let mut stepped = Ok(());
            for _ in 1..a.new_tokens {
                let t = Instant::now();
                if let Err(e) = p.state.step_for(&mut *model, &tokens, Want::Argmax) {
                    stepped = Err(e);
                    break;
                }
                if rep > 0 {
                    step_times.push(t.elapsed().as_secs_f64() * 1000.0);
                }
            }
            p.state.release(&mut *model);
            stepped?;
            if rep > 0 {
                prefill_times.push(dt.as_secs_f64() * 1000.0);
            }
        }
        res.insert(format!("prefill_b{bs}_ms"), json!(round(median(prefill_times), 2)));
        if !step_times.is_empty() {
            res.insert(format!("decode_step_b{bs}_ms"), json!(round(median(step_times), 3)));
        }
        Ok(())
    }

    /// Median ms of a whole generate at batch `b` with `n` new tokens, each rep on fresh
    /// pixel values so the image-embedding cache never answers.
    fn generate(&mut self, b: usize, n: usize) -> Result<f64> {
        let cfg = self.config(n);
        let texts = vec![self.text.clone(); b];
        let (rng, size, pipe) = (&mut self.rng, self.size, &mut self.pipe);
        timed(
            self.args.reps,
            || rng.pixels(b, size),
            |px| {
                let out = pipe.generate_text_ids(px, &texts, &cfg)?;
                debug_assert!(out.iter().all(|r| r[0].token_ids.len() == n));
                Ok(())
            },
        )
    }
}

/// The command line's lengths against the model, before anything is timed, naming
/// bench's own flags (the library's checks speak of `--max-new-tokens`).
fn check_room(pipe: &Pipeline, text: &[i64], a: &BenchArgs) -> Result<()> {
    let len = pipe.prompter.assemble(&[text.to_vec()]).ids[0].len();
    let max = pipe.prompter.max_positions;
    if len + a.new_tokens > max {
        let room = max.saturating_sub(len);
        return Err(UsageError(format!(
            "--new-tokens: the prompt ({len} tokens with --prompt-tokens {}) plus --new-tokens {} exceeds the \
             language model's {max} positions; use at most {room}",
            a.prompt_tokens, a.new_tokens
        ))
        .into());
    }
    let vocab = pipe.model.manifest.text.vocab_size;
    if a.num_beams > vocab {
        return Err(UsageError(format!(
            "--num-beams: {} beams are more than the language model's vocabulary of {vocab} tokens allows; use at most {vocab}",
            a.num_beams
        ))
        .into());
    }
    Ok(())
}

pub fn run(a: &BenchArgs, quiet: bool) -> Result<i32> {
    if !a.image.is_empty() {
        return run_image(a, quiet);
    }
    let Some(model) = &a.model else {
        return Err(
            UsageError("--model is needed (or --image to time preprocessing)".into()).into()
        );
    };
    if a.batch.is_empty() || a.batch.contains(&0) {
        return Err(UsageError("--batch needs batch sizes of at least 1".into()).into());
    }
    for (flag, v) in
        [("--new-tokens", a.new_tokens), ("--reps", a.reps), ("--num-beams", a.num_beams)]
    {
        if v == 0 {
            return Err(UsageError(format!("{flag}: must be at least 1")).into());
        }
    }
    let dir = crate::session::resolve_model(model, quiet)?;
    let rss_before_load = rss_mb("VmRSS:");
    let t = Instant::now();
    let pipe = crate::session::load_pipeline(&dir, &a.session)?;
    let load_ms = round(t.elapsed().as_secs_f64() * 1000.0, 1);
    let rss_after_load = rss_mb("VmRSS:");
    let size = pipe.model.manifest.image.height as usize;
    if pipe.model.manifest.image.width as usize != size {
        bail!(
            "the benchmark makes square images; this model wants {}x{}",
            pipe.model.manifest.image.width,
            size
        );
    }
    let mut text = pipe.prompter.text_ids("")?;
    text.extend((0..a.prompt_tokens as i64).map(|i| 10 + i));
    check_room(&pipe, &text, a)?;
    let profile = crate::session::profile(&a.session)?;
    let mut res: BTreeMap<String, Value> = BTreeMap::new();
    res.insert("model".into(), json!(dir.display().to_string()));
    res.insert("ep".into(), json!(a.session.ep));
    res.insert("threads".into(), json!(profile.intra_op_threads));
    res.insert("cuda_graph".into(), json!(profile.cuda_graph));
    res.insert("new_tokens".into(), json!(a.new_tokens));
    res.insert("prompt_tokens".into(), json!(a.prompt_tokens));
    res.insert("beams".into(), json!(a.num_beams));
    res.insert("reps".into(), json!(a.reps));
    res.insert("dtype".into(), json!(pipe.model.manifest.dtype));
    res.insert("quantize".into(), json!(pipe.model.manifest.quantization));
    res.insert("quantize_encoders".into(), json!(pipe.model.manifest.encoder_quantization));
    let lm_activations = pipe.model.manifest.lm_activation_quantization;
    res.insert("quantize_lm_activations".into(), json!(lm_activations));
    res.insert("target".into(), json!(pipe.model.manifest.target.name()));
    res.insert("ort_version".into(), json!(blip2_runtime::ort_env::ORT_VERSION));
    res.insert("load_ms".into(), json!(load_ms));
    res.insert("rss_after_load_MB".into(), json!(rss_after_load));
    res.insert("rss_before_load_MB".into(), json!(rss_before_load));

    let mut b = Bench { pipe, rng: Randn(a.seed), size, text, args: a };

    // The very first generate: what a one-shot `infer` pays on top of loading.
    let cfg = b.config(a.new_tokens);
    let px = b.rng.pixels(1, size);
    let t = Instant::now();
    b.pipe.generate_text_ids(px, std::slice::from_ref(&b.text), &cfg)?;
    res.insert("first_generate_b1_ms".into(), json!(round(t.elapsed().as_secs_f64() * 1000.0, 2)));

    // The pieces, at batch 1 and at each other batch size asked for.
    let mut sizes = vec![1];
    sizes.extend(a.batch.iter().copied().filter(|&bs| bs > 1));
    sizes.dedup();
    for bs in sizes {
        b.pieces(bs, &mut res)?;
    }

    // Whole generation per batch size, as hf_generate_bench.
    for &bs in &a.batch {
        let ms = b.generate(bs, a.new_tokens)?;
        res.insert(format!("generate_b{bs}_ms"), json!(ms));
        res.insert(format!("images_per_s_b{bs}"), json!(round(bs as f64 / (ms / 1000.0), 2)));
    }
    // Time to first token: image in, first token out (vision, Q-Former, prefill, pick).
    let one = b.generate(1, 1)?;
    res.insert("ttft_b1_ms".into(), json!(one));
    if a.new_tokens > 1 {
        let full = match res.get("generate_b1_ms").and_then(Value::as_f64) {
            Some(ms) => ms,
            None => b.generate(1, a.new_tokens)?,
        };
        res.insert("generate_b1_1tok_ms".into(), json!(one));
        res.insert(
            "decode_ms_per_token_b1".into(),
            json!(round((full - one) / (a.new_tokens - 1) as f64, 3)),
        );
    }

    // A second question about the same image: vision and Q-Former come from the cache.
    let px = b.rng.pixels(1, size);
    let texts = std::slice::from_ref(&b.text);
    b.pipe.generate_text_ids(px.clone(), texts, &cfg)?;
    let pipe = &mut b.pipe;
    let cached = timed(
        a.reps,
        || px.clone(),
        |px| {
            pipe.generate_text_ids(px, texts, &cfg)?;
            Ok(())
        },
    )?;
    res.insert("generate_b1_cached_image_ms".into(), json!(cached));
    res.insert("peak_rss_MB".into(), json!(rss_mb("VmHWM:")));
    if profile.uses_gpu() {
        // ONNX Runtime's CUDA arenas, as hf_generate_bench.py reports torch's allocator.
        let mem = blip2_runtime::model::cuda_memory(profile.device_id)?;
        if let Some(bytes) = b.pipe.model.allocator_peak_bytes(&mem) {
            res.insert(
                "peak_gpu_mem_MB".into(),
                json!(round(bytes as f64 / (1u64 << 20) as f64, 1)),
            );
        }
    }

    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string(&res)?)?;
    } else {
        print_table(&mut out, &res, a)?;
    }
    Ok(0)
}

/// `bench --image`: preprocessing alone, at the model's image size (BLIP-2's 224 without
/// --model).
fn run_image(a: &BenchArgs, quiet: bool) -> Result<i32> {
    if a.reps == 0 {
        return Err(UsageError("--reps: must be at least 1".into()).into());
    }
    if a.workers.contains(&0) {
        return Err(UsageError("--workers needs thread counts of at least 1".into()).into());
    }
    let cfg = match &a.model {
        Some(m) => {
            let dir = crate::session::resolve_model(m, quiet)?;
            blip2_core::Manifest::load(&dir)?.image
        }
        None => crate::bench_image::blip2_image_config(),
    };
    let mut workers = a.workers.clone();
    if workers.is_empty() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        workers = vec![1, 2.min(cores), cores];
        workers.dedup();
    }
    crate::bench_image::run(&a.image, &workers, &cfg, a.reps, a.json)
}

fn print_table(
    out: &mut impl Write,
    r: &BTreeMap<String, Value>,
    a: &BenchArgs,
) -> std::io::Result<()> {
    let num = |k: &str| r.get(k).and_then(Value::as_f64);
    writeln!(
        out,
        "{} ({}{}{}, {} threads, ep {}), {} new tokens, {} prompt tokens, {} beam(s), median of {}",
        r["model"].as_str().unwrap_or(""),
        r["dtype"].as_str().unwrap_or(""),
        r["quantize"].as_str().map(|q| format!(", {q} weights")).unwrap_or_default(),
        r["quantize_encoders"].as_str().map(|q| format!(", {q} encoders")).unwrap_or_default(),
        r["threads"].as_u64().map(|t| t.to_string()).unwrap_or_else(|| "default".into()),
        a.session.ep,
        a.new_tokens,
        a.prompt_tokens,
        a.num_beams,
        a.reps
    )?;
    let mut row = |what: &str, v: Option<f64>, unit: &str| match v {
        Some(v) => writeln!(out, "  {what:<34} {v:>10.2} {unit}"),
        None => Ok(()),
    };
    row("session start-up", num("load_ms"), "ms")?;
    row("first generate, batch 1", num("first_generate_b1_ms"), "ms")?;
    row("vision encoder, batch 1", num("vision_b1_ms"), "ms")?;
    row("Q-Former, batch 1", num("qformer_b1_ms"), "ms")?;
    row("prefill, batch 1", num("prefill_b1_ms"), "ms")?;
    row("time to first token, batch 1", num("ttft_b1_ms"), "ms")?;
    row("decode step, batch 1", num("decode_step_b1_ms"), "ms")?;
    row("decode per token, batch 1 (HF way)", num("decode_ms_per_token_b1"), "ms")?;
    for &b in &a.batch {
        row(&format!("generate, batch {b}"), num(&format!("generate_b{b}_ms")), "ms")?;
        row(&format!("  images/s, batch {b}"), num(&format!("images_per_s_b{b}")), "img/s")?;
        if b > 1 {
            for (what, key) in [
                ("vision encoder", "vision"),
                ("Q-Former", "qformer"),
                ("prefill", "prefill"),
                ("decode step", "decode_step"),
            ] {
                row(&format!("  {what}, batch {b}"), num(&format!("{key}_b{b}_ms")), "ms")?;
            }
        }
    }
    row("generate, batch 1, cached image", num("generate_b1_cached_image_ms"), "ms")?;
    row("RSS after load", num("rss_after_load_MB"), "MB")?;
    row("peak RSS", num("peak_rss_MB"), "MB")?;
    row("peak GPU memory (ORT arenas)", num("peak_gpu_mem_MB"), "MB")?;
    Ok(())
}
