//! Resolves a MODEL argument, for the binary's `infer`, `bench` and `serve` and the Python
//! module alike: an export folder as it is, or a checkpoint (folder or Hugging Face Hub id)
//! exported once into `~/.cache/blip2-ort/models/` under a fingerprint of its content.
//!
//! Its own crate because it needs both the exporter and the Hub client, which the runtime
//! must not depend on.

pub mod hub;

use std::path::{Path, PathBuf};

/// Why a MODEL argument names no usable model.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// Neither a folder nor a file of that name, and not a Hub id.
    #[error("{0}: no such folder, and not a Hub id of the form owner/name")]
    NotFound(String),
    /// Exists, but holds neither an export nor a checkpoint.
    #[error("{model}: neither an exported model (no {manifest}) nor a checkpoint folder (no config.json)", manifest = blip2_core::io::MANIFEST_FILE)]
    NotAModel { model: String },
    /// Graph files without their manifest.
    #[error(
        "{model}: an export folder without its {manifest} ({graph} is there): the manifest was deleted or the export did not \
         finish; export the checkpoint again with `blip2-ort export CHECKPOINT -o {model} --force`",
        manifest = blip2_core::io::MANIFEST_FILE
    )]
    IncompleteExport { model: String, graph: &'static str },
    #[error("{}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Fetching from the Hub failed (the message says what to do).
    #[error("{0}")]
    Hub(String),
    #[error(transparent)]
    Export(#[from] blip2_export::ExportError),
}

type Result<T> = std::result::Result<T, ResolveError>;

/// A local checkpoint folder as it is, or a Hub id fetched into the Hugging Face cache
/// (at `revision` when given): the folder to export from.
pub fn resolve_checkpoint(model: &str, revision: Option<&str>, quiet: bool) -> Result<PathBuf> {
    if hub::looks_like_hub_id(model) {
        hub::fetch(model, revision, quiet)
    } else {
        Ok(PathBuf::from(model))
    }
}

/// Resolves MODEL to an exported folder, exporting a checkpoint into the cache once.
///
/// A checkpoint's export is cached under a key made from its content (see
/// [`fingerprint`]), so another checkpoint put at the same path, or a new Hub revision,
/// gets its own export instead of the old model's answers. With `keep_lock` the export
/// made here keeps its folder locked until [`blip2_export::acknowledge`] (the binary's
/// signal handling, see `blip2_export::ExportOptions::keep_lock`).
pub fn resolve_model(model: &str, quiet: bool, keep_lock: bool) -> Result<PathBuf> {
    let p = Path::new(model);
    if p.join(blip2_core::io::MANIFEST_FILE).exists() {
        return Ok(p.to_path_buf());
    }
    if let Some(graph) = export_graph_in(p) {
        return Err(ResolveError::IncompleteExport { model: model.into(), graph });
    }
    let (src, label) = if p.join("config.json").exists() {
        let canon = p.canonicalize().map_err(|source| ResolveError::Io {
            path: p.into(),
            what: "cannot resolve the path",
            source,
        })?;
        let label = format!("local/{}", sanitize(&canon.to_string_lossy()));
        (canon, label)
    } else if hub::looks_like_hub_id(model) {
        (hub::fetch(model, None, quiet)?, format!("hub/{}", sanitize(model)))
    } else if p.exists() {
        return Err(ResolveError::NotAModel { model: model.into() });
    } else {
        return Err(ResolveError::NotFound(model.into()));
    };
    let out = models_cache().join(format!("{label}-{:016x}", fingerprint(&src)?));
    if out.join(blip2_core::io::MANIFEST_FILE).exists() {
        return Ok(out);
    }
    if !quiet {
        eprintln!("exporting {model} into {} (once)", out.display());
    }
    let opts = blip2_export::ExportOptions {
        source_label: model.to_string(),
        keep_lock,
        ..Default::default()
    };
    match blip2_export::export_any(&src, &out, &opts, &mut blip2_export::NoProgress) {
        Ok(_) => {}
        // Another process exported the same checkpoint meanwhile.
        Err(blip2_export::ExportError::OutputExists { .. })
            if out.join(blip2_core::io::MANIFEST_FILE).exists() => {}
        Err(e) => return Err(e.into()),
    }
    remove_other_versions(&out);
    Ok(out)
}

/// The name of a graph file an export writes, if `dir` holds one.
fn export_graph_in(dir: &Path) -> Option<&'static str> {
    use blip2_core::io;
    [io::VISION_ENCODER_FILE, io::QFORMER_FILE, io::LANGUAGE_MODEL_FILE]
        .into_iter()
        .find(|f| dir.join(f).is_file())
}

/// A hash of a checkpoint folder's content as far as it can be had without reading the
/// weights: every file's name, size and modification time (through the symlinks of the
/// Hugging Face cache, whose snapshot folder names the revision), and the bytes of the
/// small JSON files that decide the export.
pub fn fingerprint(dir: &Path) -> Result<u64> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|source| ResolveError::Io {
            path: dir.into(),
            what: "cannot list the checkpoint folder",
            source,
        })?
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.file_name());
    let mut h = blip2_core::hash::Fnv64::default();
    // A build that writes another manifest version exports the checkpoint again.
    h.write_field(&blip2_core::MANIFEST_VERSION.to_le_bytes());
    h.write_field(dir.to_string_lossy().as_bytes());
    for e in entries {
        let name = e.file_name();
        let Ok(meta) = std::fs::metadata(e.path()) else { continue };
        if !meta.is_file() {
            continue;
        }
        h.write_field(name.as_encoded_bytes());
        h.write_field(&meta.len().to_le_bytes());
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        h.write_field(&mtime.to_le_bytes());
        let small_json = name.to_string_lossy().ends_with(".json") && meta.len() <= 16 << 20;
        if small_json {
            let bytes = std::fs::read(e.path()).map_err(|source| ResolveError::Io {
                path: e.path(),
                what: "cannot read",
                source,
            })?;
            h.write_field(&bytes);
        }
    }
    Ok(h.finish())
}

/// Removes cached exports of the same path or Hub id made from other content: only the
/// newest is ever used again.
fn remove_other_versions(out: &Path) {
    let (Some(parent), Some(name)) =
        (out.parent(), out.file_name().map(|n| n.to_string_lossy().into_owned()))
    else {
        return;
    };
    let Some((label, _)) = name.rsplit_once('-') else { return };
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let other = e.file_name().to_string_lossy().into_owned();
        let same_label = other.rsplit_once('-').is_some_and(|(l, hash)| {
            l == label && hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit())
        });
        let old_format = other == label;
        if other != name
            && (same_label || old_format)
            && e.path().join(blip2_core::io::MANIFEST_FILE).exists()
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn models_cache() -> PathBuf {
    blip2_runtime::ort_env::cache_root().join("models")
}

fn sanitize(s: &str) -> String {
    s.trim_start_matches('/')
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' })
        .collect()
}
