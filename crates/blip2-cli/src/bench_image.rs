//! `blip2-ort bench --image FILE`: what reading and preprocessing one image costs, per
//! image, on 1, 2, ... worker threads, exact (Pillow's pixels) and with `--fast-decode`;
//! plus, on one thread, how the time splits between decoding and the rest (RGB, resize,
//! normalize). No model runs: the numbers are the CPU work that feeds one.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use blip2_core::ImageConfig;
use blip2_runtime::preprocess::{self, ImageLimits};
use serde_json::{json, Value};

use crate::stats::{median, round};

/// The image processor of every released BLIP-2 checkpoint (Blip2Processor's
/// BlipImageProcessor): 224x224 bicubic, rescale 1/255, CLIP's mean and std.
pub fn blip2_image_config() -> ImageConfig {
    ImageConfig {
        height: 224,
        width: 224,
        do_resize: true,
        resample: 3,
        do_rescale: true,
        rescale_factor: 1.0 / 255.0,
        do_normalize: true,
        // Python floats cast to float32, as transformers' normalize does.
        image_mean: [0.48145466f64, 0.4578275, 0.40821073].map(|v| v as f32),
        image_std: [0.26862954f64, 0.26130258, 0.27577711].map(|v| v as f32),
        do_convert_rgb: true,
    }
}

/// Wall ms per image of preprocessing `images` (each repeated `per_worker` times per
/// worker) on `workers` threads; the median over `reps` runs after a warm-up run.
fn per_image_ms(
    images: &[PathBuf],
    limits: &ImageLimits,
    cfg: &ImageConfig,
    workers: usize,
    reps: usize,
) -> Result<f64> {
    let per_worker = images.len().max(2);
    let batch: Vec<&Path> =
        images.iter().map(PathBuf::as_path).cycle().take(per_worker * workers).collect();
    let run = || -> Result<f64> {
        let t = Instant::now();
        for r in preprocess::load_and_preprocess(&batch, limits, cfg, workers) {
            r?;
        }
        Ok(t.elapsed().as_secs_f64() * 1000.0 / batch.len() as f64)
    };
    run()?;
    let ts = (0..reps).map(|_| run()).collect::<Result<Vec<_>>>()?;
    Ok(round(median(ts), 2))
}

/// One thread: ms per image to read and decode, and for everything after (RGB, resize,
/// normalize), medians over `reps` passes over `images`.
fn split_ms(
    images: &[PathBuf],
    limits: &ImageLimits,
    cfg: &ImageConfig,
    reps: usize,
) -> Result<(f64, f64)> {
    let (mut decode, mut rest) = (Vec::new(), Vec::new());
    for rep in 0..=reps {
        for p in images {
            let t = Instant::now();
            let img = preprocess::load_image(p, limits)?;
            let d = t.elapsed().as_secs_f64() * 1000.0;
            let t = Instant::now();
            preprocess::preprocess(&img, cfg)?;
            if rep > 0 {
                decode.push(d);
                rest.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
    }
    Ok((round(median(decode), 2), round(median(rest), 2)))
}

pub fn run(
    images: &[PathBuf],
    workers: &[usize],
    cfg: &ImageConfig,
    reps: usize,
    json_out: bool,
) -> Result<i32> {
    let exact = ImageLimits::default();
    let fast = exact.fast_decode(cfg);
    // Read each file once first, so a bad one is named before anything is timed.
    for p in images {
        preprocess::load_image(p, &exact)?;
    }
    let mut res: BTreeMap<String, Value> = BTreeMap::new();
    res.insert(
        "images".into(),
        json!(images.iter().map(|p| p.display().to_string()).collect::<Vec<_>>()),
    );
    res.insert("size".into(), json!([cfg.width, cfg.height]));
    res.insert("reps".into(), json!(reps));
    res.insert("cores".into(), json!(std::thread::available_parallelism().map_or(1, |n| n.get())));
    let simd = preprocess::jpeg_simd();
    res.insert("jpeg_simd".into(), json!(simd));
    if !simd {
        eprintln!("warning: {}", preprocess::JPEG_NO_SIMD);
    }
    for (mode, limits) in [("exact", &exact), ("fast", &fast)] {
        let (decode, rest) = split_ms(images, limits, cfg, reps)?;
        res.insert(format!("{mode}_decode_ms"), json!(decode));
        res.insert(format!("{mode}_resize_normalize_ms"), json!(rest));
        for &w in workers {
            let ms = per_image_ms(images, limits, cfg, w, reps)?;
            res.insert(format!("{mode}_w{w}_ms_per_image"), json!(ms));
        }
    }
    let mut out = std::io::stdout().lock();
    if json_out {
        writeln!(out, "{}", serde_json::to_string(&res)?)?;
        return Ok(0);
    }
    writeln!(
        out,
        "preprocessing {} image(s) to {}x{}, median of {reps}, {} cores",
        images.len(),
        cfg.width,
        cfg.height,
        res["cores"]
    )?;
    writeln!(out, "  libjpeg-turbo SIMD: {}", if simd { "on" } else { "off (see the warning)" })?;
    let num = |k: &str| res.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    for mode in ["exact", "fast"] {
        let label = if mode == "exact" { "exact (Pillow's pixels)" } else { "--fast-decode" };
        writeln!(out, "  {label}")?;
        writeln!(
            out,
            "    {:<32} {:>9.2} ms",
            "read + decode, 1 thread",
            num(&format!("{mode}_decode_ms"))
        )?;
        writeln!(
            out,
            "    {:<32} {:>9.2} ms",
            "RGB + resize + normalize",
            num(&format!("{mode}_resize_normalize_ms"))
        )?;
        for &w in workers {
            writeln!(
                out,
                "    {:<32} {:>9.2} ms",
                format!("per image, {w} worker(s)"),
                num(&format!("{mode}_w{w}_ms_per_image"))
            )?;
        }
    }
    Ok(0)
}
