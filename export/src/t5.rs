//! The Flan-T5 language model (`T5ForConditionalGeneration`) as two graphs: the text
//! encoder, which also computes every decoder layer's cross-attention keys and values
//! once per prompt, and the decoder with a self-attention cache that grows per step.
//!
//! fp16: transformers keeps the feed-forward output projections (`wo`) in fp32
//! (`_keep_in_fp32_modules`), which turns its residual stream fp32 after the first block.
//! The graphs keep the residual stream in fp32 throughout, run `wo` in fp32 and the other
//! projections in the export dtype, so fp16 graphs do not overflow where T5 is known to.

use blip2_core::{io, Dim};

use crate::blocks::{
    activation, attention, causal_positions, dim_of, lm_head, scatter_image_embeds, select_tokens,
    split_heads,
};
use crate::builder::Builder;
use crate::config::T5Config;
use crate::error::Result;
use crate::onnx::{Attr, Elem};

const P: &str = "language_model";

fn named(s: &str) -> Dim {
    Dim::Named(s.into())
}

/// The embedding table: `shared` (transformers 5 saves) or the encoder's copy (Hub files).
fn embedding_name(b: &Builder) -> String {
    if b.has(&format!("{P}.shared.weight")) {
        format!("{P}.shared.weight")
    } else {
        format!("{P}.encoder.embed_tokens.weight")
    }
}

/// transformers' `_relative_position_bucket` for relative positions -max_distance..=max_distance
/// (positions further away land in the last bucket, so the table is exact after clamping),
/// computed in float32 as torch does it.
pub fn bucket_table(c: &T5Config, bidirectional: bool) -> Vec<i64> {
    let md = c.relative_attention_max_distance as i64;
    let mut nb = c.relative_attention_num_buckets as i64;
    if bidirectional {
        nb /= 2;
    }
    let max_exact = nb / 2;
    let scale = ((md as f64) / (max_exact as f64)).ln() as f32;
    (-md..=md)
        .map(|rel| {
            let mut bucket = 0;
            let n = if bidirectional {
                if rel > 0 {
                    bucket += nb;
                }
                rel.abs()
            } else {
                (-rel).max(0)
            };
            if n < max_exact {
                bucket + n
            } else {
                let large = max_exact
                    + ((n as f32 / max_exact as f32).ln() / scale * (nb - max_exact) as f32) as i64;
                bucket + large.min(nb - 1)
            }
        })
        .collect()
}

/// Relative position bias `[1, H, S, T]` for queries at `qpos` ([S]) and keys at `kpos` ([T]).
///
/// ```text
///   kpos[None,:] - qpos[:,None] ──Clip(±max_distance)──Add(max_distance)──Gather(bucket table)
///     ──Gather(relative_attention_bias)──Transpose──Unsqueeze ─▶ [1, H, S, T]
/// ```
fn position_bias(
    b: &mut Builder,
    c: &T5Config,
    path: &str,
    prefix: &str,
    qpos: &str,
    kpos: &str,
    bidirectional: bool,
) -> Result<String> {
    let p = |s: &str| format!("{path}/{s}");
    let md = c.relative_attention_max_distance as i64;
    let table = bucket_table(c, bidirectional);
    let table = b.int_table(
        &format!("/constants/t5_buckets/{}/{md}/{bidirectional}", c.relative_attention_num_buckets),
        &table,
    );
    let axes0 = b.ints(&[0]);
    let axes1 = b.ints(&[1]);
    let q2 = b.op(&p("Unsqueeze"), "Unsqueeze", &[qpos, &axes1], vec![]);
    let k2 = b.op(&p("Unsqueeze_1"), "Unsqueeze", &[kpos, &axes0], vec![]);
    let rel = b.op(&p("Sub"), "Sub", &[&k2, &q2], vec![]);
    let lo = b.int(-md);
    let hi = b.int(md);
    let rel = b.op(&p("Clip"), "Clip", &[&rel, &lo, &hi], vec![]);
    let rel = b.op(&p("Add"), "Add", &[&rel, &hi], vec![]);
    let bucket = b.op(&p("Gather"), "Gather", &[&table, &rel], vec![("axis", Attr::Int(0))]);
    let w = b.weight(
        &format!("{prefix}.relative_attention_bias.weight"),
        &[c.relative_attention_num_buckets, c.num_heads],
    )?;
    let bias = b.op(&p("Gather_1"), "Gather", &[&w, &bucket], vec![("axis", Attr::Int(0))]);
    let bias =
        b.op(&p("Transpose"), "Transpose", &[&bias], vec![("perm", Attr::Ints(vec![2, 0, 1]))]);
    Ok(b.op(&p("Unsqueeze_2"), "Unsqueeze", &[&bias, &axes0], vec![]))
}

