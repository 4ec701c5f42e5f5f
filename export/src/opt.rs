//! The OPT decoder with its KV cache (`OPTForCausalLM`), as one graph for the prefill and
//! every later step: pass `past_key_values.*` with length 0 first, then feed `present.*`
//! back. The image embeddings replace the image tokens' embeddings inside the graph, so
//! a caller only ever passes token ids.

use blip2_core::{io, Dim};

use crate::blocks::{
    attention, causal_positions, dim_of, layer_norm, layer_norm_plain, linear, lm_head,
    scatter_image_embeds, select_tokens, split_heads,
};
use crate::builder::{Builder, Projection};
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

/// The image token and how many of them begin every prompt (the query tokens).
#[derive(Debug, Clone, Copy)]
pub struct ImageTokens {
    pub id: i64,
    pub count: usize,
}

/// ```text
///   input_ids ──Gather(embed_tokens)───────────────────────────┐
///   image_embeds ──Pad(+1 zero row)──GatherND(image index)──────Where(input_ids == image token)
///   position_ids ──Add(2)──Gather(embed_positions) ─────────────Add ─▶ h
///   attention_mask ──▶ allowed [B,1,S,T] (causal AND not padding)
///   h ──▶ layers.0 … layers.L-1 (each: past_key_values.i ─▶ present.i)
///     ──final_layer_norm──Gemm(embed_tokens^T) ─▶ logits [B,S,V] (float32)
/// ```
pub fn build(b: &mut Builder, c: &OptConfig, image: ImageTokens) -> Result<()> {
    let d = c.hidden_size;
    let heads = c.num_attention_heads;
    let dh = d / heads;
    let float = b.float();
    let ids =
        b.input(io::INPUT_IDS, Elem::I64, vec![named(io::DIM_BATCH), named(io::DIM_SEQUENCE)]);
    let img = b.input(
        io::IMAGE_EMBEDS,
        float,
        vec![named(io::DIM_BATCH), named(io::DIM_NUM_IMAGE_TOKENS), Dim::Fixed(d as i64)],
    );
    let mask = b.input(
        io::ATTENTION_MASK,
        Elem::I64,
        vec![named(io::DIM_BATCH), named(io::DIM_TOTAL_SEQUENCE)],
    );
    let pos =
        b.input(io::POSITION_IDS, Elem::I64, vec![named(io::DIM_BATCH), named(io::DIM_SEQUENCE)]);
    let kv_dims = |len: &str| {
        vec![named(io::DIM_BATCH), Dim::Fixed(heads as i64), named(len), Dim::Fixed(dh as i64)]
    };
    let mut past = Vec::new();
    for i in 0..c.num_hidden_layers {
        let k = b.input(&io::past_key(i), float, kv_dims(io::DIM_PAST_SEQUENCE));
        let v = b.input(&io::past_value(i), float, kv_dims(io::DIM_PAST_SEQUENCE));
        past.push((k, v));
    }

    let h = embeddings(b, c, &ids, &img, &pos, image)?;
    let allowed = causal_padding_mask(b, &ids, &mask);
    let mut h = h;
    for (i, (pk, pv)) in past.iter().enumerate() {
        let (out, k, v) =
            layer(b, c, i, &h, Kv::Growing { past_key: pk, past_value: pv, allowed: &allowed })?;
        h = out;
        b.output(&k, &io::present_key(i), float, kv_dims(io::DIM_TOTAL_SEQUENCE));
        b.output(&v, &io::present_value(i), float, kv_dims(io::DIM_TOTAL_SEQUENCE));
    }
    if c.do_layer_norm_before && !c.remove_final_layer_norm {
        h = norm(b, c, "/lm/final_layer_norm", &h, &format!("{P}.final_layer_norm"))?;
    }

    // Tied embeddings are read once: Gemm's transB uses embed_tokens as stored.
    let head = if c.tie_word_embeddings {
        format!("{P}.embed_tokens.weight")
    } else {
        "language_model.lm_head.weight".into()
    };
    let h = keep_last_positions(b, &h);
    let logits = lm_head(b, &h, &head, d, c.vocab_size, None)?;
    b.output(
        &logits,
        io::LOGITS,
        Elem::F32,
        vec![named(io::DIM_BATCH), named(io::DIM_LOGITS_SEQUENCE), Dim::Fixed(c.vocab_size as i64)],
    );
    Ok(())
}

