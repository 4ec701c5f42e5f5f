//! The blocks the graphs share, each emitting named nodes through a [`Builder`], with a
//! diagram of the ops it emits: projections, layer norms, activations, attention (plain,
//! with a bias, or fused), the causal positions of a decoder step, the image-embedding
//! scatter and the LM head.

use blip2_core::{io, Dim};

use crate::builder::{Builder, Projection};
use crate::error::{ExportError, Result};
use crate::onnx::{Attr, Elem, Tensor};

/// `x @ W^T + b` for a checkpoint Linear `{prefix}.weight` of shape `[out, in]`.
///
/// ```text
///   x ──MatMul(W^T)──Add(b)──▶
/// ```
pub fn linear(
    b: &mut Builder,
    path: &str,
    x: &str,
    prefix: &str,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
) -> Result<String> {
    let name = format!("{prefix}.weight");
    if matches!(b.projection(), Projection::DynamicInt8 | Projection::RowInt8) {
        // The int8 products add the bias themselves.
        let bv = if bias { Some(b.weight(&format!("{prefix}.bias"), &[out_dim])?) } else { None };
        return int8_product(b, path, x, &name, in_dim, out_dim, bv.as_deref());
    }
    let y = project(b, path, x, &name, in_dim, out_dim)?;
    if !bias {
        return Ok(y);
    }
    let bv = b.weight(&format!("{prefix}.bias"), &[out_dim])?;
    Ok(b.op(&format!("{path}/Add"), "Add", &[&y, &bv], vec![]))
}

/// `x @ W^T` for a checkpoint `[out, in]` weight: MatMul on the transposed weight, or
/// MatMulNBits on the quantized one when the graph is quantized.
pub fn project(
    b: &mut Builder,
    path: &str,
    x: &str,
    name: &str,
    in_dim: usize,
    out_dim: usize,
) -> Result<String> {
    match b.projection() {
        Projection::DynamicInt8 | Projection::RowInt8 => {
            int8_product(b, path, x, name, in_dim, out_dim, None)
        }
        Projection::NBits { .. } => {
            b.matmul_nbits(&format!("{path}/MatMulNBits"), x, name, out_dim, in_dim)
        }
        Projection::Float => {
            let w = b.weight_t(name, &[out_dim, in_dim])?;
            Ok(b.op(&format!("{path}/MatMul"), "MatMul", &[x, &w], vec![]))
        }
    }
}

/// `x @ W^T (+ bias)` with int8 weights per output channel and int8 activations: per
/// call (DynamicQuantizeMatMul) or per row (MatMulInteger), as the graph's projection says.
fn int8_product(
    b: &mut Builder,
    path: &str,
    x: &str,
    name: &str,
    in_dim: usize,
    out_dim: usize,
    bias: Option<&str>,
) -> Result<String> {
    if b.projection() == Projection::RowInt8 {
        return b.matmul_row_int8(&format!("{path}/RowInt8"), x, name, out_dim, in_dim, bias);
    }
    b.matmul_dynamic_int8(&format!("{path}/DynamicQuantizeMatMul"), x, name, out_dim, in_dim, bias)
}

/// LayerNormalization over the last axis with `{prefix}.weight` and `{prefix}.bias`.
pub fn layer_norm(
    b: &mut Builder,
    path: &str,
    x: &str,
    prefix: &str,
    dim: usize,
    eps: f64,
) -> Result<String> {
    let g = b.weight(&format!("{prefix}.weight"), &[dim])?;
    let beta = b.weight(&format!("{prefix}.bias"), &[dim])?;
    Ok(b.op(
        &format!("{path}/LayerNormalization"),
        "LayerNormalization",
        &[x, &g, &beta],
        vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(eps as f32))],
    ))
}

/// LayerNormalization without learned scale and bias (OPT's `layer_norm_elementwise_affine = false`).
pub fn layer_norm_plain(b: &mut Builder, path: &str, x: &str, dim: usize, eps: f64) -> String {
    let (one, zero) = match b.float() {
        Elem::F16 => (
            half::f16::from_f32(1.0).to_le_bytes().to_vec(),
            half::f16::from_f32(0.0).to_le_bytes().to_vec(),
        ),
        _ => (1f32.to_le_bytes().to_vec(), 0f32.to_le_bytes().to_vec()),
    };
    let elem = b.float();
    let ones = b.constant(
        format!("/constants/ones/{dim}/{elem:?}"),
        elem,
        vec![dim as i64],
        one.repeat(dim),
    );
    let zeros = b.constant(
        format!("/constants/zeros/{dim}/{elem:?}"),
        elem,
        vec![dim as i64],
        zero.repeat(dim),
    );
    b.op(
        &format!("{path}/LayerNormalization"),
        "LayerNormalization",
        &[x, &ones, &zeros],
        vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(eps as f32))],
    )
}

