//! `blip2-ort index` and `blip2-ort search`: photo search over a persistent index of
//! image embeddings in one SQLite file (crate `blip2-index`). See docs/retrieval.md.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::{Context, Result};
use blip2_core::hash::fnv64;
use blip2_core::RetrievalManifest;
use blip2_index::{Entry, ExportIdentity, NewImage, OpenMode, Store};
use blip2_runtime::retrieval::RetrievalModel;
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::Array3;
use serde_json::json;

use crate::session::SessionOptions;

/// File extensions `index` takes from folders (files named on the command line are
/// always tried).
const IMAGE_EXTENSIONS: [&str; 9] =
    ["jpg", "jpeg", "png", "gif", "webp", "bmp", "tif", "tiff", "jfif"];

#[derive(clap::Args, Debug)]
pub struct IndexArgs {
    /// An image-text retrieval export (folder, checkpoint folder or Hub id).
    #[arg(long)]
    pub model: String,
    /// The index file: made if missing, else brought up to date.
    #[arg(long)]
    pub db: PathBuf,
    /// Image files, and folders whose image files (by extension) to index.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Also index the images in the folders' subfolders.
    #[arg(long, short = 'r')]
    pub recursive: bool,
    /// Images per model call; each call's images are committed together.
    #[arg(long, default_value_t = 8, value_parser = crate::args::positive)]
    pub batch_size: usize,
    #[command(flatten)]
    pub session: SessionOptions,
}

#[derive(clap::Args, Debug)]
pub struct SearchArgs {
    /// The image-text retrieval export the index was made with.
    #[arg(long)]
    pub model: String,
    /// The index file made by `blip2-ort index`.
    #[arg(long)]
    pub db: PathBuf,
    /// The text to search for.
    pub query: String,
    /// How many images to print.
    #[arg(long, default_value_t = 10, value_parser = crate::args::positive)]
    pub top: usize,
    /// Rescore the best K by ITC with the ITM head (reading their files again) and order those by it.
    #[arg(long, value_parser = crate::args::positive)]
    pub rerank: Option<usize>,
    /// One JSON object per result: {"rank", "image", "text", "itc"}, plus "itm" for the reranked ones.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub session: SessionOptions,
}

/// Opens the index `db` for the retrieval export in `dir` (a captioning export is
/// refused naming the tasks it supports; an index of another export is refused).
pub fn open_index(dir: &Path, db: &Path, mode: OpenMode) -> Result<Store> {
    let m = RetrievalManifest::load(dir)?;
    let identity = ExportIdentity::of(dir, &m)?;
    Ok(Store::open(db, &identity, mode)?)
}

/// What the command line names: a file, or a folder (walked, by extension).
enum Scope {
    File(PathBuf),
    Folder(PathBuf),
}

impl Scope {
    /// Whether an indexed path is one this run looks at (so it is dropped when it vanished).
    fn covers(&self, p: &Path, recursive: bool) -> bool {
        match self {
            Scope::File(f) => p == f,
            Scope::Folder(d) if recursive => p.starts_with(d),
            Scope::Folder(d) => p.parent() == Some(d.as_path()),
        }
    }
}

fn is_image_name(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The image files of a folder, sorted, and of its subfolders with `recursive` (each
/// folder once, whatever links lead to it).
fn walk(
    dir: &Path,
    recursive: bool,
    seen: &mut HashSet<PathBuf>,
    out: &mut Vec<PathBuf>,
    skipped: &mut Vec<(String, String)>,
) {
    if !seen.insert(dir.to_path_buf()) {
        return;
    }
    let mut entries: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
        Err(e) => {
            skipped.push((dir.display().to_string(), format!("cannot list the folder: {e}")));
            return;
        }
    };
    entries.sort();
    for p in entries {
        match std::fs::metadata(&p) {
            Ok(m) if m.is_dir() && recursive => {
                if let Ok(c) = p.canonicalize() {
                    walk(&c, recursive, seen, out, skipped);
                }
            }
            Ok(m) if m.is_file() && is_image_name(&p) => {
                out.push(p.canonicalize().unwrap_or(p));
            }
            _ => {}
        }
    }
}

fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    m.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i64)
}

/// One file to look at again: new, or its size or time changed.
struct Todo {
    path: String,
    size: u64,
    mtime_ns: i64,
}

/// What reading a file gave.
enum Read {
    /// Same bytes as indexed: only the size and time are recorded.
    Same,
    Pixels {
        hash: u64,
        pixels: Array3<f32>,
    },
    Failed(String),
}

