//! `blip2-ort cache`: what the cache folder (`~/.cache/blip2-ort`, `$BLIP2_ORT_CACHE`)
//! holds, and removing it: `list`, `prune`, `clear [KIND]`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use blip2_runtime::ort_env;
use blip2_runtime::session_cache::{self, EntryStatus};

use crate::export_cmd::human;

#[derive(clap::Subcommand, Debug)]
pub enum CacheCommand {
    /// List the cache's entries: optimized graphs (with the export each belongs to),
    /// exported checkpoints, TensorRT engines and ONNX Runtime, their sizes and the total.
    List,
    /// Remove optimized graphs of deleted or re-exported graphs, old temporary folders, and
    /// the least recently used optimized graphs beyond the bound.
    Prune {
        /// The bound for optimized graphs (`20G`, `512M`, bytes); default
        /// $BLIP2_ORT_OPTIMIZED_CACHE_MAX, else 20G.
        #[arg(long, value_parser = size_arg)]
        max_size: Option<u64>,
    },
    /// Remove everything blip2-ort made in the cache (optimized graphs, exported
    /// checkpoints, TensorRT engines), or one kind; ONNX Runtime only when named (`runtime`).
    Clear {
        /// optimized, models, tensorrt or runtime.
        #[arg(value_enum)]
        kind: Option<Kind>,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Optimized graphs (`optimized/`).
    Optimized,
    /// Checkpoints exported by infer, serve and bench (`models/`).
    Models,
    /// TensorRT engines (`tensorrt-engines/`).
    Tensorrt,
    /// The ONNX Runtime libraries `install-runtime` put there.
    Runtime,
}

fn size_arg(v: &str) -> Result<u64, String> {
    session_cache::parse_size(v)
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

/// The folders of a kind, other than optimized graphs: (name shown, path).
fn folders(root: &Path, kind: Kind) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    match kind {
        Kind::Optimized => {}
        Kind::Models => {
            // models/local/NAME-HASH and models/hub/NAME-HASH.
            for group in ["local", "hub"] {
                let dir = root.join("models").join(group);
                let Ok(list) = std::fs::read_dir(&dir) else { continue };
                for e in list.flatten() {
                    out.push((format!("{group}/{}", e.file_name().to_string_lossy()), e.path()));
                }
            }
        }
        Kind::Tensorrt => {
            let dir = root.join("tensorrt-engines");
            if dir.exists() {
                out.push(("tensorrt-engines".into(), dir));
            }
        }
        Kind::Runtime => {
            for gpu in [false, true] {
                let dir = root.join(ort_env::runtime_dir_name(gpu));
                if dir.exists() {
                    out.push((ort_env::runtime_dir_name(gpu), dir));
                }
            }
        }
    }
    out.sort();
    out
}

fn status_text(s: &EntryStatus) -> &'static str {
    match s {
        EntryStatus::Current => "in use",
        EntryStatus::SourceGone => "export gone",
        EntryStatus::SourceChanged => "re-exported",
        EntryStatus::Partial => "unfinished",
    }
}

pub fn run(cmd: &CacheCommand) -> Result<i32> {
    let root = ort_env::cache_root();
    let optimized = root.join("optimized");
    match cmd {
        CacheCommand::List => {
            let max = session_cache::max_bytes().map_err(|e| anyhow!(e))?;
            println!("cache {}", root.display());
            let mut total = 0;
            let entries = session_cache::entries(&optimized);
            let sum: u64 = entries.iter().map(|e| e.bytes).sum();
            println!(
                "optimized graphs: {} in {} entries (bound {}, {})",
                human(sum),
                entries.len(),
                human(max),
                session_cache::OPTIMIZED_CACHE_MAX_ENV
            );
            for e in &entries {
                let name = e.path.file_name().unwrap_or_default().to_string_lossy();
                let export = e.source.as_ref().map_or_else(
                    || "?".to_string(),
                    |s| {
                        let graph = s.file_name().unwrap_or_default().to_string_lossy();
                        let folder =
                            s.parent().map(|p| p.display().to_string()).unwrap_or_default();
                        format!("{graph} of {folder}")
                    },
                );
                println!(
                    "  {:>10}  {:<12} {name}  {export}",
                    human(e.bytes),
                    status_text(&e.status)
                );
            }
            total += sum;
            for (kind, label) in [
                (Kind::Models, "exported checkpoints"),
                (Kind::Tensorrt, "TensorRT engines"),
                (Kind::Runtime, "ONNX Runtime"),
            ] {
                let list: Vec<(String, u64)> =
                    folders(&root, kind).into_iter().map(|(n, p)| (n, folder_bytes(&p))).collect();
                let sum: u64 = list.iter().map(|x| x.1).sum();
                println!("{label}: {} in {} entries", human(sum), list.len());
                for (name, bytes) in &list {
                    println!("  {:>10}  {name}", human(*bytes));
                }
                total += sum;
            }
            println!("total {}", human(total));
        }
        CacheCommand::Prune { max_size } => {
            let max = match max_size {
                Some(m) => *m,
                None => session_cache::max_bytes().map_err(|e| anyhow!(e))?,
            };
            let removed = session_cache::prune(&optimized, max, &[]);
            for e in &removed {
                println!(
                    "removed {} ({}, {}, {})",
                    e.path.display(),
                    human(e.bytes),
                    status_text(&e.status),
                    e.source.as_ref().map_or("?".into(), |s| s.display().to_string())
                );
            }
            let freed: u64 = removed.iter().map(|e| e.bytes).sum();
            let left: u64 = session_cache::entries(&optimized).iter().map(|e| e.bytes).sum();
            println!(
                "pruned {} entries, freed {}; optimized graphs now {} (bound {})",
                removed.len(),
                human(freed),
                human(left),
                human(max)
            );
        }
        CacheCommand::Clear { kind } => {
            let kinds = match kind {
                Some(k) => vec![*k],
                None => vec![Kind::Optimized, Kind::Models, Kind::Tensorrt],
            };
            let mut freed = 0;
            let mut count = 0;
            for k in kinds {
                if k == Kind::Optimized {
                    let removed = session_cache::clear(&optimized);
                    count += removed.len();
                    freed += removed.iter().map(|e| e.bytes).sum::<u64>();
                    continue;
                }
                for (_, path) in folders(&root, k) {
                    let bytes = folder_bytes(&path);
                    std::fs::remove_dir_all(&path)
                        .map_err(|e| anyhow!("{}: cannot remove: {e}", path.display()))?;
                    count += 1;
                    freed += bytes;
                }
            }
            println!("removed {count} entries, freed {}", human(freed));
        }
    }
    Ok(0)
}
