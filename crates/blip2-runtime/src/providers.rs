//! Execution-provider profiles: which ONNX Runtime providers each graph runs on, with
//! their options, read from `models.toml` (built in) and an optional user file laid over
//! it. [`apply`] registers a profile's providers on a session builder.
//!
//! A GPU provider that cannot be used is an error naming the reason, never a silent run on
//! the CPU: a user who asked for CUDA and got minutes-long CPU inference would not know
//! why. `allow_fallback = true` in a profile turns that error into a warning on stderr.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ort::ep::{self, ExecutionProvider, ExecutionProviderDispatch};
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session;
use serde::Deserialize;

use crate::ort_env::{self, RuntimeSetupError};

/// The repository's `models.toml`, built in so the binary works from any folder.
pub const BUILTIN_CONFIG: &str = include_str!("../../../models.toml");
/// Origin label of the built-in config in error messages.
pub const BUILTIN_ORIGIN: &str = "built-in models.toml";
/// Environment variable naming a user config file (used when no path is given).
pub const CONFIG_ENV: &str = "BLIP2_ORT_CONFIG";
/// The graphs of an export, as `[profiles.x.graphs.NAME]` names them.
pub const GRAPHS: [&str; 4] = ["vision_encoder", "qformer", "text_encoder", "language_model"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Provider {
    Cpu,
    Cuda,
    TensorRt,
}

impl Provider {
    pub const ALL: [Provider; 3] = [Provider::Cpu, Provider::Cuda, Provider::TensorRt];

    /// The name used in profiles.
    pub fn name(self) -> &'static str {
        match self {
            Provider::Cpu => "cpu",
            Provider::Cuda => "cuda",
            Provider::TensorRt => "tensorrt",
        }
    }

    /// ONNX Runtime's name for it.
    pub fn ep_name(self) -> &'static str {
        match self {
            Provider::Cpu => <ep::CPU as ExecutionProvider>::NAME,
            Provider::Cuda => <ep::CUDA as ExecutionProvider>::NAME,
            Provider::TensorRt => <ep::TensorRT as ExecutionProvider>::NAME,
        }
    }

    pub fn is_gpu(self) -> bool {
        !matches!(self, Provider::Cpu)
    }

    fn known_list() -> String {
        Provider::ALL.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Provider {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Provider::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("unknown provider \"{s}\" (known: {})", Provider::known_list()))
    }
}

/// `graph_optimization`: ONNX Runtime's graph optimization levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GraphOptimization {
    Disable,
    Basic,
    Extended,
    Layout,
    #[default]
    All,
}

impl GraphOptimization {
    const NAMES: [(&'static str, GraphOptimization); 5] = [
        ("disable", GraphOptimization::Disable),
        ("basic", GraphOptimization::Basic),
        ("extended", GraphOptimization::Extended),
        ("layout", GraphOptimization::Layout),
        ("all", GraphOptimization::All),
    ];
}

impl FromStr for GraphOptimization {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::NAMES.iter().find(|(n, _)| n.eq_ignore_ascii_case(s.trim())).map(|(_, l)| *l).ok_or_else(|| {
            format!(
                "unknown graph_optimization \"{s}\" (known: {})",
                Self::NAMES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            )
        })
    }
}

impl From<GraphOptimization> for GraphOptimizationLevel {
    fn from(g: GraphOptimization) -> Self {
        match g {
            GraphOptimization::Disable => GraphOptimizationLevel::Disable,
            GraphOptimization::Basic => GraphOptimizationLevel::Level1,
            GraphOptimization::Extended => GraphOptimizationLevel::Level2,
            GraphOptimization::Layout => GraphOptimizationLevel::Level3,
            GraphOptimization::All => GraphOptimizationLevel::All,
        }
    }
}

/// One resolved profile; see `models.toml` for what each key means.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub name: String,
    /// Providers for every graph without its own list, first preferred.
    pub providers: Vec<Provider>,
    /// Per-graph provider lists, keyed by a [`GRAPHS`] name.
    pub graphs: BTreeMap<String, Vec<Provider>>,
    pub device_id: i32,
    pub gpu_mem_limit: Option<u64>,
    pub fp16: bool,
    /// Let the CUDA provider run fp32 products on TF32 tensor cores (10-bit mantissa).
    /// Off by default, as in PyTorch, so an fp32 export gives the CPU's tokens on CUDA.
    pub tf32: bool,
    pub engine_cache_path: Option<PathBuf>,
    pub allow_fallback: bool,
    pub intra_op_threads: Option<usize>,
    pub graph_optimization: GraphOptimization,
}

