use std::path::PathBuf;

/// Everything that can stop an export. Each variant names the file, tensor or setting at
/// fault so the message alone tells the user what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{path}: missing; a BLIP-2 checkpoint folder needs it ({why})")]
    MissingFile { path: PathBuf, why: &'static str },
    #[error("{path}: cannot read: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not valid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: model_type is \"{found}\"; blip2-ort exports \"blip-2\" checkpoints")]
    WrongModelType { path: PathBuf, found: String },
    #[error("{path}: text_config.model_type \"{found}\" is not supported (supported: opt, t5)")]
    UnsupportedLanguageModel { path: PathBuf, found: String },
    #[error("{path}: corrupt safetensors file: {message}")]
    CorruptSafetensors { path: PathBuf, message: String },
    #[error("tensor {name}: missing from the checkpoint ({files})")]
    MissingTensor { name: String, files: String },
    #[error("tensor {name}: shape {found:?}, expected {expected:?} from config.json")]
    TensorShape { name: String, found: Vec<usize>, expected: Vec<usize> },
    #[error("tensor {name}: dtype {dtype} is not supported (supported: F32, F16, BF16)")]
    UnsupportedDtype { name: String, dtype: String },
    /// A command-line setting that cannot be used (out of range for this model, or at odds
    /// with another): a usage error.
    #[error("{flag}: {message}")]
    Flag { flag: &'static str, message: String },
    #[error("{path}: already exists; pass --force to replace it")]
    OutputExists { path: PathBuf },
    /// The export was stopped by [`crate::output::interrupt`] (a signal) before it was put
    /// in place.
    #[error("interrupted")]
    Interrupted,
    #[error("{path}: cannot write: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    /// A `--target cuda` graph that ONNX Runtime's CUDA provider would have to copy
    /// values of to the host mid-run (a bug of the exporter, never of the checkpoint).
    #[error(
        "{graph}: {} value(s) that ONNX Runtime's CUDA kernels read on the host would be \
         computed on the device (an exporter bug; please report it): {}",
        violations.len(),
        violations.join("; ")
    )]
    HostReads { graph: String, violations: Vec<String> },
}

pub type Result<T, E = ExportError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ExportError {
    let path = path.into();
    move |source| ExportError::Io { path, source }
}

pub(crate) fn write_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ExportError {
    let path = path.into();
    move |source| ExportError::Write { path, source }
}
