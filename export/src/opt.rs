//! The OPT decoder with its KV cache (`OPTForCausalLM`), as one graph for the prefill and
//! every later step: pass `past_key_values.*` with length 0 first, then feed `present.*`
//! back. The image embeddings replace the image tokens' embeddings inside the graph, so
//! a caller only ever passes token ids.

use blip2_core::{io, Dim};

use crate::builder::{attention, dim_of, layer_norm, layer_norm_plain, linear, split_heads, Builder};
use crate::config::OptConfig;
use crate::error::Result;
use crate::onnx::{Attr, Elem};

const P: &str = "language_model.model.decoder";
/// OPT's learned positions are stored shifted by two (`OPTLearnedPositionalEmbedding.offset`).
const POSITION_OFFSET: i64 = 2;
/// OPT uses nn.LayerNorm's default epsilon.
const EPS: f64 = 1e-5;

fn named(s: &str) -> Dim {
    Dim::Named(s.into())
}

/// ```text
///   input_ids ──Gather(embed_tokens)───────────────────────────┐
///   image_embeds ──Pad(+1 zero row)──GatherND(image index)──────Where(input_ids == image token)
///   position_ids ──Add(2)──Gather(embed_positions) ─────────────Add ─▶ h
///   attention_mask ──▶ allowed [B,1,S,T] (causal AND not padding)
///   h ──▶ layers.0 … layers.L-1 (each: past_key_values.i ─▶ present.i)
///     ──final_layer_norm──Gemm(embed_tokens^T) ─▶ logits [B,S,V] (float32)
/// ```
pub fn build(b: &mut Builder, c: &OptConfig, image_token_id: i64) -> Result<()> {
    let d = c.hidden_size;
    let heads = c.num_attention_heads;
    let dh = d / heads;
    let float = b.float;
    let ids = b.input(io::INPUT_IDS, Elem::I64, vec![named(io::DIM_BATCH), named(io::DIM_SEQUENCE)]);
    let img = b.input(io::IMAGE_EMBEDS, float, vec![named(io::DIM_BATCH), named(io::DIM_NUM_IMAGE_TOKENS), Dim::Fixed(d as i64)]);
    let mask = b.input(io::ATTENTION_MASK, Elem::I64, vec![named(io::DIM_BATCH), named(io::DIM_TOTAL_SEQUENCE)]);
    let pos = b.input(io::POSITION_IDS, Elem::I64, vec![named(io::DIM_BATCH), named(io::DIM_SEQUENCE)]);
    let kv_dims = |len: &str| vec![named(io::DIM_BATCH), Dim::Fixed(heads as i64), named(len), Dim::Fixed(dh as i64)];
    let mut past = Vec::new();
    for i in 0..c.num_hidden_layers {
        let k = b.input(&io::past_key(i), float, kv_dims(io::DIM_PAST_SEQUENCE));
        let v = b.input(&io::past_value(i), float, kv_dims(io::DIM_PAST_SEQUENCE));
        past.push((k, v));
    }

    let h = embeddings(b, c, &ids, &img, &pos, image_token_id)?;
    let allowed = causal_padding_mask(b, &ids, &mask);
    let mut h = h;
    for (i, (pk, pv)) in past.iter().enumerate() {
        let (out, k, v) = layer(b, c, i, &h, pk, pv, &allowed)?;
        h = out;
        b.output(&k, &io::present_key(i), float, kv_dims(io::DIM_TOTAL_SEQUENCE));
        b.output(&v, &io::present_value(i), float, kv_dims(io::DIM_TOTAL_SEQUENCE));
    }
    if c.do_layer_norm_before && !c.remove_final_layer_norm {
        h = norm(b, c, "/lm/final_layer_norm", &h, &format!("{P}.final_layer_norm"))?;
    }

    // Tied embeddings are read once: Gemm's transB uses embed_tokens as stored.
    let head = if c.tie_word_embeddings { format!("{P}.embed_tokens.weight") } else { "language_model.lm_head.weight".into() };
    let h = keep_last_positions(b, &h);
    let logits = lm_head(b, &h, &head, d, c.vocab_size)?;
    b.output(&logits, io::LOGITS, Elem::F32, vec![named(io::DIM_BATCH), named(io::DIM_LOGITS_SEQUENCE), Dim::Fixed(c.vocab_size as i64)]);
    Ok(())
}