impl Profile {
    /// The providers `graph` runs on.
    pub fn providers_for(&self, graph: &str) -> &[Provider] {
        self.graphs.get(graph).unwrap_or(&self.providers)
    }

    /// Whether any graph asks for a GPU provider (and so needs `install-runtime --gpu`).
    pub fn uses_gpu(&self) -> bool {
        self.providers.iter().chain(self.graphs.values().flatten()).any(|p| p.is_gpu())
    }

    /// The TensorRT engine cache folder, relative paths taken under the blip2-ort cache.
    pub fn engine_cache_dir(&self) -> Option<PathBuf> {
        self.engine_cache_path.as_ref().map(|p| if p.is_absolute() { p.clone() } else { ort_env::cache_root().join(p) })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{path}: cannot read the config: {source}", path = .path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("{origin}: profile \"{profile}\": unknown provider \"{name}\" (known: {known})", known = Provider::known_list())]
    UnknownProvider { origin: String, profile: String, name: String },
    #[error("{origin}: profile \"{profile}\": unknown graph \"{name}\" (known: {known})", known = GRAPHS.join(", "))]
    UnknownGraph { origin: String, profile: String, name: String },
    #[error("{origin}: profile \"{profile}\": {message}")]
    InvalidProfile { origin: String, profile: String, message: String },
    #[error("unknown profile \"{name}\"; known profiles: {known}", known = .known.join(", "))]
    UnknownProfile { name: String, known: Vec<String> },
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

// ---- the file format, as written -------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    profiles: BTreeMap<String, RawProfile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    providers: Option<Vec<String>>,
    #[serde(default)]
    graphs: BTreeMap<String, RawGraph>,
    device_id: Option<i32>,
    gpu_mem_limit: Option<u64>,
    fp16: Option<bool>,
    tf32: Option<bool>,
    engine_cache_path: Option<PathBuf>,
    allow_fallback: Option<bool>,
    intra_op_threads: Option<usize>,
    graph_optimization: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGraph {
    providers: Vec<String>,
}

/// One file's profile, checked but with unset keys left open so a later file can lay
/// single keys over it.
#[derive(Debug, Clone, Default)]
struct PartialProfile {
    providers: Option<Vec<Provider>>,
    graphs: BTreeMap<String, Vec<Provider>>,
    device_id: Option<i32>,
    gpu_mem_limit: Option<u64>,
    fp16: Option<bool>,
    tf32: Option<bool>,
    engine_cache_path: Option<PathBuf>,
    allow_fallback: Option<bool>,
    intra_op_threads: Option<usize>,
    graph_optimization: Option<GraphOptimization>,
    /// The last file that set anything in it, for error messages.
    origin: String,
}

impl PartialProfile {
    fn from_raw(raw: RawProfile, name: &str, origin: &str) -> Result<Self, ProviderError> {
        let providers = raw.providers.map(|list| parse_provider_list(&list, name, origin)).transpose()?;
        let mut graphs = BTreeMap::new();
        for (graph, g) in raw.graphs {
            if !GRAPHS.contains(&graph.as_str()) {
                return Err(ProviderError::UnknownGraph { origin: origin.into(), profile: name.into(), name: graph });
            }
            graphs.insert(graph, parse_provider_list(&g.providers, name, origin)?);
        }
        let graph_optimization = raw
            .graph_optimization
            .map(|s| s.parse::<GraphOptimization>())
            .transpose()
            .map_err(|message| invalid(origin, name, message))?;
        Ok(Self {
            providers,
            graphs,
            device_id: raw.device_id,
            gpu_mem_limit: raw.gpu_mem_limit,
            fp16: raw.fp16,
            tf32: raw.tf32,
            engine_cache_path: raw.engine_cache_path,
            allow_fallback: raw.allow_fallback,
            intra_op_threads: raw.intra_op_threads,
            graph_optimization,
            origin: origin.into(),
        })
    }