/// The activations BLIP-2 configs name, in transformers' definitions (ACT2FN).
///
/// ```text
///   gelu:       x * 0.5 * (1 + Erf(x / sqrt 2))          (ONNX Runtime fuses this into Gelu)
///   gelu_new:   x * 0.5 * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
///   quick_gelu: x * Sigmoid(1.702 x)
///   relu:       Relu(x)
/// ```
pub fn activation(b: &mut Builder, path: &str, x: &str, act: &str) -> Result<String> {
    let p = |s: &str| format!("{path}/{s}");
    Ok(match act {
        "relu" => b.op(&p("Relu"), "Relu", &[x], vec![]),
        "gelu" => {
            let sqrt2 = b.scalar(std::f32::consts::SQRT_2);
            let one = b.scalar(1.0);
            let half = b.scalar(0.5);
            let d = b.op(&p("Div"), "Div", &[x, &sqrt2], vec![]);
            let e = b.op(&p("Erf"), "Erf", &[&d], vec![]);
            let a = b.op(&p("Add"), "Add", &[&e, &one], vec![]);
            let m = b.op(&p("Mul"), "Mul", &[x, &a], vec![]);
            b.op(&p("Mul_1"), "Mul", &[&m, &half], vec![])
        }
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => {
            let c = b.scalar(0.044715);
            let k = b.scalar((2.0f32 / std::f32::consts::PI).sqrt());
            let one = b.scalar(1.0);
            let half = b.scalar(0.5);
            let x2 = b.op(&p("Mul"), "Mul", &[x, x], vec![]);
            let x3 = b.op(&p("Mul_1"), "Mul", &[&x2, x], vec![]);
            let cx3 = b.op(&p("Mul_2"), "Mul", &[&x3, &c], vec![]);
            let s = b.op(&p("Add"), "Add", &[x, &cx3], vec![]);
            let ks = b.op(&p("Mul_3"), "Mul", &[&s, &k], vec![]);
            let t = b.op(&p("Tanh"), "Tanh", &[&ks], vec![]);
            let a = b.op(&p("Add_1"), "Add", &[&t, &one], vec![]);
            let m = b.op(&p("Mul_4"), "Mul", &[x, &a], vec![]);
            b.op(&p("Mul_5"), "Mul", &[&m, &half], vec![])
        }
        "silu" | "swish" => {
            let s = b.op(&p("Sigmoid"), "Sigmoid", &[x], vec![]);
            b.op(&p("Mul"), "Mul", &[x, &s], vec![])
        }
        "quick_gelu" => {
            let k = b.scalar(1.702);
            let kx = b.op(&p("Mul"), "Mul", &[x, &k], vec![]);
            let s = b.op(&p("Sigmoid"), "Sigmoid", &[&kx], vec![]);
            b.op(&p("Mul_1"), "Mul", &[x, &s], vec![])
        }
        other => {
            return Err(ExportError::Config {
                path: "config.json".into(),
                message: format!(
                "activation \"{other}\" is not supported (gelu, gelu_new, quick_gelu, relu, silu)"
            ),
            })
        }
    })
}

/// `[B, S, H*D]` to `[B, H, S, D]`.
pub fn split_heads(b: &mut Builder, path: &str, x: &str, heads: usize, head_dim: usize) -> String {
    let shape = b.ints(&[0, 0, heads as i64, head_dim as i64]);
    let r = b.op(&format!("{path}/Reshape"), "Reshape", &[x, &shape], vec![]);
    b.op(
        &format!("{path}/Transpose"),
        "Transpose",
        &[&r],
        vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
    )
}

