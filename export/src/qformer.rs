//! The Q-Former (`Blip2QFormerModel` over the learned `query_tokens`) and the
//! `language_projection`: image features to the embeddings that take the place of the
//! image tokens in the language model's input. The Q-Former always runs in fp32, as
//! transformers keeps it (`_keep_in_fp32_modules`); the projection uses the LM's dtype.

use blip2_core::{io, Dim};

use crate::blocks::{
    activation, attention, dim_of, fused_attention, layer_norm, linear, split_heads, value_tensor,
};
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
    let (_, h) = queries_over_image(b, c, num_query_tokens, vision_positions, vision_float)?;
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
        vec![
            Dim::Named(io::DIM_BATCH.into()),
            Dim::Fixed(num_query_tokens as i64),
            Dim::Fixed(text_hidden as i64),
        ],
    );
    Ok(())
}

/// The `image_features` input, in fp32 (for cross-attention).
fn image_features_input(
    b: &mut Builder,
    c: &QFormerConfig,
    vision_positions: usize,
    vision_float: Elem,
) -> String {
    let feats = b.input(
        io::IMAGE_FEATURES,
        vision_float,
        vec![
            Dim::Named(io::DIM_BATCH.into()),
            Dim::Fixed(vision_positions as i64),
            Dim::Fixed(c.encoder_hidden_size as i64),
        ],
    );
    b.cast("/qformer/Cast", &feats, vision_float, Elem::F32)
}

/// The learned `query_tokens` `[1,Q,Dq]` expanded to the batch of `like` `[B, ...]`.
fn expanded_query_tokens(
    b: &mut Builder,
    c: &QFormerConfig,
    num_query_tokens: usize,
    like: &str,
) -> Result<String> {
    let query = b.weight("query_tokens", &[1, num_query_tokens, c.hidden_size])?;
    let batch = dim_of(b, "/qformer/batch", like, 0);
    let ones = b.ints(&[1, 1]);
    let shape = b.op("/qformer/Concat", "Concat", &[&batch, &ones], vec![("axis", Attr::Int(0))]);
    Ok(b.op("/qformer/query_tokens/Expand", "Expand", &[&query, &shape], vec![]))
}

/// The Q-Former over the query tokens alone, cross-attending to the image: returns the
/// fp32 image features and the queries' last hidden state `[B, Q, Dq]`.
fn queries_over_image(
    b: &mut Builder,
    c: &QFormerConfig,
    num_query_tokens: usize,
    vision_positions: usize,
    vision_float: Elem,
) -> Result<(String, String)> {
    let feats = image_features_input(b, c, vision_positions, vision_float);
    let query = expanded_query_tokens(b, c, num_query_tokens, &feats)?;
    let mut h = layer_norm(
        b,
        "/qformer/layernorm",
        &query,
        &format!("{P}.layernorm"),
        c.hidden_size,
        c.layer_norm_eps,
    )?;
    for i in 0..c.num_hidden_layers {
        h = layer(b, c, i, &h, Pass::Queries { feats: &feats })?;
    }
    Ok((feats, h))
}