/// T5LayerNorm (RMS norm, no mean, no bias) on the fp32 residual stream; the result is
/// in the graph's float type, as T5LayerNorm casts before its weight.
///
/// ```text
///   x ──Mul(x)──ReduceMean──Add(eps)──Sqrt──Div(x, ·)──Cast──Mul(weight) ─▶
/// ```
///
/// Fused graphs (`--target cuda`) use ONNX Runtime's one-kernel
/// SimplifiedLayerNormalization on the fp32 stream, with the weight in fp32, and cast
/// after it; in fp16 graphs that rounds the product once where T5LayerNorm rounds the
/// normalized value and then the product.
///
/// ```text
///   x ──SimplifiedLayerNormalization(weight as fp32)──Cast ─▶
/// ```
fn rms_norm(
    b: &mut Builder,
    path: &str,
    x: &str,
    prefix: &str,
    dim: usize,
    eps: f64,
) -> Result<String> {
    let p = |s: &str| format!("{path}/{s}");
    let float = b.float();
    if b.fused() {
        let w = b.weight_of(&format!("{prefix}.weight"), &[dim], false, Elem::F32)?;
        let attrs = vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(eps as f32))];
        let n = b.op(
            &p("SimplifiedLayerNormalization"),
            "SimplifiedLayerNormalization",
            &[x, &w],
            attrs,
        );
        return Ok(b.cast(&p("Cast"), &n, Elem::F32, float));
    }
    let sq = b.op(&p("Mul"), "Mul", &[x, x], vec![]);
    let var = b.op(
        &p("ReduceMean"),
        "ReduceMean",
        &[&sq],
        vec![("axes", Attr::Ints(vec![-1])), ("keepdims", Attr::Int(1))],
    );
    let e = b.scalar_of(eps as f32, Elem::F32);
    let v = b.op(&p("Add"), "Add", &[&var, &e], vec![]);
    let s = b.op(&p("Sqrt"), "Sqrt", &[&v], vec![]);
    let n = b.op(&p("Div"), "Div", &[x, &s], vec![]);
    let n = b.cast(&p("Cast"), &n, Elem::F32, float);
    let w = b.weight(&format!("{prefix}.weight"), &[dim])?;
    Ok(b.op(&p("Mul_1"), "Mul", &[&w, &n], vec![]))
}

/// A bias-free projection `x @ W^T` in the graph's float type.
fn proj(
    b: &mut Builder,
    path: &str,
    x: &str,
    name: &str,
    in_dim: usize,
    out_dim: usize,
) -> Result<String> {
    crate::blocks::project(b, path, x, name, in_dim, out_dim)
}

/// Adds a sublayer output (graph float type) to the fp32 residual stream.
fn residual(b: &mut Builder, path: &str, h: &str, y: &str) -> String {
    let float = b.float();
    let y = b.cast(&format!("{path}/Cast"), y, float, Elem::F32);
    b.op(&format!("{path}/Add"), "Add", &[h, &y], vec![])
}

/// Token embeddings with the image embeddings in place of the image tokens (as for OPT).
fn embeddings(
    b: &mut Builder,
    c: &T5Config,
    ids: &str,
    img: &str,
    image_token_id: i64,
) -> Result<String> {
    let table = embedding_name(b);
    let table = b.weight(&table, &[c.vocab_size, c.d_model])?;
    let tok =
        b.op("/lm/embed_tokens/Gather", "Gather", &[&table, ids], vec![("axis", Attr::Int(0))]);
    // The encoder reads prompts only: every image token there is an image slot.
    Ok(scatter_image_embeds(b, ids, img, &tok, image_token_id, None))
}