    /// `over`'s keys win; graph lists are replaced per graph.
    fn overlay(mut self, over: PartialProfile) -> Self {
        self.graphs.extend(over.graphs);
        Self {
            providers: over.providers.or(self.providers),
            graphs: self.graphs,
            device_id: over.device_id.or(self.device_id),
            gpu_mem_limit: over.gpu_mem_limit.or(self.gpu_mem_limit),
            fp16: over.fp16.or(self.fp16),
            tf32: over.tf32.or(self.tf32),
            engine_cache_path: over.engine_cache_path.or(self.engine_cache_path),
            allow_fallback: over.allow_fallback.or(self.allow_fallback),
            intra_op_threads: over.intra_op_threads.or(self.intra_op_threads),
            graph_optimization: over.graph_optimization.or(self.graph_optimization),
            origin: over.origin,
        }
    }

    fn resolve(&self, name: &str) -> Result<Profile, ProviderError> {
        let providers = self
            .providers
            .clone()
            .ok_or_else(|| invalid(&self.origin, name, "no providers list (e.g. providers = [\"cuda\", \"cpu\"])"))?;
        Ok(Profile {
            name: name.into(),
            providers,
            graphs: self.graphs.clone(),
            device_id: self.device_id.unwrap_or(0),
            gpu_mem_limit: self.gpu_mem_limit,
            fp16: self.fp16.unwrap_or(false),
            tf32: self.tf32.unwrap_or(false),
            engine_cache_path: self.engine_cache_path.clone(),
            allow_fallback: self.allow_fallback.unwrap_or(false),
            intra_op_threads: self.intra_op_threads,
            graph_optimization: self.graph_optimization.unwrap_or_default(),
        })
    }
}

fn invalid(origin: &str, profile: &str, message: impl Into<String>) -> ProviderError {
    ProviderError::InvalidProfile { origin: origin.into(), profile: profile.into(), message: message.into() }
}

fn parse_provider_list(list: &[String], profile: &str, origin: &str) -> Result<Vec<Provider>, ProviderError> {
    let mut out: Vec<Provider> = Vec::with_capacity(list.len());
    for name in list {
        let p = name.parse::<Provider>().map_err(|_| ProviderError::UnknownProvider {
            origin: origin.into(),
            profile: profile.into(),
            name: name.clone(),
        })?;
        if out.contains(&p) {
            return Err(invalid(origin, profile, format!("provider \"{p}\" is listed twice")));
        }
        out.push(p);
    }
    if out.is_empty() {
        return Err(invalid(origin, profile, "the providers list is empty"));
    }
    // ONNX Runtime always keeps its CPU provider last, whatever the order asked for;
    // refuse an order that would not be honoured.
    if out.iter().position(|p| *p == Provider::Cpu).is_some_and(|i| i + 1 != out.len()) {
        return Err(invalid(
            origin,
            profile,
            "\"cpu\" must come last in a providers list (ONNX Runtime always tries it last)",
        ));
    }
    Ok(out)
}

// ---- the merged configuration ----------------------------------------------------------

/// Execution-provider profiles: the built-in file with any user file laid over it.
#[derive(Debug, Clone)]
pub struct Config {
    partial: BTreeMap<String, PartialProfile>,
    profiles: BTreeMap<String, Profile>,
}

impl Config {
    /// The built-in `models.toml` alone.
    pub fn builtin() -> Config {
        Config::from_toml(BUILTIN_CONFIG, BUILTIN_ORIGIN).expect("the built-in models.toml is valid (tested)")
    }