/// The CUDA-target language model (`--target cuda`): the graph [`build`] makes, with
/// GroupQueryAttention over per-layer KV buffers of a fixed length that are bound as
/// both past and present and written in place, rows right-padded and described by their
/// lengths (`seqlens_k`) instead of an attention mask, the LM head on each row's last
/// real position only, and token selection on the device.
///
/// ```text
///   input_ids, image_embeds, position_ids ──embeddings ─▶ h
///   h ──▶ layers.0 … layers.L-1 (each: GroupQueryAttention(past_key_values.i, seqlens_k,
///         total_sequence_length) ─▶ present.i, the same buffers)
///     ──GatherElements(ArgMax(position_ids))──final_layer_norm──lm_head ─▶ logits [B,1,V]
///   logits ──first largest (TopK values, blocks::select_tokens) ─▶ next_token [B]
///   logits ──LogSoftmax──TopK(top_k) ─▶ top_logprobs, top_ids [B, top_k]
/// ```
pub fn build_cuda(b: &mut Builder, c: &OptConfig, image: ImageTokens) -> Result<()> {
    let d = c.hidden_size;
    let heads = c.num_attention_heads;
    let dh = d / heads;
    let float = b.float();
    let batch = || named(io::DIM_BATCH);
    let ids = b.input(io::INPUT_IDS, Elem::I64, vec![batch(), named(io::DIM_SEQUENCE)]);
    let img = b.input(
        io::IMAGE_EMBEDS,
        float,
        vec![batch(), named(io::DIM_NUM_IMAGE_TOKENS), Dim::Fixed(d as i64)],
    );
    let pos = b.input(io::POSITION_IDS, Elem::I64, vec![batch(), named(io::DIM_SEQUENCE)]);
    let seqlens = b.input(io::SEQLENS_K, Elem::I32, vec![batch()]);
    let total = b.input(io::TOTAL_SEQUENCE_LENGTH, Elem::I32, vec![]);
    let kv_dims = || {
        vec![batch(), Dim::Fixed(heads as i64), named(io::DIM_MAX_SEQUENCE), Dim::Fixed(dh as i64)]
    };
    let mut past = Vec::new();
    for i in 0..c.num_hidden_layers {
        let k = b.input(&io::past_key(i), float, kv_dims());
        let v = b.input(&io::past_value(i), float, kv_dims());
        past.push((k, v));
    }
    let mut h = embeddings(b, c, &ids, &img, &pos, image)?;
    for (i, (pk, pv)) in past.iter().enumerate() {
        let kv = Kv::Static { past_key: pk, past_value: pv, seqlens_k: &seqlens, total: &total };
        let (out, k, v) = layer(b, c, i, &h, kv)?;
        h = out;
        b.output(&k, &io::present_key(i), float, kv_dims());
        b.output(&v, &io::present_value(i), float, kv_dims());
    }
    let h = last_real_position(b, &h, &pos, d);
    let h = if c.do_layer_norm_before && !c.remove_final_layer_norm {
        norm(b, c, "/lm/final_layer_norm", &h, &format!("{P}.final_layer_norm"))?
    } else {
        h
    };
    let head = if c.tie_word_embeddings {
        format!("{P}.embed_tokens.weight")
    } else {
        "language_model.lm_head.weight".into()
    };
    let logits = lm_head(b, &h, &head, d, c.vocab_size, Some(1))?;
    b.output(
        &logits,
        io::LOGITS,
        Elem::F32,
        vec![batch(), Dim::Fixed(1), Dim::Fixed(c.vocab_size as i64)],
    );
    select_tokens(b, &logits, "/lm/select", c.vocab_size);
    Ok(())
}

