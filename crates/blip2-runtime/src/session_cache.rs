//! The optimized-graph disk cache: a big graph that runs on the CPU alone is saved once
//! after ONNX Runtime's graph optimizations, with its weights in a file ONNX Runtime
//! memory-maps, and later sessions load that copy ([`open`]). Used by
//! [`open_session`].

use std::path::{Path, PathBuf};

use ort::session::Session;

use crate::config::{GraphOptimization, Profile, Provider};
use crate::ort_env;
use crate::providers::{commit, ProviderError, Warning};
use blip2_core::GraphKind;

/// Graph files at least this big get an optimized copy; smaller ones load in
/// milliseconds anyway (and the test fixtures stay out of the cache).
pub const OPTIMIZED_CACHE_MIN_BYTES: u64 = 16 << 20;
/// Bumped when the cached files change meaning, so old entries are rebuilt.
const OPTIMIZED_CACHE_VERSION: u32 = 1;
/// Environment variable: the most the optimized-graph cache may hold (`20G`, `500M`,
/// bytes); least recently used entries beyond it are removed.
pub const OPTIMIZED_CACHE_MAX_ENV: &str = "BLIP2_ORT_OPTIMIZED_CACHE_MAX";
/// The default bound of the optimized-graph cache: 20 GiB (the three graphs of
/// OPT-2.7B in fp32 take about 15 GB).
pub const DEFAULT_OPTIMIZED_CACHE_MAX_BYTES: u64 = 20 << 30;
/// Temporary folders of an interrupted start are removed once this old.
const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// Reads a size: bytes, or a number with `K`, `M`, `G` or `T` (powers of 1024; `KB`,
/// `MiB` ... also accepted), e.g. `20G`, `512M`, `1.5G`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => {
            return Err(format!(
                "{text:?} is not a size (bytes, or a number with K, M, G or T, e.g. 20G)"
            ))
        }
    };
    let value: f64 = num.parse().map_err(|_| {
        format!("{text:?} is not a size (bytes, or a number with K, M, G or T, e.g. 20G)")
    })?;
    Ok((value * (1u64 << shift) as f64) as u64)
}

/// The cache's bound: `$BLIP2_ORT_OPTIMIZED_CACHE_MAX` when set, else
/// [`DEFAULT_OPTIMIZED_CACHE_MAX_BYTES`]; a malformed value is an error naming the variable.
pub fn max_bytes() -> Result<u64, String> {
    match std::env::var(OPTIMIZED_CACHE_MAX_ENV) {
        Ok(v) if !v.trim().is_empty() => {
            parse_size(&v).map_err(|e| format!("{OPTIMIZED_CACHE_MAX_ENV}: {e}"))
        }
        _ => Ok(DEFAULT_OPTIMIZED_CACHE_MAX_BYTES),
    }
}

/// What a cache folder is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryStatus {
    /// The optimized copy of a graph file that is still there, unchanged.
    Current,
    /// Its graph file is gone (a deleted or moved export).
    SourceGone,
    /// Its graph file was written again since (a re-export): the copy is never used again.
    SourceChanged,
    /// A temporary folder of a start still running, or interrupted (`.tmp-PID`), or a
    /// folder without a readable stamp.
    Partial,
}

/// One folder of the optimized-graph cache.
#[derive(Clone, Debug)]
pub struct CacheEntry {
    pub path: PathBuf,
    /// The graph file it is the optimized copy of (from its stamp).
    pub source: Option<PathBuf>,
    /// Bytes of its files.
    pub bytes: u64,
    /// When a session last loaded it (or it was made).
    pub last_used: std::time::SystemTime,
    pub status: EntryStatus,
}

fn folder_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => folder_bytes(&e.path()),
            _ => e.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}

fn mtime_nanos(meta: &std::fs::Metadata) -> u128 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos())
}