    /// A config from one TOML text alone; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ProviderError> {
        let mut c = Config { partial: BTreeMap::new(), profiles: BTreeMap::new() };
        c.overlay_toml(text, origin)?;
        Ok(c)
    }

    /// The built-in config with a user file over it: `path` if given, else
    /// `$BLIP2_ORT_CONFIG` if set, else nothing.
    pub fn load(path: Option<&Path>) -> Result<Config, ProviderError> {
        let mut c = Config::builtin();
        let from_env = std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()).map(PathBuf::from);
        if let Some(p) = path.map(Path::to_path_buf).or(from_env) {
            c.overlay_file(&p)?;
        }
        Ok(c)
    }

    /// Lays a TOML file over this config.
    pub fn overlay_file(&mut self, path: &Path) -> Result<(), ProviderError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ProviderError::Read { path: path.to_path_buf(), source })?;
        self.overlay_toml(&text, &path.display().to_string())
    }

    /// Lays a TOML text over this config, profiles key by key. On error the config is
    /// left unchanged.
    pub fn overlay_toml(&mut self, text: &str, origin: &str) -> Result<(), ProviderError> {
        let raw: RawFile =
            toml::from_str(text).map_err(|e| ProviderError::Parse { origin: origin.into(), message: e.to_string() })?;
        let mut partial = self.partial.clone();
        for (name, rp) in raw.profiles {
            let over = PartialProfile::from_raw(rp, &name, origin)?;
            let merged = match partial.remove(&name) {
                Some(base) => base.overlay(over),
                None => over,
            };
            partial.insert(name, merged);
        }
        let profiles = partial
            .iter()
            .map(|(name, p)| p.resolve(name).map(|r| (name.clone(), r)))
            .collect::<Result<BTreeMap<_, _>, _>>()?;
        self.partial = partial;
        self.profiles = profiles;
        Ok(())
    }

    /// The profile called `name`, or an error listing the known ones.
    pub fn profile(&self, name: &str) -> Result<&Profile, ProviderError> {
        self.profiles.get(name).ok_or_else(|| ProviderError::UnknownProfile {
            name: name.into(),
            known: self.profiles.keys().cloned().collect(),
        })
    }

    /// All profiles by name.
    pub fn profiles(&self) -> &BTreeMap<String, Profile> {
        &self.profiles
    }

    pub fn profile_names(&self) -> Vec<&str> {
        self.profiles.keys().map(String::as_str).collect()
    }

}

// ---- registering providers -------------------------------------------------------------

fn ort_ctx<R>(what: &str) -> impl FnOnce(ort::Error<R>) -> ProviderError + '_
where
    ort::Error: From<ort::Error<R>>,
{
    move |e| ProviderError::Ort { what: what.into(), source: e.into() }
}

