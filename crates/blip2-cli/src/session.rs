//! Session options shared by `infer` and `bench`: which execution-provider profile,
//! which config file, how many threads.

use std::path::{Path, PathBuf};

use anyhow::Result;
use blip2_runtime::error::RuntimeError;
use blip2_runtime::pipeline::Pipeline;
use blip2_runtime::providers::{self, Config, Profile};

#[derive(clap::Args, Debug, Clone)]
pub struct SessionOptions {
    /// Execution-provider profile from models.toml or --config: cpu, cuda, tensorrt, or your own.
    #[arg(long, global = true, default_value = "cpu")]
    pub ep: String,
    /// A TOML file whose [profiles.*] are laid over the built-in ones (also $BLIP2_ORT_CONFIG).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// ONNX Runtime intra-op threads (default: the profile's, else ONNX Runtime's choice).
    #[arg(long, global = true, value_parser = crate::args::positive)]
    pub threads: Option<usize>,
}

pub fn profile(o: &SessionOptions) -> Result<Profile> {
    let config = Config::load(o.config.as_deref())?;
    let mut p = config.profile(&o.ep)?.clone();
    if let Some(n) = o.threads {
        p.intra_op_threads = Some(n);
    }
    Ok(p)
}

pub fn load_pipeline(dir: &Path, o: &SessionOptions) -> Result<Pipeline> {
    let profile = profile(o)?;
    blip2_runtime::ort_env::init_with_threads(profile.intra_op_threads)?;
    let mut factory = |kind: blip2_runtime::model::GraphKind, path: &Path| {
        providers::open_session(&profile, kind.name(), path).map_err(|e| RuntimeError::Input(e.to_string()))
    };
    let mut pipe = Pipeline::load(dir, &mut factory)?;
    // On a GPU the decoder's KV cache stays on the device between steps.
    let lm = profile.providers_for("language_model");
    if matches!(lm.first(), Some(providers::Provider::Cuda | providers::Provider::TensorRt)) {
        pipe.model.keep_cache_on_cuda(profile.device_id)?;
    }
    Ok(pipe)
}
