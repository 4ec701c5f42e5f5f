//! Decoder states: what a language model keeps between generation steps (its KV cache,
//! positions, masks or row lengths), behind the one interface the search drives,
//! [`StepModel`]. The pipeline and the benchmarks start one with [`prefill`] and never
//! look at the family or the kind of export:
//!
//! - [`opt::OptState`]: OPT on the portable graph, a growing cache and left padding,
//!   exactly transformers' layout;
//! - [`opt_static::OptStaticState`]: OPT on a CUDA-target graph, fixed-length KV buffers
//!   written in place, rows right-padded, token selection on the device;
//! - [`t5::T5State`]: Flan-T5's decoder, the cross-attention cache computed once.

pub mod opt;
pub mod opt_static;
pub mod t5;

use blip2_core::io;
use ndarray::{Array2, ArrayD};

use crate::error::RuntimeError;
use crate::generation::{Prompt, StepModel};
use crate::model::Blip2Model;
use crate::prompt::Batch;

/// A decoder state the search can drive.
pub type Decoder<'m> = Box<dyn StepModel<Error = RuntimeError> + 'm>;

/// A decoder after its prefill.
pub struct Prefilled<'m> {
    pub state: Decoder<'m>,
    /// The search's view of each row, as transformers' `generate()` sees it.
    pub prompts: Vec<Prompt>,
    /// The logits of each row's next token, `[rows, vocab]`.
    pub logits: Array2<f32>,
}

/// Runs the prefill of a prompt batch (`batch`: left-padded as Blip2Processor pads;
/// `image_embeds` `[rows, num_query_tokens, hidden]`) on the decoder the export has, with
/// room for `max_new_tokens` new tokens per row.
pub fn prefill<'m>(
    model: &'m mut Blip2Model,
    batch: &Batch,
    image_embeds: ArrayD<f32>,
    max_new_tokens: usize,
) -> Result<Prefilled<'m>, RuntimeError> {
    if model.manifest.family == "t5" {
        // The search sees the decoder's ids, as transformers' processors do for
        // encoder-decoder models.
        let start = model.manifest.tokens.decoder_start_token_id.unwrap_or(0);
        let prompts = vec![Prompt::new(vec![start]); batch.ids.len()];
        let (state, logits) = t5::T5State::prefill(model, &batch.ids, &batch.mask, image_embeds, start)?;
        return Ok(Prefilled { state: Box::new(state), prompts, logits });
    }
    let prompts = batch.ids.iter().zip(&batch.mask).map(|(ids, m)| Prompt::with_attention_mask(ids.clone(), m)).collect();
    if is_static(model) {
        let (state, logits) = opt_static::OptStaticState::prefill(model, batch, image_embeds, max_new_tokens)?;
        return Ok(Prefilled { state: Box::new(state), prompts, logits });
    }
    let embeds = crate::model::lm_value(model, image_embeds)?;
    let (state, logits) = opt::OptState::prefill_last(model, &batch.ids, &batch.mask, embeds)?;
    Ok(Prefilled { state: Box::new(state), prompts, logits })
}

/// Whether the export's language model keeps a static KV buffer (`--target cuda`).
pub fn is_static(model: &Blip2Model) -> bool {
    model.manifest.graphs.language_model.inputs.iter().any(|t| t.name == io::SEQLENS_K)
}