/// Every folder of the cache under `root`, most recently used first (none when `root`
/// does not exist).
pub fn entries(root: &Path) -> Vec<CacheEntry> {
    let Ok(list) = std::fs::read_dir(root) else { return Vec::new() };
    let mut out: Vec<CacheEntry> = list
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let stamp_file = path.join("stamp");
            let stamp = std::fs::read_to_string(&stamp_file).ok();
            let field = |k: &str| {
                stamp
                    .as_deref()
                    .and_then(|s| s.lines().find_map(|l| l.strip_prefix(k).map(str::to_string)))
            };
            let source = field("source ").map(PathBuf::from);
            let last_used = std::fs::metadata(&stamp_file)
                .or_else(|_| e.metadata())
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            let status = match (&source, name.contains(".tmp-")) {
                (_, true) | (None, _) => EntryStatus::Partial,
                (Some(src), false) => match std::fs::metadata(src) {
                    Err(_) => EntryStatus::SourceGone,
                    Ok(m) => {
                        let same = field("size ").is_some_and(|v| v == m.len().to_string())
                            && field("mtime ").is_some_and(|v| v == mtime_nanos(&m).to_string());
                        if same {
                            EntryStatus::Current
                        } else {
                            EntryStatus::SourceChanged
                        }
                    }
                },
            };
            CacheEntry { bytes: folder_bytes(&path), path, source, last_used, status }
        })
        .collect();
    out.sort_by(|a, b| b.last_used.cmp(&a.last_used).then_with(|| a.path.cmp(&b.path)));
    out
}

/// Removes what the cache under `root` no longer needs, and returns what it removed:
/// copies whose graph file is gone or was written again, temporary folders older than an
/// hour, then the least recently used copies until the rest fit in `max_bytes`. Folders
/// in `keep` (the copies in use) are never removed.
pub fn prune(root: &Path, max_bytes: u64, keep: &[&Path]) -> Vec<CacheEntry> {
    let mut removed = Vec::new();
    let mut total = 0u64;
    for e in entries(root) {
        let kept = keep.iter().any(|k| *k == e.path);
        let drop = !kept
            && match e.status {
                EntryStatus::SourceGone | EntryStatus::SourceChanged => true,
                EntryStatus::Partial => {
                    e.last_used.elapsed().is_ok_and(|age| age > ABANDONED_AFTER)
                }
                // Most recently used first: what no longer fits is the least recent.
                EntryStatus::Current => total + e.bytes > max_bytes,
            };
        if drop {
            if std::fs::remove_dir_all(&e.path).is_ok() {
                removed.push(e);
            }
        } else if e.status == EntryStatus::Current || kept {
            total += e.bytes;
        }
    }
    removed
}

/// Removes every folder of the cache under `root` and returns what was removed.
pub fn clear(root: &Path) -> Vec<CacheEntry> {
    entries(root).into_iter().filter(|e| std::fs::remove_dir_all(&e.path).is_ok()).collect()
}