/// Sleeps `BLIP2_ORT_TEST_INDEX_DELAY_MS` milliseconds after each committed batch, if
/// set: tests stretch an index run with it to interrupt it, or to race two runs.
fn test_delay() {
    if let Some(ms) =
        std::env::var("BLIP2_ORT_TEST_INDEX_DELAY_MS").ok().and_then(|v| v.parse().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

pub fn index(a: &IndexArgs, quiet: bool) -> Result<i32> {
    let dir = crate::session::resolve_model(&a.model, quiet)?;
    let mut store = open_index(&dir, &a.db, OpenMode::Create)?;
    let cwd = std::env::current_dir().context("the current folder")?;

    // The files this run covers, and what it covers (for files that vanished).
    let mut found: Vec<PathBuf> = Vec::new();
    let mut skipped: Vec<(String, String)> = Vec::new();
    let mut scopes = Vec::new();
    let mut seen_dirs = HashSet::new();
    for input in &a.inputs {
        match std::fs::metadata(input) {
            Ok(m) if m.is_dir() => {
                let d = input.canonicalize().unwrap_or_else(|_| cwd.join(input));
                scopes.push(Scope::Folder(d.clone()));
                walk(&d, a.recursive, &mut seen_dirs, &mut found, &mut skipped);
            }
            Ok(_) => {
                let f = input.canonicalize().unwrap_or_else(|_| cwd.join(input));
                scopes.push(Scope::File(f.clone()));
                found.push(f);
            }
            Err(e) => {
                skipped.push((input.display().to_string(), e.to_string()));
                scopes.push(Scope::File(cwd.join(input)));
            }
        }
    }
    let mut unique = HashSet::new();
    found.retain(|p| unique.insert(p.clone()));

    let known: HashMap<String, Entry> =
        store.entries()?.into_iter().map(|e| (e.path.clone(), e)).collect();
    let mut todo = Vec::new();
    let mut unchanged = 0usize;
    let mut covered: HashSet<String> = HashSet::new();
    for p in &found {
        let Some(path) = p.to_str() else {
            skipped.push((p.display().to_string(), "the path is not UTF-8".into()));
            continue;
        };
        covered.insert(path.to_string());
        let meta = match std::fs::metadata(p) {
            Ok(m) => m,
            Err(e) => {
                skipped.push((path.to_string(), e.to_string()));
                continue;
            }
        };
        let (size, mtime) = (meta.len(), mtime_ns(&meta));
        match known.get(path) {
            Some(e) if e.size == size && e.mtime_ns == mtime => unchanged += 1,
            _ => todo.push(Todo { path: path.to_string(), size, mtime_ns: mtime }),
        }
    }
    for (p, why) in &skipped {
        eprintln!("warning: skipped {p}: {why}");
    }

    let (mut added, mut updated) = (0usize, 0usize);
    if !todo.is_empty() {
        let mut model = crate::retrieval_cmd::load(&dir, &a.session)?;
        let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(todo.len() as u64) };
        bar.set_style(
            ProgressStyle::with_template("indexing {bar:40} {pos}/{len} images {eta}")
                .expect("a valid progress template"),
        );
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        for chunk in todo.chunks(a.batch_size) {
            let reads = read_all(&model, chunk, &known, threads);
            let mut pixels = Vec::new();
            for (t, r) in chunk.iter().zip(&reads) {
                match r {
                    Read::Pixels { pixels: px, .. } => pixels.push(px),
                    Read::Failed(why) => {
                        bar.suspend(|| eprintln!("warning: skipped {}: {why}", t.path));
                        skipped.push((t.path.clone(), why.clone()));
                    }
                    Read::Same => {}
                }
            }
            let emb = if pixels.is_empty() {
                None
            } else {
                let f = model.image_features(RetrievalModel::stack_pixels(&pixels)?)?;
                Some(model.embed_image_features(&f)?)
            };
            let mut rows = emb.iter().flat_map(|e| e.outer_iter());
            store.write(|w| {
                for (t, r) in chunk.iter().zip(&reads) {
                    match r {
                        Read::Same => {
                            w.touch(&t.path, t.size, t.mtime_ns)?;
                            unchanged += 1;
                        }
                        Read::Pixels { hash, .. } => {
                            let e = rows.next().expect("one embedding per image read");
                            let e = e.as_standard_layout();
                            let embedding = e.as_slice().expect("a standard-layout row");
                            w.put(&NewImage {
                                path: &t.path,
                                size: t.size,
                                mtime_ns: t.mtime_ns,
                                hash: *hash,
                                embedding,
                            })?;
                            if known.contains_key(&t.path) {
                                updated += 1;
                            } else {
                                added += 1;
                            }
                        }
                        Read::Failed(_) => {}
                    }
                }
                Ok(())
            })?;
            bar.inc(chunk.len() as u64);
            test_delay();
        }
        bar.finish_and_clear();
    }

    // Indexed files under what this run covers that are gone from the disk. A file not
    // walked but still there (another run added it meanwhile) stays.
    let gone: Vec<&String> = known
        .keys()
        .filter(|p| !covered.contains(*p))
        .filter(|p| scopes.iter().any(|s| s.covers(Path::new(p), a.recursive)))
        .filter(|p| !Path::new(p).exists())
        .collect();
    let removed = if gone.is_empty() {
        0
    } else {
        store.write(|w| {
            let mut n = 0;
            for p in &gone {
                n += usize::from(w.remove(p)?);
            }
            Ok(n)
        })?
    };
    let total = store.len()?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}: {total} images ({added} added, {updated} updated, {unchanged} unchanged, {removed} removed, {} skipped)",
        a.db.display(),
        skipped.len()
    )?;
    out.flush()?;
    Ok(0)
}

