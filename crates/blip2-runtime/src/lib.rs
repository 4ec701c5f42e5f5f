//! The BLIP-2 runtime: turns images and prompts into tokens with the graphs that
//! `blip2-ort export` writes, on ONNX Runtime.
//!
//! Pieces, kept apart as in onnxruntime-genai: [`preprocess`] (images to pixel values,
//! exactly as transformers' PIL path), [`generation`] (search: greedy, beam, sampling and
//! the logits processors), [`model`] (the sessions), [`state`] (each decoder's state
//! between steps) and [`kv_cache`].
//!
//! Sessions come from [`providers`], which registers a [`config`] profile's execution
//! providers (and keeps big CPU graphs in the [`session_cache`]), on the ONNX Runtime
//! library that [`ort_env`] finds and loads; [`profiles`] does all of that the way the
//! binary and the Python module load a model.
pub mod config;
pub mod embed_cache;
pub mod engine;
pub mod error;
pub mod generation;
mod jpeg;
pub mod kv_cache;
pub mod model;
pub mod orientation;
pub mod ort_env;
pub mod pipeline;
pub mod preprocess;
pub mod profiles;
pub mod prompt;
pub mod providers;
pub mod retrieval;
pub mod session_cache;
pub mod state;
