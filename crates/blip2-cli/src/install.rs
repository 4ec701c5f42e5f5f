//! `blip2-ort install-runtime`: fetches the ONNX Runtime library from the official
//! `onnxruntime` / `onnxruntime-gpu` Python wheels with pip, because that is the one
//! channel that is reachable everywhere pip is, and unpacks only the shared libraries into
//! the per-version cache folder where the runtime looks for them
//! ([`blip2_runtime::ort_env::cache_dir`], [`blip2_runtime::ort_env::find_dylib`]).

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use blip2_runtime::ort_env::{
    cache_root, dylib_file_name, package_name, runtime_dir_name, ORT_VERSION,
};

/// Environment variable naming the Python interpreter `install` runs (default `python3`).
pub const PYTHON_ENV: &str = "BLIP2_ORT_PYTHON";

/// How many lines of pip's stderr an error keeps: enough for pip's own explanation,
/// short enough to read.
const PIP_TAIL_LINES: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot run {python} (needed by `blip2-ort install-runtime` to download the onnxruntime wheel with pip; set {var} to another interpreter): {source}", python = .python.to_string_lossy(), var = PYTHON_ENV)]
    PythonMissing { python: OsString, source: std::io::Error },
    #[error("`{command}` failed ({status}):\n{stderr_tail}")]
    Pip { command: String, status: String, stderr_tail: String },
    #[error("`{command}` succeeded but left no .whl file in {dir}", dir = .dir.display())]
    NoWheel { command: String, dir: PathBuf },
    #[error("{wheel}: cannot extract the libraries ({status}):\n{stderr_tail}", wheel = .wheel.display())]
    Extract { wheel: PathBuf, status: String, stderr_tail: String },
    #[error("{wheel}: the wheel has no {wanted}", wheel = .wheel.display())]
    WheelMissingLibrary { wheel: PathBuf, wanted: String },
    #[error("{path}: {source}", path = .path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io { path: path.to_path_buf(), source }
}

/// The interpreter `install` runs: `$BLIP2_ORT_PYTHON` (unless empty) or `python3`.
fn python_program() -> OsString {
    std::env::var_os(PYTHON_ENV)
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| OsString::from(if cfg!(windows) { "python" } else { "python3" }))
}

/// Downloads the `onnxruntime` (or `onnxruntime-gpu`) wheel of [`ORT_VERSION`] with pip
/// and unpacks its shared libraries into [`blip2_runtime::ort_env::cache_dir`]; returns
/// the main library's path. Does nothing but return the path when the cache already
/// holds it.
pub fn install(gpu: bool, progress: &mut dyn FnMut(&str)) -> Result<PathBuf, InstallError> {
    install_with(&python_program(), &cache_root(), gpu, progress)
}

/// [`install`] with the interpreter and the cache root explicit (for tests).
fn install_with(
    python: &OsStr,
    root: &Path,
    gpu: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, InstallError> {
    let dir_name = runtime_dir_name(gpu);
    let final_dir = root.join(&dir_name);
    let lib = final_dir.join(dylib_file_name());
    if lib.is_file() {
        progress(&format!("ONNX Runtime {ORT_VERSION} is already installed: {}", lib.display()));
        return Ok(lib);
    }
    std::fs::create_dir_all(root).map_err(io_err(root))?;

    // Work folders sit next to the destination so the final rename stays on one file
    // system (and so is atomic); the guard removes them on every exit path.
    let pid = std::process::id();
    let download = TempDir::create(root.join(format!(".{dir_name}.download-{pid}")))?;
    let staging = TempDir::create(root.join(format!(".{dir_name}.tmp-{pid}")))?;

    let spec = format!("{}=={ORT_VERSION}", package_name(gpu));
    let wheel = pip_download(python, &spec, &download.0, progress)?;

    progress(&format!("extracting the libraries from {}", file_name(&wheel)));
    let extracted = extract_libraries(python, &wheel, &staging.0)?;
    let wanted = dylib_file_name();
    if !extracted.contains(&wanted) {
        return Err(InstallError::WheelMissingLibrary { wheel, wanted });
    }

    // A folder left by an interrupted older install has no library (checked above);
    // clear it so the rename can take its place.
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(io_err(&final_dir))?;
    }
    if let Err(e) = std::fs::rename(&staging.0, &final_dir) {
        // Another install finishing first is success too.
        if !lib.is_file() {
            return Err(InstallError::Io { path: final_dir, source: e });
        }
    }
    progress(&format!(
        "installed ONNX Runtime {ORT_VERSION} ({}) into {}",
        extracted.join(", "),
        final_dir.display()
    ));
    Ok(lib)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// A folder removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn create(path: PathBuf) -> Result<Self, InstallError> {
        // A crashed earlier run with the same pid may have left it behind.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).map_err(io_err(&path))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn spawn_python(python: &OsStr, cmd: &mut Command) -> Result<std::process::Child, InstallError> {
    cmd.spawn()
        .map_err(|source| InstallError::PythonMissing { python: python.to_os_string(), source })
}

