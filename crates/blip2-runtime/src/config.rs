//! Execution-provider profiles: which ONNX Runtime providers each graph runs on, with
//! their options, parsed from TOML text ([`Config::from_toml`]) with further files laid
//! over it key by key. The text itself (the CLI's built-in `models.toml`, a user file) is
//! the caller's; this module only reads and checks it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ort::ep::{self, ExecutionProvider};
use ort::session::builder::GraphOptimizationLevel;
use serde::Deserialize;

use blip2_core::GraphKind;

use crate::ort_env;

/// The graphs of an export, as `[profiles.x.graphs.NAME]` names them.
pub const GRAPHS: [&str; 4] = [
    GraphKind::ALL[0].name(),
    GraphKind::ALL[1].name(),
    GraphKind::ALL[2].name(),
    GraphKind::ALL[3].name(),
];

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
        Self::NAMES
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(s.trim()))
            .map(|(_, l)| *l)
            .ok_or_else(|| {
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

/// A profile's keys are listed here once: [`Profile`], the file format's raw profile and
/// the keys one file sets come from this list.
macro_rules! profile_keys {
    (
        defaulted { $( $(#[$dm:meta])* $d:ident: $dt:ty = $dv:expr, )* }
        optional { $( $(#[$om:meta])* $o:ident: $ot:ty, )* }
        parsed { $( $(#[$pm:meta])* $p:ident: $pt:ty, )* }
    ) => {
        /// One resolved profile; the CLI's `models.toml` says what each key means.
        #[derive(Debug, Clone, PartialEq)]
        pub struct Profile {
            pub name: String,
            /// Providers for every graph without its own list, first preferred.
            pub providers: Vec<Provider>,
            /// Per-graph provider lists, keyed by a [`GRAPHS`] name.
            pub graphs: BTreeMap<String, Vec<Provider>>,
            pub graph_optimization: GraphOptimization,
            $( $(#[$dm])* pub $d: $dt, )*
            $( $(#[$om])* pub $o: Option<$ot>, )*
            $( $(#[$pm])* pub $p: Option<$pt>, )*
        }

        /// A profile as a file writes it.
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RawProfile {
            providers: Option<Vec<String>>,
            #[serde(default)]
            graphs: BTreeMap<String, RawGraph>,
            graph_optimization: Option<String>,
            $( $d: Option<$dt>, )*
            $( $o: Option<$ot>, )*
            $( $p: Option<String>, )*
        }

        /// The keys as a file sets them (the parsed ones read from their text), each
        /// left open (None) where the file did not set it.
        #[derive(Debug, Clone, Default)]
        struct PlainKeys {
            $( $d: Option<$dt>, )*
            $( $o: Option<$ot>, )*
            $( $p: Option<$pt>, )*
        }

        impl PlainKeys {
            /// The raw profile's keys; a parsed key's text that does not parse is refused
            /// with its type's message.
            fn of(raw: &RawProfile) -> Result<Self, String> {
                Ok(Self {
                    $( $d: raw.$d.clone(), )*
                    $( $o: raw.$o.clone(), )*
                    $( $p: raw.$p.as_deref().map(<$pt as FromStr>::from_str).transpose()?, )*
                })
            }

            /// `over`'s keys win.
            fn overlay(self, over: Self) -> Self {
                Self {
                    $( $d: over.$d.or(self.$d), )*
                    $( $o: over.$o.or(self.$o), )*
                    $( $p: over.$p.or(self.$p), )*
                }
            }

            /// The profile with these keys, each unset one at its default.
            fn profile(
                &self,
                name: String,
                providers: Vec<Provider>,
                graphs: BTreeMap<String, Vec<Provider>>,
                graph_optimization: GraphOptimization,
            ) -> Profile {
                Profile {
                    name,
                    providers,
                    graphs,
                    graph_optimization,
                    $( $d: self.$d.clone().unwrap_or($dv), )*
                    $( $o: self.$o.clone(), )*
                    $( $p: self.$p, )*
                }
            }
        }
    };
}

profile_keys! {
    defaulted {
        device_id: i32 = 0,
        fp16: bool = false,
        /// Let the CUDA provider run fp32 products on TF32 tensor cores (10-bit mantissa).
        /// Off by default, as in PyTorch, so an fp32 export gives the CPU's tokens on CUDA.
        tf32: bool = false,
        /// Capture the language model's decode step as a CUDA graph and replay it (CUDA
        /// provider, OPT exports made with `--target cuda`). Off by default.
        cuda_graph: bool = false,
        allow_fallback: bool = false,
        /// Decode JPEGs with libjpeg's DCT scaling down to twice the model's input size
        /// (`--fast-decode`): several times faster on camera photos, but not Pillow's
        /// pixels, so off by default.
        fast_decode: bool = false,
    }
    optional {
        gpu_mem_limit: u64,
        engine_cache_path: PathBuf,
        intra_op_threads: usize,
    }
    parsed {
        /// How the CUDA provider picks cuDNN's convolution algorithm for each new input
        /// shape (unset: ONNX Runtime's default, exhaustive).
        conv_algo_search: ConvAlgoSearch,
    }
}

/// `conv_algo_search`: how the CUDA provider picks cuDNN's convolution algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvAlgoSearch {
    /// Times every algorithm on the first run of each input shape (ONNX Runtime's default).
    Exhaustive,
    /// cuDNN's pick without timing (as PyTorch does unless `cudnn.benchmark` is set).
    Heuristic,
    /// cuDNN's default algorithm.
    Default,
}

impl ConvAlgoSearch {
    pub const ALL: [ConvAlgoSearch; 3] =
        [ConvAlgoSearch::Exhaustive, ConvAlgoSearch::Heuristic, ConvAlgoSearch::Default];

    /// The key's value in a profile.
    pub fn name(self) -> &'static str {
        match self {
            ConvAlgoSearch::Exhaustive => "exhaustive",
            ConvAlgoSearch::Heuristic => "heuristic",
            ConvAlgoSearch::Default => "default",
        }
    }
}

impl FromStr for ConvAlgoSearch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|c| c.name() == s).ok_or_else(|| {
            format!(
                "unknown conv_algo_search \"{s}\" (known: {})",
                Self::ALL.map(ConvAlgoSearch::name).join(", ")
            )
        })
    }
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
        self.engine_cache_path.as_ref().map(|p| {
            if p.is_absolute() {
                p.clone()
            } else {
                ort_env::cache_root().join(p)
            }
        })
    }
}

/// The most intra-op threads a profile or `--threads` may ask for: 4 per core of this
/// machine (`std::thread::available_parallelism`). More only makes the threads wait on
/// each other, and a typo such as 100000 would start that many threads.
pub fn max_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).saturating_mul(4)
}

/// Checks a thread count against [`max_threads`]; the message leaves the naming of the
/// flag or key to the caller.
pub fn check_threads(n: usize) -> Result<(), String> {
    let max = max_threads();
    if n == 0 {
        return Err("must be at least 1".into());
    }
    if n > max {
        return Err(format!(
            "{n} is more than 4 threads per core of this machine's {} cores; use at most {max}",
            max / 4
        ));
    }
    Ok(())
}

impl Profile {
    /// The CPU profile with every key at its default (`providers = ["cpu"]`), the same as
    /// the CLI's built-in `cpu` profile: for tests and callers without a config file.
    pub fn cpu() -> Profile {
        PlainKeys::default().profile(
            "cpu".into(),
            vec![Provider::Cpu],
            BTreeMap::new(),
            GraphOptimization::All,
        )
    }
}

/// A config file or profile that cannot be used, naming the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
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
}

// ---- the file format, as written -------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    profiles: BTreeMap<String, RawProfile>,
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
    graph_optimization: Option<GraphOptimization>,
    keys: PlainKeys,
    /// The last file that set anything in it, for error messages.
    origin: String,
}

impl PartialProfile {
    fn from_raw(raw: RawProfile, name: &str, origin: &str) -> Result<Self, ConfigError> {
        let keys = PlainKeys::of(&raw).map_err(|message| invalid(origin, name, message))?;
        let providers =
            raw.providers.map(|list| parse_provider_list(&list, name, origin)).transpose()?;
        let mut graphs = BTreeMap::new();
        for (graph, g) in raw.graphs {
            if !GRAPHS.contains(&graph.as_str()) {
                return Err(ConfigError::UnknownGraph {
                    origin: origin.into(),
                    profile: name.into(),
                    name: graph,
                });
            }
            graphs.insert(graph, parse_provider_list(&g.providers, name, origin)?);
        }
        let graph_optimization = raw
            .graph_optimization
            .map(|s| s.parse::<GraphOptimization>())
            .transpose()
            .map_err(|message| invalid(origin, name, message))?;
        if let Some(n) = raw.intra_op_threads {
            check_threads(n)
                .map_err(|m| invalid(origin, name, format!("intra_op_threads = {n}: {m}")))?;
        }
        Ok(Self { keys, providers, graphs, graph_optimization, origin: origin.into() })
    }

    /// `over`'s keys win; graph lists are replaced per graph.
    fn overlay(mut self, over: PartialProfile) -> Self {
        self.graphs.extend(over.graphs);
        Self {
            providers: over.providers.or(self.providers),
            graphs: self.graphs,
            graph_optimization: over.graph_optimization.or(self.graph_optimization),
            keys: self.keys.overlay(over.keys),
            origin: over.origin,
        }
    }

    fn resolve(&self, name: &str) -> Result<Profile, ConfigError> {
        let providers = self.providers.clone().ok_or_else(|| {
            invalid(&self.origin, name, "no providers list (e.g. providers = [\"cuda\", \"cpu\"])")
        })?;
        let profile = self.keys.profile(
            name.into(),
            providers,
            self.graphs.clone(),
            self.graph_optimization.unwrap_or_default(),
        );
        if profile.cuda_graph
            && profile.providers_for(GraphKind::LanguageModel.name()).first()
                != Some(&Provider::Cuda)
        {
            return Err(invalid(
                &self.origin,
                name,
                "cuda_graph = true captures the language model on the CUDA provider, so its providers list must start with \"cuda\"",
            ));
        }
        Ok(profile)
    }
}

fn invalid(origin: &str, profile: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::InvalidProfile {
        origin: origin.into(),
        profile: profile.into(),
        message: message.into(),
    }
}

fn parse_provider_list(
    list: &[String],
    profile: &str,
    origin: &str,
) -> Result<Vec<Provider>, ConfigError> {
    let mut out: Vec<Provider> = Vec::with_capacity(list.len());
    for name in list {
        let p = name.parse::<Provider>().map_err(|_| ConfigError::UnknownProvider {
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

/// Execution-provider profiles: one TOML text with any others laid over it.
#[derive(Debug, Clone)]
pub struct Config {
    partial: BTreeMap<String, PartialProfile>,
    profiles: BTreeMap<String, Profile>,
}

impl Config {
    /// A config from one TOML text alone; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut c = Config { partial: BTreeMap::new(), profiles: BTreeMap::new() };
        c.overlay_toml(text, origin)?;
        Ok(c)
    }

    /// Lays a TOML file over this config.
    pub fn overlay_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        self.overlay_toml(&text, &path.display().to_string())
    }

    /// Lays a TOML text over this config, profiles key by key. On error the config is
    /// left unchanged.
    pub fn overlay_toml(&mut self, text: &str, origin: &str) -> Result<(), ConfigError> {
        let raw: RawFile = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { origin: origin.into(), message: e.to_string() })?;
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
    pub fn profile(&self, name: &str) -> Result<&Profile, ConfigError> {
        self.profiles.get(name).ok_or_else(|| ConfigError::UnknownProfile {
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
        assert!("max"
            .parse::<GraphOptimization>()
            .unwrap_err()
            .contains("disable, basic, extended, layout, all"));
    }

    #[test]
    fn cpu_profile_is_the_parsed_defaults() {
        let c = Config::from_toml("[profiles.cpu]\nproviders = [\"cpu\"]\n", "test").unwrap();
        assert_eq!(c.profile("cpu").unwrap(), &Profile::cpu());
    }

    #[test]
    fn thread_counts_beyond_four_per_core_are_refused_naming_the_key() {
        let max = max_threads();
        let ok = format!("[profiles.cpu]\nproviders = [\"cpu\"]\nintra_op_threads = {max}\n");
        assert_eq!(
            Config::from_toml(&ok, "t.toml").unwrap().profile("cpu").unwrap().intra_op_threads,
            Some(max)
        );
        for n in [max + 1, 100_000, 0] {
            let text = format!("[profiles.lean]\nproviders = [\"cpu\"]\nintra_op_threads = {n}\n");
            let err = Config::from_toml(&text, "my.toml").unwrap_err().to_string();
            assert!(
                err.starts_with("my.toml: profile \"lean\": intra_op_threads = ")
                    && err.contains(&n.to_string()),
                "{err}"
            );
        }
    }

    #[test]
    fn conv_algo_search_takes_cudnns_three_modes_and_refuses_others_naming_the_key() {
        for v in ["exhaustive", "heuristic", "default"] {
            let text = format!(
                "[profiles.g]\nproviders = [\"cuda\", \"cpu\"]\nconv_algo_search = \"{v}\"\n"
            );
            let c = Config::from_toml(&text, "g.toml").unwrap();
            assert_eq!(c.profile("g").unwrap().conv_algo_search.map(ConvAlgoSearch::name), Some(v));
        }
        let c = Config::from_toml("[profiles.g]\nproviders = [\"cuda\"]\n", "g.toml").unwrap();
        assert_eq!(c.profile("g").unwrap().conv_algo_search, None);
        let text = "[profiles.g]\nproviders = [\"cuda\"]\nconv_algo_search = \"fastest\"\n";
        let err = Config::from_toml(text, "g.toml").unwrap_err().to_string();
        assert!(
            err.starts_with("g.toml: profile \"g\": unknown conv_algo_search \"fastest\"")
                && err.contains("exhaustive, heuristic, default"),
            "{err}"
        );
    }

    #[test]
    fn failed_overlay_leaves_config_unchanged() {
        let base = "[profiles.cpu]\nproviders = [\"cpu\"]\n[profiles.cuda]\nproviders = [\"cuda\", \"cpu\"]\n";
        let mut c = Config::from_toml(base, "base").unwrap();
        let before = c.profiles().clone();
        let err =
            c.overlay_toml("[profiles.cpu]\nproviders = [\"nope\"]\n", "user.toml").unwrap_err();
        assert!(matches!(err, ConfigError::UnknownProvider { .. }));
        assert_eq!(c.profiles(), &before);
    }
}
