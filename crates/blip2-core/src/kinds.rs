//! The identifiers an export is described by, as types: the language-model family, the
//! weight type, the quantizations, and the graphs. Serialized in the manifest as the
//! strings they always were (`"opt"`, `"fp16"`, `"int8"`, `"int8-dynamic"`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// The language model of a captioning export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// OPT, decoder only.
    Opt,
    /// Flan-T5, encoder-decoder (the export has a text encoder).
    T5,
}

/// Weight type of the vision encoder and language model (the Q-Former stays fp32).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    Fp32,
    Fp16,
}

/// Weight-only quantization of the vision encoder's and language model's projections
/// (ONNX Runtime's MatMulNBits, blocks of 32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    Int8,
    Int4,
}

/// Quantization of the language model's activations (its projections' inputs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActivationQuantization {
    /// Each row (position) quantized to int8 with its own scale, so a row's result never
    /// depends on the other rows of its batch; int8 weights per output channel.
    #[serde(rename = "int8-per-row")]
    Int8PerRow,
}

/// Quantization of the vision encoder's and Q-Former's projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EncoderQuantization {
    /// int8 weights per output channel, activations quantized to int8 per call
    /// (DynamicQuantizeMatMul).
    #[serde(rename = "int8-dynamic")]
    Int8Dynamic,
}

/// Which graph of an export a session is for, so a profile can place each on its own
/// providers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphKind {
    VisionEncoder,
    QFormer,
    /// Flan-T5's text encoder.
    TextEncoder,
    /// The decoder.
    LanguageModel,
    /// The decoder's row gather for beam reorders (`--target cuda` exports): placed on
    /// the language model's providers, where its cache lives, and never captured as a
    /// CUDA graph (its buffers change from call to call).
    KvReorder,
    /// The growing KV cache's join of newcomer rows (portable exports): placed and run
    /// as [`GraphKind::KvReorder`] is.
    KvJoin,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Opt => "opt",
            Family::T5 => "t5",
        }
    }
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Fp32 => "fp32",
            Dtype::Fp16 => "fp16",
        }
    }
}

impl Quantization {
    pub fn name(self) -> &'static str {
        match self {
            Quantization::Int8 => "int8",
            Quantization::Int4 => "int4",
        }
    }

    /// Bits per weight and weights per block.
    pub fn bits_block(self) -> (u32, usize) {
        match self {
            Quantization::Int8 => (8, 32),
            Quantization::Int4 => (4, 32),
        }
    }
}

impl ActivationQuantization {
    pub fn name(self) -> &'static str {
        match self {
            ActivationQuantization::Int8PerRow => "int8-per-row",
        }
    }
}

impl EncoderQuantization {
    pub fn name(self) -> &'static str {
        match self {
            EncoderQuantization::Int8Dynamic => "int8-dynamic",
        }
    }
}

impl GraphKind {
    pub const ALL: [GraphKind; 4] = [
        GraphKind::VisionEncoder,
        GraphKind::QFormer,
        GraphKind::TextEncoder,
        GraphKind::LanguageModel,
    ];

    /// The graph's name in profiles (`[profiles.x.graphs.NAME]`) and messages: the
    /// kinds a profile places ([`GraphKind::ALL`]); a helper graph goes by the graph it
    /// serves.
    pub const fn name(self) -> &'static str {
        match self {
            GraphKind::VisionEncoder => "vision_encoder",
            GraphKind::QFormer => "qformer",
            GraphKind::TextEncoder => "text_encoder",
            GraphKind::LanguageModel | GraphKind::KvReorder | GraphKind::KvJoin => "language_model",
        }
    }
}

macro_rules! display_by_name {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
    )*};
}
display_by_name!(
    Family,
    Dtype,
    Quantization,
    ActivationQuantization,
    EncoderQuantization,
    GraphKind
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_strings_are_unchanged() {
        let s = |v: serde_json::Value| v.as_str().unwrap().to_string();
        assert_eq!(s(serde_json::to_value(Family::T5).unwrap()), "t5");
        assert_eq!(s(serde_json::to_value(Dtype::Fp16).unwrap()), "fp16");
        assert_eq!(s(serde_json::to_value(Quantization::Int4).unwrap()), "int4");
        assert_eq!(
            s(serde_json::to_value(EncoderQuantization::Int8Dynamic).unwrap()),
            "int8-dynamic"
        );
        assert_eq!(
            s(serde_json::to_value(ActivationQuantization::Int8PerRow).unwrap()),
            ActivationQuantization::Int8PerRow.name()
        );
        assert_eq!(ActivationQuantization::Int8PerRow.name(), "int8-per-row");
        assert_eq!(serde_json::from_str::<Family>("\"opt\"").unwrap(), Family::Opt);
        assert!(serde_json::from_str::<Family>("\"llama\"").is_err());
    }

    #[test]
    fn graph_kinds_name_their_files_and_profile_keys() {
        // A kind's name is both its `[profiles.x.graphs.NAME]` key and its file's stem.
        use crate::io;
        let files = [
            io::VISION_ENCODER_FILE,
            io::QFORMER_FILE,
            io::TEXT_ENCODER_FILE,
            io::LANGUAGE_MODEL_FILE,
        ];
        for (k, file) in GraphKind::ALL.into_iter().zip(files) {
            assert_eq!(format!("{}.onnx", k.name()), file, "{k:?}");
        }
        let mut names: Vec<&str> = GraphKind::ALL.iter().map(|k| k.name()).collect();
        names.dedup();
        assert_eq!(names.len(), GraphKind::ALL.len(), "distinct names");
    }
}
