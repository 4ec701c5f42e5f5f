//! Finding and loading the ONNX Runtime shared library.
//!
//! ort is built with `load-dynamic`, so nothing is linked at build time: the library is
//! looked up at start-up ([`find_dylib`]) and loaded once ([`init`]). It is installed
//! (by `blip2-ort install-runtime`) into the per-version folder [`cache_dir`] names.
//!
//! Lookup order: `ORT_DYLIB_PATH` (always wins, even when it is wrong, so a user who set
//! it is never silently given another library), then the library its host named with
//! [`prefer_dylib`] (the Python module: the `onnxruntime` wheel installed beside it), then
//! the GPU cache, then the CPU cache.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;

/// The ONNX Runtime release this build is made for (ort 2.0.0-rc.15 speaks API 31).
pub const ORT_VERSION: &str = "1.31.1";

/// Environment variable naming the library file directly; honoured before any cache.
pub const DYLIB_ENV: &str = "ORT_DYLIB_PATH";
/// Environment variable replacing the whole blip2-ort cache root.
pub const CACHE_ENV: &str = "BLIP2_ORT_CACHE";

#[derive(Debug, thiserror::Error)]
pub enum RuntimeSetupError {
    #[error("{var} is set to {path}, but there is no file there (unset it to use the library installed by `blip2-ort install-runtime`)", var = DYLIB_ENV, path = .0.display())]
    DylibEnvMissing(PathBuf),
    #[error(
        "ONNX Runtime {ver} is not installed (looked for {searched}); \
         install it with `blip2-ort install-runtime` (CPU) or `blip2-ort install-runtime --gpu` \
         (CUDA and TensorRT), or point {var} at a libonnxruntime of version {ver}.",
        ver = ORT_VERSION,
        var = DYLIB_ENV,
        searched = .searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    NotInstalled { searched: Vec<PathBuf> },
    #[error("{path}: cannot load ONNX Runtime: {message}", path = .path.display())]
    Load { path: PathBuf, message: String },
    #[error("cannot create the ONNX Runtime environment: {0}")]
    Environment(ort::Error),
}

/// Reads an environment variable, treating an empty value as unset (as shells often
/// leave `VAR=` behind).
fn env_nonempty(name: &str) -> Option<OsString> {
    std::env::var_os(name).filter(|v| !v.is_empty())
}

/// The blip2-ort cache root: `$BLIP2_ORT_CACHE`, else `$XDG_CACHE_HOME/blip2-ort`, else
/// `~/.cache/blip2-ort`. Runtimes and exported models live below it.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = env_nonempty(CACHE_ENV) {
        return PathBuf::from(dir);
    }
    if let Some(xdg) = env_nonempty("XDG_CACHE_HOME") {
        return PathBuf::from(xdg).join("blip2-ort");
    }
    let home = env_nonempty("HOME").or_else(|| env_nonempty("USERPROFILE")).map(PathBuf::from);
    // No home at all (some containers): a temp folder beats failing outright.
    home.unwrap_or_else(std::env::temp_dir).join(".cache").join("blip2-ort")
}

/// The folder name of one runtime flavour under the cache root.
pub fn runtime_dir_name(gpu: bool) -> String {
    format!("{}-{ORT_VERSION}", package_name(gpu))
}

/// `onnxruntime` or `onnxruntime-gpu`: the wheel's package name, also the cache folder stem.
pub fn package_name(gpu: bool) -> &'static str {
    if gpu {
        "onnxruntime-gpu"
    } else {
        "onnxruntime"
    }
}

/// Where the CPU or GPU runtime lives: `cache_root()/onnxruntime[-gpu]-1.31.1`.
pub fn cache_dir(gpu: bool) -> PathBuf {
    cache_root().join(runtime_dir_name(gpu))
}

/// The main library's file name as the wheels ship it on this OS.
pub fn dylib_file_name() -> String {
    if cfg!(target_os = "windows") {
        "onnxruntime.dll".to_string()
    } else if cfg!(target_os = "macos") {
        format!("libonnxruntime.{ORT_VERSION}.dylib")
    } else {
        format!("libonnxruntime.so.{ORT_VERSION}")
    }
}

