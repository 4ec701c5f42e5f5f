//! Images to pixel values exactly as transformers' PIL path does it
//! (`BlipImageProcessorPil` on Pillow 13): decode, convert to RGB compositing any
//! transparency onto white (Pillow's integer `alpha_composite`), resize with Pillow's
//! 8-bit fixed-point resampling, rescale in float64 and cast to float32, normalize in
//! float32. Every step is integer-exact or uses the same IEEE operations in the same
//! order, so the pixel values are bit-identical. Loading follows transformers'
//! `load_image`: JPEG is decoded by libjpeg-turbo as Pillow drives it (see `jpeg`), and
//! the EXIF orientation is applied as `ImageOps.exif_transpose` does (see
//! [`crate::orientation`]).

use std::borrow::Cow;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use crate::jpeg::{self, JpegError};
use crate::orientation;
use blip2_core::ImageConfig;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage, RgbaImage};
use ndarray::{Array3, Array4, Axis};

/// How images are read: the size refused before decoding, and whether JPEGs may be
/// decoded at a reduced scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Images above this many pixels are refused before their pixels are decoded.
    pub max_pixels: u64,
    /// `--fast-decode`: a JPEG is decoded with libjpeg's DCT scaling at the smallest of
    /// 1/2, 1/4 and 1/8 that keeps both sides at least this many pixels (the model's input
    /// size twice over, see [`ImageLimits::fast_decode`]). Faster, but not Pillow's pixels,
    /// so `None` (full size, Pillow-identical) is the default. Other formats ignore it.
    pub jpeg_min_side: Option<u32>,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self { max_pixels: 64_000_000, jpeg_min_side: None }
    }
}

impl ImageLimits {
    /// These limits with `--fast-decode` for a model whose processor resizes to `cfg`:
    /// JPEGs are decoded no smaller than twice its larger side (so the resize still
    /// averages at least 2x2 decoded pixels into each input pixel), whichever way up the
    /// photo turns out to be.
    pub fn fast_decode(self, cfg: &ImageConfig) -> Self {
        Self { jpeg_min_side: Some(2 * cfg.width.max(cfg.height)), ..self }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("{path}: cannot read the file: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not an image in a supported format (PNG, JPEG, GIF, WebP, BMP, TIFF)")]
    UnknownFormat { path: PathBuf },
    #[error("{path}: image format not supported: {source}")]
    Unsupported {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
    #[error("{path}: cannot decode the image: {source}")]
    Decode {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
    #[error("{path}: image file is truncated: the data ends before the image does")]
    Truncated { path: PathBuf },
    #[error("{path}: cannot decode the image: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("{path}: the image is empty ({width}x{height})")]
    Empty { path: PathBuf, width: u32, height: u32 },
    #[error("{path}: {width}x{height} is {pixels} pixels, over the limit of {limit} pixels")]
    TooLarge { path: PathBuf, width: u32, height: u32, pixels: u64, limit: u64 },
    #[error(
        "resampling filter {0} is not supported (0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, \
         4 box, 5 hamming, 6 mks2013, 7 mks2021)"
    )]
    Resample(u32),
    #[error("cannot resize a {from_width}x{from_height} image to {width}x{height}")]
    BadSize { from_width: u32, from_height: u32, width: u32, height: u32 },
    #[error(
        "image {index} of the batch is {width}x{height} after preprocessing, expected \
         {expected_width}x{expected_height} (is do_resize off?)"
    )]
    BatchSize {
        index: usize,
        width: usize,
        height: usize,
        expected_width: u32,
        expected_height: u32,
    },
}

/// Whether JPEGs are decoded with libjpeg-turbo's SIMD code. False when the build found no
/// nasm (x86): the same pixels, about 2x slower to decode; installing nasm is not enough
/// for a build that already exists, which keeps its C-only decoder until
/// `cargo clean -p mozjpeg-sys` (README, "On a fresh machine").
pub fn jpeg_simd() -> bool {
    jpeg::simd()
}

/// What `bench --image` and `serve` say when [`jpeg_simd`] is false.
pub const JPEG_NO_SIMD: &str = "libjpeg-turbo was built without its SIMD code (no nasm when it was built), so JPEGs decode about 2x slower than they should (the same pixels); install nasm, then run `cargo clean -p mozjpeg-sys && cargo clean --release -p mozjpeg-sys` and build again";

