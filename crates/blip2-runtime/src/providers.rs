//! Registering a profile's execution providers on ONNX Runtime sessions: [`apply`] sets
//! a [`Profile`]'s options and providers on a session builder (sessions for graph files
//! are opened by [`crate::session_cache::open_session`], through the optimized-graph
//! cache when it applies).
//!
//! A GPU provider that cannot be used is an error naming the reason, never a silent run on
//! the CPU: a user who asked for CUDA and got minutes-long CPU inference would not know
//! why. `allow_fallback = true` in a profile turns that error into a [`Warning`] handed to
//! the caller.

use std::fmt;
use std::path::{Path, PathBuf};

use ort::ep::{self, ExecutionProvider, ExecutionProviderDispatch};
use ort::session::builder::SessionBuilder;
use ort::session::Session;

use crate::config::{ConvAlgoSearch, Profile, Provider};
use crate::ort_env::{self, RuntimeSetupError};
use blip2_core::GraphKind;

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error(
        "profile \"{profile}\", graph {graph}: the {provider} provider ({ep}) cannot be used: {reason}\n\
         Choose another profile, or set allow_fallback = true in [profiles.{profile}] to go on with the next provider.",
        ep = .provider.ep_name()
    )]
    Unavailable { profile: String, graph: String, provider: Provider, reason: String },
    #[error("{what}: {source}")]
    Ort { what: String, source: ort::Error },
    #[error(transparent)]
    Setup(#[from] RuntimeSetupError),
    #[error("{path}: cannot create the {graph} session on {providers}: {source}", path = .path.display())]
    Commit { path: PathBuf, graph: String, providers: String, source: ort::Error },
}

/// Something the user should hear about that did not stop the session (a provider fallen
/// back from, an optimized-graph cache not used). Its text has no "warning: " prefix; the
/// caller decides how to show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning(pub String);

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// When set to a folder, every session writes ONNX Runtime's profile of its runs there
/// (`GRAPH_<time>.json`, Chrome trace format): for finding where time goes, not for
/// serving (it slows every run).
pub const PROFILE_ENV: &str = "BLIP2_ORT_PROFILE";

fn ort_ctx<R>(what: &str) -> impl FnOnce(ort::Error<R>) -> ProviderError + '_
where
    ort::Error: From<ort::Error<R>>,
{
    move |e| ProviderError::Ort { what: what.into(), source: e.into() }
}

/// The ort dispatch for one provider with the profile's options for `graph`; errors on
/// failure so we see (and report) them rather than ort's silent fallback.
fn dispatch(p: Provider, profile: &Profile, graph: &str) -> ExecutionProviderDispatch {
    match p {
        // No arena (ort's CPU default; ONNX Runtime's own is on). Measured on the small
        // benchmark model: the same speed within noise, and 120 MB less peak memory at
        // batch 4, where the arena keeps the largest activations of every graph.
        Provider::Cpu => ep::CPU::default().with_arena_allocator(false).build(),
        Provider::Cuda => {
            // ONNX Runtime's CUDA provider defaults to TF32 products; PyTorch (the
            // reference) does not, and TF32 changes fp32 tokens, so it is off unless asked.
            let mut cuda =
                ep::CUDA::default().with_device_id(profile.device_id).with_tf32(profile.tf32);
            if captures(profile, graph) {
                cuda = cuda.with_cuda_graph(true);
            }
            if let Some(limit) = profile.gpu_mem_limit {
                cuda = cuda.with_memory_limit(usize::try_from(limit).unwrap_or(usize::MAX));
            }
            if let Some(search) = profile.conv_algo_search {
                cuda = cuda.with_conv_algorithm_search(match search {
                    ConvAlgoSearch::Exhaustive => ep::cuda::ConvAlgorithmSearch::Exhaustive,
                    ConvAlgoSearch::Heuristic => ep::cuda::ConvAlgorithmSearch::Heuristic,
                    ConvAlgoSearch::Default => ep::cuda::ConvAlgorithmSearch::Default,
                });
            }
            cuda.build()
        }
        Provider::TensorRt => {
            let mut trt =
                ep::TensorRT::default().with_device_id(profile.device_id).with_fp16(profile.fp16);
            if let Some(dir) = profile.engine_cache_dir() {
                // TensorRT does not create it; a failure here shows up as TensorRT's own error.
                let _ = std::fs::create_dir_all(&dir);
                let dir = dir.display().to_string();
                trt = trt
                    .with_engine_cache(true)
                    .with_engine_cache_path(&dir)
                    .with_timing_cache(true)
                    .with_timing_cache_path(&dir);
            }
            trt.build()
        }
    }
    .error_on_failure()
}

/// Whether `graph`'s session on the profile captures CUDA graphs: the language model
/// alone, when the profile sets `cuda_graph` (the caller opens the language model's
/// helper graphs, such as `kv_reorder`, on a profile without it).
pub fn captures(profile: &Profile, graph: &str) -> bool {
    profile.cuda_graph && graph == GraphKind::LanguageModel.name()
}

