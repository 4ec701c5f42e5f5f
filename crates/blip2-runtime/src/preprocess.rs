//! Images to pixel values exactly as transformers' PIL path does it
//! (`BlipImageProcessorPil`): decode, convert to RGB compositing any transparency onto
//! white (Pillow's `alpha_composite`), resize with Pillow's 8-bit fixed-point resampling,
//! rescale in float64 then cast to float32, normalize in float32.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use blip2_core::ImageConfig;
use image::{DynamicImage, ImageReader, RgbImage};
use ndarray::{Array3, Array4, Axis};

/// Images above this many pixels are refused before their pixels are decoded.
#[derive(Debug, Clone, Copy)]
pub struct ImageLimits {
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self { max_pixels: 64_000_000 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("{path}: cannot read the image: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: not an image in a supported format (PNG, JPEG, GIF, WebP, BMP, TIFF)")]
    UnknownFormat { path: PathBuf },
    #[error("{path}: cannot decode the image: {message}")]
    Decode { path: PathBuf, message: String },
    #[error("{path}: {width}x{height} is {pixels} pixels, over the limit of {limit}")]
    TooLarge { path: PathBuf, width: u32, height: u32, pixels: u64, limit: u64 },
    #[error("resampling filter {0} is not supported (2 = bilinear, 3 = bicubic)")]
    Resample(u32),
}

pub fn load_image(path: &Path, limits: &ImageLimits) -> Result<DynamicImage, PreprocessError> {
    let bytes = std::fs::read(path).map_err(|source| PreprocessError::Read { path: path.into(), source })?;
    load_image_bytes(&bytes, path, limits)
}

/// Decodes an image held in memory; `name` is used in errors.
pub fn load_image_bytes(bytes: &[u8], name: &Path, limits: &ImageLimits) -> Result<DynamicImage, PreprocessError> {
    let reader = || {
        ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|source| PreprocessError::Read { path: name.into(), source })
    };
    let r = reader()?;
    if r.format().is_none() {
        return Err(PreprocessError::UnknownFormat { path: name.into() });
    }
    // The header alone says how big the image is: refuse decompression bombs before
    // any pixel is decoded.
    let (width, height) = r.into_dimensions().map_err(|e| PreprocessError::Decode { path: name.into(), message: e.to_string() })?;
    let pixels = width as u64 * height as u64;
    if pixels > limits.max_pixels {
        return Err(PreprocessError::TooLarge { path: name.into(), width, height, pixels, limit: limits.max_pixels });
    }
    let mut r = reader()?;
    let mut l = image::Limits::default();
    l.max_image_width = Some(width);
    l.max_image_height = Some(height);
    l.max_alloc = Some(pixels.saturating_mul(16).max(1 << 20));
    r.limits(l);
    r.decode().map_err(|e| PreprocessError::Decode { path: name.into(), message: e.to_string() })
}

/// RGB as transformers' `convert_to_rgb`: images with an alpha channel are composited
/// onto opaque white with Pillow's integer `alpha_composite`, others converted directly.
pub fn to_rgb(img: &DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba8();
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let [r, g, b, a] = p.0;
        o.0 = if a == 0 { [255, 255, 255] } else { [over_white(r, a), over_white(g, a), over_white(b, a)] };
    }
    out
}

/// One channel of `src` over opaque white, with Pillow's 7-bit fixed-point coefficients
/// and its rounded division by 255.
fn over_white(c: u8, a: u8) -> u8 {
    const BITS: u32 = 7;
    let (c, a) = (c as u32, a as u32);
    // With an opaque background outa255 = 255 * 255, so coef1 = a << BITS exactly.
    let outa255 = a * 255 + 255 * (255 - a);
    let coef1 = a * 255 * 255 * (1 << BITS) / outa255;
    let coef2 = 255 * (1 << BITS) - coef1;
    let tmp = c * coef1 + 255 * coef2 + (0x80 << BITS);
    ((((tmp >> 8) + tmp) >> 8) >> BITS) as u8
}

/// Pillow's filters: support radius and kernel.
fn filter(resample: u32) -> Result<(f64, fn(f64) -> f64), PreprocessError> {
    fn bicubic(x: f64) -> f64 {
        const A: f64 = -0.5;
        let x = x.abs();
        if x < 1.0 {
            ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * A
        } else {
            0.0
        }
    }
    fn bilinear(x: f64) -> f64 {
        let x = x.abs();
        if x < 1.0 {
            1.0 - x
        } else {
            0.0
        }
    }
    match resample {
        3 => Ok((2.0, bicubic)),
        2 => Ok((1.0, bilinear)),
        other => Err(PreprocessError::Resample(other)),
    }
}

/// Fixed-point precision of Pillow's 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output position: first input index, count, and fixed-point weights
/// (Pillow's precompute_coeffs then normalize_coeffs_8bpc).
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    weights: Vec<i32>,
}

fn coeffs(in_size: usize, out_size: usize, support: f64, f: fn(f64) -> f64) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = support * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // Truncation toward zero, as C's (int) cast.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = f((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for (x, kx) in k.iter().enumerate().take(n) {
            let w = if ww != 0.0 { kx / ww } else { *kx };
            let fixed = w * (1i64 << PRECISION_BITS) as f64;
            weights[xx * ksize + x] = if w < 0.0 { (fixed - 0.5) as i32 } else { (fixed + 0.5) as i32 };
        }
        bounds.push((xmin, n));
    }
    Coeffs { bounds, ksize, weights }
}

