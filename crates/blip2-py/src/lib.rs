//! `blip2_ort._native`: the Python module over the Rust runtime. [`Model`] holds one
//! export (captioning or image-text retrieval) loaded on an execution-provider profile,
//! exactly as `blip2-ort infer` loads it (`blip2_runtime::profiles`,
//! `blip2_models::resolve_model`), and runs the same batches the command runs, so the
//! results are the command's. The GIL is released while images are decoded and
//! preprocessed and while the model runs. The Python package (`python/blip2_ort`) wraps
//! this module: it finds ONNX Runtime in the `onnxruntime` wheel, and adds `blip2_ort.ray`.

mod errors;
mod inputs;

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use blip2_core::{GenerationDefaults, ImageConfig};
use blip2_runtime::generation::{self, GenerationConfig};
use blip2_runtime::pipeline::{Generated, Pipeline};
use blip2_runtime::preprocess::ImageLimits;
use blip2_runtime::prompt::Chat;
use blip2_runtime::retrieval::{itc, RetrievalModel};
use ndarray::{Array2, Array3, Array4, Axis};
use pyo3::exceptions::PyUserWarning;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyDict, PyList};

use errors::{generation_error, runtime_error, value_error};
use inputs::Named;

enum Kind {
    Captioning(Box<Mutex<Pipeline>>),
    Retrieval(Box<Mutex<RetrievalModel>>),
}

/// Model(model, ep="cpu", *, config=None, threads=None, quiet=True)
///
/// A BLIP-2 export loaded on ONNX Runtime: an export folder, a checkpoint folder or a Hub
/// id (exported once into the blip2-ort cache), on an execution-provider profile ("cpu",
/// "cuda", "tensorrt", ...). Captioning exports have caption, generate, vqa and chat;
/// image-text retrieval exports have embed_images, embed_texts and itm. The GIL is
/// released while images are decoded and the model runs. The type stubs
/// (`blip2_ort/_native.pyi`) document every argument and exception.
#[pyclass(module = "blip2_ort", name = "Model", frozen)]
pub struct Model {
    kind: Kind,
    path: PathBuf,
    ep: String,
    image: ImageConfig,
    limits: ImageLimits,
    /// Workers that decode and preprocess images.
    workers: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic inside a call (raised as PanicException) leaves nothing half-done that the
    // next call relies on: each call starts its own state.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn check_batch_size(n: usize) -> PyResult<()> {
    if n == 0 {
        return Err(value_error("batch_size", "must be at least 1"));
    }
    Ok(())
}

/// `cfg` with the caller's settings laid over it, checked; errors name the argument.
fn settings(
    cfg: GenerationConfig,
    s: &GenerationDefaults,
    vocab: usize,
) -> PyResult<GenerationConfig> {
    let c = cfg.overridden(s);
    generation::validate(&c).map_err(|e| generation_error(&e))?;
    generation::check_vocab(&c, vocab).map_err(|e| generation_error(&e))?;
    Ok(c)
}

/// One batch of pixel values out of per-image ones.
fn join(px: &[Array4<f32>]) -> Array4<f32> {
    let views: Vec<_> = px.iter().map(|p| p.view()).collect();
    ndarray::concatenate(Axis(0), &views).expect("every image is preprocessed to the export's size")
}

/// `a` as a writable numpy float32 array of its shape.
fn to_numpy<'py, D: ndarray::Dimension>(
    py: Python<'py>,
    a: &ndarray::Array<f32, D>,
) -> PyResult<Bound<'py, PyAny>> {
    let bytes: Vec<u8> = a.iter().flat_map(|v| v.to_ne_bytes()).collect();
    let np = py.import("numpy")?;
    let flat = np.call_method1("frombuffer", (PyByteArray::new(py, &bytes), "float32"))?;
    flat.call_method1("reshape", (a.shape().to_vec(),))
}

impl Model {
    fn pipeline(&self, method: &str) -> PyResult<&Mutex<Pipeline>> {
        match &self.kind {
            Kind::Captioning(p) => Ok(p),
            Kind::Retrieval(_) => Err(value_error(
                "model",
                format!(
                    "{}: an image-text retrieval export has no {method}(); it has embed_images, embed_texts and itm \
                     (captioning needs an export of e.g. Salesforce/blip2-opt-2.7b)",
                    self.path.display()
                ),
            )),
        }
    }