/// Last lines of a process's stderr, for error messages.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs `python -m pip download` for one exact package into `dest`; returns the wheel.
/// pip's stdout ("Collecting ...", "Downloading ... (255 MB)") goes to `progress` as it
/// comes, since the GPU wheel takes a while.
fn pip_download(
    python: &OsStr,
    spec: &str,
    dest: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, InstallError> {
    let args: Vec<OsString> = [
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--dest",
    ]
    .iter()
    .map(OsString::from)
    .chain([dest.as_os_str().to_os_string(), OsString::from(spec)])
    .collect();
    let command = format!(
        "{} {}",
        python.to_string_lossy(),
        args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
    );
    progress(&format!("downloading {spec} with pip"));
    let mut child = spawn_python(
        python,
        Command::new(python)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;

    // stderr is drained on its own thread so a chatty pip cannot block on a full pipe
    // while stdout is being read here.
    let mut stderr = child.stderr.take().expect("piped");
    let stderr_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let line = line.trim();
            if !line.is_empty() {
                progress(line);
            }
        }
    }
    let status = child
        .wait()
        .map_err(|source| InstallError::PythonMissing { python: python.to_os_string(), source })?;
    let stderr = stderr_reader.join().unwrap_or_default();
    if !status.success() {
        let mut stderr_tail = tail(&stderr, PIP_TAIL_LINES);
        if stderr.contains("No module named pip") {
            stderr_tail.push_str("\n(pip is missing: install it, e.g. the python3-pip package, or set BLIP2_ORT_PYTHON to a Python that has it)");
        }
        return Err(InstallError::Pip { command, status: status.to_string(), stderr_tail });
    }
    let wheel = std::fs::read_dir(dest)
        .map_err(io_err(dest))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"));
    wheel.ok_or_else(|| InstallError::NoWheel { command, dir: dest.to_path_buf() })
}

