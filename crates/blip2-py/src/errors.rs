//! Rust errors as Python exceptions: `ValueError` naming the argument at fault,
//! `FileNotFoundError` (and the other `OSError`s) for files, `RuntimeError` for faults of
//! the model or of ONNX Runtime. Every message is the Rust error with its causes on one
//! line, as the binary prints it.

use std::io::ErrorKind;

use blip2_models::ResolveError;
use blip2_runtime::config::ConfigError;
use blip2_runtime::error::RuntimeError;
use blip2_runtime::generation;
use blip2_runtime::preprocess::PreprocessError;
use blip2_runtime::profiles::LoadError;
use pyo3::exceptions::{
    PyFileNotFoundError, PyOSError, PyPermissionError, PyRuntimeError, PyValueError,
};
use pyo3::PyErr;

/// The error and its causes, each said once (as the binary's `error_line`).
pub fn message(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

/// `what: message`, unless the message starts with `what` already.
fn named(what: &str, msg: String) -> String {
    if what.is_empty() || msg.starts_with(what) {
        msg
    } else {
        format!("{what}: {msg}")
    }
}

pub fn value_error(what: &str, msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(named(what, msg.into()))
}

/// An I/O failure on a file the user named: the `OSError` subclass of its kind.
pub fn io_error(kind: ErrorKind, msg: String) -> PyErr {
    match kind {
        ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
        ErrorKind::PermissionDenied => PyPermissionError::new_err(msg),
        _ => PyOSError::new_err(msg),
    }
}

/// The Python name of a generation flag: `--top-p` is `top_p`.
pub fn python_name(flag: &str) -> String {
    flag.trim_start_matches('-').replace('-', "_")
}

/// The settings in Python's words: the keyword arguments.
struct PythonNames;

impl generation::Names for PythonNames {
    fn setting(&self, s: generation::Setting) -> String {
        python_name(s.flag())
    }
    fn greedy(&self) -> String {
        "do_sample=False, num_beams=1".into()
    }
}

pub fn generation_error(e: &generation::ConfigError) -> PyErr {
    PyValueError::new_err(e.in_words(&PythonNames))
}

/// An image that could not be read (`what` names it: `images[2]`).
pub fn preprocess_error(what: &str, e: &PreprocessError) -> PyErr {
    let msg = named(what, message(e));
    match e {
        PreprocessError::Read { source, .. } => io_error(source.kind(), msg),
        _ => PyValueError::new_err(msg),
    }
}

/// A failure while running the model; `input` names the argument bad input came from
/// (`prompt`, `question`, `texts`).
pub fn runtime_error(input: &str, e: &RuntimeError) -> PyErr {
    match e {
        RuntimeError::Preprocess(p) => preprocess_error("", p),
        RuntimeError::Generation(g) => generation_error(g),
        RuntimeError::Input(m) => value_error(input, m.clone()),
        RuntimeError::Room(m) => value_error(input, m.in_words(&PythonNames)),
        RuntimeError::MissingFile(_) => PyFileNotFoundError::new_err(message(e)),
        _ => PyRuntimeError::new_err(message(e)),
    }
}

pub fn load_error(e: &LoadError) -> PyErr {
    match e {
        LoadError::Setup(s) => PyRuntimeError::new_err(format!(
            "{}; from Python, `pip install onnxruntime=={}` (or onnxruntime-gpu) beside blip2_ort",
            message(s),
            blip2_runtime::ort_env::ORT_VERSION
        )),
        LoadError::Runtime(r) => runtime_error("model", r),
        LoadError::Profile { .. } => value_error("ep", message(e)),
    }
}

pub fn config_error(e: &ConfigError) -> PyErr {
    match e {
        ConfigError::Read { source, .. } => io_error(source.kind(), named("config", message(e))),
        ConfigError::UnknownProfile { .. } => value_error("ep", message(e)),
        _ => value_error("config", message(e)),
    }
}

pub fn resolve_error(e: &ResolveError) -> PyErr {
    match e {
        ResolveError::NotFound(_) => PyFileNotFoundError::new_err(named("model", message(e))),
        ResolveError::NotAModel { .. } | ResolveError::IncompleteExport { .. } => {
            value_error("model", message(e))
        }
        ResolveError::Io { source, .. } => io_error(source.kind(), named("model", message(e))),
        ResolveError::Hub(_) => PyRuntimeError::new_err(message(e)),
        ResolveError::Export(x) => export_error(x),
    }
}

pub fn export_error(e: &blip2_export::ExportError) -> PyErr {
    use blip2_export::ExportError as X;
    match e {
        X::Flag { flag, message } => value_error(&python_name(flag), message.clone()),
        X::MissingFile { .. } => PyFileNotFoundError::new_err(message(e)),
        X::Io { source, .. } | X::Write { source, .. } => io_error(source.kind(), message(e)),
        X::OutputExists { .. } => {
            value_error("out", message(e).replace("pass --force", "pass force=True"))
        }
        X::Json { .. }
        | X::Config { .. }
        | X::WrongModelType { .. }
        | X::UnsupportedLanguageModel { .. }
        | X::CorruptSafetensors { .. }
        | X::MissingTensor { .. }
        | X::TensorShape { .. }
        | X::UnsupportedDtype { .. } => value_error("checkpoint", message(e)),
        _ => PyRuntimeError::new_err(message(e)),
    }
}
