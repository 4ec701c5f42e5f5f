//! Loading a model the way every front end does (the `blip2-ort` binary, the Python
//! module): the built-in `models.toml` profiles with a user file laid over them, one
//! profile picked by name, ONNX Runtime initialised for it, and each graph's session built
//! on it through the optimized-graph cache.

use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError, Profile};
use crate::error::RuntimeError;
use crate::model::SessionFactory;
use crate::ort_env::RuntimeSetupError;
use crate::pipeline::Pipeline;
use crate::retrieval::RetrievalModel;
use crate::{providers, session_cache};

/// The crate's `models.toml`, built in so the binary and the Python module work from any
/// folder.
pub const BUILTIN_CONFIG: &str = include_str!("../models.toml");
/// Origin label of the built-in config in error messages.
pub const BUILTIN_ORIGIN: &str = "built-in models.toml";
/// Environment variable naming a user config file (used when none is given).
pub const CONFIG_ENV: &str = "BLIP2_ORT_CONFIG";
/// Environment variable: `0` turns the optimized-graph cache off.
pub const OPTIMIZED_CACHE_ENV: &str = "BLIP2_ORT_OPTIMIZED_CACHE";

/// A model that could not be loaded: ONNX Runtime missing, the export or a session at
/// fault, or a profile this export cannot run with (the profile named, the cause beneath).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Setup(#[from] RuntimeSetupError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("{context}")]
    Profile {
        context: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
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

/// Profile `name` of [`load_config`]`(config)`, with `threads` intra-op threads when given.
/// An unknown name is [`ConfigError::UnknownProfile`], which lists the known ones.
pub fn profile(
    config: Option<&Path>,
    name: &str,
    threads: Option<usize>,
) -> Result<Profile, ConfigError> {
    let mut p = load_config(config)?.profile(name)?.clone();
    if let Some(n) = threads {
        p.intra_op_threads = Some(n);
    }
    Ok(p)
}

/// A captioning export on `profile`: ONNX Runtime initialised with the profile's threads,
/// the sessions built, the KV cache kept on the GPU when the language model runs there,
/// and the decode step captured as a CUDA graph when the profile asks for it.
pub fn load_pipeline(dir: &Path, profile: &Profile) -> Result<Pipeline, LoadError> {
    crate::ort_env::init_with_threads(profile.intra_op_threads)?;
    // Only the language model's own graph captures CUDA graphs (the factory tells it by
    // its kind); its helper graphs (kv_reorder) run on buffers that change from call to
    // call. The language model's file names the session in a failure.
    let capture = if profile.cuda_graph { Some(check_cuda_graph(dir, profile)?) } else { None };
    let mut factory = session_factory(profile);
    let mut pipe = Pipeline::load(dir, &mut *factory).map_err(|e| {
        // The captured session itself failed to build: say what capture needs.
        let capturing = matches!(&e, RuntimeError::Session(providers::ProviderError::Commit { path, .. }) if Some(path.as_path()) == capture.as_deref());
        if capturing {
            LoadError::Profile {
                context: format!(
                    "profile \"{}\" sets cuda_graph = true: ONNX Runtime refuses to capture a graph with a node off the CUDA provider \
                     or a host copy; set cuda_graph = false to run it uncaptured",
                    profile.name
                ),
                source: Some(Box::new(e)),
            }
        } else {
            LoadError::Runtime(e)
        }
    })?;
    // Where the decoder keeps its state (the device, fixed step buffers), from the profile.
    pipe.model.place_for(profile)?;
    if profile.fast_decode {
        pipe.limits = pipe.limits.fast_decode(&pipe.model.manifest.image);
    }
    Ok(pipe)
}

/// An image-text retrieval export on `profile`.
pub fn load_retrieval(dir: &Path, profile: &Profile) -> Result<RetrievalModel, LoadError> {
    crate::ort_env::init_with_threads(profile.intra_op_threads)?;
    let mut model = RetrievalModel::load(dir, &mut *session_factory(profile))?;
    if profile.fast_decode {
        model.limits = model.limits.fast_decode(&model.manifest.image);
    }
    Ok(model)
}

/// For a profile with `cuda_graph = true`: the export's language-model file, after
/// checking that the export can be captured (an fp16 OPT export made with `--target
/// cuda`), before any session is built.
fn check_cuda_graph(dir: &Path, profile: &Profile) -> Result<PathBuf, LoadError> {
    let m = blip2_core::Manifest::load(dir).map_err(RuntimeError::from)?;
    crate::state::fixed::check_export(&m, dir).map_err(|e| LoadError::Profile {
        context: format!(
            "profile \"{}\" sets cuda_graph = true (use a profile without it for this export)",
            profile.name
        ),
        source: Some(Box::new(e)),
    })?;
    if m.dtype != blip2_core::Dtype::Fp16 {
        return Err(LoadError::Profile {
            context: format!(
                "profile \"{}\" sets cuda_graph = true, which captures the decode step on CUDA, where GroupQueryAttention takes \
                 fp16 only; {} is an {} export. Export it with --dtype fp16 --target cuda",
                profile.name,
                dir.display(),
                m.dtype
            ),
            source: None,
        });
    }
    Ok(dir.join(&m.graphs.language_model.file))
}

/// Builds each graph's session on the profile, with the optimized-graph cache unless
/// `BLIP2_ORT_OPTIMIZED_CACHE=0`; the library's warnings go to stderr.
/// CUDA graph capture (the profile's `cuda_graph`) applies to the language model's own
/// session alone.
pub fn session_factory(profile: &Profile) -> Box<SessionFactory<'static>> {
    let cache_on = std::env::var(OPTIMIZED_CACHE_ENV).map_or(true, |v| v.trim() != "0");
    let cache = cache_on.then(session_cache::optimized_cache_root);
    session_cache::session_factory(profile.clone(), cache, |w| eprintln!("warning: {w}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GraphOptimization;
    use crate::config::Provider;

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
            engines.starts_with(crate::ort_env::cache_root())
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
        let dir = std::env::temp_dir().join(format!("blip2-profiles-test-{}", std::process::id()));
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
        let lean = profile(Some(&path), "lean", Some(3)).unwrap();
        assert_eq!(
            (lean.providers.as_slice(), lean.intra_op_threads),
            ([Provider::Cpu].as_slice(), Some(3))
        );

        let err = load_config(Some(&dir.join("none.toml"))).unwrap_err();
        assert!(
            matches!(err, ConfigError::Read { .. }) && err.to_string().contains("none.toml"),
            "{err}"
        );
        let err = profile(Some(&path), "rocm", None).unwrap_err();
        assert!(matches!(err, ConfigError::UnknownProfile { .. }), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
