//! `blip2-ort serve`: loads a model and serves it over HTTP (OpenAI's API); see
//! docs/serving.md.

use std::io::{IsTerminal, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use blip2_serve::engine::{EngineOptions, ImageStage};
use blip2_serve::media::MediaPolicy;
use blip2_serve::ServeOptions;

use crate::session::SessionOptions;
use crate::UsageError;

/// `--image-stage` ([`ImageStage`]).
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum ImageStageArg {
    Auto,
    Thread,
    Inline,
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// An exported model folder, a Hugging Face checkpoint folder, or a Hub id (the last
    /// two are exported once into the blip2-ort cache and reused, as `infer` does).
    #[arg(long)]
    pub model: String,
    /// Address or host name to listen on (a name is resolved, its IPv4 address preferred).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    #[command(flatten)]
    pub session: SessionOptions,
    /// The model id clients use (in /v1/models and the requests' "model"); default: --model as given.
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Sequences generated together in one batch at most.
    #[arg(long, default_value_t = 8, value_parser = crate::args::positive)]
    pub max_batch: usize,
    /// How long a request waits for others to batch with, in milliseconds.
    #[arg(long, default_value_t = 5, value_parser = crate::args::count)]
    pub max_wait_ms: usize,
    /// While a batch generates, how long newcomers may wait for others to be taken in
    /// with them (one encoder batch, one prefill), in milliseconds; they go in earlier
    /// once they hold half as many rows as are running. 0 (default): at the next step.
    #[arg(long, default_value_t = 0, value_parser = crate::args::count)]
    pub admit_wait_ms: usize,
    /// Requests in flight at most (waiting or generating); more get 503 with Retry-After.
    #[arg(long, default_value_t = 64, value_parser = crate::args::positive)]
    pub max_queue: usize,
    /// Where images are encoded: `thread` (a thread of its own, ahead of the language
    /// model), `inline` (the engine thread, as it admits requests), or `auto`: the one
    /// measured fastest, today `inline` on the CPU and on CUDA (docs/serving.md).
    #[arg(long, value_enum, default_value_t = ImageStageArg::Auto)]
    pub image_stage: ImageStageArg,
    /// Requests to /v1/* must send "Authorization: Bearer KEY" (also $BLIP2_ORT_API_KEY).
    #[arg(long, env = "BLIP2_ORT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Allow file:// image URLs naming files under this folder (off by default).
    #[arg(long)]
    pub allowed_local_media_path: Option<PathBuf>,
    /// Fetch http:// and https:// image URLs (off by default: the server makes no outgoing requests).
    #[arg(long)]
    pub allow_remote_media: bool,
    /// Request bodies (and images) over this many megabytes get 413.
    #[arg(long, default_value_t = blip2_serve::DEFAULT_MAX_BODY_MB, value_parser = crate::args::positive)]
    pub max_body_mb: usize,
    /// Retrieval exports: an image index made by `blip2-ort index`, searched by POST /v1/search.
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Leave out the playground page (GET / then answers 404; the API is unchanged).
    #[arg(long)]
    pub no_ui: bool,
}

pub fn run(a: &ServeArgs, quiet: bool, signals: Option<crate::signals::Handle>) -> Result<i32> {
    let level = if quiet { "warn" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("BLIP2_ORT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();

    let local_root = match &a.allowed_local_media_path {
        Some(p) => Some(p.canonicalize().map_err(|e| {
            UsageError(format!("--allowed-local-media-path: {}: {e}", p.display()))
        })?),
        None => None,
    };
    if a.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
        return Err(
            UsageError("--api-key: empty; leave it out to serve without a key".into()).into()
        );
    }
    let addr = listen_addr(&a.host, a.port)?;
    let dir = crate::session::resolve_model(&a.model, quiet)?;
    let served = if blip2_core::manifest_family(&dir)? == blip2_core::RETRIEVAL_FAMILY {
        // The index is checked (and its codes read) before the model is loaded.
        let index = match &a.db {
            Some(db) => {
                let store =
                    crate::index_cmd::open_index(&dir, db, blip2_index::OpenMode::Existing)?;
                let index = blip2_serve::SearchIndex::open(store)?;
                if !quiet {
                    eprintln!("{}: {} images", db.display(), index.len());
                }
                Some(index)
            }
            None => None,
        };
        let model = crate::retrieval_cmd::load(&dir, &a.session)?;
        blip2_serve::Served::Retrieval { model, index }
    } else {
        if a.db.is_some() {
            return Err(UsageError(format!(
                "--db: {} is a captioning export; an image index is searched with an image-text retrieval export \
                 (the one it was made with)",
                dir.display()
            ))
            .into());
        }
        blip2_serve::Served::Captioning(crate::session::load_pipeline(&dir, &a.session)?)
    };
    if !blip2_runtime::preprocess::jpeg_simd() {
        // Every uploaded JPEG is decoded on the server's cores: say so once, at start-up.
        eprintln!("warning: {}", blip2_runtime::preprocess::JPEG_NO_SIMD);
    }
    let max_body_bytes = a.max_body_mb.saturating_mul(1 << 20);
    let opts = ServeOptions {
        served_model_name: a.served_model_name.clone().unwrap_or_else(|| a.model.clone()),
        engine: EngineOptions {
            max_batch: a.max_batch,
            max_wait: Duration::from_millis(a.max_wait_ms as u64),
            max_queue: a.max_queue,
            image_stage: match a.image_stage {
                ImageStageArg::Auto => ImageStage::Auto,
                ImageStageArg::Thread => ImageStage::Thread,
                ImageStageArg::Inline => ImageStage::Inline,
            },
            admit_wait: Duration::from_millis(a.admit_wait_ms as u64),
        },
        api_key: a.api_key.clone(),
        media: MediaPolicy { local_root, remote: a.allow_remote_media, max_bytes: max_body_bytes },
        max_body_bytes,
        ui: !a.no_ui,
    };
    blip2_serve::run(served, opts, addr, |bound| {
        // The server listens for SIGTERM and Ctrl-C now: from here they shut it down
        // gracefully instead (dropping ours earlier left a moment where they were lost).
        if let Some(h) = signals {
            h.close();
        }
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on http://{bound}");
        let _ = out.flush();
    })
    .context("serving")?;
    Ok(0)
}

/// `--host` and `--port` as the address to bind: an IP address as given, a host name
/// (`localhost`) resolved, its first IPv4 address preferred (what clients try first).
fn listen_addr(host: &str, port: u16) -> Result<SocketAddr> {
    let bad = |why: String| UsageError(format!("--host: {host:?}: {why}"));
    // [::1] as written in URLs.
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if bare.is_empty() {
        return Err(bad("empty; give an address (127.0.0.1, 0.0.0.0) or a host name".into()).into());
    }
    if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let addrs: Vec<SocketAddr> = (bare, port)
        .to_socket_addrs()
        .map_err(|e| bad(format!("not an IP address, and the name does not resolve ({e})")))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| bad("the name resolves to no address".into()).into())
}