/// Scaled dot-product attention over heads already split, with an optional additive
/// bias on the scores (T5's relative positions).
///
/// ```text
///   q [B,H,S,D]   k [B,H,T,D]   v [B,H,T,D]
///   q ──MatMul(Transpose(k))──[Mul(scale)]──[Add(bias)]──[Where(allowed, ·, min)]──Softmax──MatMul(v)
///     ──Transpose──Reshape ──▶ [B, S, H*D]
/// ```
/// `allowed` is a boolean mask broadcastable to `[B, H, S, T]`; masked scores are
/// replaced (not offset), so a row with every key masked cannot overflow to NaN.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    b: &mut Builder,
    path: &str,
    q: &str,
    k: &str,
    v: &str,
    scale: Option<f32>,
    bias: Option<&str>,
    allowed: Option<&str>,
) -> String {
    let p = |s: &str| format!("{path}/{s}");
    let kt = b.op(&p("Transpose"), "Transpose", &[k], vec![("perm", Attr::Ints(vec![0, 1, 3, 2]))]);
    let mut s = b.op(&p("MatMul"), "MatMul", &[q, &kt], vec![]);
    if let Some(scale) = scale {
        let c = b.scalar(scale);
        s = b.op(&p("Mul"), "Mul", &[&s, &c], vec![]);
    }
    if let Some(bias) = bias {
        s = b.op(&p("Add"), "Add", &[&s, bias], vec![]);
    }
    if let Some(m) = allowed {
        let min = b.mask_value();
        s = b.op(&p("Where"), "Where", &[m, &s, &min], vec![]);
    }
    let probs = b.op(&p("Softmax"), "Softmax", &[&s], vec![("axis", Attr::Int(-1))]);
    let o = b.op(&p("MatMul_1"), "MatMul", &[&probs, v], vec![]);
    let t =
        b.op(&p("Transpose_1"), "Transpose", &[&o], vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))]);
    let shape = b.ints(&[0, 0, -1]);
    b.op(&p("Reshape"), "Reshape", &[&t, &shape], vec![])
}

/// Attention with ONNX Runtime's fused MultiHeadAttention (com.microsoft) on inputs whose
/// heads are not split: q `[B,S,H*D]`, k and v `[B,T,H*D]`; the output is `[B,S,H*D]`,
/// as [`attention`]'s. Scores are scaled by `D^-0.5`, the operator's default.
///
/// ```text
///   q, k, v ──MultiHeadAttention(num_heads) ─▶ [B, S, H*D]
/// ```
pub fn fused_attention(
    b: &mut Builder,
    path: &str,
    q: &str,
    k: &str,
    v: &str,
    heads: usize,
) -> String {
    b.ms_op(
        &format!("{path}/MultiHeadAttention"),
        "MultiHeadAttention",
        &[q, k, v],
        vec![("num_heads", Attr::Int(heads as i64))],
    )
}

/// Element `i` of a tensor's shape, as a 1-D int64 tensor of length one.
pub fn dim_of(b: &mut Builder, path: &str, x: &str, i: i64) -> String {
    let s = b.op(&format!("{path}/Shape"), "Shape", &[x], vec![]);
    let idx = b.ints(&[i]);
    b.op(&format!("{path}/Gather"), "Gather", &[&s, &idx], vec![("axis", Attr::Int(0))])
}

/// Tensor used by ConstantOfShape's `value` attribute.
pub fn value_tensor(elem: Elem, raw: Vec<u8>) -> Attr {
    Attr::Tensor(Tensor { elem, dims: vec![1], raw })
}

/// Query and key positions of a decoder step and which keys each query may see: the
/// queries are positions `past .. total` (`qpos`, [S]), the keys `0 .. total` (`kpos`,
/// [T]), and key j is allowed for query i when j <= i. `past` and `total` are int64
/// scalars. Returns (qpos, kpos, causal [S,T]).
///
/// ```text
///   Range(past, total) ─▶ qpos ──Unsqueeze(1)─┐
///   Range(0, total) ─▶ kpos ────Unsqueeze(0)──LessOrEqual ─▶ causal [S,T]
/// ```
pub fn causal_positions(
    b: &mut Builder,
    path: &str,
    past: &str,
    total: &str,
) -> (String, String, String) {
    let p = |s: &str| format!("{path}/{s}");
    let zero = b.int(0);
    let one = b.int(1);
    let qpos = b.op(&p("Range"), "Range", &[past, total, &one], vec![]);
    let kpos = b.op(&p("Range_1"), "Range", &[&zero, total, &one], vec![]);
    let axes1 = b.ints(&[1]);
    let axes0 = b.ints(&[0]);
    let q2 = b.op(&p("Unsqueeze"), "Unsqueeze", &[&qpos, &axes1], vec![]);
    let k2 = b.op(&p("Unsqueeze_1"), "Unsqueeze", &[&kpos, &axes0], vec![]);
    let causal = b.op(&p("LessOrEqual"), "LessOrEqual", &[&k2, &q2], vec![]);
    (qpos, kpos, causal)
}

