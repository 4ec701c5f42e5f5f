//! The output folder of an export: written into a hidden `.NAME.partial-PID` folder beside
//! it, then put in place, so that a failed or interrupted export never leaves a folder
//! that looks complete and never loses a file the user had.
//!
//! * A partial folder is removed when the export fails, when the process is stopped by a
//!   signal the binary handles ([`remove_partials`]), and otherwise (kill -9, power loss)
//!   by the next export beside the same output, once its process is gone
//!   ([`remove_stale_partials`]).
//! * Replacing an earlier export (`--force`) replaces only the files an export writes; the
//!   user's own files in that folder stay. While files are moved in, the folder holds a
//!   marker and no manifest, so it never looks complete half-way.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use blip2_core::io;

use crate::error::{write_err, ExportError, Result};

/// Present in an output folder while an earlier export in it is being replaced.
pub const REPLACING_MARKER: &str = ".blip2-ort-replacing";

/// Every file name an export may write into its folder; `--force` touches no other.
pub fn export_file_names() -> Vec<String> {
    let mut v = vec![io::MANIFEST_FILE.to_string()];
    let retrieval = [io::IMAGE_EMBEDDING_FILE, io::TEXT_EMBEDDING_FILE, io::ITM_FILE];
    for g in [
        io::VISION_ENCODER_FILE,
        io::QFORMER_FILE,
        io::LANGUAGE_MODEL_FILE,
        io::TEXT_ENCODER_FILE,
        io::KV_REORDER_FILE,
    ]
    .into_iter()
    .chain(retrieval)
    {
        v.push(g.to_string());
        v.push(format!("{g}.data"));
    }
    v.extend(crate::source::RUNTIME_FILES.iter().map(|s| s.to_string()));
    v
}

/// Whether `dir` holds an export (or one whose replacement was interrupted).
pub fn is_export(dir: &Path) -> bool {
    dir.join(io::MANIFEST_FILE).exists() || dir.join(REPLACING_MARKER).exists()
}

/// Partial folders this process is writing, for [`remove_partials`].
static ACTIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Removes the partial folders of the exports this process is running. Meant for a
/// signal handler (the binary calls it on SIGINT, SIGTERM and SIGHUP before it exits);
/// the export itself may still be writing, so each removal is retried a few times.
pub fn remove_partials() {
    let paths = match ACTIVE.lock() {
        Ok(g) => g.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    for p in paths {
        for _ in 0..5 {
            if std::fs::remove_dir_all(&p).is_ok() || !p.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// A partial folder being written; removed when dropped (an error or a panic) unless it
/// has been put in place.
pub(crate) struct Partial {
    pub path: PathBuf,
}

impl Partial {
    pub fn create(path: PathBuf) -> Result<Self> {
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(write_err(&path))?;
        }
        ACTIVE.lock().unwrap_or_else(|p| p.into_inner()).push(path.clone());
        let partial = Partial { path };
        std::fs::create_dir_all(&partial.path).map_err(write_err(&partial.path))?;
        Ok(partial)
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
        ACTIVE.lock().unwrap_or_else(|p| p.into_inner()).retain(|p| p != &self.path);
    }
}

/// The partial folder name for output `name` of process `pid`.
pub fn partial_name(name: &str, pid: u32) -> String {
    format!(".{name}.partial-{pid}")
}

/// Whether a process with this id is running (signal 0 checks without sending).
#[cfg(unix)]
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: kill with signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(not(unix))]
fn process_alive(_pid: u32) -> bool {
    // No portable check: keep the folder, as if its export were still running.
    true
}

/// Removes the `.NAME.partial-PID` folders in `parent` left by exports whose process is
/// gone (killed with -9, a crash, a power cut); returns the folders removed. Folders of
/// running exports are left alone.
pub fn remove_stale_partials(parent: &Path, name: &str) -> Vec<PathBuf> {
    let prefix = format!(".{name}.partial-");
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(parent) else { return removed };
    for e in entries.flatten() {
        let file_name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = file_name.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        if std::fs::remove_dir_all(e.path()).is_ok() {
            removed.push(e.path());
        }
    }
    removed
}

/// Puts the finished export in `partial` at `out`. A new folder is one rename. An
/// existing folder (an earlier export, or an empty one) gets the new files moved in, the
/// manifest last, and loses only the files of the earlier export that the new one does
/// not have; anything else in it stays.
pub(crate) fn put_in_place(partial: Partial, out: &Path) -> Result<()> {
    if !out.exists() {
        std::fs::rename(&partial.path, out).map_err(write_err(out))?;
        return Ok(());
    }
    let marker = out.join(REPLACING_MARKER);
    std::fs::write(&marker, b"blip2-ort is replacing the export in this folder\n")
        .map_err(write_err(&marker))?;
    let manifest = out.join(io::MANIFEST_FILE);
    if manifest.exists() {
        std::fs::remove_file(&manifest).map_err(write_err(&manifest))?;
    }
    let new: Vec<String> = std::fs::read_dir(&partial.path)
        .map_err(write_err(&partial.path))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for f in &new {
        if f != io::MANIFEST_FILE {
            let to = out.join(f);
            std::fs::rename(partial.path.join(f), &to).map_err(write_err(&to))?;
        }
    }
    for f in export_file_names() {
        if !new.contains(&f) {
            let old = out.join(&f);
            if old.is_file() {
                std::fs::remove_file(&old).map_err(write_err(&old))?;
            }
        }
    }
    std::fs::rename(partial.path.join(io::MANIFEST_FILE), &manifest)
        .map_err(write_err(&manifest))?;
    std::fs::remove_file(&marker).map_err(write_err(&marker))?;
    drop(partial);
    Ok(())
}

/// Checks that `out` may be written: absent, or with `force` an earlier export or an
/// empty folder.
pub(crate) fn check_output(out: &Path, force: bool) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !force {
        return Err(ExportError::OutputExists { path: out.into() });
    }
    if !out.is_dir() {
        return Err(ExportError::Config {
            path: out.into(),
            message: "exists and is not a folder".into(),
        });
    }
    // --force replaces an earlier export, never an unrelated folder.
    let is_empty = std::fs::read_dir(out).map(|mut d| d.next().is_none()).unwrap_or(false);
    if !is_export(out) && !is_empty {
        return Err(ExportError::Config {
            path: out.into(),
            message: format!(
                "exists and holds no {}; refusing to write into a folder blip2-ort did not write",
                io::MANIFEST_FILE
            ),
        });
    }
    Ok(())
}