/// Token embeddings with the image embeddings scattered over the image tokens, plus
/// learned positions. The k-th image token of a row takes row k of its image embeddings
/// (what transformers' masked_scatter does); other tokens index a zero row appended to
/// the image embeddings, so decode steps with no image tokens need no special case.
fn embeddings(b: &mut Builder, c: &OptConfig, ids: &str, img: &str, pos: &str, image_token_id: i64) -> Result<String> {
    let d = c.hidden_size;
    let table = b.weight(&format!("{P}.embed_tokens.weight"), &[c.vocab_size, d])?;
    let tok = b.op("/lm/embed_tokens/Gather", "Gather", &[&table, ids], vec![("axis", Attr::Int(0))]);
    let emb = scatter_image_embeds(b, ids, img, &tok, image_token_id);

    let positions = b.weight(&format!("{P}.embed_positions.weight"), &[c.max_position_embeddings + POSITION_OFFSET as usize, d])?;
    let offset = b.int(POSITION_OFFSET);
    let shifted = b.op("/lm/embed_positions/Add", "Add", &[pos, &offset], vec![]);
    let pe = b.op("/lm/embed_positions/Gather", "Gather", &[&positions, &shifted], vec![("axis", Attr::Int(0))]);
    Ok(b.op("/lm/embeddings/Add", "Add", &[&emb, &pe], vec![]))
}

/// Replaces the embeddings of image tokens with the image embeddings, in order: the k-th
/// image token of a row takes row k of its image embeddings (what transformers'
/// masked_scatter does). Other tokens index a zero row appended to the image embeddings,
/// so steps with no image tokens (`num_image_tokens` = 0) need no special case.
///
/// ```text
///   input_ids == image token ─▶ is_img ──Cast──CumSum──Sub(1)──Where(is_img, ·, count) ─▶ index
///   image_embeds ──Pad(one zero row)──GatherND(index, batch_dims 1)──Where(is_img, ·, tok) ─▶
/// ```
pub(crate) fn scatter_image_embeds(b: &mut Builder, ids: &str, img: &str, tok: &str, image_token_id: i64) -> String {
    let image_id = b.int(image_token_id);
    let is_img = b.op("/lm/image/Equal", "Equal", &[ids, &image_id], vec![]);
    let as_int = b.op("/lm/image/Cast", "Cast", &[&is_img], vec![("to", Attr::Int(Elem::I64 as i64))]);
    let axis1 = b.int(1);
    let cum = b.op("/lm/image/CumSum", "CumSum", &[&as_int, &axis1], vec![]);
    let one = b.int(1);
    let k = b.op("/lm/image/Sub", "Sub", &[&cum, &one], vec![]);
    let n_img = dim_of(b, "/lm/image/count", img, 1);
    let idx = b.op("/lm/image/Where", "Where", &[&is_img, &k, &n_img], vec![]);
    let axes2 = b.ints(&[2]);
    let idx = b.op("/lm/image/Unsqueeze", "Unsqueeze", &[&idx, &axes2], vec![]);
    let pads = b.ints(&[0, 0, 0, 0, 1, 0]);
    let padded = b.op("/lm/image/Pad", "Pad", &[img, &pads], vec![]);
    let gathered = b.op("/lm/image/GatherND", "GatherND", &[&padded, &idx], vec![("batch_dims", Attr::Int(1))]);
    let sel = b.op("/lm/image/Unsqueeze_1", "Unsqueeze", &[&is_img, &axes2], vec![]);
    b.op("/lm/image/Where_1", "Where", &[&sel, &gathered, tok], vec![])

}

/// The last `logits_to_keep` positions of `h` (all when it is 0, its default), so the
/// prefill of a generation computes the LM head for one position instead of all.
///
/// ```text
///   logits_to_keep (scalar, default 0) ──Unsqueeze──Neg ─▶ start
///   h [B,S,D] ──Slice(axis 1, start .. end) ─▶ [B, min(S, keep) or S, D]
/// ```
fn keep_last_positions(b: &mut Builder, h: &str) -> String {
    let keep = b.input_with_default(io::LOGITS_TO_KEEP, Elem::I64, vec![], 0i64.to_le_bytes().to_vec());
    let axis0 = b.ints(&[0]);
    let keep = b.op("/lm/logits_to_keep/Unsqueeze", "Unsqueeze", &[&keep, &axis0], vec![]);
    let start = b.op("/lm/logits_to_keep/Neg", "Neg", &[&keep], vec![]);
    let end = b.ints(&[i64::MAX]);
    let axis1 = b.ints(&[1]);
    b.op("/lm/logits_to_keep/Slice", "Slice", &[h, &start, &end, &axis1], vec![])
}

