//! The optimized-graph disk cache: a big graph that runs on the CPU alone is saved once
//! after ONNX Runtime's graph optimizations, with its weights in a file ONNX Runtime
//! memory-maps, and later sessions load that copy ([`open`]). Used by
//! [`providers::open_session`](crate::providers::open_session).

use std::path::{Path, PathBuf};

use ort::session::Session;

use crate::config::{GraphOptimization, Profile, Provider};
use crate::ort_env;
use crate::providers::{commit, ProviderError, Warning};

/// Graph files at least this big get an optimized copy; smaller ones load in
/// milliseconds anyway (and the test fixtures stay out of the cache).
pub const OPTIMIZED_CACHE_MIN_BYTES: u64 = 16 << 20;
/// Bumped when the cached files change meaning, so old entries are rebuilt.
const OPTIMIZED_CACHE_VERSION: u32 = 1;

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
pub fn open(
    profile: &Profile,
    graph: &str,
    path: &Path,
    root: &Path,
    warn: &mut dyn FnMut(Warning),
) -> Result<Session, ProviderError> {
    match open_cached(profile, graph, path, root, warn) {
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
    warn: &mut dyn FnMut(Warning),
) -> Result<Session, String> {
    let optimized = cached_graph(profile, path, root)?;
    match commit(profile, graph, &optimized, warn) {
        Ok(session) => Ok(session),
        Err(first) => {
            let entry = optimized.parent().expect("a cached graph lives in its entry folder");
            std::fs::remove_dir_all(entry).map_err(|e| {
                format!("{}: does not load ({first}) and cannot be removed: {e}", entry.display())
            })?;
            let optimized = cached_graph(profile, path, root)?;
            commit(profile, graph, &optimized, warn).map_err(|e| {
                format!("{}: made again, still does not load: {e}", optimized.display())
            })
        }
    }
}

/// FNV-1a: a stable folder name for a source path (std's hasher may change between releases).
fn fnv64(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
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
    let fresh = |d: &Path| {
        std::fs::read_to_string(d.join("stamp")).is_ok_and(|s| s == stamp)
            && d.join("model.onnx").is_file()
    };
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
                stamp
                    .lines()
                    .find_map(|l| l.strip_prefix("source "))
                    .is_some_and(|src| !Path::new(src).exists())
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
}
