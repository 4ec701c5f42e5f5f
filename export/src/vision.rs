//! The ViT image encoder (`Blip2VisionModel`): pixel values to image features, the
//! post-layer-normed last hidden state the Q-Former cross-attends to.

use blip2_core::{io, Dim};

use crate::blocks::{activation, attention, dim_of, fused_attention, layer_norm, linear};
use crate::builder::Builder;
use crate::config::VisionConfig;
use crate::error::Result;
use crate::onnx::{Attr, Elem};

const P: &str = "vision_model";

/// ```text
///   pixel_values [B,3,H,W] ──Cast──Conv(patch)──Reshape──Transpose──┐
///   class_embedding ──Expand(B)─────────────────────────────────────Concat──Add(position_embedding)
///     ──▶ layers.0 … layers.N-1 ──LayerNorm(post_layernorm)──▶ image_features [B, 1+patches, D]
/// ```
pub fn build(b: &mut Builder, c: &VisionConfig) -> Result<()> {
    let d = c.hidden_size;
    let grid = c.image_size / c.patch_size;
    let positions = grid * grid + 1;
    let float = b.float();
    let px = b.input(
        io::PIXEL_VALUES,
        Elem::F32,
        vec![
            Dim::Named(io::DIM_BATCH.into()),
            Dim::Fixed(3),
            Dim::Fixed(c.image_size as i64),
            Dim::Fixed(c.image_size as i64),
        ],
    );
    let px = b.cast("/vision/embeddings/Cast", &px, Elem::F32, float);
    let w = b.weight(
        &format!("{P}.embeddings.patch_embedding.weight"),
        &[d, 3, c.patch_size, c.patch_size],
    )?;
    let bias = b.weight(&format!("{P}.embeddings.patch_embedding.bias"), &[d])?;
    let p = c.patch_size as i64;
    let conv = b.op(
        "/vision/embeddings/patch_embedding/Conv",
        "Conv",
        &[&px, &w, &bias],
        vec![("kernel_shape", Attr::Ints(vec![p, p])), ("strides", Attr::Ints(vec![p, p]))],
    );
    let flat_shape = b.ints(&[0, 0, -1]);
    let flat = b.op("/vision/embeddings/Reshape", "Reshape", &[&conv, &flat_shape], vec![]);
    let patches = b.op(
        "/vision/embeddings/Transpose",
        "Transpose",
        &[&flat],
        vec![("perm", Attr::Ints(vec![0, 2, 1]))],
    );

    let cls = b.weight(&format!("{P}.embeddings.class_embedding"), &[1, 1, d])?;
    let batch = dim_of(b, "/vision/embeddings/batch", &patches, 0);
    let ones = b.ints(&[1, 1]);
    let expand_shape =
        b.op("/vision/embeddings/Concat", "Concat", &[&batch, &ones], vec![("axis", Attr::Int(0))]);
    let cls = b.op("/vision/embeddings/class/Expand", "Expand", &[&cls, &expand_shape], vec![]);
    let emb = b.op(
        "/vision/embeddings/Concat_1",
        "Concat",
        &[&cls, &patches],
        vec![("axis", Attr::Int(1))],
    );
    let pos = b.weight(&format!("{P}.embeddings.position_embedding"), &[1, positions, d])?;
    let mut h = b.op("/vision/embeddings/Add", "Add", &[&emb, &pos], vec![]);

    for i in 0..c.num_hidden_layers {
        h = layer(b, c, i, &h)?;
    }
    let out = layer_norm(
        b,
        "/vision/post_layernorm",
        &h,
        &format!("{P}.post_layernorm"),
        d,
        c.layer_norm_eps,
    )?;
    b.output(
        &out,
        io::IMAGE_FEATURES,
        float,
        vec![Dim::Named(io::DIM_BATCH.into()), Dim::Fixed(positions as i64), Dim::Fixed(d as i64)],
    );
    Ok(())
}