/// Why `p` cannot even be tried with the loaded library, if so.
fn not_built_in(p: Provider) -> Result<Option<String>, ProviderError> {
    let available = match p {
        Provider::Cpu => return Ok(None),
        Provider::Cuda => <ep::CUDA as ExecutionProvider>::is_available(),
        Provider::TensorRt => <ep::TensorRT as ExecutionProvider>::is_available(),
    }
    .map_err(|source| ProviderError::Ort {
        what: "listing the available providers".into(),
        source,
    })?;
    if available {
        return Ok(None);
    }
    let lib = ort_env::loaded_dylib()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "the loaded library".into());
    Ok(Some(format!(
        "the ONNX Runtime library {lib} is built without it. Install the GPU build with \
         `blip2-ort install-runtime --gpu` (and unset {} if it points at a CPU build)",
        ort_env::DYLIB_ENV
    )))
}

/// What a GPU provider needs besides the library, added to ONNX Runtime's own message
/// (which is usually a bare "cannot open shared object file").
fn gpu_hint(p: Provider) -> &'static str {
    match p {
        Provider::Cpu => "",
        Provider::Cuda => " (the CUDA provider needs an NVIDIA driver and the CUDA 13 and cuDNN 9 libraries on the loader path)",
        Provider::TensorRt => {
            " (the TensorRT provider needs an NVIDIA driver and the TensorRT 10, CUDA 13 and cuDNN 9 libraries on the loader path)"
        }
    }
}

/// Sets the profile's options and registers its providers for `graph` on `builder`, in
/// order. A GPU provider that is not in the loaded library or fails to register is an
/// [`ProviderError::Unavailable`] unless the profile allows fallback, in which case a
/// [`Warning`] goes to `warn` and the next provider is tried (ONNX Runtime's CPU provider
/// is always there last). Call [`ort_env::init`] first (building a session does).
pub fn apply(
    builder: SessionBuilder,
    profile: &Profile,
    graph: &str,
    warn: &mut dyn FnMut(Warning),
) -> Result<SessionBuilder, ProviderError> {
    let mut builder = builder
        .with_optimization_level(profile.graph_optimization.into())
        .map_err(ort_ctx("setting the graph optimization level"))?;
    if let Some(n) = profile.intra_op_threads {
        builder =
            builder.with_intra_threads(n).map_err(ort_ctx("setting the intra-op thread count"))?;
    }
    // A graph's nodes run one after another (the parallelism is inside each operator).
    builder =
        builder.with_inter_threads(1).map_err(ort_ctx("setting the inter-op thread count"))?;
    if graph == "language_model" {
        // Every decode step has new shapes (the KV cache grows by one), so a memory
        // pattern planned for one step never fits the next and is only overhead.
        builder = builder
            .with_memory_pattern(false)
            .map_err(ort_ctx("turning off the memory pattern"))?;
    }
    if let Some(dir) = std::env::var_os(PROFILE_ENV).filter(|d| !d.is_empty()) {
        // ONNX Runtime's profiler: each node's time (and on CUDA each kernel's), written
        // as DIR/GRAPH_<time>.json when the session ends.
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).map_err(|e| ProviderError::Ort {
            what: format!("{PROFILE_ENV}: creating {}", dir.display()),
            source: ort::Error::new(e.to_string()),
        })?;
        builder = builder
            .with_profiling(dir.join(graph))
            .map_err(ort_ctx("turning on ONNX Runtime's profiler"))?;
    }
    let providers = profile.providers_for(graph);
    for (i, &p) in providers.iter().enumerate() {
        let failure = match not_built_in(p)? {
            Some(reason) => Some(reason),
            None => match builder.with_execution_providers([dispatch(p, profile, graph)]) {
                Ok(b) => {
                    builder = b;
                    None
                }
                Err(e) => {
                    let reason = format!("{}{}", e.message().trim_end(), gpu_hint(p));
                    builder = e.recover();
                    Some(reason)
                }
            },
        };
        if let Some(reason) = failure {
            if !profile.allow_fallback {
                return Err(ProviderError::Unavailable {
                    profile: profile.name.clone(),
                    graph: graph.into(),
                    provider: p,
                    reason,
                });
            }
            let next = providers.get(i + 1).copied().unwrap_or(Provider::Cpu);
            warn(Warning(format!(
                "profile \"{}\", graph {graph}: cannot use {} ({reason}); falling back to {next}",
                profile.name,
                p.ep_name()
            )));
        }
    }
    Ok(builder)
}

/// Builds a session for one graph file on a profile: initialises ONNX Runtime if needed,
/// A session for `path` on the profile, loaded as the file is.
pub(crate) fn commit(
    profile: &Profile,
    graph: &str,
    path: &Path,
    warn: &mut dyn FnMut(Warning),
) -> Result<Session, ProviderError> {
    let env = ort_env::environment()?;
    let builder = Session::builder(env).map_err(|source| ProviderError::Ort {
        what: "creating a session builder".into(),
        source,
    })?;
    let mut builder = apply(builder, profile, graph, warn)?;
    builder.commit_from_file(path).map_err(|source| ProviderError::Commit {
        path: path.to_path_buf(),
        graph: graph.into(),
        providers: profile
            .providers_for(graph)
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(", "),
        source,
    })
}