/// Each row's hidden state at its last real position, `[B,S,D]` to `[B,1,D]`: where its
/// position is largest (rows are right-padded and padding has position 0; a decode step
/// has one position). Read from the positions, not from a shape, so nothing crosses from
/// host to device.
///
/// ```text
///   position_ids ──Cast(float)──ArgMax(axis 1)──Unsqueeze──Expand([1,1,D]) ─▶ index
///   h ──GatherElements(index, axis 1) ─▶
/// ```
fn last_real_position(b: &mut Builder, h: &str, pos: &str, d: usize) -> String {
    let p = "/lm/last_position";
    let f = b.op(&format!("{p}/Cast"), "Cast", &[pos], vec![("to", Attr::Int(Elem::F32 as i64))]);
    let idx = b.op(
        &format!("{p}/ArgMax"),
        "ArgMax",
        &[&f],
        vec![("axis", Attr::Int(1)), ("keepdims", Attr::Int(1))],
    );
    let axes = b.ints(&[2]);
    let idx = b.op(&format!("{p}/Unsqueeze"), "Unsqueeze", &[&idx, &axes], vec![]);
    let shape = b.ints(&[1, 1, d as i64]);
    let idx = b.op(&format!("{p}/Expand"), "Expand", &[&idx, &shape], vec![]);
    b.op(&format!("{p}/GatherElements"), "GatherElements", &[h, &idx], vec![("axis", Attr::Int(1))])
}

/// CUDA target: reorders the rows of every layer's KV buffer, `present.*[r] =
/// past_key_values.*[rows[r]]`, for beam search; the runtime binds the outputs to a
/// second set of buffers and swaps.
///
/// ```text
///   past_key_values.i.key ──Gather(rows, axis 0) ─▶ present.i.key   (every layer, key and value)
/// ```
pub fn build_kv_reorder(b: &mut Builder, layers: usize, heads: usize, dh: usize) {
    let float = b.float();
    let dims = |batch: &str| {
        vec![
            named(batch),
            Dim::Fixed(heads as i64),
            named(io::DIM_MAX_SEQUENCE),
            Dim::Fixed(dh as i64),
        ]
    };
    let rows = b.input(io::ROWS, Elem::I64, vec![named(io::DIM_NEW_BATCH)]);
    for i in 0..layers {
        for (past, present) in
            [(io::past_key(i), io::present_key(i)), (io::past_value(i), io::present_value(i))]
        {
            let x = b.input(&past, float, dims(io::DIM_BATCH));
            let y = b.op(
                &format!("/kv_reorder/{present}/Gather"),
                "Gather",
                &[&x, &rows],
                vec![("axis", Attr::Int(0))],
            );
            b.output(&y, &present, float, dims(io::DIM_NEW_BATCH));
        }
    }
}

/// Portable exports: joins newcomer rows to the growing KV cache where it lies (the
/// runtime binds the outputs where the decoder's cache lives), and drops positions that
/// every running row pads. The runtime picks the pads: left padding for self-attention
/// caches, right padding for Flan-T5's cross-attention caches.
///
/// ```text
///   past_key_values.i.key ──Slice(drop_positions.., axis 2)──Pad(pads)──┐
///   joining.i.key ──────────────────────────────────Pad(joining_pads)──Concat(axis 0) ─▶ present.i.key
/// ```
/// (every layer, key and value; a join with no newcomer passes zero joining rows.)
pub fn build_kv_join(b: &mut Builder, layers: usize, heads: usize, dh: usize) {
    let float = b.float();
    let dims = |batch: &str, len: &str| {
        vec![named(batch), Dim::Fixed(heads as i64), named(len), Dim::Fixed(dh as i64)]
    };
    let drop = b.input(io::DROP_POSITIONS, Elem::I64, vec![Dim::Fixed(1)]);
    let pads = b.input(io::PADS, Elem::I64, vec![Dim::Fixed(8)]);
    let joining_pads = b.input(io::JOINING_PADS, Elem::I64, vec![Dim::Fixed(8)]);
    let end = b.ints(&[i64::MAX]);
    let axes = b.ints(&[2]);
    for i in 0..layers {
        for (past, joining, present) in [
            (io::past_key(i), io::joining_key(i), io::present_key(i)),
            (io::past_value(i), io::joining_value(i), io::present_value(i)),
        ] {
            let p = |op: &str| format!("/kv_join/{present}/{op}");
            let x = b.input(&past, float, dims(io::DIM_BATCH, io::DIM_PAST_SEQUENCE));
            let j = b.input(&joining, float, dims(io::DIM_JOINING_BATCH, io::DIM_JOINING_SEQUENCE));
            let kept = b.op(&p("Slice"), "Slice", &[&x, &drop, &end, &axes], vec![]);
            let a = b.op(&p("Pad"), "Pad", &[&kept, &pads], vec![]);
            let c = b.op(&p("Pad_1"), "Pad", &[&j, &joining_pads], vec![]);
            let y = b.op(&p("Concat"), "Concat", &[&a, &c], vec![("axis", Attr::Int(0))]);
            b.output(&y, &present, float, dims(io::DIM_NEW_BATCH, io::DIM_TOTAL_SEQUENCE));
        }
    }
}

