//! `blip2-ort export`: checkpoint (folder or Hub id) to an export folder.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use blip2_export::{ExportOptions, Progress};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// A local checkpoint folder in the Hugging Face layout, or a Hub id such as Salesforce/blip2-opt-2.7b.
    pub model: String,
    /// Output folder (written atomically).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Weight type of the vision encoder and language model (the Q-Former stays fp32).
    #[arg(long, value_enum, default_value = "fp32")]
    pub dtype: Dtype,
    /// Hub revision (branch, tag or commit) to fetch.
    #[arg(long)]
    pub revision: Option<String>,
    /// Replace an existing export in the output folder.
    #[arg(long)]
    pub force: bool,
    /// Context limit (tokens, image tokens included) recorded for prompts and chat history
    /// [default: 512, or the language model's positions if fewer]. At most the language
    /// model's positions.
    #[arg(long, value_parser = crate::args::count)]
    pub max_context: Option<usize>,
    /// Weight-only quantization of the vision encoder and language model (MatMulNBits,
    /// blocks of 32): int8 or int4. The Q-Former stays fp32. Needs --dtype fp32.
    #[arg(long, value_enum)]
    pub quantize: Option<Quant>,
    /// Quantize the vision encoder and Q-Former: int8 weights (one scale per output
    /// channel) and int8 activations quantized on the fly (DynamicQuantizeMatMul).
    /// The fastest CPU option; outputs move further from fp32 than with --quantize
    /// alone (docs/PERFORMANCE.md). Needs --dtype fp32.
    #[arg(long, value_enum)]
    pub quantize_encoders: Option<EncoderQuant>,
    /// Quantize the language model's activations too: each row (token position) of its
    /// projections' inputs to int8 with the row's own scale, multiplied with int8 weights
    /// (one scale per output channel) on the CPU's int8 instructions; the LM head stays
    /// 8-bit weight-only. A row's result never depends on its batch. Faster prefills on
    /// the CPU; outputs move further from fp32 (docs/PERFORMANCE.md). Needs --quantize int8.
    #[arg(long, value_enum)]
    pub quantize_lm_activations: Option<EncoderQuant>,
    /// What the graphs are built for: `portable` (standard operators, any ONNX Runtime
    /// build and provider) or `cuda` (ONNX Runtime's fused attention and layer-norm
    /// operators, a fixed-length KV buffer updated in place and token selection on the
    /// device; use with --dtype fp16 on a GPU, see docs/gpu.md).
    #[arg(long, value_enum, default_value = "portable")]
    pub target: TargetArg,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum TargetArg {
    Portable,
    Cuda,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum EncoderQuant {
    Int8,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Quant {
    Int8,
    Int4,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Dtype {
    Fp32,
    Fp16,
}

struct Bars {
    bar: ProgressBar,
    quiet: bool,
}

impl Progress for Bars {
    fn stage(&mut self, name: &str, total: u64) {
        self.bar.set_length(total);
        self.bar.set_position(0);
        self.bar.set_message(name.to_string());
    }
    fn advance(&mut self, n: u64) {
        self.bar.inc(n);
    }
    fn finish(&mut self) {
        self.bar.finish_and_clear();
    }
    fn waiting(&mut self, output: &std::path::Path) {
        if !self.quiet {
            self.bar.suspend(|| {
                eprintln!("waiting for another export into {} to finish", output.display())
            });
        }
    }
}

pub fn run(a: &ExportArgs, quiet: bool) -> Result<()> {
    let start = Instant::now();
    let src = blip2_models::resolve_checkpoint(&a.model, a.revision.as_deref(), quiet)?;
    let opts = ExportOptions {
        dtype: match a.dtype {
            Dtype::Fp32 => blip2_core::Dtype::Fp32,
            Dtype::Fp16 => blip2_core::Dtype::Fp16,
        },
        source_label: a.model.clone(),
        revision: a.revision.clone(),
        force: a.force,
        max_context: a.max_context,
        quantize: a.quantize.map(|q| match q {
            Quant::Int8 => blip2_core::Quantization::Int8,
            Quant::Int4 => blip2_core::Quantization::Int4,
        }),
        quantize_encoders: a.quantize_encoders.is_some(),
        quantize_lm_activations: a.quantize_lm_activations.is_some(),
        target: match a.target {
            TargetArg::Portable => blip2_core::Target::Portable,
            TargetArg::Cuda => blip2_core::Target::Cuda,
        },
        // Held until the process ends: the export printed is the one in the folder.
        keep_lock: true,
        ..Default::default()
    };
    let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(0) };
    bar.set_style(
        ProgressStyle::with_template("{msg:16} {bar:40} {bytes}/{total_bytes} {eta}")
            .expect("valid template"),
    );
    let exported = blip2_export::export_any(&src, &a.output, &opts, &mut Bars { bar, quiet })?;
    if !quiet {
        let mut quant = String::new();
        if let blip2_export::Exported::Captioning(manifest) = &exported {
            quant = manifest.quantization.map(|q| format!(", {q} weights")).unwrap_or_default();
            if let Some(q) = &manifest.encoder_quantization {
                quant.push_str(&format!(", {q} encoders"));
            }
            if let Some(q) = &manifest.lm_activation_quantization {
                quant.push_str(&format!(", {q} language-model activations"));
            }
            if !manifest.target.is_portable() {
                quant.push_str(&format!(", {} target", manifest.target.name()));
            }
        }
        eprintln!(
            "exported {} ({}, {}{quant}) in {:.1}s",
            a.model,
            exported.family(),
            exported.dtype(),
            start.elapsed().as_secs_f64()
        );
        for f in exported.files() {
            let p = a.output.join(&f);
            let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            eprintln!("  {:<28} {:>10}", f.display(), human(size));
        }
    }
    println!("{}", a.output.display());
    // Reported: another export into the folder may go on (a signal from now on still
    // finds this export finished, and the process exits 0).
    blip2_export::release_kept_locks();
    Ok(())
}

pub fn human(n: u64) -> String {
    let units = ["B", "KB", "MB", "GB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1000.0 && i < units.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}