/// Reads and decodes an image file (PNG, JPEG, GIF first frame, WebP, BMP, TIFF) and turns
/// it upright by its EXIF orientation; the format is taken from the content, not the
/// extension. A truncated file is an error, as in Pillow.
pub fn load_image(path: &Path, limits: &ImageLimits) -> Result<DynamicImage, PreprocessError> {
    let bytes = std::fs::read(path)
        .map_err(|source| PreprocessError::Read { path: path.into(), source })?;
    decode(&bytes, path, limits)
}

/// Decodes an image held in memory; `name` stands for it in errors.
pub fn load_image_bytes(
    bytes: &[u8],
    name: &str,
    limits: &ImageLimits,
) -> Result<DynamicImage, PreprocessError> {
    decode(bytes, Path::new(name), limits)
}

fn decode(
    bytes: &[u8],
    path: &Path,
    limits: &ImageLimits,
) -> Result<DynamicImage, PreprocessError> {
    if jpeg::is_jpeg(bytes) {
        return decode_jpeg(bytes, path, limits);
    }
    let img = decode_other(bytes, path, limits)?;
    let orientation = match image::guess_format(bytes) {
        Ok(ImageFormat::Png) => orientation::png_orientation(bytes),
        Ok(ImageFormat::WebP) => orientation::webp_orientation(bytes),
        Ok(ImageFormat::Tiff) => orientation::resolve(orientation::from_tiff(bytes), None),
        _ => orientation::UPRIGHT,
    };
    Ok(orientation::apply(img, orientation))
}

fn decode_jpeg(
    bytes: &[u8],
    path: &Path,
    limits: &ImageLimits,
) -> Result<DynamicImage, PreprocessError> {
    let path = || path.to_path_buf();
    match jpeg::decode(bytes, limits.max_pixels, limits.jpeg_min_side) {
        Ok(j) => {
            let o = orientation::resolve(
                j.exif.as_deref().and_then(orientation::from_exif),
                j.xmp.as_deref(),
            );
            Ok(orientation::apply(j.image, o))
        }
        Err(JpegError::Truncated) => Err(PreprocessError::Truncated { path: path() }),
        Err(JpegError::Broken(message)) | Err(JpegError::Unsupported(message)) => {
            Err(PreprocessError::Corrupt { path: path(), message })
        }
        Err(JpegError::TooLarge { width, height }) => Err(PreprocessError::TooLarge {
            path: path(),
            width,
            height,
            pixels: width as u64 * height as u64,
            limit: limits.max_pixels,
        }),
        Err(JpegError::Empty { width, height }) => {
            Err(PreprocessError::Empty { path: path(), width, height })
        }
    }
}

fn decode_other(
    bytes: &[u8],
    path: &Path,
    limits: &ImageLimits,
) -> Result<DynamicImage, PreprocessError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|source| PreprocessError::Read { path: path.into(), source })?;
    if reader.format().is_none() {
        return Err(PreprocessError::UnknownFormat { path: path.into() });
    }
    let classify = |source: image::ImageError| match source {
        image::ImageError::Unsupported(_) => {
            PreprocessError::Unsupported { path: path.into(), source }
        }
        source => PreprocessError::Decode { path: path.into(), source },
    };
    // Making the decoder reads only the header: the size is known before any pixel is
    // decoded, so decompression bombs are refused here.
    let mut decoder = reader.into_decoder().map_err(classify)?;
    let (width, height) = decoder.dimensions();
    let pixels = width as u64 * height as u64;
    if pixels > limits.max_pixels {
        return Err(PreprocessError::TooLarge {
            path: path.into(),
            width,
            height,
            pixels,
            limit: limits.max_pixels,
        });
    }
    if pixels == 0 {
        return Err(PreprocessError::Empty { path: path.into(), width, height });
    }
    // And the decoder is held to that size: 16 bytes a pixel covers every output layout
    // (RGBA f32) plus the decoders' working buffers.
    let mut l = image::Limits::default();
    l.max_image_width = Some(width);
    l.max_image_height = Some(height);
    l.max_alloc = Some(pixels.saturating_mul(16).max(64 << 20));
    decoder.set_limits(l).map_err(classify)?;
    DynamicImage::from_decoder(decoder).map_err(classify)
}

