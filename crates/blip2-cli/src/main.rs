//! `blip2-ort`: export BLIP-2 checkpoints to ONNX and run them on ONNX Runtime.
//! This binary only parses flags and wires the library crates together.

mod batch;
mod bench_cmd;
mod export_cmd;
mod hub;
mod infer_cmd;
mod session;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "blip2-ort", version, about = "BLIP-2 on ONNX Runtime, without Python")]
struct Cli {
    /// No progress bars or summaries on stderr.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Export a BLIP-2 checkpoint to ONNX graphs and a manifest.
    Export(export_cmd::ExportArgs),
    /// Caption, answer questions about, or chat about images with an exported model.
    Infer(infer_cmd::InferArgs),
    /// Time generation and its pieces on random images (JSON comparable with hf_generate_bench.py).
    Bench(bench_cmd::BenchArgs),
    /// Install the ONNX Runtime library (from the onnxruntime wheel, with pip) into the cache.
    InstallRuntime {
        /// The CUDA 13 build (onnxruntime-gpu) with the CUDA and TensorRT providers.
        #[arg(long)]
        gpu: bool,
    },
}

fn install_runtime(gpu: bool, quiet: bool) -> anyhow::Result<i32> {
    let path = blip2_runtime::ort_env::install(gpu, &mut |msg: &str| {
        if !quiet {
            eprintln!("{msg}");
        }
    })?;
    println!("{}", path.display());
    Ok(0)
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Export(a) => export_cmd::run(a, cli.quiet).map(|_| 0),
        Command::Infer(a) => infer_cmd::run(a, cli.quiet),
        Command::Bench(a) => bench_cmd::run(a, cli.quiet),
        Command::InstallRuntime { gpu } => install_runtime(*gpu, cli.quiet),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // One line: the error and its causes, most specific last.
            let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", msg.join(": "));
            std::process::exit(1);
        }
    }
}