/// Self- or cross-attention of T5 (no score scaling), optional bias and mask.
#[allow(clippy::too_many_arguments)]
fn t5_attention(
    b: &mut Builder,
    c: &T5Config,
    path: &str,
    q_in: &str,
    k: &str,
    v: &str,
    prefix: &str,
    bias: Option<&str>,
    allowed: &str,
) -> Result<String> {
    let inner = c.inner_dim();
    let q = proj(b, &format!("{path}/q"), q_in, &format!("{prefix}.q.weight"), c.d_model, inner)?;
    let q = split_heads(b, &format!("{path}/q/heads"), &q, c.num_heads, c.d_kv);
    let a = attention(b, path, &q, k, v, None, bias, Some(allowed));
    proj(b, &format!("{path}/o"), &a, &format!("{prefix}.o.weight"), inner, c.d_model)
}

/// T5LayerFF: gated (`act(wi_0 x) * wi_1 x`) or plain (`act(wi x)`), then `wo` in fp32.
fn feed_forward(
    b: &mut Builder,
    c: &T5Config,
    path: &str,
    x: &str,
    prefix: &str,
) -> Result<String> {
    let (gated, act) = c.feed_forward();
    let h = if gated {
        let g = proj(
            b,
            &format!("{path}/wi_0"),
            x,
            &format!("{prefix}.wi_0.weight"),
            c.d_model,
            c.d_ff,
        )?;
        let g = activation(b, &format!("{path}/act"), &g, &act)?;
        let l = proj(
            b,
            &format!("{path}/wi_1"),
            x,
            &format!("{prefix}.wi_1.weight"),
            c.d_model,
            c.d_ff,
        )?;
        b.op(&format!("{path}/Mul"), "Mul", &[&g, &l], vec![])
    } else {
        let h =
            proj(b, &format!("{path}/wi"), x, &format!("{prefix}.wi.weight"), c.d_model, c.d_ff)?;
        activation(b, &format!("{path}/act"), &h, &act)?
    };
    let float = b.float();
    let h = b.cast(&format!("{path}/wo/Cast"), &h, float, Elem::F32);
    let w = b.weight_of(&format!("{prefix}.wo.weight"), &[c.d_model, c.d_ff], true, Elem::F32)?;
    Ok(b.op(&format!("{path}/wo/MatMul"), "MatMul", &[&h, &w], vec![]))
}

/// Boolean `[B,1,1,T]` from an int64 `[B,T]` mask.
fn key_mask(b: &mut Builder, path: &str, mask: &str) -> String {
    let m =
        b.op(&format!("{path}/Cast"), "Cast", &[mask], vec![("to", Attr::Int(Elem::Bool as i64))]);
    let axes = b.ints(&[1, 2]);
    b.op(&format!("{path}/Unsqueeze"), "Unsqueeze", &[&m, &axes], vec![])
}

