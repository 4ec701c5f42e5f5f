//! `blip2-ort infer` tasks of image-text retrieval exports (Salesforce/blip2-itm-vit-g):
//! itm, embed-image, embed-text and rank.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use blip2_runtime::retrieval::{itc, RetrievalModel};
use clap::Args;
use ndarray::{Array2, Array3, Axis};
use serde_json::json;

use crate::session::SessionOptions;
use crate::UsageError;

/// `itm IMAGE --text T [--text T2 ...]`
#[derive(Args, Debug)]
pub struct ItmArgs {
    pub image: PathBuf,
    /// A text to match against the image (repeat for several).
    #[arg(long = "text", required = true)]
    pub texts: Vec<String>,
}

/// `embed-image IMAGE...`
#[derive(Args, Debug)]
pub struct EmbedImageArgs {
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    #[command(flatten)]
    pub out: EmbedOutput,
}

/// `embed-text TEXT...`
#[derive(Args, Debug)]
pub struct EmbedTextArgs {
    #[arg(required = true)]
    pub texts: Vec<String>,
    #[command(flatten)]
    pub out: EmbedOutput,
}

#[derive(Args, Debug)]
pub struct EmbedOutput {
    /// json: one JSON line per input on stdout; npy: one float32 array in --output
    /// ([images, queries, dim] or [texts, dim], rows in argument order).
    #[arg(long, value_enum, default_value = "json")]
    pub format: EmbedFormat,
    /// The .npy file to write with --format npy (written whole or not at all).
    #[arg(long, short, required_if_eq("format", "npy"))]
    pub output: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmbedFormat {
    Json,
    Npy,
}

/// `rank --text T IMAGE... [--rerank K]`
#[derive(Args, Debug)]
pub struct RankArgs {
    /// The query text.
    #[arg(long)]
    pub text: String,
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Rescore the top K images by ITC with the ITM head and order those by it.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub rerank: Option<u64>,
}

/// A retrieval task, as parsed by `infer`.
pub enum Task<'a> {
    Itm(&'a ItmArgs),
    EmbedImage(&'a EmbedImageArgs),
    EmbedText(&'a EmbedTextArgs),
    Rank(&'a RankArgs),
}

pub fn load(dir: &Path, o: &SessionOptions) -> Result<RetrievalModel> {
    Ok(blip2_runtime::profiles::load_retrieval(dir, &crate::session::profile(o)?)?)
}

pub fn run(
    task: Task<'_>,
    dir: &Path,
    session: &SessionOptions,
    json: bool,
    batch_size: usize,
) -> Result<i32> {
    if batch_size == 0 {
        return Err(UsageError("--batch-size must be at least 1".into()).into());
    }
    // Flags are checked before the model is loaded.
    match &task {
        Task::EmbedImage(a) => check_output(&a.out)?,
        Task::EmbedText(a) => check_output(&a.out)?,
        _ => {}
    }
    let mut m = load(dir, session)?;
    match task {
        Task::Itm(a) => itm(&mut m, a, json, batch_size),
        Task::EmbedImage(a) => embed_images(&mut m, a, batch_size),
        Task::EmbedText(a) => embed_texts(&mut m, a, batch_size),
        Task::Rank(a) => rank(&mut m, a, json, batch_size),
    }
}

fn check_output(o: &EmbedOutput) -> Result<()> {
    match (o.format, &o.output) {
        // clap requires --output with --format npy.
        (EmbedFormat::Npy, None) => {
            Err(UsageError("--format npy needs --output FILE.npy".into()).into())
        }
        (EmbedFormat::Json, Some(_)) => {
            Err(UsageError("--output is for --format npy; json goes to stdout".into()).into())
        }
        _ => Ok(()),
    }
}

fn warn_truncated(m: &RetrievalModel, texts: &[String], truncated: &[bool]) {
    for (t, &cut) in texts.iter().zip(truncated) {
        if cut {
            eprintln!(
                "warning: text {t:?} was cut to the model's {} tokens",
                m.manifest.text.max_length
            );
        }
    }
}

fn itm(m: &mut RetrievalModel, a: &ItmArgs, json: bool, batch_size: usize) -> Result<i32> {
    let img = m.load_image(&a.image)?;
    // One vision-encoder pass feeds both heads.
    let feats = m.image_features(m.pixels(&[img])?)?;
    let image_embeds = m.embed_image_features(&feats)?;
    let mut out = std::io::stdout().lock();
    // Texts run --batch-size at a time: ITM repeats the image's features once per text.
    for chunk in a.texts.chunks(batch_size) {
        let batch = m.tokenize(chunk)?;
        warn_truncated(m, chunk, &batch.truncated);
        let probs = m.itm(&feats, 0, &batch)?;
        let text_embeds = m.embed_text_batch(&batch)?;
        for (i, t) in chunk.iter().enumerate() {
            let s = itc(image_embeds.index_axis(Axis(0), 0), text_embeds.row(i));
            if json {
                writeln!(
                    out,
                    "{}",
                    json!({"image": a.image.display().to_string(), "text": t, "itm": probs[i], "itc": s})
                )?;
            } else {
                writeln!(out, "{:.6}\t{:.6}\t{t}", probs[i], s)?;
            }
        }
    }
    out.flush()?;
    Ok(0)
}

fn embed_images(m: &mut RetrievalModel, a: &EmbedImageArgs, batch_size: usize) -> Result<i32> {
    let npy = a.out.format == EmbedFormat::Npy;
    let mut rows: Vec<Array3<f32>> = Vec::new();
    let mut failed = false;
    let mut out = std::io::stdout().lock();
    for chunk in a.images.chunks(batch_size) {
        // A file that cannot be read is reported on its own line (json), in argument
        // order, and the others still run; an .npy is only written when every image
        // could be embedded.
        let loaded: Vec<_> = chunk.iter().map(|p| m.load_image(p)).collect();
        if npy {
            if let Some(Err(e)) = loaded.iter().find(|r| r.is_err()) {
                bail!("{e}");
            }
        }
        let images: Vec<_> = loaded.iter().filter_map(|r| r.as_ref().ok().cloned()).collect();
        let emb = if images.is_empty() { None } else { Some(m.embed_images(&images)?) };
        if npy {
            rows.extend(emb);
            continue;
        }
        let mut next = emb.iter().flat_map(|e| e.outer_iter());
        for (p, r) in chunk.iter().zip(&loaded) {
            let line = match r {
                Ok(_) => {
                    let e = next.next().expect("one embedding per loaded image");
                    let queries: Vec<Vec<f32>> = e.outer_iter().map(|r| r.to_vec()).collect();
                    json!({"image": p.display().to_string(), "embedding": queries})
                }
                Err(e) => {
                    failed = true;
                    json!({"image": p.display().to_string(), "error": e.to_string()})
                }
            };
            writeln!(out, "{line}")?;
        }
        out.flush()?;
    }
    if let (true, Some(path)) = (npy, &a.out.output) {
        let views: Vec<_> = rows.iter().map(|r| r.view()).collect();
        let all = ndarray::concatenate(Axis(0), &views)?;
        write_npy(path, all.shape(), all.iter().copied())?;
        writeln!(out, "{}", path.display())?;
    }
    Ok(if failed { 1 } else { 0 })
}

fn embed_texts(m: &mut RetrievalModel, a: &EmbedTextArgs, batch_size: usize) -> Result<i32> {
    let mut all: Vec<Array2<f32>> = Vec::new();
    let mut out = std::io::stdout().lock();
    for chunk in a.texts.chunks(batch_size) {
        let batch = m.tokenize(chunk)?;
        warn_truncated(m, chunk, &batch.truncated);
        let emb = m.embed_text_batch(&batch)?;
        if a.out.format == EmbedFormat::Npy {
            all.push(emb);
            continue;
        }
        for (t, e) in chunk.iter().zip(emb.outer_iter()) {
            writeln!(out, "{}", json!({"text": t, "embedding": e.to_vec()}))?;
        }
        out.flush()?;
    }
    if let Some(path) = &a.out.output {
        let views: Vec<_> = all.iter().map(|r| r.view()).collect();
        let all = ndarray::concatenate(Axis(0), &views)?;
        write_npy(path, all.shape(), all.iter().copied())?;
        writeln!(out, "{}", path.display())?;
    }
    Ok(0)
}

fn rank(m: &mut RetrievalModel, a: &RankArgs, json: bool, batch_size: usize) -> Result<i32> {
    let texts = std::slice::from_ref(&a.text);
    let batch = m.tokenize(texts)?;
    warn_truncated(m, texts, &batch.truncated);
    let text = m.embed_text_batch(&batch)?;
    let rerank = (a.rerank.unwrap_or(0) as usize).min(a.images.len());
    // (image index, itc, itm); features are kept only for the images ITM may rescore.
    let mut scored: Vec<(usize, f32, Option<f32>)> = Vec::with_capacity(a.images.len());
    let mut kept = Vec::new();
    for (c, chunk) in a.images.chunks(batch_size).enumerate() {
        let images = chunk.iter().map(|p| m.load_image(p)).collect::<Result<Vec<_>, _>>()?;
        let feats = m.image_features(m.pixels(&images)?)?;
        let emb = m.embed_image_features(&feats)?;
        for (j, e) in emb.outer_iter().enumerate() {
            scored.push((c * batch_size + j, itc(e, text.row(0)), None));
        }
        if rerank > 0 {
            kept.push(feats);
        }
    }
    // Highest ITC first; the sort is stable, so equal scores keep the argument order.
    scored.sort_by(|x, y| y.1.total_cmp(&x.1));
    if rerank > 0 {
        for s in scored.iter_mut().take(rerank) {
            let (c, j) = (s.0 / batch_size, s.0 % batch_size);
            s.2 = Some(m.itm(&kept[c], j, &batch)?[0]);
        }
        scored[..rerank].sort_by(|x, y| y.2.unwrap_or(0.0).total_cmp(&x.2.unwrap_or(0.0)));
    }
    let mut out = std::io::stdout().lock();
    for (rank, (i, s, p)) in scored.iter().enumerate() {
        let path = a.images[*i].display().to_string();
        if json {
            let mut o = json!({"rank": rank + 1, "image": path, "text": a.text, "itc": s});
            if let Some(p) = p {
                o["itm"] = json!(p);
            }
            writeln!(out, "{o}")?;
        } else {
            match p {
                Some(p) => writeln!(out, "{s:.6}\t{p:.6}\t{path}")?,
                None => writeln!(out, "{s:.6}\t{path}")?,
            }
        }
    }
    out.flush()?;
    Ok(0)
}

/// Writes a little-endian float32 .npy (format 1.0) of `shape`, through a temporary file
/// renamed into place, so a failed write never leaves a file that looks complete.
pub fn write_npy(path: &Path, shape: &[usize], values: impl Iterator<Item = f32>) -> Result<()> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_str =
        if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_str}, }}");
    // magic (6) + version (2) + length (2) + header, padded with spaces to a multiple of 64, ending in \n.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + shape.iter().product::<usize>() * 4);
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "embeddings.npy".into());
    let tmp = path.with_file_name(format!(".{name}.partial-{}", std::process::id()));
    std::fs::write(&tmp, &bytes).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}