    fn retrieval(&self, method: &str) -> PyResult<&Mutex<RetrievalModel>> {
        match &self.kind {
            Kind::Retrieval(m) => Ok(m),
            Kind::Captioning(_) => Err(value_error(
                "model",
                format!(
                    "{}: a captioning export has no {method}(); it has caption, generate, vqa and chat \
                     (retrieval needs an export of e.g. Salesforce/blip2-itm-vit-g)",
                    self.path.display()
                ),
            )),
        }
    }

    fn pixels(&self, py: Python<'_>, images: &[Named]) -> PyResult<Vec<Array4<f32>>> {
        inputs::all_pixels(py, images, &self.limits, &self.image, self.workers)
    }

    /// Generation over `images` with one prompt each, `batch_size` rows per run, as
    /// `infer caption` and `infer batch` run them; `input` names the argument the prompts
    /// came from in errors.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        py: Python<'_>,
        method: &str,
        images: Vec<Named>,
        prompts: Vec<String>,
        batch_size: usize,
        gen: &GenerationDefaults,
        input: &str,
    ) -> PyResult<(Vec<Vec<Generated>>, GenerationConfig)> {
        check_batch_size(batch_size)?;
        let pipe = self.pipeline(method)?;
        let (defaults, vocab) = py.detach(|| {
            let p = lock(pipe);
            (p.default_config(), p.model.manifest.text.vocab_size)
        });
        let cfg = settings(defaults, gen, vocab)?;
        let pixels = self.pixels(py, &images)?;
        let out = py.detach(|| {
            let mut p = lock(pipe);
            let mut out = Vec::with_capacity(images.len());
            for (px, pr) in pixels.chunks(batch_size).zip(prompts.chunks(batch_size)) {
                out.extend(p.generate_pixels(join(px), pr, &cfg)?);
            }
            Ok::<_, blip2_runtime::error::RuntimeError>(out)
        });
        Ok((out.map_err(|e| runtime_error(input, &e))?, cfg))
    }
}

fn texts_of(py: Python<'_>, rows: &[Vec<Generated>], n: usize) -> PyResult<Py<PyAny>> {
    if n == 1 {
        let v: Vec<&str> = rows.iter().map(|r| r[0].text.as_str()).collect();
        return Ok(PyList::new(py, v)?.into_any().unbind());
    }
    let v: Vec<Vec<&str>> =
        rows.iter().map(|r| r.iter().map(|g| g.text.as_str()).collect()).collect();
    Ok(PyList::new(py, v)?.into_any().unbind())
}

#[pymethods]
impl Model {
    #[new]
    #[pyo3(signature = (model, ep = "cpu", *, config = None, threads = None, quiet = true))]
    fn new(
        py: Python<'_>,
        model: PathBuf,
        ep: &str,
        config: Option<PathBuf>,
        threads: Option<i64>,
        quiet: bool,
    ) -> PyResult<Self> {
        let threads = match threads {
            None => None,
            Some(n) => {
                let n = usize::try_from(n)
                    .map_err(|_| value_error("threads", format!("must be at least 1, got {n}")))?;
                blip2_runtime::config::check_threads(n).map_err(|e| value_error("threads", e))?;
                Some(n)
            }
        };
        let profile = blip2_runtime::profiles::profile(config.as_deref(), ep, threads)
            .map_err(|e| errors::config_error(&e))?;
        let name = model.to_string_lossy().into_owned();
        let dir = py
            .detach(|| blip2_models::resolve_model(&name, quiet, false))
            .map_err(|e| errors::resolve_error(&e))?;
        let family = blip2_core::manifest_family(&dir)
            .map_err(|e| value_error("model", errors::message(&e)))?;
        let workers =
            threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let (kind, image, limits) = if family == blip2_core::RETRIEVAL_FAMILY {
            let m = py
                .detach(|| blip2_runtime::profiles::load_retrieval(&dir, &profile))
                .map_err(|e| errors::load_error(&e))?;
            let (image, limits) = (m.manifest.image.clone(), m.limits);
            (Kind::Retrieval(Box::new(Mutex::new(m))), image, limits)
        } else {
            let p = py
                .detach(|| blip2_runtime::profiles::load_pipeline(&dir, &profile))
                .map_err(|e| errors::load_error(&e))?;
            let (image, limits) = (p.model.manifest.image.clone(), p.limits);
            (Kind::Captioning(Box::new(Mutex::new(p))), image, limits)
        };
        Ok(Model { kind, path: dir, ep: ep.to_string(), image, limits, workers })
    }