/// Replaces the embeddings of image tokens with the image embeddings, in order: the k-th
/// image token of a row takes row k of its image embeddings (what transformers'
/// masked_scatter does). The image embeddings get a zero row in front, which every other
/// token indexes, so steps with no image tokens (`num_image_tokens` = 0) need no special
/// case, and no index depends on a tensor's shape (nothing crosses from host to device).
///
/// `slots` (positions, n): only tokens at positions below n are image slots. A decoder
/// gets this: the prompt's image tokens come first, and transformers' `generate()`
/// replaces them once, in the prompt, so a later token that happens to be the image
/// token's id (a sampled one, say) is embedded like any other token.
///
/// ```text
///   input_ids == image token [And position < n] ─▶ is_img ──Cast──CumSum──Mul(is_img) ─▶ index (k+1, or 0)
///   image_embeds ──Pad(a zero row in front)──GatherND(index, batch_dims 1)──Where(is_img, ·, tok) ─▶
/// ```
pub fn scatter_image_embeds(
    b: &mut Builder,
    ids: &str,
    img: &str,
    tok: &str,
    image_token_id: i64,
    slots: Option<(&str, usize)>,
) -> String {
    let image_id = b.int(image_token_id);
    let mut is_img = b.op("/lm/image/Equal", "Equal", &[ids, &image_id], vec![]);
    if let Some((positions, n)) = slots {
        let n = b.int(n as i64);
        let slot = b.op("/lm/image/Less", "Less", &[positions, &n], vec![]);
        is_img = b.op("/lm/image/And", "And", &[&is_img, &slot], vec![]);
    }
    let as_int =
        b.op("/lm/image/Cast", "Cast", &[&is_img], vec![("to", Attr::Int(Elem::I64 as i64))]);
    let axis1 = b.int(1);
    let cum = b.op("/lm/image/CumSum", "CumSum", &[&as_int, &axis1], vec![]);
    let idx = b.op("/lm/image/Mul", "Mul", &[&cum, &as_int], vec![]);
    let axes2 = b.ints(&[2]);
    let idx = b.op("/lm/image/Unsqueeze", "Unsqueeze", &[&idx, &axes2], vec![]);
    let pads = b.ints(&[0, 1, 0, 0, 0, 0]);
    let padded = b.op("/lm/image/Pad", "Pad", &[img, &pads], vec![]);
    let gathered = b.op(
        "/lm/image/GatherND",
        "GatherND",
        &[&padded, &idx],
        vec![("batch_dims", Attr::Int(1))],
    );
    let sel = b.op("/lm/image/Unsqueeze_1", "Unsqueeze", &[&is_img, &axes2], vec![]);
    b.op("/lm/image/Where_1", "Where", &[&sel, &gathered, tok], vec![])
}

/// Logits `[B, S, V]` in float32 from hidden states `[B, S, D]` and a `[V, D]` table, read
/// as stored (Gemm's transB), so a table tied to the embeddings is not copied. `positions`
/// is S when the graph fixes it (one position a row: the output shape is then a constant,
/// not read from a tensor).
pub fn lm_head(
    b: &mut Builder,
    h: &str,
    head: &str,
    hidden: usize,
    vocab: usize,
    positions: Option<usize>,
) -> Result<String> {
    let float = b.float();
    if matches!(b.projection(), Projection::NBits { .. } | Projection::RowInt8) {
        // The table is [V, D], MatMulNBits' own layout: no reshape around it.
        let logits = b.matmul_nbits("/lm/lm_head/MatMulNBits", h, head, vocab, hidden)?;
        return Ok(b.cast("/lm/lm_head/Cast", &logits, float, Elem::F32));
    }
    let w = b.weight(head, &[vocab, hidden])?;
    let w = w.as_str();
    let flat_shape = b.ints(&[-1, hidden as i64]);
    let flat = b.op("/lm/lm_head/Reshape", "Reshape", &[h, &flat_shape], vec![]);
    let logits = b.op("/lm/lm_head/Gemm", "Gemm", &[&flat, w], vec![("transB", Attr::Int(1))]);
    let out_shape = match positions {
        Some(s) => b.ints(&[-1, s as i64, vocab as i64]),
        None => {
            let batch = dim_of(b, "/lm/lm_head/batch", h, 0);
            let seq = dim_of(b, "/lm/lm_head/seq", h, 1);
            let v = b.ints(&[vocab as i64]);
            b.op("/lm/lm_head/Concat", "Concat", &[&batch, &seq, &v], vec![("axis", Attr::Int(0))])
        }
    };
    let logits = b.op("/lm/lm_head/Reshape_1", "Reshape", &[&logits, &out_shape], vec![]);
    Ok(b.cast("/lm/lm_head/Cast", &logits, float, Elem::F32))
}