/// RGB as transformers' `convert_to_rgb` on a Pillow image: an image with an alpha channel
/// (or a transparent colour, which the decoders turn into one) is composited onto opaque
/// white with Pillow's integer `alpha_composite`; others are converted as Pillow does.
pub fn to_rgb(img: &DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return pillow_rgb(img);
    }
    let rgba = pillow_rgba(img);
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let [r, g, b, a] = p.0;
        o.0 = [over_white(r, a), over_white(g, a), over_white(b, a)];
    }
    out
}

/// Pillow's 8-bit view of 16-bit samples keeps the high byte (`RGB;16B`, `LA;16B` raw modes).
fn high_byte(v: u16) -> u8 {
    (v >> 8) as u8
}

/// Pillow's `convert("RGB")` without compositing. Where Pillow reads 16-bit data differently
/// from the image crate's rounding conversion, follow Pillow.
fn pillow_rgb(img: &DynamicImage) -> RgbImage {
    match img {
        DynamicImage::ImageRgb8(i) => i.clone(),
        // 16-bit greyscale is Pillow's "I;16", whose conversion to RGB saturates at 255
        // instead of scaling (Convert.c, I16_RGB).
        DynamicImage::ImageLuma16(i) => RgbImage::from_fn(i.width(), i.height(), |x, y| {
            let v = i.get_pixel(x, y).0[0].min(255) as u8;
            image::Rgb([v, v, v])
        }),
        DynamicImage::ImageRgb16(i) => RgbImage::from_fn(i.width(), i.height(), |x, y| {
            image::Rgb(i.get_pixel(x, y).0.map(high_byte))
        }),
        DynamicImage::ImageRgba16(_) | DynamicImage::ImageLumaA16(_) => {
            let rgba = pillow_rgba(img);
            RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
                let [r, g, b, _] = rgba.get_pixel(x, y).0;
                image::Rgb([r, g, b])
            })
        }
        other => other.to_rgb8(),
    }
}

/// Pillow's RGBA for an image with alpha; 16-bit samples keep their high byte.
fn pillow_rgba(img: &DynamicImage) -> RgbaImage {
    match img {
        DynamicImage::ImageRgba8(i) => i.clone(),
        DynamicImage::ImageRgba16(i) => RgbaImage::from_fn(i.width(), i.height(), |x, y| {
            image::Rgba(i.get_pixel(x, y).0.map(high_byte))
        }),
        DynamicImage::ImageLumaA16(i) => RgbaImage::from_fn(i.width(), i.height(), |x, y| {
            let [l, a] = i.get_pixel(x, y).0.map(high_byte);
            image::Rgba([l, l, l, a])
        }),
        other => other.to_rgba8(),
    }
}

/// One channel of a pixel with alpha `a` laid over opaque white, in Pillow's
/// `alpha_composite` arithmetic: 7 extra fixed-point bits and a rounded division by 255.
fn over_white(c: u8, a: u8) -> u8 {
    const BITS: u32 = 7;
    if a == 0 {
        // Pillow copies the background pixel outright.
        return 255;
    }
    let (c, a) = (c as u32, a as u32);
    // Background alpha is 255, so the output alpha (x255) is always 255 * 255.
    let out_a255 = a * 255 + 255 * (255 - a);
    let coef_src = a * 255 * 255 * (1 << BITS) / out_a255;
    let coef_dst = 255 * (1 << BITS) - coef_src;
    let t = c * coef_src + 255 * coef_dst + (0x80 << BITS);
    // (t + t / 256) / 256 is Pillow's shift-based rounded division by 255.
    ((((t >> 8) + t) >> 8) >> BITS) as u8
}

/// A Pillow resampling filter: its support radius (at scale 1) and kernel.
struct Filter {
    support: f64,
    kernel: fn(f64) -> f64,
}

/// The kernels of Resample.c, written with the same operations in the same order so that
/// the double-precision weights, and hence the rounded fixed-point ones, are identical.
mod kernels {
    use std::f64::consts::PI;

