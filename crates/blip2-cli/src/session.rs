//! Session options shared by `infer`, `bench` and `serve`: which execution-provider
//! profile, which config file, how many threads. Loading itself is
//! `blip2_runtime::profiles`, shared with the Python module.

use std::path::{Path, PathBuf};

use anyhow::Result;
use blip2_runtime::config::{ConfigError, Profile};
use blip2_runtime::pipeline::Pipeline;
use blip2_runtime::profiles;

#[derive(clap::Args, Debug, Clone)]
pub struct SessionOptions {
    /// Execution-provider profile from models.toml or --config: cpu, cuda, cuda-graph, tensorrt, or your own.
    #[arg(long, global = true, default_value = "cpu")]
    pub ep: String,
    /// A TOML file whose [profiles.*] are laid over the built-in ones (also $BLIP2_ORT_CONFIG).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// ONNX Runtime intra-op threads (default: the profile's, else ONNX Runtime's choice).
    #[arg(long, global = true, value_parser = crate::args::threads)]
    pub threads: Option<usize>,
    /// Decode JPEGs at libjpeg's 1/2, 1/4 or 1/8 scale, no smaller than twice the model's
    /// input (the profile key fast_decode): much faster on camera photos, but the pixels are
    /// not Pillow's, so tokens can differ from transformers'. Other formats are unaffected.
    #[arg(long, global = true)]
    pub fast_decode: bool,
}

pub fn profile(o: &SessionOptions) -> Result<Profile> {
    match profiles::profile(o.config.as_deref(), &o.ep, o.threads) {
        Ok(mut p) => {
            p.fast_decode |= o.fast_decode;
            Ok(p)
        }
        // An unknown --ep is the command line's mistake (exit status 2), not the config's.
        Err(e @ ConfigError::UnknownProfile { .. }) => {
            Err(crate::UsageError(format!("--ep: {e}")).into())
        }
        Err(e) => Err(e.into()),
    }
}

pub fn load_pipeline(dir: &Path, o: &SessionOptions) -> Result<Pipeline> {
    Ok(profiles::load_pipeline(dir, &profile(o)?)?)
}

/// Resolves --model (`blip2_models::resolve_model`); a signal that came once an export
/// made here was in place ends the process now.
pub fn resolve_model(model: &str, quiet: bool) -> Result<PathBuf> {
    let dir = blip2_models::resolve_model(model, quiet, true)?;
    crate::signals::export_reported();
    Ok(dir)
}