/// The library [`prefer_dylib`] named, if any.
static PREFERRED: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Names a library to load before the caches (after `ORT_DYLIB_PATH`), used when it is
/// a file: the Python module passes the one in the `onnxruntime` wheel beside it. Only
/// matters before the first [`init`].
pub fn prefer_dylib(path: PathBuf) {
    *PREFERRED.lock().unwrap_or_else(|p| p.into_inner()) = Some(path);
}

/// Finds the library to load; see the module docs for the order.
pub fn find_dylib() -> Result<PathBuf, RuntimeSetupError> {
    let preferred = PREFERRED.lock().unwrap_or_else(|p| p.into_inner()).clone();
    find_dylib_in(env_nonempty(DYLIB_ENV), preferred, &cache_root())
}

/// [`find_dylib`] with its inputs explicit, so tests need not touch the process environment.
pub(crate) fn find_dylib_in(
    dylib_env: Option<OsString>,
    preferred: Option<PathBuf>,
    root: &Path,
) -> Result<PathBuf, RuntimeSetupError> {
    if let Some(p) = dylib_env {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { Err(RuntimeSetupError::DylibEnvMissing(p)) };
    }
    let searched: Vec<PathBuf> = preferred
        .into_iter()
        .chain(
            [true, false]
                .iter()
                .map(|&gpu| root.join(runtime_dir_name(gpu)).join(dylib_file_name())),
        )
        .collect();
    match searched.iter().find(|p| p.is_file()) {
        Some(p) => Ok(p.clone()),
        None => Err(RuntimeSetupError::NotInstalled { searched }),
    }
}

/// The process-wide environment and the library it was loaded from. ort allows one
/// environment per process, and sessions hold it by reference, so it lives forever.
static ENV: OnceLock<(Environment, PathBuf)> = OnceLock::new();
/// Serialises first-time initialisation so two threads never race to load the library.
static INIT_LOCK: Mutex<()> = Mutex::new(());

/// Loads ONNX Runtime and creates the environment, once; later calls return at once.
/// Call it before any other ort API: ort would otherwise load a library on its own.
pub fn init() -> Result<(), RuntimeSetupError> {
    environment().map(|_| ())
}

/// [`init`], with one intra-op thread pool of `intra_op_threads` threads (`None`: ONNX
/// Runtime's default, one per physical core) shared by every session of the process
/// instead of a pool per session. A pipeline runs its sessions one after another; with a
/// pool each, the threads of the session that just finished keep spinning for work
/// while the next one runs, and on a machine with few cores that costs ~15% of a
/// caption (measured in docs/PERFORMANCE.md). The server's image stage runs the vision
/// encoder beside the language model (from two threads): they then share this pool's
/// threads rather than each bringing its own. Sessions' own thread counts are then
/// ignored. Only the first initialisation of the process decides.
pub fn init_with_threads(intra_op_threads: Option<usize>) -> Result<(), RuntimeSetupError> {
    environment_with(Some(intra_op_threads.unwrap_or(0))).map(|_| ())
}

/// The environment sessions are built in (`Session::builder(environment()?)`);
/// initialises on first use.
pub fn environment() -> Result<&'static Environment, RuntimeSetupError> {
    environment_with(None)
}