/// One pre-norm encoder layer (`Blip2EncoderLayer`).
///
/// ```text
///   h ──LayerNorm1──qkv(MatMul+Add)──Reshape[B,T,3,H,Dh]──Transpose──Gather 0/1/2 ─▶ q,k,v
///     ──attention──projection──Add(h) ─▶ r
///   r ──LayerNorm2──fc1──act──fc2──Add(r) ─▶
/// ```
fn layer(b: &mut Builder, c: &VisionConfig, i: usize, h: &str) -> Result<String> {
    let d = c.hidden_size;
    let heads = c.num_attention_heads;
    let dh = d / heads;
    let pre = format!("{P}.encoder.layers.{i}");
    let path = format!("/vision/layers.{i}");
    let x = layer_norm(
        b,
        &format!("{path}/layer_norm1"),
        h,
        &format!("{pre}.layer_norm1"),
        d,
        c.layer_norm_eps,
    )?;
    let qkv = linear(
        b,
        &format!("{path}/attn/qkv"),
        &x,
        &format!("{pre}.self_attn.qkv"),
        d,
        3 * d,
        c.qkv_bias,
    )?;
    let a = if b.fused() {
        // qkv is [B, T, 3 * D] laid out (q | k | v), each head-major.
        let sizes = b.ints(&[d as i64; 3]);
        let parts = b.op_n(
            &format!("{path}/attn/qkv/Split"),
            "Split",
            &[&qkv, &sizes],
            vec![("axis", Attr::Int(-1))],
            3,
        );
        fused_attention(b, &format!("{path}/attn"), &parts[0], &parts[1], &parts[2], heads)
    } else {
        split_attention(b, &path, &qkv, heads, dh)
    };
    let o = linear(
        b,
        &format!("{path}/attn/projection"),
        &a,
        &format!("{pre}.self_attn.projection"),
        d,
        d,
        true,
    )?;
    let r = b.residual(&format!("{path}/Add"), &o, h);
    let x = layer_norm(
        b,
        &format!("{path}/layer_norm2"),
        &r,
        &format!("{pre}.layer_norm2"),
        d,
        c.layer_norm_eps,
    )?;
    let f = linear(
        b,
        &format!("{path}/mlp/fc1"),
        &x,
        &format!("{pre}.mlp.fc1"),
        d,
        c.intermediate_size,
        true,
    )?;
    let f = activation(b, &format!("{path}/mlp/act"), &f, &c.hidden_act)?;
    let f = linear(
        b,
        &format!("{path}/mlp/fc2"),
        &f,
        &format!("{pre}.mlp.fc2"),
        c.intermediate_size,
        d,
        true,
    )?;
    Ok(b.residual(&format!("{path}/Add_1"), &f, &r))
}

/// Standard-operator attention over a packed `[B, T, 3 * H * Dh]` projection.
fn split_attention(b: &mut Builder, path: &str, qkv: &str, heads: usize, dh: usize) -> String {
    let shape = b.ints(&[0, 0, 3, heads as i64, dh as i64]);
    let r = b.op(&format!("{path}/attn/qkv/Reshape"), "Reshape", &[qkv, &shape], vec![]);
    let t = b.op(
        &format!("{path}/attn/qkv/Transpose"),
        "Transpose",
        &[&r],
        vec![("perm", Attr::Ints(vec![2, 0, 3, 1, 4]))],
    );
    let mut qkv_parts = Vec::new();
    for (j, n) in ["q", "k", "v"].iter().enumerate() {
        let idx = b.int(j as i64);
        qkv_parts.push(b.op(
            &format!("{path}/attn/{n}/Gather"),
            "Gather",
            &[&t, &idx],
            vec![("axis", Attr::Int(0))],
        ));
    }
    let scale = (dh as f32).powf(-0.5);
    attention(
        b,
        &format!("{path}/attn"),
        &qkv_parts[0],
        &qkv_parts[1],
        &qkv_parts[2],
        Some(scale),
        None,
        None,
    )
}