/// Marks a cached copy as used now (its stamp's modification time), for the
/// least-recently-used order.
fn touch(dir: &Path) {
    if let Ok(f) = std::fs::File::options().write(true).open(dir.join("stamp")) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

/// The cache folder sessions use by default: `cache_root()/optimized`.
pub fn optimized_cache_root() -> PathBuf {
    ort_env::cache_root().join("optimized")
}

/// Whether the cache is for this graph: the CPU provider alone (GPU providers rewrite the
/// graph for their device), optimizations on, and a graph file of at least
/// [`OPTIMIZED_CACHE_MIN_BYTES`]. (Whether to use a cache at all is the caller's choice.)
pub fn applies(profile: &Profile, graph: &str, path: &Path) -> bool {
    profile.providers_for(graph).iter().all(|p| *p == Provider::Cpu)
        && profile.graph_optimization != GraphOptimization::Disable
        && std::fs::metadata(path).is_ok_and(|m| m.len() >= OPTIMIZED_CACHE_MIN_BYTES)
}

/// A session for `path` from its optimized copy under `root`, made now if needed.
///
/// The cached copy is the graph after ONNX Runtime's basic and extended optimizations
/// (the fusions; layout changes are hardware-specific and are redone at every load),
/// weights in an external data file that ONNX Runtime memory-maps. It is keyed by the
/// source's path, size and modification time, the ONNX Runtime version and the level, so
/// a re-export or another library rebuilds it. The first start writes it and then loads
/// it like every later start, so all starts run the same graph. A cached copy that no
/// longer loads (a truncated or damaged file) is deleted and made again, once. Any failure
/// to cache (read-only cache, full disk) is a [`Warning`] and the original graph is loaded.
/// Each use marks the copy as used and then [`prune`]s the cache to its bound
/// ([`max_bytes`]): copies of deleted or re-exported graphs go, then the least recently
/// used ones beyond the bound (never the copy being loaded).
pub fn open(
    profile: &Profile,
    graph: &str,
    path: &Path,
    root: &Path,
    warn: &mut dyn FnMut(Warning),
) -> Result<Session, ProviderError> {
    let max = max_bytes().unwrap_or_else(|e| {
        warn(Warning(format!("{e}; keeping the optimized-graph cache within the default bound")));
        DEFAULT_OPTIMIZED_CACHE_MAX_BYTES
    });
    match open_cached(profile, graph, path, root, max, warn) {
        Ok(session) => Ok(session),
        Err(reason) => {
            warn(Warning(format!(
                "{}: cannot use the optimized-graph cache ({reason}); loading the original",
                path.display()
            )));
            commit(profile, graph, path, warn)
        }
    }
}

/// Loads the cached copy of `path`, making it first if needed, and making it again once
/// if it does not load.
fn open_cached(
    profile: &Profile,
    graph: &str,
    path: &Path,
    root: &Path,
    max: u64,
    warn: &mut dyn FnMut(Warning),
) -> Result<Session, String> {
    let optimized = cached_graph(profile, path, root, max)?;
    match commit(profile, graph, &optimized, warn) {
        Ok(session) => Ok(session),
        Err(first) => {
            let entry = optimized.parent().expect("a cached graph lives in its entry folder");
            std::fs::remove_dir_all(entry).map_err(|e| {
                format!("{}: does not load ({first}) and cannot be removed: {e}", entry.display())
            })?;
            let optimized = cached_graph(profile, path, root, max)?;
            commit(profile, graph, &optimized, warn).map_err(|e| {
                format!("{}: made again, still does not load: {e}", optimized.display())
            })
        }
    }
}

/// The optimized copy of `path` under `root`, made now if missing or stale.
fn cached_graph(profile: &Profile, path: &Path, root: &Path, max: u64) -> Result<PathBuf, String> {
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
    let key = format!("{:016x}", blip2_core::hash::fnv64(source.as_os_str().as_encoded_bytes()));
    let dir = root.join(&key);
    let model = dir.join("model.onnx");
    let fresh = |d: &Path| {
        std::fs::read_to_string(d.join("stamp")).is_ok_and(|s| s == stamp)
            && d.join("model.onnx").is_file()
    };
    if fresh(&dir) {
        touch(&dir);
        prune(root, max, &[&dir]);
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
        prune(root, max, &[&dir]);
    }
    match written {
        Ok(()) => Ok(model),
        // Another process may have put the same copy in place first.
        Err(_) if fresh(&dir) => Ok(model),
        Err(e) => Err(e),
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
            b.with_config_entry(
                "session.optimized_model_external_initializers_file_name",
                "model.onnx.data",
            )
            .map_err(Into::into)
        })
        .and_then(|b| {
            // Small tensors stay in the graph; big ones go to the mapped file.
            b.with_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes",
                "4096",
            )
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

/// [`apply`](crate::providers::apply)s the profile and loads the model.
///
/// `optimized_cache` is the folder of the optimized-graph cache the caller allows
/// (usually [`optimized_cache_root`]; `None` turns it off). A graph the
/// cache [`applies`] to is loaded from an optimized copy there,
/// made on first use: later starts skip the graph optimizations and memory-map the
/// weights instead of parsing and copying them, which starts faster and keeps less
/// memory resident. Warnings (a provider fallen back from, a cache that could not be
/// used) go to `warn`.
pub fn open_session(
    profile: &Profile,
    graph: &str,
    path: &Path,
    optimized_cache: Option<&Path>,
    warn: &mut dyn FnMut(Warning),
) -> Result<Session, ProviderError> {
    match optimized_cache.filter(|_| applies(profile, graph, path)) {
        Some(root) => open(profile, graph, path, root, warn),
        None => commit(profile, graph, path, warn),
    }
}

/// A factory of every graph's session on `profile` (what [`crate::model::Blip2Model::load`]
/// takes), through the optimized-graph cache in `optimized_cache` when given, warnings to
/// `warn`. The profile's `cuda_graph` applies to the language model's own session alone;
/// every other graph (its `kv_reorder` helper included) is built without it.
pub fn session_factory(
    profile: Profile,
    optimized_cache: Option<PathBuf>,
    mut warn: impl FnMut(Warning) + 'static,
) -> Box<crate::model::SessionFactory<'static>> {
    let uncaptured = Profile { cuda_graph: false, ..profile.clone() };
    Box::new(move |kind: GraphKind, path: &Path| {
        let p = if kind == GraphKind::LanguageModel { &profile } else { &uncaptured };
        open_session(p, kind.name(), path, optimized_cache.as_deref(), &mut warn)
            .map_err(crate::error::RuntimeError::Session)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `c = a + b` over float[3] (the same model as tests/providers.rs).
    const ADD_ONNX: [u8; 80] = [
        8, 8, 58, 70, 10, 14, 10, 1, 97, 10, 1, 98, 18, 1, 99, 34, 3, 65, 100, 100, 18, 1, 103, 90,
        15, 10, 1, 97, 18, 10, 10, 8, 8, 1, 18, 4, 10, 2, 8, 3, 90, 15, 10, 1, 98, 18, 10, 10, 8,
        8, 1, 18, 4, 10, 2, 8, 3, 98, 15, 10, 1, 99, 18, 10, 10, 8, 8, 1, 18, 4, 10, 2, 8, 3, 66,
        4, 10, 0, 16, 13,
    ];

    /// A fresh folder holding the Add graph, and the cache folder to use beside it.
    fn scratch(test: &str) -> (PathBuf, PathBuf, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("blip2-ort-optcache-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let model = dir.join("add.onnx");
        std::fs::write(&model, ADD_ONNX).unwrap();
        let cache = dir.join("cache");
        (dir, model, cache)
    }

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
        let (dir, model, cache) = scratch("made-once");
        let profile = Profile::cpu();
        // A session and the warnings opening it gave.
        let open_warned = |path: &Path, cache: &Path| {
            let mut warnings = Vec::new();
            let s = open(&profile, "qformer", path, cache, &mut |w| warnings.push(w)).unwrap();
            (s, warnings)
        };
        let open = |cache: &Path| {
            let (s, warnings) = open_warned(&model, cache);
            assert_eq!(warnings, [], "a cache that works warns of nothing");
            s
        };

        let mut s = open(&cache);
        assert_eq!(run_add(&mut s), [11.0, 22.0, 33.0]);
        let entries: Vec<PathBuf> =
            std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
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
        let _ = open_warned(&other, &cache);
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 2);
        std::fs::remove_file(&other).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&model, ADD_ONNX).unwrap();
        let _ = open(&cache);
        assert_eq!(
            std::fs::read_dir(&cache).unwrap().count(),
            1,
            "the copy of the deleted graph is pruned"
        );

        // A cache that cannot be written is no error: the original graph loads.
        let blocked = dir.join("not-a-folder");
        std::fs::write(&blocked, b"").unwrap();
        let (mut s, warnings) = open_warned(&model, &blocked.join("cache"));
        assert_eq!(run_add(&mut s), [11.0, 22.0, 33.0]);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        let said = warnings[0].to_string();
        assert!(
            said.starts_with(&format!(
                "{}: cannot use the optimized-graph cache (",
                model.display()
            )) && said.ends_with("); loading the original"),
            "{said}"
        );

        // Small graphs and GPU profiles are never cached.
        assert!(!applies(&profile, "qformer", &model));
        let cuda = Profile {
            name: "cuda".into(),
            providers: vec![Provider::Cuda, Provider::Cpu],
            ..Profile::cpu()
        };
        std::fs::write(&model, vec![0u8; OPTIMIZED_CACHE_MIN_BYTES as usize]).unwrap();
        assert!(applies(&profile, "qformer", &model));
        assert!(!applies(&cuda, "qformer", &model));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_broken_cached_graph_is_made_again() {
        if ort_env::find_dylib().is_err() {
            eprintln!("note: skipping, the ONNX Runtime library is not installed");
            return;
        }
        let (dir, model, cache) = scratch("broken");
        let profile = Profile::cpu();
        let open = || {
            open(&profile, "qformer", &model, &cache, &mut |w| panic!("unexpected warning: {w}"))
                .unwrap()
        };
        drop(open());
        let entry = std::fs::read_dir(&cache).unwrap().next().unwrap().unwrap().path();
        let good = std::fs::read(entry.join("model.onnx")).unwrap();
        // Damage the copy but keep its stamp: it still looks current.
        std::fs::write(entry.join("model.onnx"), &good[..good.len() / 2]).unwrap();
        let mut s = open();
        assert_eq!(run_add(&mut s), [11.0, 22.0, 33.0]);
        assert_eq!(
            std::fs::read(entry.join("model.onnx")).unwrap(),
            good,
            "the broken copy is made again"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A cache folder as [`cached_graph`] leaves it, for `source`, with `bytes` of graph,
    /// last used `age_s` seconds ago.
    fn fake_entry(root: &Path, name: &str, source: &Path, bytes: usize, age_s: u64) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model.onnx"), vec![0u8; bytes]).unwrap();
        let stamp = match std::fs::metadata(source) {
            Ok(m) => format!(
                "blip2-ort optimized graph v1\nsource {}\nsize {}\nmtime {}\n",
                source.display(),
                m.len(),
                mtime_nanos(&m)
            ),
            Err(_) => format!(
                "blip2-ort optimized graph v1\nsource {}\nsize 1\nmtime 1\n",
                source.display()
            ),
        };
        std::fs::write(dir.join("stamp"), stamp).unwrap();
        let when = std::time::SystemTime::now() - std::time::Duration::from_secs(age_s);
        std::fs::File::options()
            .write(true)
            .open(dir.join("stamp"))
            .unwrap()
            .set_modified(when)
            .unwrap();
        dir
    }

    fn names(entries: &[CacheEntry]) -> Vec<String> {
        entries.iter().map(|e| e.path.file_name().unwrap().to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn prune_evicts_the_least_recently_used_beyond_the_bound() {
        let (dir, _model, cache) = scratch("lru");
        let src = |n: &str| {
            let p = dir.join(n);
            std::fs::write(&p, n).unwrap();
            p
        };
        // Used 10, 20, 30 and 40 s ago; 1000 bytes of graph each.
        let a = fake_entry(&cache, "a", &src("a.onnx"), 1000, 10);
        fake_entry(&cache, "b", &src("b.onnx"), 1000, 20);
        fake_entry(&cache, "c", &src("c.onnx"), 1000, 30);
        let d = fake_entry(&cache, "d", &src("d.onnx"), 1000, 40);
        let listed = entries(&cache);
        assert_eq!(names(&listed), ["a", "b", "c", "d"], "most recently used first");
        assert!(listed.iter().all(|e| e.status == EntryStatus::Current && e.bytes > 1000));
        let total: u64 = listed.iter().map(|e| e.bytes).sum();

        // Within the bound: nothing goes.
        assert!(prune(&cache, total, &[]).is_empty());
        // Room for two: the two least recently used go, oldest first.
        assert_eq!(names(&prune(&cache, 2500, &[])), ["c", "d"]);
        assert_eq!(names(&entries(&cache)), ["a", "b"]);
        // Using an entry (as a load does) makes it the most recent.
        touch(&cache.join("b"));
        assert_eq!(names(&entries(&cache)), ["b", "a"]);
        assert_eq!(names(&prune(&cache, 1500, &[])), ["a"]);
        assert!(!a.exists() && !d.exists());
        // The copy in use stays even when it alone is over the bound.
        let b = cache.join("b");
        assert!(prune(&cache, 10, &[b.as_path()]).is_empty());
        assert_eq!(names(&prune(&cache, 10, &[])), ["b"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn prune_drops_copies_of_deleted_or_rewritten_graphs_and_old_temporaries() {
        let (dir, _model, cache) = scratch("orphans");
        let kept_src = dir.join("kept.onnx");
        std::fs::write(&kept_src, "k").unwrap();
        let gone_src = dir.join("export-gone/language_model.onnx");
        std::fs::create_dir_all(gone_src.parent().unwrap()).unwrap();
        std::fs::write(&gone_src, "g").unwrap();
        let changed_src = dir.join("changed.onnx");
        std::fs::write(&changed_src, "c").unwrap();
        fake_entry(&cache, "kept", &kept_src, 10, 50);
        fake_entry(&cache, "gone", &gone_src, 10, 1);
        fake_entry(&cache, "changed", &changed_src, 10, 2);
        // A temporary folder of a start interrupted two hours ago, and one still running.
        let old_tmp = cache.join("0123.tmp-999999");
        std::fs::create_dir_all(&old_tmp).unwrap();
        std::fs::File::open(&old_tmp)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(7200))
            .unwrap();
        let new_tmp = cache.join("4567.tmp-999998");
        std::fs::create_dir_all(&new_tmp).unwrap();
        // The export is deleted; the other graph is written again (a re-export).
        std::fs::remove_dir_all(gone_src.parent().unwrap()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&changed_src, "c2").unwrap();
        let status = |n: &str| {
            entries(&cache).into_iter().find(|e| e.path.ends_with(n)).map(|e| e.status).unwrap()
        };
        assert_eq!(status("kept"), EntryStatus::Current);
        assert_eq!(status("gone"), EntryStatus::SourceGone);
        assert_eq!(status("changed"), EntryStatus::SourceChanged);
        assert_eq!(status("0123.tmp-999999"), EntryStatus::Partial);
        let gone = entries(&cache).into_iter().find(|e| e.path.ends_with("gone")).unwrap();
        assert_eq!(gone.source.as_deref(), Some(gone_src.as_path()));

        let mut removed = names(&prune(&cache, u64::MAX, &[]));
        removed.sort();
        assert_eq!(removed, ["0123.tmp-999999", "changed", "gone"]);
        let mut left = names(&entries(&cache));
        left.sort();
        assert_eq!(left, ["4567.tmp-999998", "kept"]);
        assert_eq!(names(&clear(&cache)).len(), 2);
        assert!(entries(&cache).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_load_marks_its_copy_used_and_drops_copies_of_deleted_graphs() {
        if ort_env::find_dylib().is_err() {
            eprintln!("note: skipping, the ONNX Runtime library is not installed");
            return;
        }
        let (dir, model, cache) = scratch("bound");
        let profile = Profile::cpu();
        // An old copy of another graph, and one of a graph since deleted.
        let other = dir.join("other.onnx");
        std::fs::write(&other, ADD_ONNX).unwrap();
        fake_entry(&cache, "other", &other, 1000, 3600);
        fake_entry(&cache, "deleted", &dir.join("deleted.onnx"), 1000, 1);
        let mut warnings = Vec::new();
        drop(open(&profile, "qformer", &model, &cache, &mut |w| warnings.push(w)).unwrap());
        assert_eq!(warnings, []);
        let listed = entries(&cache);
        assert_eq!(listed.len(), 2, "the deleted graph's copy is dropped: {listed:?}");
        assert_eq!(listed[0].source.as_deref(), Some(model.canonicalize().unwrap().as_path()));
        assert_eq!(names(&listed)[1], "other");
        // Loading again marks it used: it stays the most recent.
        let fresh = listed[0].clone();
        std::fs::File::options()
            .write(true)
            .open(fresh.path.join("stamp"))
            .unwrap()
            .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(7200))
            .unwrap();
        assert_eq!(names(&entries(&cache))[0], "other");
        drop(open(&profile, "qformer", &model, &cache, &mut |w| panic!("{w}")).unwrap());
        assert_eq!(entries(&cache)[0].path, fresh.path, "a load marks its copy used");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sizes_read_as_bytes_or_with_binary_units() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("20G"), Ok(20 << 30));
        assert_eq!(parse_size("512 MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_size("0"), Ok(0));
        let e = parse_size("lots").unwrap_err();
        assert!(e.contains("\"lots\" is not a size"), "{e}");
        assert!(parse_size("5X").is_err());
    }
}
