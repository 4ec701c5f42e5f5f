//! One table of graph IO names and dimension names, used by the exporter (to name
//! graph inputs and outputs), the runtime (to feed them) and the manifest (to list them).

/// File names of the graphs and of the manifest inside an exported model folder.
pub const VISION_ENCODER_FILE: &str = "vision_encoder.onnx";
pub const QFORMER_FILE: &str = "qformer.onnx";
pub const LANGUAGE_MODEL_FILE: &str = "language_model.onnx";
pub const MANIFEST_FILE: &str = "blip2_manifest.json";
/// Encoder-decoder language models (Flan-T5) only: the text encoder.
pub const TEXT_ENCODER_FILE: &str = "text_encoder.onnx";

// vision_encoder.onnx
pub const PIXEL_VALUES: &str = "pixel_values";
pub const IMAGE_FEATURES: &str = "image_features";

// qformer.onnx: image features in, projected query embeddings (the LM's image tokens) out.
pub const IMAGE_EMBEDS: &str = "image_embeds";

// language_model.onnx
pub const INPUT_IDS: &str = "input_ids";
pub const ATTENTION_MASK: &str = "attention_mask";
pub const POSITION_IDS: &str = "position_ids";
pub const LOGITS: &str = "logits";
/// Optional scalar input of the OPT language model (a graph input with a default):
/// logits are computed for the last `logits_to_keep` positions only; 0, the default,
/// means all. Generation feeds 1 to its prefill, as transformers' generate() does.
pub const LOGITS_TO_KEEP: &str = "logits_to_keep";

// text_encoder.onnx (T5): the encoder output and, for each decoder layer, the
// cross-attention keys and values, computed once per prompt.
pub const ENCODER_HIDDEN_STATES: &str = "encoder_hidden_states";
pub const ENCODER_ATTENTION_MASK: &str = "encoder_attention_mask";

pub fn cross_key(layer: usize) -> String {
    format!("cross.{layer}.key")
}
pub fn cross_value(layer: usize) -> String {
    format!("cross.{layer}.value")
}

pub fn past_key(layer: usize) -> String {
    format!("past_key_values.{layer}.key")
}
pub fn past_value(layer: usize) -> String {
    format!("past_key_values.{layer}.value")
}
pub fn present_key(layer: usize) -> String {
    format!("present.{layer}.key")
}
pub fn present_value(layer: usize) -> String {
    format!("present.{layer}.value")
}

// Dimension names (symbolic dims of the graphs).
pub const DIM_BATCH: &str = "batch_size";
pub const DIM_SEQUENCE: &str = "sequence_length";
/// Positions the logits are computed for: `sequence_length`, or `logits_to_keep` if smaller.
pub const DIM_LOGITS_SEQUENCE: &str = "logits_sequence_length";
pub const DIM_PAST_SEQUENCE: &str = "past_sequence_length";
pub const DIM_TOTAL_SEQUENCE: &str = "total_sequence_length";
pub const DIM_NUM_IMAGE_TOKENS: &str = "num_image_tokens";
pub const DIM_ENCODER_SEQUENCE: &str = "encoder_sequence_length";