/// Token embeddings with the image embeddings scattered over the image tokens, plus
/// learned positions. The k-th image token of a row takes row k of its image embeddings
/// (what transformers' masked_scatter does); other tokens index a zero row appended to
/// the image embeddings, so decode steps with no image tokens need no special case.
fn embeddings(
    b: &mut Builder,
    c: &OptConfig,
    ids: &str,
    img: &str,
    pos: &str,
    image: ImageTokens,
) -> Result<String> {
    let d = c.hidden_size;
    let table = b.weight(&format!("{P}.embed_tokens.weight"), &[c.vocab_size, d])?;
    let tok =
        b.op("/lm/embed_tokens/Gather", "Gather", &[&table, ids], vec![("axis", Attr::Int(0))]);
    let emb = scatter_image_embeds(b, ids, img, &tok, image.id, Some((pos, image.count)));

    let positions = b.weight(
        &format!("{P}.embed_positions.weight"),
        &[c.max_position_embeddings + POSITION_OFFSET as usize, d],
    )?;
    let offset = b.int(POSITION_OFFSET);
    let shifted = b.op("/lm/embed_positions/Add", "Add", &[pos, &offset], vec![]);
    let pe = b.op(
        "/lm/embed_positions/Gather",
        "Gather",
        &[&positions, &shifted],
        vec![("axis", Attr::Int(0))],
    );
    Ok(b.op("/lm/embeddings/Add", "Add", &[&emb, &pe], vec![]))
}

/// The last `logits_to_keep` positions of `h` (all when it is 0, its default), so the
/// prefill of a generation computes the LM head for one position instead of all.
///
/// ```text
///   logits_to_keep (scalar, default 0) ──Unsqueeze──Neg ─▶ start
///   h [B,S,D] ──Slice(axis 1, start .. end) ─▶ [B, min(S, keep) or S, D]
/// ```
fn keep_last_positions(b: &mut Builder, h: &str) -> String {
    let keep =
        b.input_with_default(io::LOGITS_TO_KEEP, Elem::I64, vec![], 0i64.to_le_bytes().to_vec());
    let axis0 = b.ints(&[0]);
    let keep = b.op("/lm/logits_to_keep/Unsqueeze", "Unsqueeze", &[&keep, &axis0], vec![]);
    let start = b.op("/lm/logits_to_keep/Neg", "Neg", &[&keep], vec![]);
    let end = b.ints(&[i64::MAX]);
    let axis1 = b.ints(&[1]);
    b.op("/lm/logits_to_keep/Slice", "Slice", &[h, &start, &end, &axis1], vec![])
}