/// Logits `[B, S, V]` in float32 from hidden states `[B, S, D]` and a `[V, D]` table, read
/// as stored (Gemm's transB), so a table tied to the embeddings is not copied.
pub(crate) fn lm_head(b: &mut Builder, h: &str, head: &str, hidden: usize, vocab: usize) -> Result<String> {
    let float = b.float;
    if b.quant.is_some() {
        // The table is [V, D], MatMulNBits' own layout: no reshape around it.
        let logits = b.matmul_nbits("/lm/lm_head/MatMulNBits", h, head, vocab, hidden)?;
        return Ok(b.cast("/lm/lm_head/Cast", &logits, float, Elem::F32));
    }
    let w = b.weight(head, &[vocab, hidden])?;
    let w = w.as_str();
    let flat_shape = b.ints(&[-1, hidden as i64]);
    let flat = b.op("/lm/lm_head/Reshape", "Reshape", &[h, &flat_shape], vec![]);
    let logits = b.op("/lm/lm_head/Gemm", "Gemm", &[&flat, w], vec![("transB", Attr::Int(1))]);
    let batch = dim_of(b, "/lm/lm_head/batch", h, 0);
    let seq = dim_of(b, "/lm/lm_head/seq", h, 1);
    let v = b.ints(&[vocab as i64]);
    let out_shape = b.op("/lm/lm_head/Concat", "Concat", &[&batch, &seq, &v], vec![("axis", Attr::Int(0))]);
    let logits = b.op("/lm/lm_head/Reshape_1", "Reshape", &[&logits, &out_shape], vec![]);
    Ok(b.cast("/lm/lm_head/Cast", &logits, float, Elem::F32))
}

/// Which keys each query may see: key j is allowed for the query at absolute position
/// past + i when j <= past + i and attention_mask[b, j] is 1.
///
/// ```text
///   Range(past, T) ─Unsqueeze(1)─┐
///   Range(0, T) ───Unsqueeze(0)──LessOrEqual ─▶ causal [S,T]
///   attention_mask ──Cast(bool)──Unsqueeze(1,2) ─▶ [B,1,1,T] ──And(causal) ─▶ allowed [B,1,S,T]
/// ```
fn causal_padding_mask(b: &mut Builder, ids: &str, mask: &str) -> String {
    let p = "/lm/mask";
    let s = dim_of(b, &format!("{p}/seq"), ids, 1);
    let t = dim_of(b, &format!("{p}/total"), mask, 1);
    let past = b.op(&format!("{p}/Sub"), "Sub", &[&t, &s], vec![]);
    let axes0 = b.ints(&[0]);
    let past = b.op(&format!("{p}/Squeeze"), "Squeeze", &[&past, &axes0], vec![]);
    let total = b.op(&format!("{p}/Squeeze_1"), "Squeeze", &[&t, &axes0], vec![]);
    let zero = b.int(0);
    let one = b.int(1);
    let qpos = b.op(&format!("{p}/Range"), "Range", &[&past, &total, &one], vec![]);
    let kpos = b.op(&format!("{p}/Range_1"), "Range", &[&zero, &total, &one], vec![]);
    let axes1 = b.ints(&[1]);
    let q2 = b.op(&format!("{p}/Unsqueeze"), "Unsqueeze", &[&qpos, &axes1], vec![]);
    let k2 = b.op(&format!("{p}/Unsqueeze_1"), "Unsqueeze", &[&kpos, &axes0], vec![]);
    let causal = b.op(&format!("{p}/LessOrEqual"), "LessOrEqual", &[&k2, &q2], vec![]);
    let pad = b.op(&format!("{p}/Cast"), "Cast", &[mask], vec![("to", Attr::Int(Elem::Bool as i64))]);
    let axes12 = b.ints(&[1, 2]);
    let pad = b.op(&format!("{p}/Unsqueeze_2"), "Unsqueeze", &[&pad, &axes12], vec![]);
    b.op(&format!("{p}/And"), "And", &[&causal, &pad], vec![])
}