/// The environment, created with a shared pool of `shared_pool` threads (0: default)
/// if this call creates it.
fn environment_with(shared_pool: Option<usize>) -> Result<&'static Environment, RuntimeSetupError> {
    if let Some((env, _)) = ENV.get() {
        return Ok(env);
    }
    let _guard = INIT_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((env, _)) = ENV.get() {
        return Ok(env);
    }
    let path = find_dylib()?;
    let builder = ort::init_from(&path)
        .map_err(|e| RuntimeSetupError::Load { path: path.clone(), message: e.to_string() })?;
    let mut builder = builder.with_name("blip2-ort").with_telemetry(false);
    if let Some(n) = shared_pool {
        let pool = ort::environment::GlobalThreadPoolOptions::default()
            .with_intra_threads(n)
            .and_then(|o| o.with_inter_threads(1))
            .map_err(RuntimeSetupError::Environment)?;
        builder = builder.with_global_thread_pool(pool);
    }
    let env = builder.build().map_err(RuntimeSetupError::Environment)?;
    let _ = ENV.set((env, path));
    Ok(&ENV.get().expect("set just above").0)
}

/// The library file [`init`] loaded, if it ran.
pub fn loaded_dylib() -> Option<&'static Path> {
    ENV.get().map(|(_, p)| p.as_path())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh empty folder under the system temp dir, removed on drop.
    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(tag: &str) -> Scratch {
        let p =
            std::env::temp_dir().join(format!("blip2-ort-env-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    #[test]
    fn runtime_dirs_are_versioned() {
        assert_eq!(runtime_dir_name(false), "onnxruntime-1.31.1");
        assert_eq!(runtime_dir_name(true), "onnxruntime-gpu-1.31.1");
        assert!(cache_dir(true).ends_with("onnxruntime-gpu-1.31.1"));
        assert!(cache_dir(false).starts_with(cache_root()));
    }

    #[test]
    fn dylib_env_wins_and_must_exist() {
        let root = scratch("env");
        let missing = root.0.join("nope.so");
        let err = find_dylib_in(Some(missing.clone().into()), None, &root.0).unwrap_err();
        assert!(matches!(err, RuntimeSetupError::DylibEnvMissing(ref p) if *p == missing));
        assert!(err.to_string().contains("ORT_DYLIB_PATH"), "{err}");

        // Set and present: used even though the cache is empty.
        let lib = root.0.join("custom.so");
        std::fs::write(&lib, b"x").unwrap();
        assert_eq!(find_dylib_in(Some(lib.clone().into()), None, &root.0).unwrap(), lib);
        // Before a preferred library too.
        let other = root.0.join("other.so");
        std::fs::write(&other, b"x").unwrap();
        assert_eq!(find_dylib_in(Some(lib.clone().into()), Some(other), &root.0).unwrap(), lib);
    }

    #[test]
    fn gpu_cache_before_cpu_cache() {
        let root = scratch("order");
        let err = find_dylib_in(None, None, &root.0).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("`blip2-ort install-runtime`")
                && msg.contains("`blip2-ort install-runtime --gpu`"),
            "{msg}"
        );

        let cpu = root.0.join(runtime_dir_name(false));
        std::fs::create_dir_all(&cpu).unwrap();
        std::fs::write(cpu.join(dylib_file_name()), b"x").unwrap();
        assert_eq!(find_dylib_in(None, None, &root.0).unwrap(), cpu.join(dylib_file_name()));

        let gpu = root.0.join(runtime_dir_name(true));
        std::fs::create_dir_all(&gpu).unwrap();
        std::fs::write(gpu.join(dylib_file_name()), b"x").unwrap();
        assert_eq!(find_dylib_in(None, None, &root.0).unwrap(), gpu.join(dylib_file_name()));

        // A preferred library comes before both caches when it is there, and is named
        // among the places searched when nothing is found.
        let wheel = root.0.join("wheel").join(dylib_file_name());
        let err = find_dylib_in(None, Some(wheel.clone()), &root.0.join("empty")).unwrap_err();
        assert!(err.to_string().contains(&wheel.display().to_string()), "{err}");
        assert_eq!(
            find_dylib_in(None, Some(wheel.clone()), &root.0).unwrap(),
            gpu.join(dylib_file_name())
        );
        std::fs::create_dir_all(wheel.parent().unwrap()).unwrap();
        std::fs::write(&wheel, b"x").unwrap();
        assert_eq!(find_dylib_in(None, Some(wheel.clone()), &root.0).unwrap(), wheel);
    }
}
