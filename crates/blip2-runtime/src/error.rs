use std::path::PathBuf;

/// Errors of the runtime pieces that run models: a manifest or file problem, a model this
/// build does not support, an ONNX Runtime failure with what it was doing, a missing
/// graph output, the tokenizer, an image, generation settings, or other bad input.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Manifest(#[from] blip2_core::ManifestError),
    #[error("{0}: missing from the model folder (export it again with blip2-ort export)")]
    MissingFile(PathBuf),
    #[error("{0}")]
    Unsupported(String),
    #[error("{what}: {source}")]
    Ort { what: String, source: ort::Error },
    #[error("the graph has no output {0}; the export is incomplete or from another tool")]
    MissingOutput(String),
    #[error("{path}: cannot load the tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// A graph's session could not be made (its providers, or the file, named).
    #[error(transparent)]
    Session(#[from] crate::providers::ProviderError),
    /// An image that cannot be read or preprocessed (the file named).
    #[error(transparent)]
    Preprocess(#[from] crate::preprocess::PreprocessError),
    /// Generation settings that cannot be used together (the flag named).
    #[error(transparent)]
    Generation(#[from] crate::generation::ConfigError),
    #[error("{0}")]
    Input(String),
    /// A prompt that leaves no room for the new tokens asked for (its message names
    /// settings: each front end words it, see [`crate::generation::Names`]).
    #[error("{0}")]
    Room(crate::generation::Message),
    /// A request's own search could not go on (the engine went on with the others).
    #[error("{0}")]
    Search(String),
    /// A fault of the runtime itself (a panic caught, with what was being done); the
    /// requests it concerned failed, the others went on.
    #[error("{0}")]
    Fault(String),
    /// A failure that several requests of one batch share (a model run they were in).
    #[error(transparent)]
    Shared(std::sync::Arc<RuntimeError>),
    /// A graph file whose inputs or outputs are not the ones its manifest lists: copied in
    /// from another export.
    #[error(
        "{path}: does not belong to this export ({manifest}): {what}; it was copied from another export or \
         the export was changed: export the model again with `blip2-ort export CHECKPOINT -o DIR --force`",
        path = .path.display(), manifest = .manifest.display()
    )]
    GraphMismatch { path: PathBuf, manifest: PathBuf, what: String },
}

/// Turns an ONNX Runtime error into a [`RuntimeError::Ort`] saying what was being done.
pub(crate) fn ort_err(what: impl Into<String>) -> impl FnOnce(ort::Error) -> RuntimeError {
    let what = what.into();
    move |source| RuntimeError::Ort { what, source }
}

/// What a caught panic said (its message, or "a panic").
pub fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}
