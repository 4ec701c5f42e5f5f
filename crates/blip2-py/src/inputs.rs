//! Python arguments to Rust values, while the GIL is held: images of every kind (only
//! copied here; decoding and preprocessing run later without the GIL), texts and
//! generation keyword arguments.

use std::path::PathBuf;

use blip2_core::{EarlyStoppingSetting, GenerationDefaults, ImageConfig, Never};
use blip2_runtime::preprocess::{self, ImageLimits, PreprocessError};
use image::{DynamicImage, RgbImage, RgbaImage};
use ndarray::Array4;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList, PyMemoryView, PyString, PyTuple};

use crate::errors::{preprocess_error, value_error};

/// One image as the caller gave it.
pub enum Source {
    Path(PathBuf),
    Bytes(Vec<u8>),
    /// A Pillow image or a numpy array, its pixels copied.
    Pixels(DynamicImage),
}

/// An image and the name it has in errors (`images[2]`, or the argument's name alone).
pub struct Named {
    pub name: String,
    pub source: Source,
}

fn is_path(x: &Bound<'_, PyAny>) -> PyResult<bool> {
    if x.is_instance_of::<PyString>() {
        return Ok(true);
    }
    let path_like = x.py().import("os")?.getattr("PathLike")?;
    x.is_instance(&path_like)
}

fn is_bytes(x: &Bound<'_, PyAny>) -> bool {
    x.is_instance_of::<PyBytes>()
        || x.is_instance_of::<PyByteArray>()
        || x.is_instance_of::<PyMemoryView>()
}

/// Whether `x` is one image (so the argument is not a list of them).
fn is_single(x: &Bound<'_, PyAny>) -> PyResult<bool> {
    Ok(is_path(x)? || is_bytes(x) || is_pil(x) || is_array(x)?)
}

fn is_pil(x: &Bound<'_, PyAny>) -> bool {
    let module = x.get_type().module().map(|m| m.to_string()).unwrap_or_default();
    module.starts_with("PIL.") && x.hasattr("mode").unwrap_or(false)
}

fn is_array(x: &Bound<'_, PyAny>) -> PyResult<bool> {
    Ok(x.hasattr("__array_interface__")? && x.hasattr("dtype")? && x.hasattr("shape")?)
}

/// `images`: one image or a list (or tuple) of them; `arg` is the argument's name.
pub fn images(arg: &str, images: &Bound<'_, PyAny>) -> PyResult<Vec<Named>> {
    if is_single(images)? {
        return Ok(vec![image(arg.to_string(), images)?]);
    }
    if !(images.is_instance_of::<PyList>() || images.is_instance_of::<PyTuple>()) {
        return Err(PyTypeError::new_err(format!(
            "{arg}: expected an image (a path, bytes, a PIL.Image.Image or a numpy uint8 HxWx3 array) or a list of \
             them, got {}",
            type_name(images)
        )));
    }
    let mut out = Vec::new();
    for (i, x) in images.try_iter()?.enumerate() {
        out.push(image(format!("{arg}[{i}]"), &x?)?);
    }
    if out.is_empty() {
        return Err(PyValueError::new_err(format!("{arg}: the list is empty")));
    }
    Ok(out)
}

/// Exactly one image (for `vqa`, `chat`, `itm`).
pub fn one_image(arg: &str, x: &Bound<'_, PyAny>) -> PyResult<Named> {
    if !is_single(x)? {
        return Err(PyTypeError::new_err(format!(
            "{arg}: expected one image (a path, bytes, a PIL.Image.Image or a numpy uint8 HxWx3 array), got {}",
            type_name(x)
        )));
    }
    image(arg.to_string(), x)
}