/// The text encoder graph.
///
/// ```text
///   input_ids, image_embeds ──embeddings──Cast(fp32) ─▶ h
///   h ──▶ block.0 … block.N-1 (RMSNorm──SelfAttention(+bias)──Add, RMSNorm──FF──Add)
///     ──final_layer_norm ─▶ encoder_hidden_states
///     ──per decoder layer: EncDecAttention.k / .v ─▶ cross.{i}.key / .value
/// ```
pub fn build_encoder(b: &mut Builder, c: &T5Config, image_token_id: i64) -> Result<()> {
    let float = b.float();
    let d = c.d_model;
    let ids =
        b.input(io::INPUT_IDS, Elem::I64, vec![named(io::DIM_BATCH), named(io::DIM_SEQUENCE)]);
    let img = b.input(
        io::IMAGE_EMBEDS,
        float,
        vec![named(io::DIM_BATCH), named(io::DIM_NUM_IMAGE_TOKENS), Dim::Fixed(d as i64)],
    );
    let mask =
        b.input(io::ATTENTION_MASK, Elem::I64, vec![named(io::DIM_BATCH), named(io::DIM_SEQUENCE)]);
    let emb = embeddings(b, c, &ids, &img, image_token_id)?;
    let mut h = b.cast("/lm/encoder/Cast", &emb, float, Elem::F32);
    let allowed = key_mask(b, "/lm/encoder/mask", &mask);
    let s = dim_of(b, "/lm/encoder/seq", &ids, 1);
    let axes0 = b.ints(&[0]);
    let s = b.op("/lm/encoder/Squeeze", "Squeeze", &[&s, &axes0], vec![]);
    let zero = b.int(0);
    let one = b.int(1);
    let pos = b.op("/lm/encoder/Range", "Range", &[&zero, &s, &one], vec![]);
    let bias = position_bias(
        b,
        c,
        "/lm/encoder/position_bias",
        &format!("{P}.encoder.block.0.layer.0.SelfAttention"),
        &pos,
        &pos,
        true,
    )?;
    let heads = (c.num_heads, c.d_kv);
    for i in 0..c.num_layers {
        let pre = format!("{P}.encoder.block.{i}.layer");
        let path = format!("/lm/encoder/block.{i}");
        let x = rms_norm(
            b,
            &format!("{path}/attn/layer_norm"),
            &h,
            &format!("{pre}.0.layer_norm"),
            d,
            c.layer_norm_epsilon,
        )?;
        let k = proj(
            b,
            &format!("{path}/attn/k"),
            &x,
            &format!("{pre}.0.SelfAttention.k.weight"),
            d,
            c.inner_dim(),
        )?;
        let k = split_heads(b, &format!("{path}/attn/k/heads"), &k, heads.0, heads.1);
        let v = proj(
            b,
            &format!("{path}/attn/v"),
            &x,
            &format!("{pre}.0.SelfAttention.v.weight"),
            d,
            c.inner_dim(),
        )?;
        let v = split_heads(b, &format!("{path}/attn/v/heads"), &v, heads.0, heads.1);
        let a = t5_attention(
            b,
            c,
            &format!("{path}/attn"),
            &x,
            &k,
            &v,
            &format!("{pre}.0.SelfAttention"),
            Some(&bias),
            &allowed,
        )?;
        h = residual(b, &format!("{path}/attn/residual"), &h, &a);
        let x = rms_norm(
            b,
            &format!("{path}/ff/layer_norm"),
            &h,
            &format!("{pre}.1.layer_norm"),
            d,
            c.layer_norm_epsilon,
        )?;
        let f = feed_forward(b, c, &format!("{path}/ff"), &x, &format!("{pre}.1.DenseReluDense"))?;
        h = b.op(&format!("{path}/ff/Add"), "Add", &[&h, &f], vec![]);
    }
    let out = rms_norm(
        b,
        "/lm/encoder/final_layer_norm",
        &h,
        &format!("{P}.encoder.final_layer_norm"),
        d,
        c.layer_norm_epsilon,
    )?;
    let enc_dims = vec![named(io::DIM_BATCH), named(io::DIM_SEQUENCE), Dim::Fixed(d as i64)];
    b.output(&out, io::ENCODER_HIDDEN_STATES, float, enc_dims);
    let kv_dims = vec![
        named(io::DIM_BATCH),
        Dim::Fixed(c.num_heads as i64),
        named(io::DIM_SEQUENCE),
        Dim::Fixed(c.d_kv as i64),
    ];
    for i in 0..c.decoder_layers() {
        let pre = format!("{P}.decoder.block.{i}.layer.1.EncDecAttention");
        let path = format!("/lm/cross.{i}");
        let k = proj(b, &format!("{path}/k"), &out, &format!("{pre}.k.weight"), d, c.inner_dim())?;
        let k = split_heads(b, &format!("{path}/k/heads"), &k, c.num_heads, c.d_kv);
        let v = proj(b, &format!("{path}/v"), &out, &format!("{pre}.v.weight"), d, c.inner_dim())?;
        let v = split_heads(b, &format!("{path}/v/heads"), &v, c.num_heads, c.d_kv);
        b.output(&k, &io::cross_key(i), float, kv_dims.clone());
        b.output(&v, &io::cross_value(i), float, kv_dims.clone());
    }
    Ok(())
}