    /// "captioning" or "retrieval".
    #[getter]
    fn kind(&self) -> &'static str {
        match self.kind {
            Kind::Captioning(_) => "captioning",
            Kind::Retrieval(_) => "retrieval",
        }
    }

    /// The export folder the model was loaded from.
    #[getter]
    fn path(&self) -> String {
        self.path.display().to_string()
    }

    #[getter]
    fn ep(&self) -> &str {
        &self.ep
    }

    fn __repr__(&self) -> String {
        format!(
            "blip2_ort.Model({:?}, ep={:?}) [{}]",
            self.path.display().to_string(),
            self.ep,
            self.kind()
        )
    }

    /// Checks generation settings against this captioning model without running it
    /// (what `caption` would raise for them); used by `blip2_ort.ray.Captioner`.
    #[pyo3(signature = (**generation))]
    fn _check_generation(
        &self,
        py: Python<'_>,
        generation: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<()> {
        let gen = inputs::generation("caption", generation)?;
        let pipe = self.pipeline("caption")?;
        let (defaults, vocab) = py.detach(|| {
            let p = lock(pipe);
            (p.default_config(), p.model.manifest.text.vocab_size)
        });
        settings(defaults, &gen, vocab).map(|_| ())
    }

    /// Captions of images (paths, bytes, PIL images or uint8 HxWx3 arrays; one or a
    /// list), one per image in order (a list per image with num_return_sequences > 1),
    /// continuing `prompt` when given; as `blip2-ort infer caption`. Generation settings
    /// as keyword arguments (max_new_tokens, num_beams, do_sample, ...); unset ones come
    /// from the checkpoint's generation_config.json.
    #[pyo3(signature = (images, prompt = None, *, batch_size = 8, **generation))]
    fn caption(
        &self,
        py: Python<'_>,
        images: &Bound<'_, PyAny>,
        prompt: Option<String>,
        batch_size: i64,
        generation: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        let gen = inputs::generation("caption", generation)?;
        let images = inputs::images("images", images)?;
        let prompts = vec![prompt.unwrap_or_default(); images.len()];
        let (rows, cfg) =
            self.run(py, "caption", images, prompts, batch(batch_size)?, &gen, "prompt")?;
        texts_of(py, &rows, cfg.num_return_sequences)
    }

    /// `{"text", "token_ids"}` for each image with its prompt (one string for all, or
    /// one per image), as `infer --json` prints them; with num_return_sequences > 1,
    /// that many entries per image, numbered by "sequence".
    #[pyo3(signature = (images, prompts = None, *, batch_size = 8, **generation))]
    fn generate(
        &self,
        py: Python<'_>,
        images: &Bound<'_, PyAny>,
        prompts: Option<&Bound<'_, PyAny>>,
        batch_size: i64,
        generation: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        let gen = inputs::generation("generate", generation)?;
        let images = inputs::images("images", images)?;
        let prompts = match prompts {
            None => vec![String::new(); images.len()],
            Some(p) => {
                let is_one = p.is_instance_of::<pyo3::types::PyString>();
                let t = inputs::texts("prompts", p)?;
                if is_one {
                    vec![t[0].clone(); images.len()]
                } else if t.len() != images.len() {
                    return Err(value_error(
                        "prompts",
                        format!(
                            "{} prompts for {} images (give one per image, or one string for all)",
                            t.len(),
                            images.len()
                        ),
                    ));
                } else {
                    t
                }
            }
        };
        let (rows, _) =
            self.run(py, "generate", images, prompts, batch(batch_size)?, &gen, "prompts")?;
        let out = PyList::empty(py);
        for r in &rows {
            for (i, g) in r.iter().enumerate() {
                let d = PyDict::new(py);
                d.set_item("text", &g.text)?;
                d.set_item("token_ids", &g.token_ids)?;
                if r.len() > 1 {
                    d.set_item("sequence", i)?;
                }
                out.append(d)?;
            }
        }
        Ok(out.into_any().unbind())
    }

    /// The answer to `question` about `image`, with the model's VQA template; as
    /// `blip2-ort infer vqa`.
    #[pyo3(signature = (image, question, **generation))]
    fn vqa(
        &self,
        py: Python<'_>,
        image: &Bound<'_, PyAny>,
        question: String,
        generation: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        let gen = inputs::generation("vqa", generation)?;
        let image = inputs::one_image("image", image)?;
        let pipe = self.pipeline("vqa")?;
        let prompt = py.detach(|| lock(pipe).prompter.vqa_prompt(&question));
        let (rows, cfg) = self.run(py, "vqa", vec![image], vec![prompt], 1, &gen, "question")?;
        first_or_all(py, &rows, cfg.num_return_sequences)
    }

    /// The answer to `question` about `image` after the `(question, answer)` turns of
    /// `history`, as `blip2-ort infer chat` answers its next line; the oldest turns that
    /// do not fit the context are left out (UserWarning).
    #[pyo3(signature = (image, history, question, **generation))]
    fn chat(
        &self,
        py: Python<'_>,
        image: &Bound<'_, PyAny>,
        history: &Bound<'_, PyAny>,
        question: String,
        generation: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        let gen = inputs::generation("chat", generation)?;
        let image = inputs::one_image("image", image)?;
        let mut chat = Chat::default();
        for (i, turn) in history.try_iter().map_err(|_| history_error(None))?.enumerate() {
            let (q, a): (String, String) = turn?.extract().map_err(|_| history_error(Some(i)))?;
            chat.push(&q, &a);
        }
        let q = question.trim();
        if q.is_empty() {
            return Err(value_error("question", "is empty"));
        }
        let pipe = self.pipeline("chat")?;
        let (prompt, dropped) = py
            .detach(|| {
                let p = lock(pipe);
                let cfg = p.default_config().overridden(&gen);
                chat.fit(&p.prompter, q, cfg.max_new_tokens)
            })
            .map_err(|e| runtime_error("question", &e))?;
        if dropped > 0 {
            let msg = format!(
                "dropped the {dropped} oldest turn(s) of history to fit the model's context with room for max_new_tokens"
            );
            let msg = std::ffi::CString::new(msg).expect("no NUL in the message");
            PyErr::warn(py, &py.get_type::<PyUserWarning>(), &msg, 1)?;
        }
        let (rows, cfg) = self.run(py, "chat", vec![image], vec![prompt], 1, &gen, "question")?;
        first_or_all(py, &rows, cfg.num_return_sequences)
    }

    /// Normalized query embeddings, numpy float32 `[images, num_query_tokens, dim]`, as
    /// `blip2-ort infer embed-image` (retrieval exports).
    #[pyo3(signature = (images, *, batch_size = 8))]
    fn embed_images<'py>(
        &self,
        py: Python<'py>,
        images: &Bound<'py, PyAny>,
        batch_size: i64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let m = self.retrieval("embed_images")?;
        let images = inputs::images("images", images)?;
        let batch_size = batch(batch_size)?;
        let pixels = self.pixels(py, &images)?;
        let emb = py
            .detach(|| {
                let mut m = lock(m);
                let mut rows: Vec<Array3<f32>> = Vec::new();
                for px in pixels.chunks(batch_size) {
                    let feats = m.image_features(join(px))?;
                    rows.push(m.embed_image_features(&feats)?);
                }
                let views: Vec<_> = rows.iter().map(|r| r.view()).collect();
                Ok(ndarray::concatenate(Axis(0), &views).expect("equal shapes"))
            })
            .map_err(|e| runtime_error("images", &e))?;
        to_numpy(py, &emb)
    }

    /// Normalized text embeddings, numpy float32 `[texts, dim]`, as `blip2-ort infer
    /// embed-text` (retrieval exports).
    #[pyo3(signature = (texts, *, batch_size = 8))]
    fn embed_texts<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
        batch_size: i64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let m = self.retrieval("embed_texts")?;
        let texts = inputs::texts("texts", texts)?;
        let batch_size = batch(batch_size)?;
        let (emb, cut) = py
            .detach(|| {
                let mut m = lock(m);
                let mut all: Vec<Array2<f32>> = Vec::new();
                let mut cut = Vec::new();
                for chunk in texts.chunks(batch_size) {
                    let b = m.tokenize(chunk)?;
                    cut.extend(b.truncated.iter().copied());
                    all.push(m.embed_text_batch(&b)?);
                }
                let views: Vec<_> = all.iter().map(|r| r.view()).collect();
                Ok((ndarray::concatenate(Axis(0), &views).expect("equal widths"), cut))
            })
            .map_err(|e| runtime_error("texts", &e))?;
        self.warn_truncated(py, &texts, &cut)?;
        to_numpy(py, &emb)
    }

    /// `{"text", "itm", "itc"}` of `image` with each text, as `blip2-ort infer itm
    /// --json` (retrieval exports).
    #[pyo3(signature = (image, texts, *, batch_size = 8))]
    fn itm(
        &self,
        py: Python<'_>,
        image: &Bound<'_, PyAny>,
        texts: &Bound<'_, PyAny>,
        batch_size: i64,
    ) -> PyResult<Py<PyAny>> {
        let m = self.retrieval("itm")?;
        let image = inputs::one_image("image", image)?;
        let texts = inputs::texts("texts", texts)?;
        let batch_size = batch(batch_size)?;
        let pixels = self.pixels(py, std::slice::from_ref(&image))?;
        let (scores, cut) = py
            .detach(|| {
                let mut m = lock(m);
                // One vision-encoder pass feeds both heads, as `infer itm` runs it.
                let feats = m.image_features(join(&pixels))?;
                let image_embeds = m.embed_image_features(&feats)?;
                let mut scores = Vec::with_capacity(texts.len());
                let mut cut = Vec::new();
                for chunk in texts.chunks(batch_size) {
                    let b = m.tokenize(chunk)?;
                    cut.extend(b.truncated.iter().copied());
                    let probs = m.itm(&feats, 0, &b)?;
                    let text_embeds = m.embed_text_batch(&b)?;
                    for (i, p) in probs.iter().enumerate() {
                        scores.push((
                            *p,
                            itc(image_embeds.index_axis(Axis(0), 0), text_embeds.row(i)),
                        ));
                    }
                }
                Ok((scores, cut))
            })
            .map_err(|e| runtime_error("texts", &e))?;
        self.warn_truncated(py, &texts, &cut)?;
        let out = PyList::empty(py);
        for (t, (p, s)) in texts.iter().zip(scores) {
            let d = PyDict::new(py);
            d.set_item("text", t)?;
            d.set_item("itm", p as f64)?;
            d.set_item("itc", s as f64)?;
            out.append(d)?;
        }
        Ok(out.into_any().unbind())
    }
}