#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resamples rows: `src` is `h x w x 3`, result `h x out_w x 3`.
fn horizontal(src: &[u8], w: usize, h: usize, c: &Coeffs) -> Vec<u8> {
    let out_w = c.bounds.len();
    let mut out = vec![0u8; out_w * h * 3];
    for y in 0..h {
        let row = &src[y * w * 3..(y + 1) * w * 3];
        for (xx, &(xmin, n)) in c.bounds.iter().enumerate() {
            let k = &c.weights[xx * c.ksize..xx * c.ksize + n];
            let mut s = [1i32 << (PRECISION_BITS - 1); 3];
            for (x, &kx) in k.iter().enumerate() {
                let p = &row[(xmin + x) * 3..(xmin + x) * 3 + 3];
                s[0] += p[0] as i32 * kx;
                s[1] += p[1] as i32 * kx;
                s[2] += p[2] as i32 * kx;
            }
            let o = &mut out[(y * out_w + xx) * 3..(y * out_w + xx) * 3 + 3];
            o[0] = clip8(s[0]);
            o[1] = clip8(s[1]);
            o[2] = clip8(s[2]);
        }
    }
    out
}

/// Resamples columns: `src` is `h x w x 3`, result `out_h x w x 3`.
fn vertical(src: &[u8], w: usize, c: &Coeffs) -> Vec<u8> {
    let out_h = c.bounds.len();
    let mut out = vec![0u8; w * out_h * 3];
    let mut acc = vec![0i32; w * 3];
    for (yy, &(ymin, n)) in c.bounds.iter().enumerate() {
        let k = &c.weights[yy * c.ksize..yy * c.ksize + n];
        acc.fill(1i32 << (PRECISION_BITS - 1));
        for (y, &ky) in k.iter().enumerate() {
            let row = &src[(ymin + y) * w * 3..(ymin + y + 1) * w * 3];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += p as i32 * ky;
            }
        }
        for (o, &a) in out[yy * w * 3..(yy + 1) * w * 3].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// Pillow 13's `Image.resize` for 8-bit RGB: two separable passes with 8-bit rounding
/// between them. The horizontal pass runs first (over only the rows the vertical pass
/// will read) unless the height shrinks by more than twice as many pixels as the width,
/// in which case the vertical pass runs first; a pass whose size does not change is
/// skipped.
pub fn resize_rgb(img: &RgbImage, width: u32, height: u32, resample: u32) -> Result<RgbImage, PreprocessError> {
    let (support, f) = filter(resample)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (ow, oh) = (width as usize, height as usize);
    let need_h = ow != w;
    let need_v = oh != h;
    let dh = h as i64 - oh as i64;
    let horizontal_first = !(dh > 0 && dh > (w as i64 - ow as i64) * 2);
    let src = img.as_raw();
    let data = if horizontal_first {
        let mut vert = coeffs(h, oh, support, f);
        let mut data = src.clone();
        if need_h {
            // Only rows first..last are read by the vertical pass.
            let first = vert.bounds.first().map(|b| b.0).unwrap_or(0);
            let last = vert.bounds.last().map(|b| b.0 + b.1).unwrap_or(h);
            for b in &mut vert.bounds {
                b.0 -= first;
            }
            let hz = coeffs(w, ow, support, f);
            data = horizontal(&src[first * w * 3..last * w * 3], w, last - first, &hz);
        }
        if need_v {
            data = vertical(&data, ow, &vert);
        }
        data
    } else {
        let mut data = vertical(src, w, &coeffs(h, oh, support, f));
        if need_h {
            data = horizontal(&data, w, oh, &coeffs(w, ow, support, f));
        }
        data
    };
    Ok(RgbImage::from_raw(width, height, data).expect("buffer matches the size"))
}

/// `(3, H, W)` pixel values for one image.
pub fn preprocess(img: &DynamicImage, cfg: &ImageConfig) -> Result<Array3<f32>, PreprocessError> {
    let rgb = if cfg.do_convert_rgb { to_rgb(img) } else { img.to_rgb8() };
    let rgb = if cfg.do_resize && (rgb.width() != cfg.width || rgb.height() != cfg.height) {
        resize_rgb(&rgb, cfg.width, cfg.height, cfg.resample)?
    } else {
        rgb
    };
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let mut out = Array3::<f32>::zeros((3, h, w));
    let raw = rgb.as_raw();
    for c in 0..3 {
        let mean = cfg.image_mean[c];
        let std = cfg.image_std[c];
        let mut plane = out.index_axis_mut(Axis(0), c);
        for (i, v) in plane.iter_mut().enumerate() {
            let p = raw[i * 3 + c];
            // transformers rescales in float64 and casts to float32, then normalizes in float32.
            let mut x = if cfg.do_rescale { (p as f64 * cfg.rescale_factor) as f32 } else { p as f32 };
            if cfg.do_normalize {
                x = (x - mean) / std;
            }
            *v = x;
        }
    }
    Ok(out)
}

/// `(B, 3, H, W)` pixel values for a batch.
pub fn preprocess_batch(images: &[DynamicImage], cfg: &ImageConfig) -> Result<Array4<f32>, PreprocessError> {
    let mut out = Array4::<f32>::zeros((images.len(), 3, cfg.height as usize, cfg.width as usize));
    for (i, img) in images.iter().enumerate() {
        out.index_axis_mut(Axis(0), i).assign(&preprocess(img, cfg)?);
    }
    Ok(out)
}