/// `[batch, heads, len, d_kv]`: a decoder cache tensor's dimensions.
fn kv_dims(c: &T5Config, len: &str) -> Vec<Dim> {
    vec![
        named(io::DIM_BATCH),
        Dim::Fixed(c.num_heads as i64),
        named(len),
        Dim::Fixed(c.d_kv as i64),
    ]
}

/// The decoder's cache inputs, per layer (key, value): `cross.*` (the encoder's length),
/// then `past_key_values.*` (length `past`).
#[allow(clippy::type_complexity)]
fn decoder_caches(
    b: &mut Builder,
    c: &T5Config,
    past: &str,
) -> (Vec<(String, String)>, Vec<(String, String)>) {
    let float = b.float();
    let mut inputs = |key: fn(usize) -> String,
                      value: fn(usize) -> String,
                      len: &str|
     -> Vec<(String, String)> {
        (0..c.decoder_layers())
            .map(|i| {
                (
                    b.input(&key(i), float, kv_dims(c, len)),
                    b.input(&value(i), float, kv_dims(c, len)),
                )
            })
            .collect()
    };
    let cross = inputs(io::cross_key, io::cross_value, io::DIM_ENCODER_SEQUENCE);
    let past = inputs(io::past_key, io::past_value, past);
    (cross, past)
}

/// The decoder's token embeddings on the fp32 residual stream.
fn decoder_embeddings(b: &mut Builder, c: &T5Config, ids: &str) -> Result<String> {
    let float = b.float();
    let table = embedding_name(b);
    let table = b.weight(&table, &[c.vocab_size, c.d_model])?;
    let emb = b.op(
        "/lm/decoder/embed_tokens/Gather",
        "Gather",
        &[&table, ids],
        vec![("axis", Attr::Int(0))],
    );
    Ok(b.cast("/lm/decoder/Cast", &emb, float, Elem::F32))
}

/// final_layer_norm, transformers' output scaling when `scale_output`, and the LM head
/// (`positions`: as [`lm_head`] takes it).
fn decoder_head(
    b: &mut Builder,
    c: &T5Config,
    h: &str,
    scale_output: bool,
    positions: Option<usize>,
) -> Result<String> {
    let d = c.d_model;
    let mut out = rms_norm(
        b,
        "/lm/decoder/final_layer_norm",
        h,
        &format!("{P}.decoder.final_layer_norm"),
        d,
        c.layer_norm_epsilon,
    )?;
    if scale_output {
        let s = b.scalar((d as f32).powf(-0.5));
        out = b.op("/lm/decoder/scale/Mul", "Mul", &[&out, &s], vec![]);
    }
    let head = if b.has(&format!("{P}.lm_head.weight")) {
        format!("{P}.lm_head.weight")
    } else {
        embedding_name(b)
    };
    lm_head(b, &out, &head, d, c.vocab_size, positions)
}

/// A decoder block after its self-attention: RMSNorm, cross-attention over the text
/// encoder's keys and values (`cross`) where `cross_allowed`, residual; RMSNorm, feed-forward,
/// residual. The same for both decoder graphs.
///
/// Cross-attention is in plain operators in the `--target cuda` graph too: the CUDA kernel
/// of DecoderMaskedMultiHeadAttention reads every key cache, the encoder's keys included, in
/// its own tiled layout [B, H, D/x, T, x] (x = 16 bytes of elements), while the CPU kernel
/// and the text encoder's outputs are [B, H, T, D]: the fused operator gave the GPU other
/// tokens than the CPU (measured on an H200, 2026-12-04). One query over the encoder's keys
/// is a few small products either way.
fn cross_and_feed_forward(
    b: &mut Builder,
    c: &T5Config,
    path: &str,
    pre: &str,
    h: &str,
    (ck, cv): (&String, &String),
    cross_allowed: &str,
) -> Result<String> {
    let (d, eps) = (c.d_model, c.layer_norm_epsilon);
    let x = rms_norm(
        b,
        &format!("{path}/cross/layer_norm"),
        h,
        &format!("{pre}.1.layer_norm"),
        d,
        eps,
    )?;
    let a = t5_attention(
        b,
        c,
        &format!("{path}/cross"),
        &x,
        ck,
        cv,
        &format!("{pre}.1.EncDecAttention"),
        None,
        cross_allowed,
    )?;
    let h = residual(b, &format!("{path}/cross/residual"), h, &a);
    let x =
        rms_norm(b, &format!("{path}/ff/layer_norm"), &h, &format!("{pre}.2.layer_norm"), d, eps)?;
    let f = feed_forward(b, c, &format!("{path}/ff"), &x, &format!("{pre}.2.DenseReluDense"))?;
    Ok(b.op(&format!("{path}/ff/Add"), "Add", &[&h, &f], vec![]))
}

