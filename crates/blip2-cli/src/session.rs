//! Session options shared by `infer` and `bench`: which execution-provider profile,
//! which config file, how many threads; the built-in `models.toml` and the environment
//! variables that the library leaves to the binary.

use std::path::{Path, PathBuf};

use anyhow::Result;
use blip2_runtime::config::{Config, ConfigError, Profile};
use blip2_runtime::error::RuntimeError;
use blip2_runtime::model::SessionFactory;
use blip2_runtime::pipeline::Pipeline;
use blip2_runtime::{providers, session_cache};

/// The crate's `models.toml`, built in so the binary works from any folder.
pub const BUILTIN_CONFIG: &str = include_str!("../models.toml");
/// Origin label of the built-in config in error messages.
pub const BUILTIN_ORIGIN: &str = "built-in models.toml";
/// Environment variable naming a user config file (used when no --config is given).
pub const CONFIG_ENV: &str = "BLIP2_ORT_CONFIG";
/// Environment variable: `0` turns the optimized-graph cache off.
pub const OPTIMIZED_CACHE_ENV: &str = "BLIP2_ORT_OPTIMIZED_CACHE";

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
}

/// The built-in `models.toml` alone.
pub fn builtin_config() -> Config {
    Config::from_toml(BUILTIN_CONFIG, BUILTIN_ORIGIN)
        .expect("the built-in models.toml is valid (tested)")
}

/// The built-in config with a user file over it: `path` if given, else
/// `$BLIP2_ORT_CONFIG` if set, else nothing.
pub fn load_config(path: Option<&Path>) -> Result<Config, ConfigError> {
    let mut c = builtin_config();
    let from_env = std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(p) = path.map(Path::to_path_buf).or(from_env) {
        c.overlay_file(&p)?;
    }
    Ok(c)
}

