//! `blip2-ort`: export BLIP-2 checkpoints to ONNX and run them on ONNX Runtime.
//! This binary only parses flags and wires the library crates together.

mod args;
mod batch;
mod bench_cmd;
mod bench_image;
mod cache_cmd;
mod export_cmd;
mod index_cmd;
mod infer_cmd;
mod install;
mod retrieval_cmd;
mod serve_cmd;
mod session;
mod signals;
mod stats;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

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
    /// Time generation and its pieces on random images (JSON comparable with scripts/hf_generate_bench.py).
    Bench(bench_cmd::BenchArgs),
    /// Serve a model over HTTP with OpenAI's API (chat and completions, or embeddings, rerank and search; batched).
    Serve(serve_cmd::ServeArgs),
    /// Retrieval exports: add images to a photo-search index (one SQLite file), or bring it up to date.
    Index(index_cmd::IndexArgs),
    /// Retrieval exports: the images of an index that best match a text.
    Search(index_cmd::SearchArgs),
    /// List, prune or clear the cache (optimized graphs, exported checkpoints, engines).
    #[command(subcommand)]
    Cache(cache_cmd::CacheCommand),
    /// Install the ONNX Runtime library (from the onnxruntime wheel, with pip) into the cache.
    InstallRuntime {
        /// The CUDA 13 build (onnxruntime-gpu) with the CUDA and TensorRT providers.
        #[arg(long)]
        gpu: bool,
    },
}

fn install_runtime(gpu: bool, quiet: bool) -> anyhow::Result<i32> {
    let path = install::install(gpu, &mut |msg: &str| {
        if !quiet {
            eprintln!("{msg}");
        }
    })?;
    println!("{}", path.display());
    Ok(0)
}

/// A mistake on the command line found after parsing (a flag value out of range, flags
/// that contradict each other, a missing --model): exits with status 2, as clap's own
/// usage errors do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Exit status of a failure: 2 when the command line is at fault, 1 otherwise.
fn exit_code(e: &anyhow::Error) -> i32 {
    let usage = e.chain().any(|c| {
        c.downcast_ref::<UsageError>().is_some()
            || c.downcast_ref::<blip2_runtime::generation::ConfigError>().is_some()
            || matches!(
                c.downcast_ref::<blip2_export::ExportError>(),
                Some(blip2_export::ExportError::Flag { .. })
            )
    });
    if usage {
        2
    } else {
        1
    }
}

/// The error and its causes on one line, most specific last. A cause whose text its
/// parent already shows (errors that print their source, as most here do) is left out,
/// so nothing is said twice.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.is_empty() {
            line = text;
        } else if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

/// The command line, with negative numbers accepted as the values of every flag that
/// takes one: `--top-k -1` then reaches the flag's own check and gets a message naming
/// the flag, instead of clap's tip to write `-- -1` (which no subcommand accepts).
fn parse_cli() -> Cli {
    fn negative_values(cmd: clap::Command) -> clap::Command {
        cmd.mut_args(|a| {
            if a.get_long().is_some() && a.get_action().takes_values() {
                a.allow_negative_numbers(true)
            } else {
                a
            }
        })
        .mut_subcommands(negative_values)
    }
    let matches = negative_values(Cli::command()).get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

fn main() {
    let cli = parse_cli();
    // An interrupted export removes its temporary folder before the process ends.
    let signals = signals::install();
    let result = match &cli.command {
        Command::Export(a) => export_cmd::run(a, cli.quiet).map(|_| 0),
        Command::Infer(a) => infer_cmd::run(a, cli.quiet),
        Command::Bench(a) => bench_cmd::run(a, cli.quiet),
        Command::Serve(a) => serve_cmd::run(a, cli.quiet, signals),
        Command::Index(a) => index_cmd::index(a, cli.quiet),
        Command::Search(a) => index_cmd::search(a, cli.quiet),
        Command::Cache(c) => cache_cmd::run(c),
        Command::InstallRuntime { gpu } => install_runtime(*gpu, cli.quiet),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // An export stopped by a signal: the process ends by that signal, silently.
            signals::wait_if_interrupted();
            eprintln!("error: {}", error_line(&e));
            std::process::exit(exit_code(&e));
        }
    }
}