/// Unpacks ONNX Runtime's own shared libraries (the main one and its provider plugins,
/// which it looks for next to itself) flat into `dest`, leaving out the Python
/// extension module. Python's zipfile does the work, as Python is already required.
fn extract_libraries(
    python: &OsStr,
    wheel: &Path,
    dest: &Path,
) -> Result<Vec<String>, InstallError> {
    const SCRIPT: &str = r#"
import os, shutil, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        parts = info.filename.split("/")
        base = parts[-1]
        if len(parts) < 2 or parts[-2] != "capi" or not base:
            continue
        if not (base.startswith("libonnxruntime") or (base.startswith("onnxruntime") and base.endswith(".dll"))):
            continue
        with z.open(info) as src, open(os.path.join(dest, base), "wb") as dst:
            shutil.copyfileobj(src, dst)
        print(base)
"#;
    let out = spawn_python(
        python,
        Command::new(python)
            .arg("-c")
            .arg(SCRIPT)
            .arg(wheel)
            .arg(dest)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?
    .wait_with_output()
    .map_err(|source| InstallError::PythonMissing { python: python.to_os_string(), source })?;
    if !out.status.success() {
        return Err(InstallError::Extract {
            wheel: wheel.to_path_buf(),
            status: out.status.to_string(),
            stderr_tail: tail(&String::from_utf8_lossy(&out.stderr), PIP_TAIL_LINES),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh empty folder under the system temp dir, removed on drop.
    fn scratch(tag: &str) -> TempDir {
        let p =
            std::env::temp_dir().join(format!("blip2-ort-env-test-{tag}-{}", std::process::id()));
        TempDir::create(p).unwrap()
    }

    fn have_python3() -> bool {
        Command::new("python3").arg("-c").arg("pass").status().is_ok_and(|s| s.success())
    }

    #[test]
    fn install_skips_when_cached() {
        let root = scratch("cached");
        let dir = root.0.join(runtime_dir_name(false));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(dylib_file_name()), b"x").unwrap();
        // The interpreter does not exist: reaching it would fail the test.
        let got =
            install_with(OsStr::new("/nonexistent/python3"), &root.0, false, &mut |_| {}).unwrap();
        assert_eq!(got, dir.join(dylib_file_name()));
    }

    #[test]
    fn install_without_python_says_so() {
        let root = scratch("nopython");
        let err = install_with(OsStr::new("/nonexistent/python3"), &root.0, false, &mut |_| {})
            .unwrap_err();
        assert!(matches!(err, InstallError::PythonMissing { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/python3"), "{err}");
        // Work folders are cleaned up and nothing half-made is left behind.
        assert_eq!(std::fs::read_dir(&root.0).unwrap().count(), 0);
    }

    #[cfg(unix)]
    #[test]
    fn pip_failure_reports_command_and_stderr() {
        use std::os::unix::fs::PermissionsExt;
        let root = scratch("pipfail");
        // A stand-in interpreter that fails the way pip does.
        let fake = root.0.join("fake-python");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho 'ERROR: No matching distribution found for onnxruntime==1.31.1' >&2\nexit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cache = root.0.join("cache");
        let err = install_with(fake.as_os_str(), &cache, false, &mut |_| {}).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, InstallError::Pip { .. }), "{msg}");
        assert!(msg.contains("pip download") && msg.contains("onnxruntime==1.31.1"), "{msg}");
        assert!(msg.contains("No matching distribution"), "{msg}");
        assert!(!cache.join(runtime_dir_name(false)).exists());
    }

    /// A stand-in interpreter: `-m pip download ... --dest DIR SPEC` copies `wheel` into
    /// DIR (no network); anything else runs the real python3 (the zipfile extraction).
    #[cfg(unix)]
    fn fake_pip(dir: &Path, wheel: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let fake = dir.join("fake-python");
        let script = format!(
            "#!/bin/sh\nif [ \"$1\" = -m ]; then\n  while [ $# -gt 0 ]; do [ \"$1\" = --dest ] && dest=\"$2\"; shift; done\n  \
             echo \"Saved $dest/x.whl\"\n  cp '{}' \"$dest/\"\n  exit 0\nfi\nexec python3 \"$@\"\n",
            wheel.display()
        );
        std::fs::write(&fake, script).unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        fake
    }

    /// Writes a zip with the given member names (each holding its own name) using python3.
    fn make_zip(path: &Path, members: &[&str]) {
        let script = "import sys, zipfile\nwith zipfile.ZipFile(sys.argv[1], 'w') as z:\n    for m in sys.argv[2:]: z.writestr(m, m)\n";
        let ok = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(path)
            .args(members)
            .status()
            .unwrap()
            .success();
        assert!(ok, "python3 could not write {}", path.display());
    }

    #[cfg(unix)]
    #[test]
    fn install_places_libraries_atomically() {
        if !have_python3() {
            eprintln!("note: python3 is missing; skipping the install flow test");
            return;
        }
        let root = scratch("flow");
        let wheel = root.0.join("onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl");
        let lib = dylib_file_name();
        make_zip(
            &wheel,
            &[
                &format!("onnxruntime/capi/{lib}"),
                "onnxruntime/capi/libonnxruntime_providers_shared.so",
                "onnxruntime/capi/onnxruntime_pybind11_state.cpython-311-x86_64-linux-gnu.so",
                "onnxruntime/__init__.py",
            ],
        );
        let fake = fake_pip(&root.0, &wheel);
        let cache = root.0.join("cache");
        let mut said = Vec::new();
        let got = install_with(fake.as_os_str(), &cache, false, &mut |m| said.push(m.to_string()))
            .unwrap();
        let dir = cache.join(runtime_dir_name(false));
        assert_eq!(got, dir.join(&lib));
        assert_eq!(std::fs::read_to_string(&got).unwrap(), format!("onnxruntime/capi/{lib}"));
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec![lib.clone(), "libonnxruntime_providers_shared.so".to_string()]);
        // Only the final folder is left in the cache root: no work folders.
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1);
        assert!(
            said.iter().any(|m| m.starts_with("Saved")),
            "pip's stdout reaches progress: {said:?}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn wheel_without_library_is_an_error() {
        if !have_python3() {
            eprintln!("note: python3 is missing; skipping the wheel extraction test");
            return;
        }
        let root = scratch("nolib");
        let wheel = root.0.join("onnxruntime-1.31.1-py3-none-any.whl");
        make_zip(&wheel, &["onnxruntime/__init__.py"]);
        let fake = fake_pip(&root.0, &wheel);
        let cache = root.0.join("cache");
        let err = install_with(fake.as_os_str(), &cache, false, &mut |_| {}).unwrap_err();
        assert!(matches!(err, InstallError::WheelMissingLibrary { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("onnxruntime-1.31.1-py3-none-any.whl") && msg.contains(&dylib_file_name()),
            "{msg}"
        );
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0, "nothing left behind");

        // A file that is no zip at all fails extraction, naming the wheel.
        std::fs::write(&wheel, b"not a zip").unwrap();
        let out = root.0.join("out");
        std::fs::create_dir_all(&out).unwrap();
        let err = extract_libraries(OsStr::new("python3"), &wheel, &out).unwrap_err();
        assert!(matches!(err, InstallError::Extract { .. }), "{err}");
        assert!(err.to_string().contains("onnxruntime-1.31.1-py3-none-any.whl"), "{err}");
    }

    #[test]
    fn stderr_tail_keeps_last_lines() {
        assert_eq!(tail("a\n\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("x", 5), "x");
    }

    /// Installs the CPU runtime into the cache (downloads the wheel with pip); the same as
    /// `blip2-ort install-runtime`. Run with `cargo test -p blip2-cli --bin blip2-ort --
    /// --ignored install_cpu_runtime`.
    #[test]
    #[ignore = "downloads the onnxruntime wheel"]
    fn install_cpu_runtime() {
        let lib = install(false, &mut |m| eprintln!("{m}")).unwrap();
        assert!(lib.is_file());
        assert_eq!(lib.parent().unwrap(), blip2_runtime::ort_env::cache_dir(false));
    }

    /// The GPU runtime (about 250 MB), as `blip2-ort install-runtime --gpu`.
    #[test]
    #[ignore = "downloads the onnxruntime-gpu wheel"]
    fn install_gpu_runtime() {
        let lib = install(true, &mut |m| eprintln!("{m}")).unwrap();
        assert!(lib.is_file());
        assert_eq!(lib.parent().unwrap(), blip2_runtime::ort_env::cache_dir(true));
        for plugin in [
            "libonnxruntime_providers_shared.so",
            "libonnxruntime_providers_cuda.so",
            "libonnxruntime_providers_tensorrt.so",
        ] {
            assert!(
                lib.with_file_name(plugin).is_file(),
                "{plugin} missing next to {}",
                lib.display()
            );
        }
    }
}
