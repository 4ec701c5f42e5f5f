//! One table of graph IO names and dimension names, used by the exporter (to name
//! graph inputs and outputs), the runtime (to feed them) and the manifest (to list them).

/// File names of the graphs and of the manifest inside an exported model folder.
pub const VISION_ENCODER_FILE: &str = "vision_encoder.onnx";
pub const QFORMER_FILE: &str = "qformer.onnx";
pub const LANGUAGE_MODEL_FILE: &str = "language_model.onnx";
pub const MANIFEST_FILE: &str = "blip2_manifest.json";
/// Encoder-decoder language models (Flan-T5) only: the text encoder.
pub const TEXT_ENCODER_FILE: &str = "text_encoder.onnx";
/// The KV cache's row reorder (beam search, rows leaving), where the cache lies.
pub const KV_REORDER_FILE: &str = "kv_reorder.onnx";
/// Portable exports: the growing KV cache's join of newcomer rows, where the cache lies.
pub const KV_JOIN_FILE: &str = "kv_join.onnx";

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

// language_model.onnx of a CUDA-target export (see `Target::Cuda`): the KV buffers are
// `[batch, heads, max_sequence_length, head_dim]`, bound as both past and present; rows
// are right-padded and each row's length is given instead of an attention mask.
/// int32 `[batch]`: each row's length including this step's tokens, minus one.
pub const SEQLENS_K: &str = "seqlens_k";
/// int32 scalar: the longest row's length including this step's tokens (the padded
/// prompt length in the prefill).
pub const TOTAL_SEQUENCE_LENGTH: &str = "total_sequence_length";
/// int32 scalar (Flan-T5 CUDA-target decoder): how many positions the self-attention
/// buffers hold before this step; the step writes its key and value there.
pub const PAST_SEQUENCE_LENGTH: &str = "past_sequence_length";
/// int64 scalar (Flan-T5 CUDA-target decoder): the positions this step attends to,
/// `past_sequence_length` + 1. Read on the host (the bounds of the decoder's position
/// Range), so it is an input of its own rather than a sum the device would compute.
pub const KEY_COUNT: &str = "key_count";
/// int64 `[batch]`: the most likely next token of each row (first index on ties).
pub const NEXT_TOKEN: &str = "next_token";
/// Optional int64 `[1]` input (default [1]): how many candidates `top_logprobs` keeps,
/// in the shape TopK reads (on the host).
pub const TOP_K: &str = "top_k";
/// float32 `[batch, top_k]`: the largest log-softmax values of each row, best first.
pub const TOP_LOGPROBS: &str = "top_logprobs";
/// int64 `[batch, top_k]`: their token ids.
pub const TOP_IDS: &str = "top_ids";
/// float32 `[batch, top_k]`: the raw logits of those ids (what sampling draws from).
pub const TOP_LOGITS: &str = "top_logits";
// kv_reorder.onnx: past_key_values.* in, present.* out, row r of the output being row
// `rows[r]` of the input.
pub const ROWS: &str = "rows";
// kv_join.onnx: the rows of a running cache (past_key_values.*, their first
// `drop_positions` positions dropped) and a newcomer's rows (joining.*), each padded with
// zeros along the positions by its pads (ONNX Pad's `[begins..., ends...]`, non-negative),
// one after the other in present.*.
pub const DROP_POSITIONS: &str = "drop_positions";
pub const PADS: &str = "pads";
pub const JOINING_PADS: &str = "joining_pads";
pub fn joining_key(layer: usize) -> String {
    format!("joining.{layer}.key")
}
pub fn joining_value(layer: usize) -> String {
    format!("joining.{layer}.value")
}

// text_encoder.onnx (T5): the encoder output and, for each decoder layer, the
// cross-attention keys and values, computed once per prompt.
pub const ENCODER_HIDDEN_STATES: &str = "encoder_hidden_states";
pub const ENCODER_ATTENTION_MASK: &str = "encoder_attention_mask";
/// int64 `[batch, past + sequence]` (the portable Flan-T5 decoder): 1 for each position a
/// row holds, 0 for left padding, so rows of different lengths share a batch.
pub const DECODER_ATTENTION_MASK: &str = "decoder_attention_mask";

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
/// The fixed length of a CUDA-target export's KV buffers (prompt plus new tokens).
pub const DIM_MAX_SEQUENCE: &str = "max_sequence_length";
pub const DIM_TOP_K: &str = "top_k";
pub const DIM_NEW_BATCH: &str = "new_batch_size";
pub const DIM_JOINING_BATCH: &str = "joining_batch_size";
pub const DIM_JOINING_SEQUENCE: &str = "joining_sequence_length";

// Image-text retrieval exports (family "retrieval", Salesforce/blip2-itm-vit-g): the
// vision encoder above, then three graphs over its image features and the text.
pub const IMAGE_EMBEDDING_FILE: &str = "image_embedding.onnx";
pub const TEXT_EMBEDDING_FILE: &str = "text_embedding.onnx";
pub const ITM_FILE: &str = "itm.onnx";
/// image_embedding.onnx: L2-normalized query embeddings `[batch, num_query_tokens, dim]`.
pub const IMAGE_EMBEDDINGS: &str = "image_embeddings";
/// text_embedding.onnx: L2-normalized [CLS] embeddings `[batch, dim]`.
pub const TEXT_EMBEDDINGS: &str = "text_embeddings";
/// itm.onnx: the image-text matching head's two logits (no match, match) `[batch, 2]`.
pub const ITM_LOGITS: &str = "itm_logits";
