//! `blip2-ort`: export BLIP-2 checkpoints to ONNX and run them on ONNX Runtime.
//! This binary only parses flags and wires the library crates together.

mod export_cmd;
mod hub;

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
    /// Export a BLIP-2 checkpoint to three ONNX graphs and a manifest.
    Export(export_cmd::ExportArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Export(a) => export_cmd::run(a, cli.quiet),
    };
    if let Err(e) = result {
        // One line: the error and its causes, most specific last.
        let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        eprintln!("error: {}", msg.join(": "));
        std::process::exit(1);
    }
}