    pub fn box_(x: f64) -> f64 {
        if x > -0.5 && x <= 0.5 {
            1.0
        } else {
            0.0
        }
    }

    pub fn bilinear(x: f64) -> f64 {
        let x = x.abs();
        if x < 1.0 {
            1.0 - x
        } else {
            0.0
        }
    }

    pub fn hamming(x: f64) -> f64 {
        let x = x.abs();
        if x == 0.0 {
            return 1.0;
        }
        if x >= 1.0 {
            return 0.0;
        }
        let x = x * PI;
        // The C source uses float literals 0.54f and 0.46f, widened to double.
        x.sin() / x * (0.54f32 as f64 + 0.46f32 as f64 * x.cos())
    }

    pub fn bicubic(x: f64) -> f64 {
        // Keys' cubic convolution with a = -0.5.
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

    fn sinc(x: f64) -> f64 {
        if x == 0.0 {
            return 1.0;
        }
        let x = x * PI;
        x.sin() / x
    }

    pub fn lanczos(x: f64) -> f64 {
        if (-3.0..3.0).contains(&x) {
            sinc(x) * sinc(x / 3.0)
        } else {
            0.0
        }
    }

    pub fn mks2013(x: f64) -> f64 {
        let x = x.abs();
        if x < 0.5 {
            17.0 / 16.0 - 7.0 / 4.0 * (x * x)
        } else if x < 1.5 {
            (1.0 - x) * (7.0 / 4.0 - x)
        } else if x < 2.5 {
            let d = x - 5.0 / 2.0;
            -1.0 / 8.0 * (d * d)
        } else {
            0.0
        }
    }

    pub fn mks2021(x: f64) -> f64 {
        let x = x.abs();
        if x < 0.5 {
            577.0 / 576.0 - 239.0 / 144.0 * (x * x)
        } else if x < 1.5 {
            35.0 / 36.0 * (x - 1.0) * (x - 239.0 / 140.0)
        } else if x < 2.5 {
            1.0 / 6.0 * (x - 2.0) * (65.0 / 24.0 - x)
        } else if x < 3.5 {
            1.0 / 36.0 * (x - 3.0) * (x - 15.0 / 4.0)
        } else if x < 4.5 {
            let d = x - 9.0 / 2.0;
            -1.0 / 288.0 * (d * d)
        } else {
            0.0
        }
    }
}

/// Pillow's filter numbers (`PIL.Image.Resampling`); `None` is NEAREST, which Pillow does
/// not resample but maps coordinates (see [`nearest`]).
fn filter(resample: u32) -> Result<Option<Filter>, PreprocessError> {
    let (support, kernel): (f64, fn(f64) -> f64) = match resample {
        0 => return Ok(None),
        1 => (3.0, kernels::lanczos),
        2 => (1.0, kernels::bilinear),
        3 => (2.0, kernels::bicubic),
        4 => (0.5, kernels::box_),
        5 => (1.0, kernels::hamming),
        6 => (2.5, kernels::mks2013),
        7 => (4.5, kernels::mks2021),
        other => return Err(PreprocessError::Resample(other)),
    };
    Ok(Some(Filter { support, kernel }))
}

/// Fixed-point precision of Pillow's 8-bit resampling: 8 bits of result, 2 of headroom
/// for filters with negative lobes, in a 32-bit accumulator.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// One axis' weights: for each output position the first input index, the tap count and
/// the fixed-point weights (`ksize` slots per position).
struct Coeffs {
    start: Vec<usize>,
    taps: Vec<usize>,
    ksize: usize,
    weights: Vec<i32>,
}

impl Coeffs {
    fn of(&self, i: usize) -> (usize, &[i32]) {
        let k = &self.weights[i * self.ksize..i * self.ksize + self.taps[i]];
        (self.start[i], k)
    }
}

/// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`.
fn coeffs(in_size: usize, out_size: usize, f: &Filter) -> Coeffs {
    // Pillow takes the source extent from a float box: reproduce that rounding (only
    // visible past 2^24 pixels).
    let span = in_size as f32 as f64;
    let scale = span / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = f.support * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv = 1.0 / filterscale;
    let mut start = Vec::with_capacity(out_size);
    let mut taps = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut w = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // Truncation toward zero, as C's (int) cast, then clamp to the image.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin).min(ksize);
        let mut total = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(n) {
            // (x + xmin) is an int sum in C, exact in f64 too.
            *wx = (f.kernel)(((x + xmin) as f64 - center + 0.5) * inv);
            total += *wx;
        }
        let row = &mut weights[xx * ksize..xx * ksize + n];
        for (slot, &wx) in row.iter_mut().zip(&w[..n]) {
            let wx = if total != 0.0 { wx / total } else { wx };
            let fixed = wx * (1 << PRECISION_BITS) as f64;
            // Round half away from zero, as normalize_coeffs_8bpc.
            *slot = if wx < 0.0 { (-0.5 + fixed) as i32 } else { (0.5 + fixed) as i32 };
        }
        start.push(xmin);
        taps.push(n);
    }
    Coeffs { start, taps, ksize, weights }
}

