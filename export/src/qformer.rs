//! The Q-Former (`Blip2QFormerModel` over the learned `query_tokens`) and the
//! `language_projection`: image features to the embeddings that take the place of the
//! image tokens in the language model's input. The Q-Former always runs in fp32, as
//! transformers keeps it (`_keep_in_fp32_modules`); the projection uses the LM's dtype.

use blip2_core::{io, Dim};

use crate::blocks::{activation, attention, dim_of, fused_attention, layer_norm, linear, split_heads};
use crate::builder::{Builder, Projection};
use crate::config::QFormerConfig;
use crate::error::Result;
use crate::onnx::{Attr, Elem};

const P: &str = "qformer";

/// ```text
///   image_features [B,N,Dv] ──Cast(fp32)─────────────────────────────┐ (cross-attention keys/values)
///   query_tokens [1,Q,Dq] ──Expand(B)──LayerNorm ──▶ layer.0 … layer.L-1 ──Cast(LM dtype)
///     ──language_projection ──▶ image_embeds [B, Q, D_text]
/// ```
pub fn build(
    b: &mut Builder,
    c: &QFormerConfig,
    num_query_tokens: usize,
    text_hidden: usize,
    vision_positions: usize,
    vision_float: Elem,
    lm_float: Elem,
) -> Result<()> {
    let dq = c.hidden_size;
    let feats = b.input(
        io::IMAGE_FEATURES,
        vision_float,
        vec![Dim::Named(io::DIM_BATCH.into()), Dim::Fixed(vision_positions as i64), Dim::Fixed(c.encoder_hidden_size as i64)],
    );
    let feats = b.cast("/qformer/Cast", &feats, vision_float, Elem::F32);
    let query = b.weight("query_tokens", &[1, num_query_tokens, dq])?;
    let batch = dim_of(b, "/qformer/batch", &feats, 0);
    let ones = b.ints(&[1, 1]);
    let shape = b.op("/qformer/Concat", "Concat", &[&batch, &ones], vec![("axis", Attr::Int(0))]);
    let query = b.op("/qformer/query_tokens/Expand", "Expand", &[&query, &shape], vec![]);
    let mut h = layer_norm(b, "/qformer/layernorm", &query, &format!("{P}.layernorm"), dq, c.layer_norm_eps)?;
    for i in 0..c.num_hidden_layers {
        h = layer(b, c, i, &h, &feats)?;
    }
    let h = b.cast("/qformer/Cast_1", &h, Elem::F32, lm_float);
    // The projection is one small product over the queries, in the LM's type: it stays
    // in float even when the Q-Former's layers are quantized.
    let out = b.scoped(lm_float, Projection::Float, |b| {
        linear(b, "/language_projection", &h, "language_projection", dq, text_hidden, true)
    })?;
    b.output(
        &out,
        io::IMAGE_EMBEDS,
        lm_float,
        vec![Dim::Named(io::DIM_BATCH.into()), Dim::Fixed(num_query_tokens as i64), Dim::Fixed(text_hidden as i64)],
    );
    Ok(())
}

/// One Q-Former layer on the query tokens: self-attention, cross-attention to the image
/// every `cross_attention_frequency` layers, then the query feed-forward.
///
/// ```text
///   h ──attention(h,h,h)──dense──Add(h)──LayerNorm ─▶ h1
///   h1 ──attention(h1, img, img)──dense──Add(h1)──LayerNorm ─▶ h2     (layers i % freq == 0)
///   h2 ──intermediate_query(dense, act)──output_query.dense──Add(h2)──LayerNorm ─▶
/// ```
fn layer(b: &mut Builder, c: &QFormerConfig, i: usize, h: &str, feats: &str) -> Result<String> {
    let pre = format!("{P}.encoder.layer.{i}");
    let path = format!("/qformer/layer.{i}");
    let mut h = attention_block(b, c, &format!("{path}/attention"), &format!("{pre}.attention"), h, h, c.hidden_size)?;
    if i % c.cross_attention_frequency == 0 {
        h = attention_block(
            b,
            c,
            &format!("{path}/crossattention"),
            &format!("{pre}.crossattention"),
            &h,
            feats,
            c.encoder_hidden_size,
        )?;
    }
    let d = c.hidden_size;
    let f = linear(b, &format!("{path}/intermediate_query"), &h, &format!("{pre}.intermediate_query.dense"), d, c.intermediate_size, true)?;
    let f = activation(b, &format!("{path}/intermediate_query/act"), &f, &c.hidden_act)?;
    let f = linear(b, &format!("{path}/output_query"), &f, &format!("{pre}.output_query.dense"), c.intermediate_size, d, true)?;
    let r = b.residual(&format!("{path}/output_query/Add_1"), &f, &h);
    layer_norm(b, &format!("{path}/output_query/LayerNorm"), &r, &format!("{pre}.output_query.LayerNorm"), d, c.layer_norm_eps)
}

/// BERT-style attention with its output block (`Blip2QFormerAttention`).
fn attention_block(b: &mut Builder, c: &QFormerConfig, path: &str, pre: &str, h: &str, kv: &str, kv_dim: usize) -> Result<String> {
    let d = c.hidden_size;
    let heads = c.num_attention_heads;
    let dh = d / heads;
    let q = linear(b, &format!("{path}/query"), h, &format!("{pre}.attention.query"), d, d, true)?;
    let k = linear(b, &format!("{path}/key"), kv, &format!("{pre}.attention.key"), kv_dim, d, true)?;
    let v = linear(b, &format!("{path}/value"), kv, &format!("{pre}.attention.value"), kv_dim, d, true)?;
    let a = if b.fused() {
        fused_attention(b, path, &q, &k, &v, heads)
    } else {
        let q = split_heads(b, &format!("{path}/query/heads"), &q, heads, dh);
        let k = split_heads(b, &format!("{path}/key/heads"), &k, heads, dh);
        let v = split_heads(b, &format!("{path}/value/heads"), &v, heads, dh);
        attention(b, path, &q, &k, &v, Some((dh as f32).powf(-0.5)), None, None)
    };
    let o = linear(b, &format!("{path}/output/dense"), &a, &format!("{pre}.output.dense"), d, d, true)?;
    let r = b.residual(&format!("{path}/output/Add_1"), &o, h);
    layer_norm(b, &format!("{path}/output/LayerNorm"), &r, &format!("{pre}.output.LayerNorm"), d, c.layer_norm_eps)
}
