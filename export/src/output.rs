//! The output folder of an export: written into a hidden `.NAME.partial-PID` folder beside
//! it, then put in place, so that a failed or interrupted export never leaves a folder
//! that looks complete and never loses a file the user had.
//!
//! * A partial folder is removed when the export fails, when the process is stopped by a
//!   signal the binary handles ([`interrupt`]), and otherwise (kill -9, power loss) by the
//!   next export beside the same output, once its process is gone
//!   ([`remove_stale_partials`]).
//! * Replacing an earlier export (`--force`) replaces only the files an export writes; the
//!   user's own files in that folder stay. While files are moved in, the folder holds a
//!   marker and no manifest, so it never looks complete half-way.
//! * Exports into one output folder take turns ([`OutputLock`], an advisory lock on
//!   `.NAME.lock` beside it, held from the check that the folder may be written until the
//!   export is in place): a second export waits for the first, then finds the folder
//!   there (and fails without `--force`, or replaces it with `--force`).
//! * Putting an export in place and [`interrupt`] exclude each other: an interrupt either
//!   comes first (nothing is put in place, the partial folder is removed) or after the
//!   export is complete in its folder (then [`interrupt`] says so, and the caller may
//!   report the export before ending).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use blip2_core::io;

use crate::error::{write_err, ExportError, Result};

/// Present in an output folder while an earlier export in it is being replaced.
pub const REPLACING_MARKER: &str = ".blip2-ort-replacing";

/// What this process's exports are doing, for [`interrupt`].
struct State {
    /// Partial folders being written.
    partials: Vec<PathBuf>,
    /// Lock files held ([`OutputLock`]).
    locks: Vec<PathBuf>,
    /// Set by [`interrupt`]: from then on nothing is put in place.
    interrupted: bool,
    /// Exports put in place since the last [`acknowledge`].
    finished: usize,
    /// An [`interrupt`] came while an export put in place was not yet acknowledged.
    deferred: bool,
    /// Locks of exports put in place, kept until [`acknowledge`] (`keep_lock`).
    kept: Vec<OutputLock>,
}

static STATE: Mutex<State> = Mutex::new(State {
    partials: Vec::new(),
    locks: Vec::new(),
    interrupted: false,
    finished: 0,
    deferred: false,
    kept: Vec::new(),
});

fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the caller of [`interrupt`] should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    /// Nothing was put in place (any partial folder is gone): end the process now.
    Stop,
    /// An export is complete in its folder and its caller has not yet reported it (see
    /// [`acknowledge`]): let it report and end.
    Finish,
}