impl Model {
    fn warn_truncated(&self, py: Python<'_>, texts: &[String], cut: &[bool]) -> PyResult<()> {
        let Kind::Retrieval(m) = &self.kind else { return Ok(()) };
        let max = py.detach(|| lock(m).manifest.text.max_length);
        for (t, &c) in texts.iter().zip(cut) {
            if c {
                let msg =
                    format!("text {t:?} was cut to the model's {max} tokens").replace('\0', "");
                let msg = std::ffi::CString::new(msg).expect("NULs removed");
                PyErr::warn(py, &py.get_type::<PyUserWarning>(), &msg, 1)?;
            }
        }
        Ok(())
    }
}

fn history_error(turn: Option<usize>) -> PyErr {
    let at = turn.map(|i| format!("[{i}]")).unwrap_or_default();
    pyo3::exceptions::PyTypeError::new_err(format!(
        "history{at}: expected a list of (question, answer) pairs of strings"
    ))
}

fn batch(n: i64) -> PyResult<usize> {
    let n = usize::try_from(n)
        .map_err(|_| value_error("batch_size", format!("must be at least 1, got {n}")))?;
    check_batch_size(n)?;
    Ok(n)
}

/// The text of a single-row result: a str, or a list of str with several sequences.
fn first_or_all(py: Python<'_>, rows: &[Vec<Generated>], n: usize) -> PyResult<Py<PyAny>> {
    let row = &rows[0];
    if n == 1 {
        return Ok(row[0].text.clone().into_pyobject(py)?.into_any().unbind());
    }
    let v: Vec<&str> = row.iter().map(|g| g.text.as_str()).collect();
    Ok(PyList::new(py, v)?.into_any().unbind())
}