/// Reads, hashes and preprocesses a batch of files on `threads` threads, in order.
fn read_all(
    m: &RetrievalModel,
    chunk: &[Todo],
    known: &HashMap<String, Entry>,
    threads: usize,
) -> Vec<Read> {
    let read = |t: &Todo| -> Read {
        let bytes = match std::fs::read(&t.path) {
            Ok(b) => b,
            Err(e) => return Read::Failed(format!("cannot read: {e}")),
        };
        let hash = fnv64(&bytes);
        if known.get(&t.path).is_some_and(|e| e.hash == hash) {
            return Read::Same;
        }
        let px = blip2_runtime::preprocess::load_image_bytes(&bytes, &t.path, &m.limits)
            .and_then(|img| blip2_runtime::preprocess::preprocess(&img, &m.manifest.image));
        match px {
            Ok(pixels) => Read::Pixels { hash, pixels },
            // The message names the file; the warning names it already.
            Err(e) => {
                let m = e.to_string();
                Read::Failed(
                    m.strip_prefix(&format!("{}: ", t.path)).map_or(m.clone(), str::to_string),
                )
            }
        }
    };
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<Option<Read>>> =
        chunk.iter().map(|_| Default::default()).collect();
    std::thread::scope(|s| {
        for _ in 0..threads.min(chunk.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(t) = chunk.get(i) else { break };
                *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(read(t));
            });
        }
    });
    slots
        .into_iter()
        .map(|s| s.into_inner().unwrap_or_else(|e| e.into_inner()).expect("every file read"))
        .collect()
}

pub fn search(a: &SearchArgs, quiet: bool) -> Result<i32> {
    let dir = crate::session::resolve_model(&a.model, quiet)?;
    let store = open_index(&dir, &a.db, OpenMode::Existing)?;
    let codes = store.load_codes()?;
    let mut m = crate::retrieval_cmd::load(&dir, &a.session)?;
    let texts = std::slice::from_ref(&a.query);
    let batch = m.tokenize(texts)?;
    if batch.truncated[0] {
        eprintln!(
            "warning: text {:?} was cut to the model's {} tokens",
            a.query, m.manifest.text.max_length
        );
    }
    let t = m.embed_text_batch(&batch)?;
    let t = t.row(0).to_vec();
    let rerank = a.rerank.unwrap_or(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (hits, _) = blip2_index::search(&store, &codes, &t, a.top.max(rerank), threads)?;
    // ITM over the best `rerank` images, read again from their files.
    let n = rerank.min(hits.len());
    let mut itm = vec![None; n];
    for (i, h) in hits[..n].iter().enumerate() {
        let img = match m.load_image(Path::new(&h.path)) {
            Ok(img) => img,
            Err(e) => {
                eprintln!("warning: {}: not reranked: {e}", h.path);
                continue;
            }
        };
        let feats = m.image_features(m.pixels(&[img])?)?;
        itm[i] = Some(m.itm(&feats, 0, &batch)?[0]);
    }
    let mut out = std::io::stdout().lock();
    for (rank, (h, p)) in blip2_index::rerank(hits, &itm).into_iter().take(a.top).enumerate() {
        if a.json {
            let mut o = json!({"rank": rank + 1, "image": h.path, "text": a.query, "itc": h.itc});
            if let Some(p) = p {
                o["itm"] = json!(p);
            }
            writeln!(out, "{o}")?;
        } else {
            match p {
                Some(p) => writeln!(out, "{:.6}\t{p:.6}\t{}", h.itc, h.path)?,
                None => writeln!(out, "{:.6}\t{}", h.itc, h.path)?,
            }
        }
    }
    out.flush()?;
    Ok(0)
}