/// The accumulator's start value: one half, so that the final shift rounds.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `HALF + sum(a[i] * b[i])` in wrapping 32-bit arithmetic. Pillow sums the same products
/// in a 32-bit `int` that never overflows (8-bit samples, weights summing to 2^22), so
/// any order gives its exact result: the compiler may add in vector lanes.
#[inline(always)]
fn dot(a: &[i32], b: &[i32]) -> i32 {
    a.iter().zip(b).fold(HALF, |s, (x, y)| s.wrapping_add(x.wrapping_mul(*y)))
}

/// Horizontal pass over `rows` rows of a packed RGB buffer `w` pixels wide, starting at
/// row `first`: the result is `rows` rows of `c.start.len()` pixels.
fn horizontal(src: &[u8], w: usize, first: usize, rows: usize, c: &Coeffs) -> Vec<u8> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { horizontal_avx2(src, w, first, rows, c) };
    }
    horizontal_any(src, w, first, rows, c)
}

/// The same code compiled for AVX2 (8 lanes of 32-bit multiplies), chosen at run time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn horizontal_avx2(src: &[u8], w: usize, first: usize, rows: usize, c: &Coeffs) -> Vec<u8> {
    horizontal_any(src, w, first, rows, c)
}

#[inline(always)]
fn horizontal_any(src: &[u8], w: usize, first: usize, rows: usize, c: &Coeffs) -> Vec<u8> {
    let ow = c.start.len();
    let mut out = vec![0u8; ow * rows * 3];
    // Each row split into one 32-bit plane per channel, so every output sample is a
    // contiguous dot product of samples and weights.
    let mut planes = vec![0i32; w * 3];
    for (y, out_row) in out.chunks_exact_mut(ow * 3).enumerate() {
        let row = &src[(first + y) * w * 3..(first + y + 1) * w * 3];
        let (r, gb) = planes.split_at_mut(w);
        let (g, b) = gb.split_at_mut(w);
        for (((p, r), g), b) in
            row.chunks_exact(3).zip(r.iter_mut()).zip(g.iter_mut()).zip(b.iter_mut())
        {
            (*r, *g, *b) = (p[0] as i32, p[1] as i32, p[2] as i32);
        }
        for (xx, o) in out_row.chunks_exact_mut(3).enumerate() {
            let (xmin, k) = c.of(xx);
            let span = xmin..xmin + k.len();
            o[0] = clip8(dot(&r[span.clone()], k));
            o[1] = clip8(dot(&g[span.clone()], k));
            o[2] = clip8(dot(&b[span], k));
        }
    }
    out
}