/// The ort dispatch for one provider with the profile's options; errors on failure so
/// we see (and report) them rather than ort's silent fallback.
fn dispatch(p: Provider, profile: &Profile) -> ExecutionProviderDispatch {
    match p {
        // No arena (ort's CPU default; ONNX Runtime's own is on). Measured on the small
        // benchmark model: the same speed within noise, and 120 MB less peak memory at
        // batch 4, where the arena keeps the largest activations of every graph.
        Provider::Cpu => ep::CPU::default().with_arena_allocator(false).build(),
        Provider::Cuda => {
            // ONNX Runtime's CUDA provider defaults to TF32 products; PyTorch (the
            // reference) does not, and TF32 changes fp32 tokens, so it is off unless asked.
            let mut cuda = ep::CUDA::default().with_device_id(profile.device_id).with_tf32(profile.tf32);
            if let Some(limit) = profile.gpu_mem_limit {
                cuda = cuda.with_memory_limit(usize::try_from(limit).unwrap_or(usize::MAX));
            }
            cuda.build()
        }
        Provider::TensorRt => {
            let mut trt = ep::TensorRT::default().with_device_id(profile.device_id).with_fp16(profile.fp16);
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

/// Why `p` cannot even be tried with the loaded library, if so.
fn not_built_in(p: Provider) -> Result<Option<String>, ProviderError> {
    let available = match p {
        Provider::Cpu => return Ok(None),
        Provider::Cuda => <ep::CUDA as ExecutionProvider>::is_available(),
        Provider::TensorRt => <ep::TensorRT as ExecutionProvider>::is_available(),
    }
    .map_err(|source| ProviderError::Ort { what: "listing the available providers".into(), source })?;
    if available {
        return Ok(None);
    }
    let lib = ort_env::loaded_dylib().map(|p| p.display().to_string()).unwrap_or_else(|| "the loaded library".into());
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
/// warning goes to stderr and the next provider is tried (ONNX Runtime's CPU provider is
/// always there last). Call [`ort_env::init`] first (building a session does).
pub fn apply(builder: SessionBuilder, profile: &Profile, graph: &str) -> Result<SessionBuilder, ProviderError> {
    let mut builder = builder
        .with_optimization_level(profile.graph_optimization.into())
        .map_err(ort_ctx("setting the graph optimization level"))?;
    if let Some(n) = profile.intra_op_threads {
        builder = builder.with_intra_threads(n).map_err(ort_ctx("setting the intra-op thread count"))?;
    }
    // The graphs run one after another, never side by side.
    builder = builder.with_inter_threads(1).map_err(ort_ctx("setting the inter-op thread count"))?;
    if graph == "language_model" {
        // Every decode step has new shapes (the KV cache grows by one), so a memory
        // pattern planned for one step never fits the next and is only overhead.
        builder = builder.with_memory_pattern(false).map_err(ort_ctx("turning off the memory pattern"))?;
    }
    let providers = profile.providers_for(graph);
    for (i, &p) in providers.iter().enumerate() {
        let failure = match not_built_in(p)? {
            Some(reason) => Some(reason),
            None => match builder.with_execution_providers([dispatch(p, profile)]) {
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
            eprintln!(
                "warning: profile \"{}\", graph {graph}: cannot use {} ({reason}); falling back to {next}",
                profile.name,
                p.ep_name()
            );
        }
    }
    Ok(builder)
}

/// Graph files at least this big get an optimized copy cached by [`open_session`];
/// smaller ones load in milliseconds anyway (and the test fixtures stay out of the cache).
pub const OPTIMIZED_CACHE_MIN_BYTES: u64 = 16 << 20;
/// Environment variable: `0` turns the optimized-graph cache off.
pub const OPTIMIZED_CACHE_ENV: &str = "BLIP2_ORT_OPTIMIZED_CACHE";
/// Bumped when the cached files change meaning, so old entries are rebuilt.
const OPTIMIZED_CACHE_VERSION: u32 = 1;

/// Where [`open_session`] keeps optimized graphs: `cache_root()/optimized`.
pub fn optimized_cache_root() -> PathBuf {
    ort_env::cache_root().join("optimized")
}

/// Builds a session for one graph file on a profile: initialises ONNX Runtime if needed,
/// [`apply`]s the profile and loads the model.
///
/// A big graph running on the CPU alone is loaded from an optimized copy in
/// [`optimized_cache_root`], made on first use (see [`open_session_with_cache`]):
/// later starts skip the graph optimizations and memory-map the weights instead of
/// parsing and copying them, which starts faster and keeps less memory resident.
pub fn open_session(profile: &Profile, graph: &str, path: &Path) -> Result<Session, ProviderError> {
    let cache = optimized_cache_applies(profile, graph, path).then(optimized_cache_root);
    open_session_with_cache(profile, graph, path, cache.as_deref())
}

/// Whether [`open_session`] caches this graph: the CPU provider alone (GPU providers
/// rewrite the graph for their device), optimizations on, a graph file of at least
/// [`OPTIMIZED_CACHE_MIN_BYTES`], and not turned off by `BLIP2_ORT_OPTIMIZED_CACHE=0`.
pub fn optimized_cache_applies(profile: &Profile, graph: &str, path: &Path) -> bool {
    std::env::var(OPTIMIZED_CACHE_ENV).map_or(true, |v| v.trim() != "0")
        && profile.providers_for(graph).iter().all(|p| *p == Provider::Cpu)
        && profile.graph_optimization != GraphOptimization::Disable
        && std::fs::metadata(path).is_ok_and(|m| m.len() >= OPTIMIZED_CACHE_MIN_BYTES)
}

/// [`open_session`] with the cache folder explicit (`None`: load `path` as it is).
///
/// The cached copy is the graph after ONNX Runtime's basic and extended optimizations
/// (the fusions; layout changes are hardware-specific and are redone at every load),
/// weights in an external data file that ONNX Runtime memory-maps. It is keyed by the
/// source's path, size and modification time, the ONNX Runtime version and the level, so
/// a re-export or another library rebuilds it. The first start writes it and then loads
/// it like every later start, so all starts run the same graph. A cached copy that no
/// longer loads (a truncated or damaged file) is deleted and made again, once. Any failure
/// to cache (read-only cache, full disk) is a warning and the original graph is loaded.
pub fn open_session_with_cache(
    profile: &Profile,
    graph: &str,
    path: &Path,
    cache: Option<&Path>,
) -> Result<Session, ProviderError> {
    if let Some(root) = cache {
        match open_cached(profile, graph, path, root) {
            Ok(session) => return Ok(session),
            Err(reason) => {
                eprintln!("warning: {}: cannot use the optimized-graph cache ({reason}); loading the original", path.display())
            }
        }
    }
    commit(profile, graph, path)
}

/// Loads the cached copy of `path`, making it first if needed, and making it again once
/// if it does not load.
fn open_cached(profile: &Profile, graph: &str, path: &Path, root: &Path) -> Result<Session, String> {
    let optimized = cached_graph(profile, path, root)?;
    match commit(profile, graph, &optimized) {
        Ok(session) => Ok(session),
        Err(first) => {
            let entry = optimized.parent().expect("a cached graph lives in its entry folder");
            std::fs::remove_dir_all(entry)
                .map_err(|e| format!("{}: does not load ({first}) and cannot be removed: {e}", entry.display()))?;
            let optimized = cached_graph(profile, path, root)?;
            commit(profile, graph, &optimized)
                .map_err(|e| format!("{}: made again, still does not load: {e}", optimized.display()))
        }
    }
}

fn commit(profile: &Profile, graph: &str, path: &Path) -> Result<Session, ProviderError> {
    let env = ort_env::environment()?;
    let builder = Session::builder(env)
        .map_err(|source| ProviderError::Ort { what: "creating a session builder".into(), source })?;
    let mut builder = apply(builder, profile, graph)?;
    builder.commit_from_file(path).map_err(|source| ProviderError::Commit {
        path: path.to_path_buf(),
        graph: graph.into(),
        providers: profile.providers_for(graph).iter().map(|p| p.name()).collect::<Vec<_>>().join(", "),
        source,
    })
}

/// FNV-1a: a stable folder name for a source path (std's hasher may change between releases).
fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The optimized copy of `path` under `root`, made now if missing or stale.
fn cached_graph(profile: &Profile, path: &Path, root: &Path) -> Result<PathBuf, String> {
    let source = path.canonicalize().map_err(|e| format!("{}: {e}", path.display()))?;
    let meta = std::fs::metadata(&source).map_err(|e| e.to_string())?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    // Saved at most at the extended level: the layout level's rewrites depend on this
    // CPU's instruction set, and ONNX Runtime applies them again when it loads the copy.
    let level = match profile.graph_optimization {
        GraphOptimization::Layout | GraphOptimization::All => GraphOptimization::Extended,
        other => other,
    };
    let stamp = format!(
        "blip2-ort optimized graph v{OPTIMIZED_CACHE_VERSION}\nsource {}\nsize {}\nmtime {mtime}\nonnxruntime {}\nlevel {level:?}\n",
        source.display(),
        meta.len(),
        ort_env::ORT_VERSION
    );
    let key = format!("{:016x}", fnv64(source.as_os_str().as_encoded_bytes()));
    let dir = root.join(&key);
    let model = dir.join("model.onnx");
    let fresh = |d: &Path| std::fs::read_to_string(d.join("stamp")).is_ok_and(|s| s == stamp) && d.join("model.onnx").is_file();
    if fresh(&dir) {
        return Ok(model);
    }
    let tmp = root.join(format!("{key}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let written = write_optimized(&source, &tmp, level).and_then(|()| {
        std::fs::write(tmp.join("stamp"), &stamp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir).map_err(|e| format!("{}: {e}", dir.display()))
    });
    let _ = std::fs::remove_dir_all(&tmp);
    if written.is_ok() {
        prune_optimized_cache(root);
    }
    match written {
        Ok(()) => Ok(model),
        // Another process may have put the same copy in place first.
        Err(_) if fresh(&dir) => Ok(model),
        Err(e) => Err(e),
    }
}

/// Drops cached copies whose source graph is gone (a deleted or moved export) and
/// temporary folders an interrupted start left behind more than an hour ago, so the
/// cache does not keep gigabytes for models that no longer exist.
fn prune_optimized_cache(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = if name.contains(".tmp-") {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > std::time::Duration::from_secs(3600))
        } else {
            std::fs::read_to_string(path.join("stamp")).ok().is_some_and(|stamp| {
                stamp.lines().find_map(|l| l.strip_prefix("source ")).is_some_and(|src| !Path::new(src).exists())
            })
        };
        if stale {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// Runs ONNX Runtime's optimizer on `source` and saves the result as `dir/model.onnx`
/// with its weights in `dir/model.onnx.data`. The session is only a means to that: one
/// thread, no weight prepacking, dropped at once.
fn write_optimized(source: &Path, dir: &Path, level: GraphOptimization) -> Result<(), String> {
    let env = ort_env::environment().map_err(|e| e.to_string())?;
    let out = dir.join("model.onnx");
    let session = Session::builder(env)
        .and_then(|b| b.with_optimization_level(level.into()).map_err(Into::into))
        .and_then(|b| b.with_intra_threads(1).map_err(Into::into))
        .and_then(|b| b.with_prepacking(false).map_err(Into::into))
        .and_then(|b| b.with_optimized_model_path(&out).map_err(Into::into))
        .and_then(|b| {
            b.with_config_entry("session.optimized_model_external_initializers_file_name", "model.onnx.data")
                .map_err(Into::into)
        })
        .and_then(|b| {
            // Small tensors stay in the graph; big ones go to the mapped file.
            b.with_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "4096")
                .map_err(Into::into)
        })
        .and_then(|mut b| b.commit_from_file(source));
    let session: Session = session.map_err(|e: ort::Error| e.to_string())?;
    drop(session);
    if out.is_file() {
        Ok(())
    } else {
        Err(format!("ONNX Runtime did not write {}", out.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_names_round_trip() {
        for p in Provider::ALL {
            assert_eq!(p.name().parse::<Provider>().unwrap(), p);
        }
        assert_eq!("CUDA".parse::<Provider>().unwrap(), Provider::Cuda);
        assert!("rocm".parse::<Provider>().unwrap_err().contains("cpu, cuda, tensorrt"));
        assert_eq!(Provider::TensorRt.ep_name(), "TensorrtExecutionProvider");
    }

    #[test]
    fn cpu_must_be_last_and_unique() {
        let e = parse_provider_list(&["cpu".into(), "cuda".into()], "p", "f").unwrap_err();
        assert!(e.to_string().contains("must come last"), "{e}");
        let e = parse_provider_list(&["cuda".into(), "cuda".into()], "p", "f").unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let e = parse_provider_list(&[], "p", "f").unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
    }

    #[test]
    fn graph_optimization_levels() {
        assert_eq!("all".parse::<GraphOptimization>().unwrap(), GraphOptimization::All);
        assert_eq!("basic".parse::<GraphOptimization>().unwrap(), GraphOptimization::Basic);
        assert!("max".parse::<GraphOptimization>().unwrap_err().contains("disable, basic, extended, layout, all"));
    }

    /// `c = a + b` over float[3] (the same model as tests/providers.rs).
    const ADD_ONNX: [u8; 80] = [
        8, 8, 58, 70, 10, 14, 10, 1, 97, 10, 1, 98, 18, 1, 99, 34, 3, 65, 100, 100, 18, 1, 103, 90, 15, 10, 1, 97, 18,
        10, 10, 8, 8, 1, 18, 4, 10, 2, 8, 3, 90, 15, 10, 1, 98, 18, 10, 10, 8, 8, 1, 18, 4, 10, 2, 8, 3, 98, 15, 10, 1,
        99, 18, 10, 10, 8, 8, 1, 18, 4, 10, 2, 8, 3, 66, 4, 10, 0, 16, 13,
    ];

    fn run_add(session: &mut Session) -> Vec<f32> {
        let a = ort::value::Tensor::from_array(([3usize], vec![1.0f32, 2.0, 3.0])).unwrap();
        let b = ort::value::Tensor::from_array(([3usize], vec![10.0f32, 20.0, 30.0])).unwrap();
        let out = session.run(ort::inputs!["a" => a, "b" => b]).unwrap();
        out["c"].try_extract_array::<f32>().unwrap().iter().copied().collect()
    }

    #[test]
    fn optimized_graph_cache_is_made_once_and_follows_its_source() {
        if ort_env::find_dylib().is_err() {
            eprintln!("note: skipping, the ONNX Runtime library is not installed");
            return;
        }
        let dir = std::env::temp_dir().join(format!("blip2-ort-optcache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let model = dir.join("add.onnx");
        std::fs::write(&model, ADD_ONNX).unwrap();
        let cache = dir.join("cache");
        let profile = Config::builtin().profile("cpu").unwrap().clone();
        let open = |cache: &Path| open_session_with_cache(&profile, "qformer", &model, Some(cache)).unwrap();

        let mut s = open(&cache);
        assert_eq!(run_add(&mut s), [11.0, 22.0, 33.0]);
        let entries: Vec<PathBuf> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(entries.len(), 1, "one folder per source graph, no temporary left: {entries:?}");
        let entry = &entries[0];
        let stamp = || std::fs::read_to_string(entry.join("stamp")).unwrap();
        let written = || std::fs::metadata(entry.join("model.onnx")).unwrap().modified().unwrap();
        let (stamp1, time1) = (stamp(), written());
        assert!(stamp1.contains(&model.canonicalize().unwrap().display().to_string()), "{stamp1}");

        // A second start loads the copy as it is.
        let mut s = open(&cache);
        assert_eq!(run_add(&mut s), [11.0, 22.0, 33.0]);
        assert_eq!(written(), time1);

        // A re-export (new modification time) replaces it.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&model, ADD_ONNX).unwrap();
        let mut s = open(&cache);
        assert_eq!(run_add(&mut s), [11.0, 22.0, 33.0]);
        assert_ne!(stamp(), stamp1);
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1);

        // A copy whose source is gone is dropped when another copy is made.
        let other = dir.join("other.onnx");
        std::fs::write(&other, ADD_ONNX).unwrap();
        let _ = open_session_with_cache(&profile, "qformer", &other, Some(&cache)).unwrap();
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 2);
        std::fs::remove_file(&other).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&model, ADD_ONNX).unwrap();
        let _ = open(&cache);
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1, "the copy of the deleted graph is pruned");

        // A cache that cannot be written is no error: the original graph loads.
        let blocked = dir.join("not-a-folder");
        std::fs::write(&blocked, b"").unwrap();
        let mut s = open(&blocked.join("cache"));
        assert_eq!(run_add(&mut s), [11.0, 22.0, 33.0]);

        // Small graphs and GPU profiles are never cached.
        assert!(!optimized_cache_applies(&profile, "qformer", &model));
        let cuda = Config::builtin().profile("cuda").unwrap().clone();
        std::fs::write(&model, vec![0u8; OPTIMIZED_CACHE_MIN_BYTES as usize]).unwrap();
        assert!(!optimized_cache_applies(&cuda, "qformer", &model));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_broken_cached_graph_is_made_again() {
        if ort_env::find_dylib().is_err() {
            eprintln!("note: skipping, the ONNX Runtime library is not installed");
            return;
        }
        let dir = std::env::temp_dir().join(format!("blip2-ort-optcache-broken-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let model = dir.join("add.onnx");
        std::fs::write(&model, ADD_ONNX).unwrap();
        let cache = dir.join("cache");
        let profile = Config::builtin().profile("cpu").unwrap().clone();
        let open = || open_session_with_cache(&profile, "qformer", &model, Some(&cache)).unwrap();
        drop(open());
        let entry = std::fs::read_dir(&cache).unwrap().next().unwrap().unwrap().path();
        let good = std::fs::read(entry.join("model.onnx")).unwrap();
        // Damage the copy but keep its stamp: it still looks current.
        std::fs::write(entry.join("model.onnx"), &good[..good.len() / 2]).unwrap();
        let mut s = open();
        assert_eq!(run_add(&mut s), [11.0, 22.0, 33.0]);
        assert_eq!(std::fs::read(entry.join("model.onnx")).unwrap(), good, "the broken copy is made again");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn failed_overlay_leaves_config_unchanged() {
        let mut c = Config::builtin();
        let before = c.profiles().clone();
        let err = c.overlay_toml("[profiles.cpu]\nproviders = [\"nope\"]\n", "user.toml").unwrap_err();
        assert!(matches!(err, ProviderError::UnknownProvider { .. }));
        assert_eq!(c.profiles(), &before);
    }
}