/// Token selection on the device, so a decode step sends back token ids or a few
/// candidates instead of the vocabulary's logits: the first most likely token of each
/// row, and the `top_k` largest log-softmax values with their ids. `logits` are one
/// position per row, `[B,1,V]`.
///
/// `next_token` is the lowest id among the row's largest logits, as `torch.argmax`
/// picks, by construction: ArgMax's tie order on CUDA is cuDNN's (undocumented), so the
/// graph takes the smallest index whose logit equals the maximum instead (indices as
/// float32 are exact up to 2^24 ids). Both reductions are TopK with K = 1 and only its
/// values are read, which do not depend on how a kernel orders ties. They are not
/// ReduceMax / ReduceMin: on ONNX Runtime's CUDA provider those reduce a `[B,1,V]` row
/// with cuDNN, which took 2.7 ms each for two or more rows on an H200 (0.2 ms for one),
/// more than the rest of an opt-2.7b decode step. `top_k` is a graph input of the shape
/// TopK reads (int64 [1]) fed to it directly: TopK reads K on the host, and ONNX Runtime
/// would run anything computed from it on the device and copy it back.
///
/// ```text
///   logits [B,1,V] ──TopK(1).values──Equal(logits)──Where(0,-1..-(V-1), else -V)──TopK(1).values──Neg──Reshape──Cast ─▶ next_token [B]
///   logits ──LogSoftmax──TopK(top_k [1])──Squeeze(1) ─▶ top_logprobs, top_ids [B, top_k]
///   logits ──GatherElements(top_ids)──Squeeze(1) ─▶ top_logits [B, top_k]
/// ```
pub fn select_tokens(b: &mut Builder, logits: &str, p: &str, vocab: usize) {
    let axis2 = || ("axis", Attr::Int(2));
    let one_k = b.ints(&[1]);
    let max = b.op_n(&format!("{p}/TopK_max"), "TopK", &[logits, &one_k], vec![axis2()], 2);
    let is_max = b.op(&format!("{p}/Equal"), "Equal", &[logits, &max[0]], vec![]);
    // Ids negated, so that the largest of them is the lowest id: 0, -1, ..., -(V-1),
    // and -V for a logit below the maximum.
    let (zero, end, minus_one) = (
        b.scalar_of(0.0, Elem::F32),
        b.scalar_of(-(vocab as f32), Elem::F32),
        b.scalar_of(-1.0, Elem::F32),
    );
    let ids = b.op(&format!("{p}/Range"), "Range", &[&zero, &end, &minus_one], vec![]);
    let ids = b.op(&format!("{p}/Where"), "Where", &[&is_max, &ids, &end], vec![]);
    let first = b.op_n(&format!("{p}/TopK_first"), "TopK", &[&ids, &one_k], vec![axis2()], 2);
    let first = b.op(&format!("{p}/Neg"), "Neg", &[&first[0]], vec![]);
    let flat = b.ints(&[-1]);
    let next = b.op(&format!("{p}/Reshape"), "Reshape", &[&first, &flat], vec![]);
    let next =
        b.op(&format!("{p}/Cast"), "Cast", &[&next], vec![("to", Attr::Int(Elem::I64 as i64))]);
    b.output(&next, io::NEXT_TOKEN, Elem::I64, vec![Dim::Named(io::DIM_BATCH.into())]);
    let k = b.input_with_default(io::TOP_K, Elem::I64, vec![1], 1i64.to_le_bytes().to_vec());
    let lp =
        b.op(&format!("{p}/LogSoftmax"), "LogSoftmax", &[logits], vec![("axis", Attr::Int(-1))]);
    let top = b.op_n(&format!("{p}/TopK"), "TopK", &[&lp, &k], vec![("axis", Attr::Int(-1))], 2);
    let axis1 = b.ints(&[1]);
    let values = b.op(&format!("{p}/Squeeze"), "Squeeze", &[&top[0], &axis1], vec![]);
    let indices = b.op(&format!("{p}/Squeeze_1"), "Squeeze", &[&top[1], &axis1], vec![]);
    let dims = vec![Dim::Named(io::DIM_BATCH.into()), Dim::Named(io::DIM_TOP_K.into())];
    b.output(&values, io::TOP_LOGPROBS, Elem::F32, dims.clone());
    b.output(&indices, io::TOP_IDS, Elem::I64, dims.clone());
    // The raw logits of the same candidates, exactly the `logits` values (sampling
    // divides them by its temperature and draws among them).
    let raw = b.op(
        &format!("{p}/GatherElements"),
        "GatherElements",
        &[logits, &top[1]],
        vec![("axis", Attr::Int(2))],
    );
    let raw = b.op(&format!("{p}/Squeeze_2"), "Squeeze", &[&raw, &axis1], vec![]);
    b.output(&raw, io::TOP_LOGITS, Elem::F32, dims);
}