/// The CUDA-target decoder (`--target cuda`): self-attention is ONNX Runtime's
/// DecoderMaskedMultiHeadAttention (com.microsoft), which runs one new position a step,
/// as T5's decoder does from its start token on. It reads and writes a KV buffer of a
/// fixed length per layer, bound as both past and present and written in place at
/// `past_sequence_length` (in the operator's own layout, which differs between the CPU
/// and CUDA kernels; nothing else reads it), with T5's relative position bias as the
/// operator's `attention_bias` and no score scaling (`scale` 1). Cross-attention is
/// plain operators over the encoder's keys and values as they are (`[B,H,T,D]`), masked
/// by `encoder_attention_mask`. The decoder picks tokens on the device as the OPT graph
/// does.
///
/// ```text
///   key_count (P+1) ──Range──position bias for query P over keys 0..=P ─▶ bias [1,H,1,P+1]
///   input_ids [B,1] ──Gather(shared)──Cast(fp32) ─▶ h
///   h ──▶ block.i: RMSNorm──q, k, v──DMMHA(bias, past.i, P) ─▶ present.i (same buffers)
///                  ──o──Add; RMSNorm──EncDecAttention(cross.i, encoder mask)──Add; RMSNorm──FF──Add
///     ──final_layer_norm──[× d_model^-0.5]──lm_head ─▶ logits [B,1,V], next_token, top-k
/// ```
pub fn build_decoder_cuda(b: &mut Builder, c: &T5Config, scale_output: bool) -> Result<()> {
    let float = b.float();
    let d = c.d_model;
    let inner = c.inner_dim();
    let batch = || named(io::DIM_BATCH);
    let ids = b.input(io::INPUT_IDS, Elem::I64, vec![batch(), Dim::Fixed(1)]);
    let enc_mask = b.input(
        io::ENCODER_ATTENTION_MASK,
        Elem::I64,
        vec![batch(), named(io::DIM_ENCODER_SEQUENCE)],
    );
    let kv = |len: &str| kv_dims(c, len);
    let (cross, past) = decoder_caches(b, c, io::DIM_MAX_SEQUENCE);
    let past_len = b.input(io::PAST_SEQUENCE_LENGTH, Elem::I32, vec![]);
    // 1 for each position of the buffers a row holds (past and this step's), 0 for the
    // positions before a row joined a running batch: the operator's key padding mask.
    let dec_mask = b.input(
        io::DECODER_ATTENTION_MASK,
        Elem::I64,
        vec![batch(), named(io::DIM_TOTAL_SEQUENCE)],
    );
    let dec_mask = b.cast("/lm/decoder/self_mask/Cast", &dec_mask, Elem::I64, Elem::I32);
    let mut h = decoder_embeddings(b, c, &ids)?;

    // The query sits at position P, the keys at 0..=P. Range reads its bounds on the
    // host, so the key count P + 1 is an input of its own (the runtime passes it in host
    // memory) and the query's position is the last key position, sliced on the device.
    let p = "/lm/decoder/positions";
    let key_count = b.input(io::KEY_COUNT, Elem::I64, vec![]);
    let one = b.int(1);
    let zero = b.int(0);
    let kpos = b.op(&format!("{p}/Range"), "Range", &[&zero, &key_count, &one], vec![]);
    let (last, end, axis0) = (b.ints(&[-1]), b.ints(&[i64::MAX]), b.ints(&[0]));
    let qpos = b.op(&format!("{p}/Slice"), "Slice", &[&kpos, &last, &end, &axis0], vec![]);
    let bias = position_bias(
        b,
        c,
        "/lm/decoder/position_bias",
        &format!("{P}.decoder.block.0.layer.0.SelfAttention"),
        &qpos,
        &kpos,
        false,
    )?;
    let cross_allowed = key_mask(b, "/lm/decoder/encoder_mask", &enc_mask);
    let heads = || ("num_heads", Attr::Int(c.num_heads as i64));
    let unscaled = || ("scale", Attr::Float(1.0));

    for (i, ((pk, pv), (ck, cv))) in past.iter().zip(&cross).enumerate() {
        let pre = format!("{P}.decoder.block.{i}.layer");
        let path = format!("/lm/decoder/block.{i}");
        let x = rms_norm(
            b,
            &format!("{path}/attn/layer_norm"),
            &h,
            &format!("{pre}.0.layer_norm"),
            d,
            c.layer_norm_epsilon,
        )?;
        let att = format!("{pre}.0.SelfAttention");
        // Three products: ONNX Runtime's CPU kernel of the operator takes no packed q/k/v,
        // and the CPU is where the graph is tested.
        let mut qkv = Vec::new();
        for n in ["q", "k", "v"] {
            qkv.push(proj(
                b,
                &format!("{path}/attn/{n}"),
                &x,
                &format!("{att}.{n}.weight"),
                d,
                inner,
            )?);
        }
        let ins = [
            qkv[0].as_str(),
            qkv[1].as_str(),
            qkv[2].as_str(),
            dec_mask.as_str(),
            bias.as_str(),
            pk.as_str(),
            pv.as_str(),
            past_len.as_str(),
        ];
        let attrs = vec![heads(), ("past_present_share_buffer", Attr::Int(1)), unscaled()];
        let mut outs = b.op_n(
            &format!("{path}/attn/DecoderMaskedMultiHeadAttention"),
            "DecoderMaskedMultiHeadAttention",
            &ins,
            attrs,
            3,
        );
        b.mark_ms_domain();
        let v = outs.pop().expect("three outputs");
        let k = outs.pop().expect("three outputs");
        let a = outs.pop().expect("three outputs");
        b.output(&k, &io::present_key(i), float, kv(io::DIM_MAX_SEQUENCE));
        b.output(&v, &io::present_value(i), float, kv(io::DIM_MAX_SEQUENCE));
        let a = proj(b, &format!("{path}/attn/o"), &a, &format!("{att}.o.weight"), inner, d)?;
        h = residual(b, &format!("{path}/attn/residual"), &h, &a);

        h = cross_and_feed_forward(b, c, &path, &pre, &h, (ck, cv), &cross_allowed)?;
    }
    let logits = decoder_head(b, c, &h, scale_output, Some(1))?;
    b.output(
        &logits,
        io::LOGITS,
        Elem::F32,
        vec![batch(), Dim::Fixed(1), Dim::Fixed(c.vocab_size as i64)],
    );
    select_tokens(b, &logits, "/lm/decoder/select", c.vocab_size);
    Ok(())
}