/// Which keys each query may see: key j is allowed for the query at absolute position
/// past + i when j <= past + i and attention_mask[b, j] is 1.
///
/// ```text
///   causal_positions(past = T - S, T) ─▶ causal [S,T]
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
    let (_, _, causal) = causal_positions(b, p, &past, &total);
    let pad =
        b.op(&format!("{p}/Cast"), "Cast", &[mask], vec![("to", Attr::Int(Elem::Bool as i64))]);
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
fn layer(
    b: &mut Builder,
    c: &OptConfig,
    i: usize,
    h: &str,
    kv: Kv<'_>,
) -> Result<(String, String, String)> {
    let d = c.hidden_size;
    let pre = format!("{P}.layers.{i}");
    let path = format!("/lm/layers.{i}");
    let bias = c.enable_bias;
    let ln1 = format!("{pre}.self_attn_layer_norm");
    let x = if c.do_layer_norm_before {
        norm(b, c, &format!("{path}/self_attn_layer_norm"), h, &ln1)?
    } else {
        h.to_string()
    };
    let (a, k, v) = match kv {
        Kv::Growing { past_key, past_value, allowed } => {
            self_attention(b, c, i, &x, past_key, past_value, allowed)?
        }
        Kv::Static { past_key, past_value, seqlens_k, total } => {
            self_attention_gqa(b, c, i, &x, past_key, past_value, seqlens_k, total)?
        }
    };
    let o = linear(
        b,
        &format!("{path}/attn/out_proj"),
        &a,
        &format!("{pre}.self_attn.out_proj"),
        d,
        d,
        bias,
    )?;
    let mut r = b.residual(&format!("{path}/Add"), h, &o);
    if !c.do_layer_norm_before {
        r = norm(b, c, &format!("{path}/self_attn_layer_norm"), &r, &ln1)?;
    }
    let ln2 = format!("{pre}.final_layer_norm");
    let x = if c.do_layer_norm_before {
        norm(b, c, &format!("{path}/final_layer_norm"), &r, &ln2)?
    } else {
        r.clone()
    };
    let f = linear(b, &format!("{path}/fc1"), &x, &format!("{pre}.fc1"), d, c.ffn_dim, bias)?;
    let f = crate::blocks::activation(b, &format!("{path}/act"), &f, &c.activation_function)?;
    let f = linear(b, &format!("{path}/fc2"), &f, &format!("{pre}.fc2"), c.ffn_dim, d, bias)?;
    let mut out = b.residual(&format!("{path}/Add_1"), &r, &f);
    if !c.do_layer_norm_before {
        out = norm(b, c, &format!("{path}/final_layer_norm"), &out, &ln2)?;
    }
    Ok((out, k, v))
}

/// OPT self-attention with ONNX Runtime's GroupQueryAttention (com.microsoft; as many
/// KV heads as query heads, no rotary) over a KV buffer it updates in place. Without
/// quantization q, k and v come from one packed product: the transposed weights are
/// concatenated in the graph, which ONNX Runtime folds into one initializer at load.
/// The scores are scaled by `Dh^-0.5` inside the operator (its default) instead of
/// scaling q first.
///
/// ```text
///   x ──MatMul(Concat(Wq^T, Wk^T, Wv^T))──Add(Concat(bq, bk, bv)) ─▶ qkv [B, S, 3D]
///   qkv ──GroupQueryAttention(past.key, past.value, seqlens_k, total) ─▶ a, present.key, present.value
/// ```
#[allow(clippy::too_many_arguments)]
fn self_attention_gqa(
    b: &mut Builder,
    c: &OptConfig,
    i: usize,
    x: &str,
    pk: &str,
    pv: &str,
    seqlens: &str,
    total: &str,
) -> Result<(String, String, String)> {
    let d = c.hidden_size;
    let heads = c.num_attention_heads;
    let pre = format!("{P}.layers.{i}");
    let path = format!("/lm/layers.{i}/attn");
    let bias = c.enable_bias;
    let proj = |n: &str| format!("{pre}.self_attn.{n}_proj");
    let mut inputs: Vec<String> = Vec::new();
    if matches!(b.projection(), Projection::NBits { .. }) {
        for n in ["q", "k", "v"] {
            inputs.push(linear(b, &format!("{path}/{n}_proj"), x, &proj(n), d, d, bias)?);
        }
    } else {
        let w: Vec<String> = ["q", "k", "v"]
            .iter()
            .map(|n| b.weight_t(&format!("{}.weight", proj(n)), &[d, d]))
            .collect::<Result<_>>()?;
        let w: Vec<&str> = w.iter().map(String::as_str).collect();
        let w = b.op(
            &format!("{path}/qkv_proj/weight/Concat"),
            "Concat",
            &w,
            vec![("axis", Attr::Int(1))],
        );
        let mut qkv = b.op(&format!("{path}/qkv_proj/MatMul"), "MatMul", &[x, &w], vec![]);
        if bias {
            let bs: Vec<String> = ["q", "k", "v"]
                .iter()
                .map(|n| b.weight(&format!("{}.bias", proj(n)), &[d]))
                .collect::<Result<_>>()?;
            let bs: Vec<&str> = bs.iter().map(String::as_str).collect();
            let bv = b.op(
                &format!("{path}/qkv_proj/bias/Concat"),
                "Concat",
                &bs,
                vec![("axis", Attr::Int(0))],
            );
            qkv = b.op(&format!("{path}/qkv_proj/Add"), "Add", &[&qkv, &bv], vec![]);
        }
        inputs = vec![qkv, String::new(), String::new()];
    }
    let ins: Vec<&str> =
        inputs.iter().map(String::as_str).chain([pk, pv, seqlens, total]).collect();
    let attrs =
        vec![("num_heads", Attr::Int(heads as i64)), ("kv_num_heads", Attr::Int(heads as i64))];
    let mut outs =
        b.op_n(&format!("{path}/GroupQueryAttention"), "GroupQueryAttention", &ins, attrs, 3);
    b.mark_ms_domain();
    let v = outs.pop().expect("three outputs");
    let k = outs.pop().expect("three outputs");
    Ok((outs.pop().expect("three outputs"), k, v))
}