/// Vertical pass over a packed RGB buffer `w` pixels wide whose row 0 is source row
/// `offset` (the weights index source rows).
fn vertical(src: &[u8], w: usize, offset: usize, c: &Coeffs) -> Vec<u8> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { vertical_avx2(src, w, offset, c) };
    }
    vertical_any(src, w, offset, c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn vertical_avx2(src: &[u8], w: usize, offset: usize, c: &Coeffs) -> Vec<u8> {
    vertical_any(src, w, offset, c)
}

#[inline(always)]
fn vertical_any(src: &[u8], w: usize, offset: usize, c: &Coeffs) -> Vec<u8> {
    let oh = c.start.len();
    let stride = w * 3;
    let mut out = vec![0u8; stride * oh];
    // Row by row into an accumulator line: each source row is read contiguously (the
    // same sums as Pillow's, in another order, which integer addition allows).
    let mut acc = vec![0i32; stride];
    for (yy, out_row) in out.chunks_exact_mut(stride).enumerate() {
        let (ymin, k) = c.of(yy);
        acc.fill(HALF);
        for (y, &ky) in k.iter().enumerate() {
            let r = ymin + y - offset;
            for (a, &p) in acc.iter_mut().zip(&src[r * stride..(r + 1) * stride]) {
                *a = a.wrapping_add((p as i32).wrapping_mul(ky));
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// Pillow's NEAREST resize: an affine coordinate map stepped by repeated addition
/// (Geometry.c, ImagingScaleAffine), not a filter.
fn nearest(img: &RgbImage, ow: usize, oh: usize) -> Vec<u8> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let table = |in_size: usize, out_size: usize| -> Vec<Option<usize>> {
        let a = in_size as f32 as f64 / out_size as f64;
        let mut pos = a * 0.5;
        (0..out_size)
            .map(|_| {
                let i = if pos < 0.0 { None } else { Some(pos as usize).filter(|&i| i < in_size) };
                pos += a;
                i
            })
            .collect()
    };
    let (xs, ys) = (table(w, ow), table(h, oh));
    let src = img.as_raw();
    let mut out = vec![0u8; ow * oh * 3];
    for (row, yi) in out.chunks_exact_mut(ow * 3).zip(&ys) {
        // Pillow leaves pixels that map outside the source black.
        let Some(yi) = yi else { continue };
        for (o, xi) in row.chunks_exact_mut(3).zip(&xs) {
            if let Some(xi) = xi {
                o.copy_from_slice(&src[(yi * w + xi) * 3..(yi * w + xi) * 3 + 3]);
            }
        }
    }
    out
}

/// Pillow's `Image.resize((width, height), resample)` of an 8-bit RGB image, bit for bit.
///
/// Two separable passes in 8 bits with 22-bit fixed-point weights; a pass whose size does
/// not change is skipped. Pillow 13 runs the vertical pass first when the height shrinks
/// by more than twice as many pixels as the width does, otherwise the horizontal pass
/// first over only the rows the vertical pass will read.
pub fn resize_rgb(
    img: &RgbImage,
    width: u32,
    height: u32,
    resample: u32,
) -> Result<RgbImage, PreprocessError> {
    let f = filter(resample)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (ow, oh) = (width as usize, height as usize);
    if ow == 0 || oh == 0 || w == 0 || h == 0 {
        return Err(PreprocessError::BadSize {
            from_width: img.width(),
            from_height: img.height(),
            width,
            height,
        });
    }
    if (w, h) == (ow, oh) {
        return Ok(img.clone());
    }
    let data = match f {
        None => nearest(img, ow, oh),
        Some(f) => {
            let src = img.as_raw();
            let (need_h, need_v) = (ow != w, oh != h);
            let (dw, dh) = (w as i64 - ow as i64, h as i64 - oh as i64);
            let vertical_first = dh > 0 && dh > dw * 2;
            if vertical_first {
                let tmp = vertical(src, w, 0, &coeffs(h, oh, &f));
                if need_h {
                    horizontal(&tmp, w, 0, oh, &coeffs(w, ow, &f))
                } else {
                    tmp
                }
            } else if need_v {
                let vc = coeffs(h, oh, &f);
                if need_h {
                    // Rows outside [first, last) are never read by the vertical pass.
                    let first = vc.start[0];
                    let last = vc.start[oh - 1] + vc.taps[oh - 1];
                    let tmp = horizontal(src, w, first, last - first, &coeffs(w, ow, &f));
                    vertical(&tmp, ow, first, &vc)
                } else {
                    vertical(src, w, 0, &vc)
                }
            } else {
                horizontal(src, w, 0, h, &coeffs(w, ow, &f))
            }
        }
    };
    // The passes produce exactly width * height * 3 bytes.
    RgbImage::from_raw(width, height, data).ok_or(PreprocessError::BadSize {
        from_width: img.width(),
        from_height: img.height(),
        width,
        height,
    })
}

/// `(3, H, W)` pixel values for one image, as `BlipImageProcessorPil` makes them.
pub fn preprocess(img: &DynamicImage, cfg: &ImageConfig) -> Result<Array3<f32>, PreprocessError> {
    // Without do_convert_rgb transformers keeps the image's own channels, which the
    // vision encoder cannot take; Pillow's plain RGB conversion is the closest fit.
    // An RGB image is its own conversion: borrowed, not copied (36 MB at 12 megapixels).
    let rgb = match img {
        DynamicImage::ImageRgb8(i) => Cow::Borrowed(i),
        _ if cfg.do_convert_rgb => Cow::Owned(to_rgb(img)),
        _ => Cow::Owned(pillow_rgb(img)),
    };
    let rgb = if cfg.do_resize {
        Cow::Owned(resize_rgb(&rgb, cfg.width, cfg.height, cfg.resample)?)
    } else {
        rgb
    };
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let mut out = Array3::<f32>::zeros((3, h, w));
    let raw = rgb.as_raw();
    for c in 0..3 {
        let (mean, std) = (cfg.image_mean[c], cfg.image_std[c]);
        let mut plane = out.index_axis_mut(Axis(0), c);
        let plane = plane.as_slice_mut().expect("a fresh array is contiguous");
        for (v, px) in plane.iter_mut().zip(raw.chunks_exact(3)) {
            let p = px[c];
            // transformers' rescale multiplies in float64 and casts to float32; normalize
            // then works in float32 (mean and std cast to float32), (x - mean) / std.
            let mut x =
                if cfg.do_rescale { (p as f64 * cfg.rescale_factor) as f32 } else { p as f32 };
            if cfg.do_normalize {
                x = (x - mean) / std;
            }
            *v = x;
        }
    }
    Ok(out)
}

/// `(B, 3, H, W)` pixel values for a batch; every image must come out at the configured
/// size (always so when `do_resize` is on).
pub fn preprocess_batch(
    images: &[DynamicImage],
    cfg: &ImageConfig,
) -> Result<Array4<f32>, PreprocessError> {
    let mut out = Array4::<f32>::zeros((images.len(), 3, cfg.height as usize, cfg.width as usize));
    for (index, img) in images.iter().enumerate() {
        let px = preprocess(img, cfg)?;
        let (height, width) = (px.shape()[1], px.shape()[2]);
        if (height, width) != (cfg.height as usize, cfg.width as usize) {
            return Err(PreprocessError::BatchSize {
                index,
                width,
                height,
                expected_width: cfg.width,
                expected_height: cfg.height,
            });
        }
        out.index_axis_mut(Axis(0), index).assign(&px);
    }
    Ok(out)
}

/// Reads, decodes and preprocesses each of `paths` into pixel values `[1, 3, H, W]`, on
/// `threads` worker threads (at least one) that take the files in turn; the results come
/// back in `paths`' order, each exactly what [`load_image`] and [`preprocess_batch`] give
/// it alone. A photo of 12 megapixels costs far more to decode and resize than its
/// model run at small batch sizes, so the cores share that work.
pub fn load_and_preprocess(
    paths: &[&Path],
    limits: &ImageLimits,
    cfg: &ImageConfig,
    threads: usize,
) -> Vec<Result<Array4<f32>, PreprocessError>> {
    on_workers(paths, threads, |path| {
        let img = load_image(path, limits)?;
        preprocess_batch(std::slice::from_ref(&img), cfg)
    })
}

/// `f` of each of `items`, on `threads` worker threads (at least one, at most one per
/// item) that take the items in turn; the results in `items`' order. What
/// [`load_and_preprocess`] runs on, for callers whose images are not all files (the
/// Python module's bytes and in-memory images).
pub fn on_workers<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let workers = threads.clamp(1, items.len().max(1));
    let mut done: Vec<(usize, R)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        mine.push((i, f(item)));
                    }
                    mine
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("a preprocessing worker")).collect()
    });
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// A counting gate: at most `n` holders at once, the others wait (blocking their thread).
pub struct Slots {
    free: std::sync::Mutex<usize>,
    freed: std::sync::Condvar,
}