pub fn profile(o: &SessionOptions) -> Result<Profile> {
    let config = load_config(o.config.as_deref())?;
    // An unknown --ep is the command line's mistake (exit status 2), not the config's.
    let mut p = match config.profile(&o.ep) {
        Ok(p) => p.clone(),
        Err(e @ ConfigError::UnknownProfile { .. }) => {
            return Err(crate::UsageError(format!("--ep: {e}")).into())
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(n) = o.threads {
        p.intra_op_threads = Some(n);
    }
    Ok(p)
}

pub fn load_pipeline(dir: &Path, o: &SessionOptions) -> Result<Pipeline> {
    let profile = profile(o)?;
    blip2_runtime::ort_env::init_with_threads(profile.intra_op_threads)?;
    // Only the language model's own graph captures CUDA graphs; its helper graphs
    // (kv_reorder) run on buffers that change from call to call.
    let capture = if profile.cuda_graph { Some(check_cuda_graph(dir, &profile)?) } else { None };
    let mut factory = session_factory(&profile);
    let mut pipe = Pipeline::load(dir, &mut *factory).map_err(|e| {
        // The captured session itself failed to build: say what capture needs.
        let capturing = matches!(&e, RuntimeError::Session(providers::ProviderError::Commit { path, .. }) if Some(path.as_path()) == capture.as_deref());
        let e = anyhow::Error::from(e);
        if capturing {
            e.context(format!(
                "profile \"{}\" sets cuda_graph = true: ONNX Runtime refuses to capture a graph with a node off the CUDA provider \
                 or a host copy; set cuda_graph = false to run it uncaptured",
                profile.name
            ))
        } else {
            e
        }
    })?;
    // Where the decoder keeps its state (the device, fixed step buffers): the runtime's
    // decision, from the profile.
    pipe.model.place_for(&profile)?;
    Ok(pipe)
}

/// For a profile with `cuda_graph = true`: the export's language-model file, after
/// checking that the export can be captured (an fp16 OPT export made with `--target
/// cuda`), before any session is built.
fn check_cuda_graph(dir: &Path, profile: &Profile) -> Result<PathBuf> {
    let m = blip2_core::Manifest::load(dir)?;
    blip2_runtime::state::fixed::check_export(&m, dir).map_err(|e| {
        anyhow::Error::from(e).context(format!(
            "profile \"{}\" sets cuda_graph = true (use a profile without it for this export)",
            profile.name
        ))
    })?;
    if m.dtype != blip2_core::Dtype::Fp16 {
        anyhow::bail!(
            "profile \"{}\" sets cuda_graph = true, which captures the decode step on CUDA, where GroupQueryAttention takes \
             fp16 only; {} is an {} export. Export it with --dtype fp16 --target cuda",
            profile.name,
            dir.display(),
            m.dtype
        );
    }
    Ok(dir.join(&m.graphs.language_model.file))
}

/// Builds each graph's session on the profile, with the optimized-graph cache unless
/// `BLIP2_ORT_OPTIMIZED_CACHE=0`; the library's warnings go to stderr.
pub fn session_factory(profile: &Profile) -> Box<SessionFactory<'static>> {
    let cache_on = std::env::var(OPTIMIZED_CACHE_ENV).map_or(true, |v| v.trim() != "0");
    let cache = cache_on.then(session_cache::optimized_cache_root);
    session_cache::session_factory(profile.clone(), cache, |w| eprintln!("warning: {w}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use blip2_runtime::config::GraphOptimization;
    use blip2_runtime::config::Provider;

    #[test]
    fn builtin_profiles_parse() {
        let c = builtin_config();
        assert_eq!(c.profile_names(), ["cpu", "cuda", "cuda-graph", "tensorrt"]);

        let cpu = c.profile("cpu").unwrap();
        assert_eq!(cpu, &Profile::cpu(), "the library's default CPU profile is the built-in one");
        assert_eq!(cpu.providers, [Provider::Cpu]);
        assert!(!cpu.uses_gpu());
        assert_eq!(cpu.graph_optimization, GraphOptimization::All);
        assert!(!cpu.allow_fallback);

        let cuda = c.profile("cuda").unwrap();
        assert_eq!(cuda.providers, [Provider::Cuda, Provider::Cpu]);
        assert_eq!(cuda.device_id, 0);
        assert_eq!(cuda.gpu_mem_limit, None);
        assert!(!cuda.allow_fallback, "asking for CUDA must not quietly run on the CPU");
        assert!(cuda.uses_gpu());
        assert!(!cuda.cuda_graph, "capture is asked for, never assumed");
        let graph = c.profile("cuda-graph").unwrap();
        assert_eq!(
            (graph.providers.as_slice(), graph.cuda_graph),
            ([Provider::Cuda, Provider::Cpu].as_slice(), true)
        );
        assert!(
            providers::captures(graph, "language_model")
                && !providers::captures(graph, "vision_encoder")
        );

        let trt = c.profile("tensorrt").unwrap();
        assert_eq!(trt.providers, [Provider::TensorRt, Provider::Cuda, Provider::Cpu]);
        assert_eq!(
            trt.providers_for("vision_encoder"),
            [Provider::TensorRt, Provider::Cuda, Provider::Cpu]
        );
        assert_eq!(trt.providers_for("language_model"), [Provider::Cuda, Provider::Cpu]);
        assert_eq!(trt.providers_for("text_encoder"), [Provider::Cuda, Provider::Cpu]);
        let engines = trt.engine_cache_dir().unwrap();
        assert!(
            engines.starts_with(blip2_runtime::ort_env::cache_root())
                && engines.ends_with("tensorrt-engines"),
            "{}",
            engines.display()
        );
        assert_eq!(
            c.profile("rocm").unwrap_err().to_string(),
            "unknown profile \"rocm\"; known profiles: cpu, cuda, cuda-graph, tensorrt"
        );
    }

    #[test]
    fn a_config_file_is_laid_over_the_builtin_one() {
        let dir =
            std::env::temp_dir().join(format!("blip2-cli-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("blip2-ort.toml");
        std::fs::write(
            &path,
            "[profiles.cuda]\ndevice_id = 1\n\n[profiles.lean]\nproviders = [\"cpu\"]\n",
        )
        .unwrap();
        let c = load_config(Some(&path)).unwrap();
        assert_eq!(c.profile_names(), ["cpu", "cuda", "cuda-graph", "lean", "tensorrt"]);
        let cuda = c.profile("cuda").unwrap();
        assert_eq!(
            (cuda.device_id, cuda.providers.as_slice()),
            (1, [Provider::Cuda, Provider::Cpu].as_slice())
        );

        let err = load_config(Some(&dir.join("none.toml"))).unwrap_err();
        assert!(
            matches!(err, ConfigError::Read { .. }) && err.to_string().contains("none.toml"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