/// What one Q-Former pass runs over (transformers' `query_length`).
#[derive(Clone, Copy)]
enum Pass<'s> {
    /// Query tokens only (`query_length` = Q), cross-attending to `feats`.
    Queries { feats: &'s str },
    /// Text tokens only (`query_length` = 0): self-attention under `allowed`, no image.
    Text { allowed: &'s str },
    /// `[queries; text]` (ITM): self-attention over both under `allowed`, the first
    /// `queries` positions cross-attend to `feats` and take the query feed-forward, the
    /// rest the text feed-forward.
    QueriesAndText { feats: &'s str, allowed: &'s str, queries: usize },
}

/// One Q-Former layer (`Blip2QFormerLayer`): self-attention, cross-attention to the
/// image every `cross_attention_frequency` layers (query positions only), then the query
/// feed-forward on query positions and the text feed-forward on text positions.
///
/// ```text
///   h ──attention(h,h,h)──dense──Add(h)──LayerNorm ─▶ h1
///   queries: h1 ──attention(h1, img, img)──dense──Add(h1)──LayerNorm ─▶ h2     (layers i % freq == 0)
///            h2 ──intermediate_query(dense, act)──output_query.dense──Add(h2)──LayerNorm ─▶
///   text:    h1 ──intermediate(dense, act)──output.dense──Add(h1)──LayerNorm ─▶
///   both:    h1 ──Slice[:Q]── queries ─┐
///            h1 ──Slice[Q:]── text ────Concat(axis 1) ─▶
/// ```
fn layer(b: &mut Builder, c: &QFormerConfig, i: usize, h: &str, pass: Pass<'_>) -> Result<String> {
    let pre = format!("{P}.encoder.layer.{i}");
    let path = format!("/qformer/layer.{i}");
    let allowed = match pass {
        Pass::Queries { .. } => None,
        Pass::Text { allowed } | Pass::QueriesAndText { allowed, .. } => Some(allowed),
    };
    let h = attention_block(
        b,
        c,
        &format!("{path}/attention"),
        &format!("{pre}.attention"),
        h,
        h,
        c.hidden_size,
        allowed,
    )?;
    match pass {
        Pass::Queries { feats } => query_part(b, c, i, &h, feats),
        Pass::Text { .. } => feed_forward(
            b,
            c,
            &format!("{path}/intermediate"),
            &format!("{path}/output"),
            &pre,
            "",
            &h,
        ),
        Pass::QueriesAndText { feats, queries, .. } => {
            let (start, split, end) =
                (b.ints(&[0]), b.ints(&[queries as i64]), b.ints(&[i64::MAX]));
            let axis = b.ints(&[1]);
            let q =
                b.op(&format!("{path}/Slice_query"), "Slice", &[&h, &start, &split, &axis], vec![]);
            let t =
                b.op(&format!("{path}/Slice_text"), "Slice", &[&h, &split, &end, &axis], vec![]);
            let q = query_part(b, c, i, &q, feats)?;
            let t = feed_forward(
                b,
                c,
                &format!("{path}/intermediate"),
                &format!("{path}/output"),
                &pre,
                "",
                &t,
            )?;
            Ok(b.op(&format!("{path}/Concat"), "Concat", &[&q, &t], vec![("axis", Attr::Int(1))]))
        }
    }
}

/// The query positions of layer `i` after self-attention: cross-attention (on the
/// layers that have it), then the query feed-forward.
fn query_part(
    b: &mut Builder,
    c: &QFormerConfig,
    i: usize,
    h: &str,
    feats: &str,
) -> Result<String> {
    let pre = format!("{P}.encoder.layer.{i}");
    let path = format!("/qformer/layer.{i}");
    let mut h = h.to_string();
    if i.is_multiple_of(c.cross_attention_frequency) {
        h = attention_block(
            b,
            c,
            &format!("{path}/crossattention"),
            &format!("{pre}.crossattention"),
            &h,
            feats,
            c.encoder_hidden_size,
            None,
        )?;
    }
    feed_forward(
        b,
        c,
        &format!("{path}/intermediate_query"),
        &format!("{path}/output_query"),
        &pre,
        "_query",
        &h,
    )
}

/// `output{suffix}(intermediate{suffix}(h), h)`: dense, activation, dense, residual, LayerNorm.
fn feed_forward(
    b: &mut Builder,
    c: &QFormerConfig,
    inter: &str,
    out: &str,
    pre: &str,
    suffix: &str,
    h: &str,
) -> Result<String> {
    let d = c.hidden_size;
    let f = linear(
        b,
        inter,
        h,
        &format!("{pre}.intermediate{suffix}.dense"),
        d,
        c.intermediate_size,
        true,
    )?;
    let f = activation(b, &format!("{inter}/act"), &f, &c.hidden_act)?;
    let f =
        linear(b, out, &f, &format!("{pre}.output{suffix}.dense"), c.intermediate_size, d, true)?;
    let r = b.residual(&format!("{out}/Add_1"), &f, h);
    layer_norm(
        b,
        &format!("{out}/LayerNorm"),
        &r,
        &format!("{pre}.output{suffix}.LayerNorm"),
        d,
        c.layer_norm_eps,
    )
}

/// BERT-style attention with its output block (`Blip2QFormerAttention`).
#[allow(clippy::too_many_arguments)]
fn attention_block(
    b: &mut Builder,
    c: &QFormerConfig,
    path: &str,
    pre: &str,
    h: &str,
    kv: &str,
    kv_dim: usize,
    allowed: Option<&str>,
) -> Result<String> {
    let d = c.hidden_size;
    let heads = c.num_attention_heads;
    let dh = d / heads;
    let q = linear(b, &format!("{path}/query"), h, &format!("{pre}.attention.query"), d, d, true)?;
    let k =
        linear(b, &format!("{path}/key"), kv, &format!("{pre}.attention.key"), kv_dim, d, true)?;
    let v = linear(
        b,
        &format!("{path}/value"),
        kv,
        &format!("{pre}.attention.value"),
        kv_dim,
        d,
        true,
    )?;
    // The fused form (CUDA target) takes no key mask; masked passes (retrieval's text)
    // keep the plain ops.
    let a = if b.fused() && allowed.is_none() {
        fused_attention(b, path, &q, &k, &v, heads)
    } else {
        let q = split_heads(b, &format!("{path}/query/heads"), &q, heads, dh);
        let k = split_heads(b, &format!("{path}/key/heads"), &k, heads, dh);
        let v = split_heads(b, &format!("{path}/value/heads"), &v, heads, dh);
        attention(b, path, &q, &k, &v, Some((dh as f32).powf(-0.5)), None, allowed)
    };
    let o =
        linear(b, &format!("{path}/output/dense"), &a, &format!("{pre}.output.dense"), d, d, true)?;
    let r = b.residual(&format!("{path}/output/Add_1"), &o, h);
    layer_norm(
        b,
        &format!("{path}/output/LayerNorm"),
        &r,
        &format!("{pre}.output.LayerNorm"),
        d,
        c.layer_norm_eps,
    )
}

// --- image-text retrieval (Blip2ForImageTextRetrieval) --------------------------------

/// Image side of ITC (`Blip2VisionModelWithProjection` after the vision model).
///
/// ```text
///   image_features [B,N,Dv] ──▶ Q-Former over the queries ──vision_projection──L2 normalize
///     ──▶ image_embeddings [B, Q, E]
/// ```
pub fn build_image_embedding(
    b: &mut Builder,
    c: &QFormerConfig,
    num_query_tokens: usize,
    embed_dim: usize,
    vision_positions: usize,
    vision_float: Elem,
) -> Result<()> {
    let (_, h) = queries_over_image(b, c, num_query_tokens, vision_positions, vision_float)?;
    let p =
        linear(b, "/vision_projection", &h, "vision_projection", c.hidden_size, embed_dim, true)?;
    let out = l2_normalize(b, "/vision_projection/normalize", &p);
    b.output(
        &out,
        io::IMAGE_EMBEDDINGS,
        Elem::F32,
        vec![
            Dim::Named(io::DIM_BATCH.into()),
            Dim::Fixed(num_query_tokens as i64),
            Dim::Fixed(embed_dim as i64),
        ],
    );
    Ok(())
}

/// Text side of ITC: the Q-Former's text-only pass (`query_length` = 0), its first
/// ([CLS]) position projected and normalized.
///
/// ```text
///   input_ids [B,S] ──embeddings(word + position)──LayerNorm──▶ layer.0 … layer.L-1 (text FFN,
///     attention_mask on the keys) ──Gather(position 0)──text_projection──L2 normalize
///     ──▶ text_embeddings [B, E]
/// ```
pub fn build_text_embedding(
    b: &mut Builder,
    c: &QFormerConfig,
    vocab_size: usize,
    max_positions: usize,
    embed_dim: usize,
) -> Result<()> {
    let (ids, mask) = text_inputs(b);
    let emb = text_embeddings(b, c, &ids, vocab_size, max_positions)?;
    let allowed = key_mask(b, "/qformer/attention_mask", &mask, None)?;
    let mut h = layer_norm(
        b,
        "/qformer/layernorm",
        &emb,
        &format!("{P}.layernorm"),
        c.hidden_size,
        c.layer_norm_eps,
    )?;
    for i in 0..c.num_hidden_layers {
        h = layer(b, c, i, &h, Pass::Text { allowed: &allowed })?;
    }
    let first = b.int(0);
    let cls = b.op("/qformer/cls/Gather", "Gather", &[&h, &first], vec![("axis", Attr::Int(1))]);
    let p = linear(b, "/text_projection", &cls, "text_projection", c.hidden_size, embed_dim, true)?;
    let out = l2_normalize(b, "/text_projection/normalize", &p);
    b.output(
        &out,
        io::TEXT_EMBEDDINGS,
        Elem::F32,
        vec![Dim::Named(io::DIM_BATCH.into()), Dim::Fixed(embed_dim as i64)],
    );
    Ok(())
}

/// Image-text matching: one Q-Former pass over `[queries; text]` with the queries
/// cross-attending to the image, `itm_head` on the query positions, averaged.
///
/// ```text
///   query_tokens ──Expand(B)──┐
///   input_ids ──embeddings────Concat(axis 1)──LayerNorm──▶ layer.0 … layer.L-1
///     (keys masked by [ones(Q); attention_mask]) ──Slice[:Q]──itm_head──ReduceMean(axis 1)
///     ──▶ itm_logits [B, 2]
/// ```
/// Row b pairs image b with text b; to score one image against many texts, repeat its
/// features along the batch.
#[allow(clippy::too_many_arguments)]
pub fn build_itm(
    b: &mut Builder,
    c: &QFormerConfig,
    num_query_tokens: usize,
    vocab_size: usize,
    max_positions: usize,
    vision_positions: usize,
    vision_float: Elem,
) -> Result<()> {
    let feats = image_features_input(b, c, vision_positions, vision_float);
    let (ids, mask) = text_inputs(b);
    let query = expanded_query_tokens(b, c, num_query_tokens, &feats)?;
    let text = text_embeddings(b, c, &ids, vocab_size, max_positions)?;
    let emb = b.op(
        "/qformer/embeddings/Concat",
        "Concat",
        &[&query, &text],
        vec![("axis", Attr::Int(1))],
    );
    let allowed = key_mask(b, "/qformer/attention_mask", &mask, Some((num_query_tokens, &feats)))?;
    let mut h = layer_norm(
        b,
        "/qformer/layernorm",
        &emb,
        &format!("{P}.layernorm"),
        c.hidden_size,
        c.layer_norm_eps,
    )?;
    for i in 0..c.num_hidden_layers {
        h = layer(
            b,
            c,
            i,
            &h,
            Pass::QueriesAndText { feats: &feats, allowed: &allowed, queries: num_query_tokens },
        )?;
    }
    let (start, end, axis) = (b.ints(&[0]), b.ints(&[num_query_tokens as i64]), b.ints(&[1]));
    let q = b.op("/itm_head/Slice", "Slice", &[&h, &start, &end, &axis], vec![]);
    let logits = linear(b, "/itm_head", &q, "itm_head", c.hidden_size, 2, true)?;
    let mean = b.op(
        "/itm_head/ReduceMean",
        "ReduceMean",
        &[&logits],
        vec![("axes", Attr::Ints(vec![1])), ("keepdims", Attr::Int(0))],
    );
    b.output(
        &mean,
        io::ITM_LOGITS,
        Elem::F32,
        vec![Dim::Named(io::DIM_BATCH.into()), Dim::Fixed(2)],
    );
    Ok(())
}

/// `input_ids` and `attention_mask`, both int64 `[batch_size, sequence_length]`.
fn text_inputs(b: &mut Builder) -> (String, String) {
    let dims = || vec![Dim::Named(io::DIM_BATCH.into()), Dim::Named(io::DIM_SEQUENCE.into())];
    let ids = b.input(io::INPUT_IDS, Elem::I64, dims());
    let mask = b.input(io::ATTENTION_MASK, Elem::I64, dims());
    (ids, mask)
}

/// `Blip2TextEmbeddings`: word embeddings plus absolute positions 0..S (no LayerNorm
/// here; the Q-Former's own `layernorm` follows).
///
/// ```text
///   input_ids [B,S] ──Gather(word_embeddings)──Add(Slice(position_embeddings, 0, S)) ─▶ [B,S,D]
/// ```
fn text_embeddings(
    b: &mut Builder,
    c: &QFormerConfig,
    ids: &str,
    vocab_size: usize,
    max_positions: usize,
) -> Result<String> {
    let d = c.hidden_size;
    let words = b.weight("embeddings.word_embeddings.weight", &[vocab_size, d])?;
    let positions = b.weight("embeddings.position_embeddings.weight", &[max_positions, d])?;
    let w = b.op(
        "/embeddings/word_embeddings/Gather",
        "Gather",
        &[&words, ids],
        vec![("axis", Attr::Int(0))],
    );
    let len = dim_of(b, "/embeddings/sequence_length", ids, 1);
    let (start, axis) = (b.ints(&[0]), b.ints(&[0]));
    let pos = b.op(
        "/embeddings/position_embeddings/Slice",
        "Slice",
        &[&positions, &start, &len, &axis],
        vec![],
    );
    Ok(b.op("/embeddings/Add", "Add", &[&w, &pos], vec![]))
}

/// The self-attention key mask `[B,1,1,T]` (true = attend) from an int64
/// `attention_mask` `[B,S]`, with `queries` always-attended positions in front when given
/// (their batch taken from `like`).
fn key_mask(
    b: &mut Builder,
    path: &str,
    mask: &str,
    queries: Option<(usize, &str)>,
) -> Result<String> {
    let mut m =
        b.op(&format!("{path}/Cast"), "Cast", &[mask], vec![("to", Attr::Int(Elem::Bool as i64))]);
    if let Some((n, like)) = queries {
        let batch = dim_of(b, &format!("{path}/batch"), like, 0);
        let q = b.ints(&[n as i64]);
        let shape =
            b.op(&format!("{path}/Concat"), "Concat", &[&batch, &q], vec![("axis", Attr::Int(0))]);
        let ones = b.op(
            &format!("{path}/ConstantOfShape"),
            "ConstantOfShape",
            &[&shape],
            vec![("value", value_tensor(Elem::Bool, vec![1]))],
        );
        m = b.op(&format!("{path}/Concat_1"), "Concat", &[&ones, &m], vec![("axis", Attr::Int(1))]);
    }
    let shape = b.ints(&[0, 1, 1, -1]);
    Ok(b.op(&format!("{path}/Reshape"), "Reshape", &[&m, &shape], vec![]))
}

/// `torch.nn.functional.normalize(x, dim=-1)`: `x / max(‖x‖₂, 1e-12)`.
///
/// ```text
///   x ──ReduceL2(axis -1)──Max(1e-12)──▶ n;   x ──Div(n) ─▶
/// ```
fn l2_normalize(b: &mut Builder, path: &str, x: &str) -> String {
    let n = b.op(
        &format!("{path}/ReduceL2"),
        "ReduceL2",
        &[x],
        vec![("axes", Attr::Ints(vec![-1])), ("keepdims", Attr::Int(1))],
    );
    let eps = b.scalar(1e-12);
    let n = b.op(&format!("{path}/Max"), "Max", &[&n, &eps], vec![]);
    b.op(&format!("{path}/Div"), "Div", &[x, &n], vec![])
}