/// The decoder graph with its self-attention cache.
///
/// ```text
///   input_ids ──Gather(shared)──Cast(fp32) ─▶ h
///   h ──▶ block.i: RMSNorm──SelfAttention(past, +position bias, causal ∧ decoder_attention_mask)──Add
///                  RMSNorm──EncDecAttention(cross.i, encoder_attention_mask)──Add
///                  RMSNorm──FF──Add
///     ──final_layer_norm──[× d_model^-0.5]──lm_head ─▶ logits (float32)
/// ```
pub fn build_decoder(b: &mut Builder, c: &T5Config, scale_output: bool) -> Result<()> {
    let float = b.float();
    let d = c.d_model;
    let ids =
        b.input(io::INPUT_IDS, Elem::I64, vec![named(io::DIM_BATCH), named(io::DIM_SEQUENCE)]);
    let enc_mask = b.input(
        io::ENCODER_ATTENTION_MASK,
        Elem::I64,
        vec![named(io::DIM_BATCH), named(io::DIM_ENCODER_SEQUENCE)],
    );
    let kv = |len: &str| kv_dims(c, len);
    let (cross, past) = decoder_caches(b, c, io::DIM_PAST_SEQUENCE);
    // Which cached and new positions each row holds (0: left padding), so rows of
    // different lengths share a batch; T5's position bias depends only on the distance
    // between positions, which left padding leaves as it is.
    let dec_mask = b.input(
        io::DECODER_ATTENTION_MASK,
        Elem::I64,
        vec![named(io::DIM_BATCH), named(io::DIM_TOTAL_SEQUENCE)],
    );
    let mut h = decoder_embeddings(b, c, &ids)?;

    // Positions: the new tokens follow the cached ones.
    let p = "/lm/decoder/positions";
    let s = dim_of(b, &format!("{p}/seq"), &ids, 1);
    let pl = dim_of(b, &format!("{p}/past"), &past[0].0, 2);
    let t = b.op(&format!("{p}/Add"), "Add", &[&s, &pl], vec![]);
    let axes0 = b.ints(&[0]);
    let pl = b.op(&format!("{p}/Squeeze"), "Squeeze", &[&pl, &axes0], vec![]);
    let t = b.op(&format!("{p}/Squeeze_1"), "Squeeze", &[&t, &axes0], vec![]);
    let (qpos, kpos, causal) = causal_positions(b, p, &pl, &t);
    let bias = position_bias(
        b,
        c,
        "/lm/decoder/position_bias",
        &format!("{P}.decoder.block.0.layer.0.SelfAttention"),
        &qpos,
        &kpos,
        false,
    )?;
    let cross_allowed = key_mask(b, "/lm/decoder/encoder_mask", &enc_mask);
    let held = key_mask(b, "/lm/decoder/self_mask", &dec_mask);
    let causal = b.op("/lm/decoder/self_mask/And", "And", &[&causal, &held], vec![]);

    for (i, ((pk, pv), (ck, cv))) in past.iter().zip(&cross).enumerate() {
        let pre = format!("{P}.decoder.block.{i}.layer");
        let path = format!("/lm/decoder/block.{i}");
        let x = rms_norm(
            b,
            &format!("{path}/attn/layer_norm"),
            &h,
            &format!("{pre}.0.layer_norm"),
            d,
            c.layer_norm_epsilon,
        )?;
        let k = proj(
            b,
            &format!("{path}/attn/k"),
            &x,
            &format!("{pre}.0.SelfAttention.k.weight"),
            d,
            c.inner_dim(),
        )?;
        let k = split_heads(b, &format!("{path}/attn/k/heads"), &k, c.num_heads, c.d_kv);
        let v = proj(
            b,
            &format!("{path}/attn/v"),
            &x,
            &format!("{pre}.0.SelfAttention.v.weight"),
            d,
            c.inner_dim(),
        )?;
        let v = split_heads(b, &format!("{path}/attn/v/heads"), &v, c.num_heads, c.d_kv);
        let k = b.op(
            &format!("{path}/attn/present_key/Concat"),
            "Concat",
            &[pk, &k],
            vec![("axis", Attr::Int(2))],
        );
        let v = b.op(
            &format!("{path}/attn/present_value/Concat"),
            "Concat",
            &[pv, &v],
            vec![("axis", Attr::Int(2))],
        );
        b.output(&k, &io::present_key(i), float, kv(io::DIM_TOTAL_SEQUENCE));
        b.output(&v, &io::present_value(i), float, kv(io::DIM_TOTAL_SEQUENCE));
        let a = t5_attention(
            b,
            c,
            &format!("{path}/attn"),
            &x,
            &k,
            &v,
            &format!("{pre}.0.SelfAttention"),
            Some(&bias),
            &causal,
        )?;
        h = residual(b, &format!("{path}/attn/residual"), &h, &a);
        h = cross_and_feed_forward(b, c, &path, &pre, &h, (ck, cv), &cross_allowed)?;
    }
    let logits = decoder_head(b, c, &h, scale_output, None)?;
    b.output(
        &logits,
        io::LOGITS,
        Elem::F32,
        vec![named(io::DIM_BATCH), named(io::DIM_SEQUENCE), Dim::Fixed(c.vocab_size as i64)],
    );
    Ok(())
}