impl Slots {
    pub fn new(n: usize) -> Self {
        Self { free: std::sync::Mutex::new(n.max(1)), freed: std::sync::Condvar::new() }
    }

    /// `f()` once a slot is free; the slot is given back when `f` returns or panics.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Held<'a>(&'a Slots);
        impl Drop for Held<'_> {
            fn drop(&mut self) {
                *self.0.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                self.0.freed.notify_one();
            }
        }
        {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            while *free == 0 {
                free = self.freed.wait(free).unwrap_or_else(|e| e.into_inner());
            }
            *free -= 1;
        }
        let _held = Held(self);
        f()
    }
}

/// Runs `f` (decoding and preprocessing an image) once one of the machine's cores is free
/// for it: at most `available_parallelism` such calls run at once across the process, the
/// others wait. The server's requests go through this, so a burst of photos is decoded by
/// a pool the size of the machine instead of hundreds of threads fighting for its cores.
pub fn on_cpu_slot<R>(f: impl FnOnce() -> R) -> R {
    static CPU: std::sync::OnceLock<Slots> = std::sync::OnceLock::new();
    CPU.get_or_init(|| Slots::new(std::thread::available_parallelism().map_or(1, |n| n.get())))
        .run(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The passes as Pillow's Resample.c writes them: per output pixel, per channel, one
    /// tap after another.
    fn pillow_passes(src: &[u8], w: usize, h: usize, ow: usize, oh: usize, f: &Filter) -> Vec<u8> {
        let (hc, vc) = (coeffs(w, ow, f), coeffs(h, oh, f));
        let mut tmp = vec![0u8; ow * h * 3];
        for y in 0..h {
            for xx in 0..ow {
                let (xmin, k) = hc.of(xx);
                for c in 0..3 {
                    let mut ss = HALF;
                    for (x, &kx) in k.iter().enumerate() {
                        ss += src[(y * w + xmin + x) * 3 + c] as i32 * kx;
                    }
                    tmp[(y * ow + xx) * 3 + c] = clip8(ss);
                }
            }
        }
        let mut out = vec![0u8; ow * oh * 3];
        for yy in 0..oh {
            let (ymin, k) = vc.of(yy);
            for i in 0..ow * 3 {
                let mut ss = HALF;
                for (y, &ky) in k.iter().enumerate() {
                    ss += tmp[(ymin + y) * ow * 3 + i] as i32 * ky;
                }
                out[yy * ow * 3 + i] = clip8(ss);
            }
        }
        out
    }

    #[test]
    fn vectorized_passes_give_pillow_s_bytes() {
        // Seeded noise (the worst case for rounding), every filter with negative lobes
        // and without, down and up; both the run-time pick (AVX2 here) and the baseline.
        let (w, h) = (203, 117);
        let mut state = 7u64;
        let src: Vec<u8> = (0..w * h * 3)
            .map(|_| (crate::generation::rng::splitmix64(&mut state) >> 56) as u8)
            .collect();
        for resample in 1..=7 {
            let f = filter(resample).unwrap().unwrap();
            for (ow, oh) in [(37, 25), (9, 5), (150, 100), (300, 200)] {
                let want = pillow_passes(&src, w, h, ow, oh, &f);
                let (hc, vc) = (coeffs(w, ow, &f), coeffs(h, oh, &f));
                let got = vertical(&horizontal(&src, w, 0, h, &hc), ow, 0, &vc);
                assert!(got == want, "filter {resample}, {ow}x{oh}");
                let any = vertical_any(&horizontal_any(&src, w, 0, h, &hc), ow, 0, &vc);
                assert!(any == want, "filter {resample}, {ow}x{oh}, baseline");
            }
        }
    }

    #[test]
    fn slots_hold_at_most_their_count() {
        let slots = Slots::new(2);
        let (now, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    slots.run(|| {
                        let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(n, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        now.fetch_sub(1, Ordering::SeqCst);
                    })
                });
            }
        });
        assert_eq!(most.load(Ordering::SeqCst), 2);
        // A panicking holder gives its slot back.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| slots.run(|| panic!())));
        assert!(r.is_err());
        assert_eq!(*slots.free.lock().unwrap(), 2);
    }
}