fn norm(b: &mut Builder, c: &OptConfig, path: &str, x: &str, prefix: &str) -> Result<String> {
    if c.layer_norm_elementwise_affine {
        layer_norm(b, path, x, prefix, c.hidden_size, EPS)
    } else {
        Ok(layer_norm_plain(b, path, x, c.hidden_size, EPS))
    }
}

/// One decoder layer (`OPTDecoderLayer`); layer norms before (OPT-2.7b and up) or after
/// (OPT-350m style) each block, as `do_layer_norm_before` says.
///
/// ```text
///   h ──[LayerNorm]──q_proj──Mul(Dh^-0.5)──heads ─▶ q
///              └──k_proj──heads──Concat(past.key) ─▶ present.key ─┐
///              └──v_proj──heads──Concat(past.value) ─▶ present.value ─ attention(allowed)
///     ──out_proj──Add(h)──[LayerNorm] ─▶ r
///   r ──[LayerNorm]──fc1──act──fc2──Add(r)──[LayerNorm] ─▶
/// ```
#[allow(clippy::too_many_arguments)]
fn layer(b: &mut Builder, c: &OptConfig, i: usize, h: &str, pk: &str, pv: &str, allowed: &str) -> Result<(String, String, String)> {
    let d = c.hidden_size;
    let heads = c.num_attention_heads;
    let dh = d / heads;
    let pre = format!("{P}.layers.{i}");
    let path = format!("/lm/layers.{i}");
    let bias = c.enable_bias;
    let ln1 = format!("{pre}.self_attn_layer_norm");
    let x = if c.do_layer_norm_before { norm(b, c, &format!("{path}/self_attn_layer_norm"), h, &ln1)? } else { h.to_string() };
    let q = linear(b, &format!("{path}/attn/q_proj"), &x, &format!("{pre}.self_attn.q_proj"), d, d, bias)?;
    let scale = b.scalar((dh as f32).powf(-0.5));
    let q = b.op(&format!("{path}/attn/q_proj/Mul"), "Mul", &[&q, &scale], vec![]);
    let k = linear(b, &format!("{path}/attn/k_proj"), &x, &format!("{pre}.self_attn.k_proj"), d, d, bias)?;
    let v = linear(b, &format!("{path}/attn/v_proj"), &x, &format!("{pre}.self_attn.v_proj"), d, d, bias)?;
    let q = split_heads(b, &format!("{path}/attn/q_proj/heads"), &q, heads, dh);
    let k = split_heads(b, &format!("{path}/attn/k_proj/heads"), &k, heads, dh);
    let v = split_heads(b, &format!("{path}/attn/v_proj/heads"), &v, heads, dh);
    let k = b.op(&format!("{path}/attn/present_key/Concat"), "Concat", &[pk, &k], vec![("axis", Attr::Int(2))]);
    let v = b.op(&format!("{path}/attn/present_value/Concat"), "Concat", &[pv, &v], vec![("axis", Attr::Int(2))]);
    let a = attention(b, &format!("{path}/attn"), &q, &k, &v, None, Some(allowed));
    let o = linear(b, &format!("{path}/attn/out_proj"), &a, &format!("{pre}.self_attn.out_proj"), d, d, bias)?;
    let mut r = b.op(&format!("{path}/Add"), "Add", &[h, &o], vec![]);
    if !c.do_layer_norm_before {
        r = norm(b, c, &format!("{path}/self_attn_layer_norm"), &r, &ln1)?;
    }
    let ln2 = format!("{pre}.final_layer_norm");
    let x = if c.do_layer_norm_before { norm(b, c, &format!("{path}/final_layer_norm"), &r, &ln2)? } else { r.clone() };
    let f = linear(b, &format!("{path}/fc1"), &x, &format!("{pre}.fc1"), d, c.ffn_dim, bias)?;
    let f = crate::builder::activation(b, &format!("{path}/act"), &f, &c.activation_function)?;
    let f = linear(b, &format!("{path}/fc2"), &f, &format!("{pre}.fc2"), c.ffn_dim, d, bias)?;
    let mut out = b.op(&format!("{path}/Add_1"), "Add", &[&r, &f], vec![]);
    if !c.do_layer_norm_before {
        out = norm(b, c, &format!("{path}/final_layer_norm"), &out, &ln2)?;
    }
    Ok((out, k, v))
}