fn type_name(x: &Bound<'_, PyAny>) -> String {
    x.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

fn image(name: String, x: &Bound<'_, PyAny>) -> PyResult<Named> {
    let source = if is_path(x)? {
        Source::Path(x.extract::<PathBuf>()?)
    } else if x.is_instance_of::<PyBytes>() {
        Source::Bytes(x.cast::<PyBytes>()?.as_bytes().to_vec())
    } else if is_bytes(x) {
        Source::Bytes(x.py().get_type::<PyBytes>().call1((x,))?.extract::<Vec<u8>>()?)
    } else if is_pil(x) {
        Source::Pixels(pil_image(&name, x)?)
    } else if is_array(x)? {
        Source::Pixels(array_image(&name, x)?)
    } else {
        return Err(PyTypeError::new_err(format!(
            "{name}: expected a path, bytes, a PIL.Image.Image or a numpy uint8 HxWx3 array, got {}",
            type_name(x)
        )));
    };
    Ok(Named { name, source })
}

/// A Pillow image's pixels. RGB is taken as it is; any other mode goes through Pillow's
/// RGBA conversion, and the runtime composites it onto white as transformers'
/// `convert_to_rgb` does, so the pixel values are those transformers makes of it.
fn pil_image(name: &str, x: &Bound<'_, PyAny>) -> PyResult<DynamicImage> {
    let mode: String = x.getattr("mode")?.extract()?;
    let (w, h): (u32, u32) = x.getattr("size")?.extract()?;
    if w == 0 || h == 0 {
        return Err(value_error(name, format!("the image is empty ({w}x{h})")));
    }
    let bad = || value_error(name, format!("PIL image of mode {mode} gave too few bytes"));
    if mode == "RGB" {
        let raw: Vec<u8> = x.call_method0("tobytes")?.extract()?;
        return RgbImage::from_raw(w, h, raw).map(DynamicImage::ImageRgb8).ok_or_else(bad);
    }
    let rgba = x.call_method1("convert", ("RGBA",))?;
    let raw: Vec<u8> = rgba.call_method0("tobytes")?.extract()?;
    RgbaImage::from_raw(w, h, raw).map(DynamicImage::ImageRgba8).ok_or_else(bad)
}

/// A numpy `uint8` array of shape `(H, W, 3)`, RGB.
fn array_image(name: &str, x: &Bound<'_, PyAny>) -> PyResult<DynamicImage> {
    let dtype: String = x.getattr("dtype")?.str()?.extract()?;
    let shape: Vec<usize> = x.getattr("shape")?.extract()?;
    if dtype != "uint8" || shape.len() != 3 || shape[2] != 3 {
        return Err(value_error(
            name,
            format!(
                "a numpy image must be uint8 of shape (height, width, 3), RGB; got {dtype} of shape {shape:?}"
            ),
        ));
    }
    let (h, w) = (shape[0], shape[1]);
    if h == 0 || w == 0 {
        return Err(value_error(name, format!("the image is empty ({w}x{h})")));
    }
    let too_big = || value_error(name, format!("{w}x{h} is too large"));
    let (w32, h32) =
        (u32::try_from(w).map_err(|_| too_big())?, u32::try_from(h).map_err(|_| too_big())?);
    let np = x.py().import("numpy")?;
    let raw: Vec<u8> =
        np.call_method1("ascontiguousarray", (x,))?.call_method0("tobytes")?.extract()?;
    RgbImage::from_raw(w32, h32, raw)
        .map(DynamicImage::ImageRgb8)
        .ok_or_else(|| value_error(name, "the array has fewer bytes than its shape says"))
}

/// Pixel values `[1, 3, H, W]` of one image: read and decoded (files and bytes, EXIF
/// orientation applied as transformers' `load_image` does), then preprocessed. Runs
/// without the GIL.
pub fn pixels(
    n: &Named,
    limits: &ImageLimits,
    cfg: &ImageConfig,
) -> Result<Array4<f32>, PreprocessError> {
    let decoded;
    let img = match &n.source {
        Source::Path(p) => {
            decoded = preprocess::load_image(p, limits)?;
            &decoded
        }
        Source::Bytes(b) => {
            decoded = preprocess::load_image_bytes(b, &format!("{} (bytes)", n.name), limits)?;
            &decoded
        }
        Source::Pixels(img) => {
            let pixels = img.width() as u64 * img.height() as u64;
            if pixels > limits.max_pixels {
                return Err(PreprocessError::TooLarge {
                    path: n.name.clone().into(),
                    width: img.width(),
                    height: img.height(),
                    pixels,
                    limit: limits.max_pixels,
                });
            }
            img
        }
    };
    preprocess::preprocess_batch(std::slice::from_ref(img), cfg)
}

/// Every image's pixel values, on `threads` workers (without the GIL), in order; the
/// first image that fails (in order) fails the call, its name in the error.
pub fn all_pixels(
    py: Python<'_>,
    images: &[Named],
    limits: &ImageLimits,
    cfg: &ImageConfig,
    threads: usize,
) -> PyResult<Vec<Array4<f32>>> {
    let loaded = py.detach(|| preprocess::on_workers(images, threads, |n| pixels(n, limits, cfg)));
    images.iter().zip(loaded).map(|(n, r)| r.map_err(|e| preprocess_error(&n.name, &e))).collect()
}

/// `texts`: one string or a list of them.
pub fn texts(arg: &str, x: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    if let Ok(s) = x.cast::<PyString>() {
        return Ok(vec![s.extract::<String>()?]);
    }
    if !(x.is_instance_of::<PyList>() || x.is_instance_of::<PyTuple>()) {
        return Err(PyTypeError::new_err(format!(
            "{arg}: expected a string or a list of strings, got {}",
            type_name(x)
        )));
    }
    let mut out = Vec::new();
    for (i, t) in x.try_iter()?.enumerate() {
        let t = t?;
        let s = t.cast::<PyString>().map_err(|_| {
            PyTypeError::new_err(format!("{arg}[{i}]: expected a string, got {}", type_name(&t)))
        })?;
        out.push(s.extract::<String>()?);
    }
    if out.is_empty() {
        return Err(PyValueError::new_err(format!("{arg}: the list is empty")));
    }
    Ok(out)
}

/// The generation keyword arguments, as the settings to lay over the model's
/// (`generation_config.json`, then transformers' defaults). Values are checked here
/// (type, sign); ranges and combinations by the search's own checks later.
pub const GENERATION_ARGS: [&str; 13] = [
    "max_new_tokens",
    "min_new_tokens",
    "num_beams",
    "length_penalty",
    "early_stopping",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "num_return_sequences",
];

pub fn generation(
    method: &str,
    kwargs: Option<&Bound<'_, PyDict>>,
) -> PyResult<GenerationDefaults> {
    let mut g = GenerationDefaults::default();
    let Some(kwargs) = kwargs else { return Ok(g) };
    for (k, v) in kwargs.iter() {
        let key: String = k.extract()?;
        // None is "unset", as the stubs' defaults say.
        if v.is_none() && GENERATION_ARGS.contains(&key.as_str()) {
            continue;
        }
        match key.as_str() {
            "max_new_tokens" => g.max_new_tokens = Some(count(&key, &v)?),
            "min_new_tokens" => g.min_new_tokens = Some(count(&key, &v)?),
            "num_beams" => g.num_beams = Some(count(&key, &v)?),
            "no_repeat_ngram_size" => g.no_repeat_ngram_size = Some(count(&key, &v)?),
            "top_k" => g.top_k = Some(count(&key, &v)?),
            "num_return_sequences" => g.num_return_sequences = Some(count(&key, &v)?),
            "length_penalty" => g.length_penalty = Some(number(&key, &v)?),
            "repetition_penalty" => g.repetition_penalty = Some(number(&key, &v)?),
            "temperature" => g.temperature = Some(number(&key, &v)?),
            "top_p" => g.top_p = Some(number(&key, &v)?),
            "do_sample" => g.do_sample = Some(boolean(&key, &v)?),
            "seed" => {
                let n = integer(&key, &v)?;
                g.seed = Some(u64::try_from(n).map_err(|_| {
                    value_error(
                        &key,
                        format!("expected a whole number from 0 to {}, got {n}", u64::MAX),
                    )
                })?);
            }
            "early_stopping" => {
                g.early_stopping = Some(if v.is_instance_of::<pyo3::types::PyBool>() {
                    EarlyStoppingSetting::Flag(v.extract()?)
                } else if v.extract::<String>().is_ok_and(|s| s == "never") {
                    EarlyStoppingSetting::Word(Never::Never)
                } else {
                    return Err(value_error(
                        &key,
                        format!("expected True, False or \"never\", got {}", v.repr()?),
                    ));
                })
            }
            _ => {
                return Err(PyTypeError::new_err(format!(
                "{method}() got an unexpected keyword argument '{key}' (generation settings: {})",
                GENERATION_ARGS.join(", ")
            )))
            }
        }
    }
    Ok(g)
}

fn integer(key: &str, v: &Bound<'_, PyAny>) -> PyResult<i128> {
    if v.is_instance_of::<pyo3::types::PyBool>() || !v.is_instance_of::<pyo3::types::PyInt>() {
        return Err(PyTypeError::new_err(format!("{key}: expected an int, got {}", type_name(v))));
    }
    v.extract::<i128>().map_err(|_| {
        value_error(
            key,
            format!("{} is out of range", v.repr().map(|r| r.to_string()).unwrap_or_default()),
        )
    })
}

fn count(key: &str, v: &Bound<'_, PyAny>) -> PyResult<usize> {
    let n = integer(key, v)?;
    usize::try_from(n)
        .map_err(|_| value_error(key, format!("expected a whole number of 0 or more, got {n}")))
}

fn number(key: &str, v: &Bound<'_, PyAny>) -> PyResult<f64> {
    if v.is_instance_of::<pyo3::types::PyBool>()
        || !(v.is_instance_of::<pyo3::types::PyFloat>() || v.is_instance_of::<pyo3::types::PyInt>())
    {
        return Err(PyTypeError::new_err(format!(
            "{key}: expected a number, got {}",
            type_name(v)
        )));
    }
    let x: f64 = v.extract()?;
    if x.is_nan() {
        return Err(value_error(key, "expected a number, got NaN"));
    }
    Ok(x)
}

fn boolean(key: &str, v: &Bound<'_, PyAny>) -> PyResult<bool> {
    if !v.is_instance_of::<pyo3::types::PyBool>() {
        return Err(PyTypeError::new_err(format!("{key}: expected a bool, got {}", type_name(v))));
    }
    v.extract()
}