/// How a layer reads and extends its KV cache.
enum Kv<'s> {
    /// Portable: `present = Concat(past, new)`, masked by `allowed` `[B,1,S,T]`.
    Growing { past_key: &'s str, past_value: &'s str, allowed: &'s str },
    /// CUDA target: a fixed-length buffer updated in place by GroupQueryAttention.
    Static { past_key: &'s str, past_value: &'s str, seqlens_k: &'s str, total: &'s str },
}

/// OPT self-attention with standard operators over a cache that grows by concatenation.
///
/// ```text
///   x ──q_proj──Mul(Dh^-0.5)──heads ─▶ q
///   x ──k_proj──heads──Concat(past.key) ─▶ present.key ─┐
///   x ──v_proj──heads──Concat(past.value) ─▶ present.value ─ attention(allowed) ─▶
/// ```
fn self_attention(
    b: &mut Builder,
    c: &OptConfig,
    i: usize,
    x: &str,
    pk: &str,
    pv: &str,
    allowed: &str,
) -> Result<(String, String, String)> {
    let d = c.hidden_size;
    let heads = c.num_attention_heads;
    let dh = d / heads;
    let pre = format!("{P}.layers.{i}");
    let path = format!("/lm/layers.{i}");
    let bias = c.enable_bias;
    let x = &x;
    let q = linear(
        b,
        &format!("{path}/attn/q_proj"),
        x,
        &format!("{pre}.self_attn.q_proj"),
        d,
        d,
        bias,
    )?;
    let scale = b.scalar((dh as f32).powf(-0.5));
    let q = b.op(&format!("{path}/attn/q_proj/Mul"), "Mul", &[&q, &scale], vec![]);
    let k = linear(
        b,
        &format!("{path}/attn/k_proj"),
        x,
        &format!("{pre}.self_attn.k_proj"),
        d,
        d,
        bias,
    )?;
    let v = linear(
        b,
        &format!("{path}/attn/v_proj"),
        x,
        &format!("{pre}.self_attn.v_proj"),
        d,
        d,
        bias,
    )?;
    let q = split_heads(b, &format!("{path}/attn/q_proj/heads"), &q, heads, dh);
    let k = split_heads(b, &format!("{path}/attn/k_proj/heads"), &k, heads, dh);
    let v = split_heads(b, &format!("{path}/attn/v_proj/heads"), &v, heads, dh);
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
    let a = attention(b, &format!("{path}/attn"), &q, &k, &v, None, None, Some(allowed));
    Ok((a, k, v))
}