/// The library the package found in the `onnxruntime` wheel (called by `__init__.py`
/// before any model loads).
#[pyfunction]
fn _prefer_runtime_library(path: PathBuf) {
    blip2_runtime::ort_env::prefer_dylib(path);
}

/// The ONNX Runtime library file this process loaded, or None before the first model.
#[pyfunction]
fn runtime_library() -> Option<String> {
    blip2_runtime::ort_env::loaded_dylib().map(|p| p.display().to_string())
}

/// The library's file name as the wheels ship it on this OS.
#[pyfunction]
fn _runtime_library_name() -> String {
    blip2_runtime::ort_env::dylib_file_name()
}

/// Exports a BLIP-2 checkpoint (folder or Hub id) to ONNX graphs in `out`, as
/// `blip2-ort export`; returns `out`. Written whole or not at all; an existing export is
/// replaced only with `force=True`.
#[pyfunction]
#[pyo3(signature = (checkpoint, out, *, dtype = "fp32", revision = None, force = false, max_context = None,
                    quantize = None, quantize_encoders = None, target = "portable", quiet = true))]
#[allow(clippy::too_many_arguments)]
fn export(
    py: Python<'_>,
    checkpoint: PathBuf,
    out: PathBuf,
    dtype: &str,
    revision: Option<String>,
    force: bool,
    max_context: Option<i64>,
    quantize: Option<&str>,
    quantize_encoders: Option<&str>,
    target: &str,
    quiet: bool,
) -> PyResult<String> {
    let bad = |arg: &str, v: &str, allowed: &str| {
        value_error(arg, format!("expected one of {allowed}, got {v:?}"))
    };
    let dtype = match dtype {
        "fp32" => blip2_core::Dtype::Fp32,
        "fp16" => blip2_core::Dtype::Fp16,
        v => return Err(bad("dtype", v, "\"fp32\", \"fp16\"")),
    };
    let quantize = match quantize {
        None => None,
        Some("int8") => Some(blip2_core::Quantization::Int8),
        Some("int4") => Some(blip2_core::Quantization::Int4),
        Some(v) => return Err(bad("quantize", v, "None, \"int8\", \"int4\"")),
    };
    let quantize_encoders = match quantize_encoders {
        None => false,
        Some("int8") => true,
        Some(v) => return Err(bad("quantize_encoders", v, "None, \"int8\"")),
    };
    let target = match target {
        "portable" => blip2_core::Target::Portable,
        "cuda" => blip2_core::Target::Cuda,
        v => return Err(bad("target", v, "\"portable\", \"cuda\"")),
    };
    let max_context = match max_context {
        None => None,
        Some(n) => Some(usize::try_from(n).map_err(|_| {
            value_error("max_context", format!("expected a whole number of 0 or more, got {n}"))
        })?),
    };
    let label = checkpoint.to_string_lossy().into_owned();
    let opts = blip2_export::ExportOptions {
        dtype,
        source_label: label.clone(),
        revision: revision.clone(),
        force,
        max_context,
        quantize,
        quantize_encoders,
        target,
        ..Default::default()
    };
    py.detach(|| {
        let src = blip2_models::resolve_checkpoint(&label, revision.as_deref(), quiet)
            .map_err(|e| errors::resolve_error(&e))?;
        if !src.exists() {
            return Err(pyo3::exceptions::PyFileNotFoundError::new_err(format!(
                "checkpoint: {}: no such folder, and not a Hub id of the form owner/name",
                src.display()
            )));
        }
        blip2_export::export_any(&src, &out, &opts, &mut blip2_export::NoProgress)
            .map_err(|e| errors::export_error(&e))?;
        Ok(())
    })?;
    Ok(out.display().to_string())
}

#[pymodule]
#[pyo3(name = "_native")]
fn native_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Model>()?;
    m.add_function(wrap_pyfunction!(export, m)?)?;
    m.add_function(wrap_pyfunction!(runtime_library, m)?)?;
    m.add_function(wrap_pyfunction!(_prefer_runtime_library, m)?)?;
    m.add_function(wrap_pyfunction!(_runtime_library_name, m)?)?;
    m.add("ORT_VERSION", blip2_runtime::ort_env::ORT_VERSION)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