/// Stops this process's exports. Meant for a signal handler thread (the binary calls it
/// on SIGINT, SIGTERM and SIGHUP): waits until no export is being put in place, removes
/// the partial folders and lock files of the exports still writing, and makes every
/// export of this process fail with [`ExportError::Interrupted`] from then on instead of
/// being put in place. [`Interrupt::Finish`] when an export was already put in place and
/// not yet [acknowledged](acknowledge): that export is complete, so its caller may report
/// it; [`Interrupt::Stop`] otherwise. The export itself may still be writing into a
/// partial folder, so each removal is retried a few times.
pub fn interrupt() -> Interrupt {
    let mut st = state();
    st.interrupted = true;
    for p in std::mem::take(&mut st.partials) {
        for _ in 0..5 {
            if std::fs::remove_dir_all(&p).is_ok() || !p.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    // This process holds these locks until it ends, so removing the files is safe (see
    // OutputLock::acquire).
    for l in std::mem::take(&mut st.locks) {
        let _ = std::fs::remove_file(l);
    }
    if st.finished > 0 {
        st.deferred = true;
        Interrupt::Finish
    } else {
        Interrupt::Stop
    }
}

/// Says that the exports put in place so far have been reported; returns whether an
/// [`interrupt`] came meanwhile (then the caller should end as the interrupt asked).
/// Lets go of the locks kept for them ([`crate::ExportOptions::keep_lock`]).
pub fn acknowledge() -> bool {
    let mut st = state();
    st.finished = 0;
    let deferred = std::mem::take(&mut st.deferred);
    drop(st);
    release_kept_locks();
    deferred
}

/// Lets go of the locks kept after exports ([`crate::ExportOptions::keep_lock`]), removing
/// their files, without [`acknowledge`]-ing the exports: a process about to end after
/// reporting its export calls this, so that an interrupt from then on still finds the
/// export finished.
pub fn release_kept_locks() {
    let kept = std::mem::take(&mut state().kept);
    drop(kept);
}

/// The old name of [`interrupt`], for callers that end the process in any case.
pub fn remove_partials() {
    let _ = interrupt();
}

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
        io::KV_JOIN_FILE,
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

/// A partial folder being written; removed when dropped (an error or a panic) unless it
/// has been put in place.
pub(crate) struct Partial {
    pub path: PathBuf,
}

impl Partial {
    pub fn create(path: PathBuf) -> Result<Self> {
        let mut st = state();
        if st.interrupted {
            return Err(ExportError::Interrupted);
        }
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(write_err(&path))?;
        }
        st.partials.push(path.clone());
        let partial = Partial { path };
        std::fs::create_dir_all(&partial.path).map_err(write_err(&partial.path))?;
        Ok(partial)
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        let mut st = state();
        let _ = std::fs::remove_dir_all(&self.path);
        st.partials.retain(|p| p != &self.path);
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

/// Sleeps for `BLIP2_ORT_TEST_FINISH_DELAY_MS` milliseconds, if set: tests widen the
/// moments just before and just after an export is put in place with it, to interrupt
/// and race exports there.
fn test_finish_delay() {
    if let Some(ms) =
        std::env::var("BLIP2_ORT_TEST_FINISH_DELAY_MS").ok().and_then(|v| v.parse().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Puts the finished export in `partial` at `out`. A new folder is one rename. An
/// existing folder (an earlier export, or an empty one) gets the new files moved in, the
/// manifest last, and loses only the files of the earlier export that the new one does
/// not have; anything else in it stays. Nothing is put in place after an [`interrupt`],
/// and no interrupt removes anything while this runs. The caller holds the output's
/// [`OutputLock`].
pub(crate) fn put_in_place(partial: Partial, out: &Path) -> Result<()> {
    test_finish_delay();
    let mut st = state();
    if st.interrupted {
        drop(st);
        return Err(ExportError::Interrupted);
    }
    let moved = move_into(&partial.path, out);
    if moved.is_ok() {
        st.finished += 1;
    }
    drop(st);
    drop(partial);
    test_finish_delay();
    moved
}

fn move_into(partial: &Path, out: &Path) -> Result<()> {
    if !out.exists() {
        std::fs::rename(partial, out).map_err(write_err(out))?;
        return Ok(());
    }
    let marker = out.join(REPLACING_MARKER);
    std::fs::write(&marker, b"blip2-ort is replacing the export in this folder\n")
        .map_err(write_err(&marker))?;
    let manifest = out.join(io::MANIFEST_FILE);
    if manifest.exists() {
        std::fs::remove_file(&manifest).map_err(write_err(&manifest))?;
    }
    let new: Vec<String> = std::fs::read_dir(partial)
        .map_err(write_err(partial))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for f in &new {
        if f != io::MANIFEST_FILE {
            let to = out.join(f);
            std::fs::rename(partial.join(f), &to).map_err(write_err(&to))?;
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
    std::fs::rename(partial.join(io::MANIFEST_FILE), &manifest).map_err(write_err(&manifest))?;
    std::fs::remove_file(&marker).map_err(write_err(&marker))?;
    Ok(())
}

/// The lock file name for output `name`.
pub fn lock_name(name: &str) -> String {
    format!(".{name}.lock")
}

/// An exclusive advisory lock (`flock`) on `.NAME.lock` beside an output folder: exports
/// into one folder take turns. The lock file is removed when the lock is let go (and by
/// [`interrupt`]); one left by kill -9 is harmless and removed by the next export. Without
/// `flock` (not Unix) there is no lock.
pub struct OutputLock {
    #[cfg(unix)]
    _file: std::fs::File,
    path: PathBuf,
}

impl OutputLock {
    /// Takes the lock on `.NAME.lock` in `parent`, waiting for another export that holds
    /// it (after saying so through `waiting`).
    pub fn acquire(parent: &Path, name: &str, waiting: &mut dyn FnMut()) -> Result<Self> {
        let path = parent.join(lock_name(name));
        // This process may hold it already, kept after an earlier export (keep_lock).
        let kept = {
            let mut st = state();
            st.kept.iter().position(|l| l.path == path).map(|i| st.kept.remove(i))
        };
        let lock = match kept {
            Some(lock) => lock,
            None => Self::acquire_at(path, waiting)?,
        };
        let mut st = state();
        if st.interrupted {
            // Still held, so no other export holds a lock on this file.
            let _ = std::fs::remove_file(&lock.path);
            return Err(ExportError::Interrupted);
        }
        if !st.locks.contains(&lock.path) {
            st.locks.push(lock.path.clone());
        }
        Ok(lock)
    }

    /// Keeps the lock until [`acknowledge`] or the process ends.
    pub(crate) fn keep(self) {
        state().kept.push(self);
    }

    #[cfg(unix)]
    fn acquire_at(path: PathBuf, waiting: &mut dyn FnMut()) -> Result<Self> {
        use std::os::unix::fs::MetadataExt;
        use std::os::unix::io::AsRawFd;
        let mut said = false;
        loop {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(write_err(&path))?;
            let fd = file.as_raw_fd();
            // SAFETY: flock on a descriptor this function owns.
            if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                    return Err(write_err(&path)(e));
                }
                if !said {
                    waiting();
                    said = true;
                }
                loop {
                    // SAFETY: as above; blocks until the holder lets go.
                    if unsafe { libc::flock(fd, libc::LOCK_EX) } == 0 {
                        break;
                    }
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(write_err(&path)(e));
                    }
                }
            }
            // The holder before us removes the file as it lets go: a lock on a file that
            // is no longer at `path` locks nothing, so start again with the file there.
            let held = file.metadata().map_err(write_err(&path))?;
            match std::fs::metadata(&path) {
                Ok(m) if m.dev() == held.dev() && m.ino() == held.ino() => {
                    return Ok(OutputLock { _file: file, path })
                }
                _ => continue,
            }
        }
    }

    #[cfg(not(unix))]
    fn acquire_at(path: PathBuf, _waiting: &mut dyn FnMut()) -> Result<Self> {
        Ok(OutputLock { path })
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still held, so no other export holds a lock on this file; not when
        // interrupt() removed it already, as another export may have made a new one since.
        let mut st = state();
        if let Some(i) = st.locks.iter().position(|l| l == &self.path) {
            st.locks.remove(i);
            let _ = std::fs::remove_file(&self.path);
        }
        // The file closes (and the lock is let go) after this.
    }
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
