//! The exporter's blocks one at a time: each is built into a graph of its own with the
//! exporter's `Builder`, run on ONNX Runtime, and compared with values computed by hand
//! here (or, for T5's buckets, by transformers: scripts/make_block_fixtures.py).

use std::path::{Path, PathBuf};

use blip2_core::Dim;
use blip2_export::builder::Builder;
use blip2_export::onnx::{self, Elem, Model};
use blip2_export::{blocks, Checkpoint};
use blip2_ort_suite::{fixture, session_factory, temp_dir};
use blip2_runtime::model::GraphKind;
use ndarray::{ArrayD, IxDyn};
use ort::value::{DynValue, Tensor};

/// A folder with a `model.safetensors` holding the given f32 tensors (and ONNX Runtime
/// loaded, as the tests' inputs are made before their session).
fn checkpoint(test: &str, tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> PathBuf {
    blip2_runtime::ort_env::init().unwrap();
    let dir = temp_dir(&format!("blocks-{test}"));
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, shape, values) in tensors {
        let start = data.len();
        data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        header.insert(name.to_string(), serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}));
    }
    let header = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend(header);
    file.extend(data);
    std::fs::write(dir.join("model.safetensors"), file).unwrap();
    dir
}

/// Builds a graph with `build`, writes it, runs it on the CPU with `inputs` and returns
/// its outputs in order, as f32 (bool and int64 outputs converted).
fn run(
    dir: &Path,
    fused: bool,
    build: impl FnOnce(&mut Builder),
    inputs: Vec<(&str, DynValue)>,
) -> Vec<ArrayD<f32>> {
    let ck = Checkpoint::open(dir).unwrap();
    let mut b = Builder::new(&ck, Elem::F32).with_fused_operators(fused);
    build(&mut b);
    let graph = b.finish("block");
    let outputs: Vec<String> = graph.outputs.iter().map(|o| o.name.clone()).collect();
    let mut opsets = vec![(String::new(), onnx::OPSET)];
    if graph.nodes.iter().any(|n| !n.domain.is_empty()) {
        opsets.push(("com.microsoft".into(), 1));
    }
    let model = Model { graph, opsets, producer: "blocks test".into(), metadata: vec![] };
    let path = dir.join("block.onnx");
    onnx::write_model(&model, &path, "block.onnx.data", false, &mut |_| {}).unwrap();
    let mut session = session_factory()(GraphKind::VisionEncoder, &path).unwrap();
    let out = session.run(inputs).unwrap();
    outputs
        .iter()
        .map(|name| {
            let v = &out[name.as_str()];
            if let Ok(a) = v.try_extract_array::<f32>() {
                a.to_owned()
            } else if let Ok(a) = v.try_extract_array::<bool>() {
                a.mapv(|x| x as u8 as f32)
            } else {
                v.try_extract_array::<i64>().unwrap().mapv(|x| x as f32)
            }
        })
        .collect()
}

fn f32_input(shape: &[usize], values: Vec<f32>) -> DynValue {
    Tensor::from_array(ArrayD::from_shape_vec(IxDyn(shape), values).unwrap()).unwrap().into_dyn()
}

fn i64_input(shape: &[usize], values: Vec<i64>) -> DynValue {
    Tensor::from_array(ArrayD::from_shape_vec(IxDyn(shape), values).unwrap()).unwrap().into_dyn()
}

fn fixed(dims: &[i64]) -> Vec<Dim> {
    dims.iter().map(|&d| Dim::Fixed(d)).collect()
}

fn assert_near(what: &str, got: &ArrayD<f32>, want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: {} values, expected {}", got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "{what}[{i}]: {g} vs {w}");
    }
}

/// LayerNorm of one row, in f64.
fn layer_norm_ref(x: &[f32], w: &[f32], b: &[f32], eps: f64) -> Vec<f32> {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    x.iter()
        .zip(w)
        .zip(b)
        .map(|((&v, &g), &be)| {
            (((v as f64 - mean) / (var + eps).sqrt()) * g as f64 + be as f64) as f32
        })
        .collect()
}

#[test]
fn layer_norm_and_its_fused_residual_form() {
    let (w, bias) = (vec![1.0, 2.0, 0.5, -1.0], vec![0.0, 1.0, -1.0, 0.5]);
    let dir =
        checkpoint("ln", &[("ln.weight", vec![4], w.clone()), ("ln.bias", vec![4], bias.clone())]);
    let a = vec![1.0, 2.0, 3.0, 4.0, -2.0, 0.0, 0.5, 8.0];
    let r = vec![0.5, -1.0, 0.0, 2.0, 1.0, 1.0, -3.0, 0.0];
    let sum: Vec<f32> = a.iter().zip(&r).map(|(x, y)| x + y).collect();
    let want: Vec<f32> =
        sum.chunks(4).flat_map(|row| layer_norm_ref(row, &w, &bias, 1e-5)).collect();
    for fused in [false, true] {
        let outs = run(
            &dir,
            fused,
            |b| {
                let x = b.input("a", Elem::F32, fixed(&[1, 2, 4]));
                let y = b.input("r", Elem::F32, fixed(&[1, 2, 4]));
                let s = b.residual("/block/Add", &x, &y);
                let n = blocks::layer_norm(b, "/block/ln", &s, "ln", 4, 1e-5).unwrap();
                b.output(&n, "normed", Elem::F32, fixed(&[1, 2, 4]));
                // The sum is read again, as a residual stream is.
                let twice = b.op("/block/Add_1", "Add", &[&s, &s], vec![]);
                b.output(&twice, "twice", Elem::F32, fixed(&[1, 2, 4]));
            },
            vec![("a", f32_input(&[1, 2, 4], a.clone())), ("r", f32_input(&[1, 2, 4], r.clone()))],
        );
        assert_near(&format!("layer norm (fused {fused})"), &outs[0], &want, 1e-5);
        let twice: Vec<f32> = sum.iter().map(|v| 2.0 * v).collect();
        assert_near(&format!("residual sum (fused {fused})"), &outs[1], &twice, 1e-6);
        let graph = std::fs::read(dir.join("block.onnx")).unwrap();
        let has_skip = graph.windows(22).any(|w| w == b"SkipLayerNormalization");
        assert_eq!(has_skip, fused, "SkipLayerNormalization only in fused graphs");
    }
}

/// softmax(q k^T * scale + bias, masked) v for one head, rows of q.
fn attention_ref(
    q: &[[f32; 2]],
    k: &[[f32; 2]],
    v: &[[f32; 2]],
    scale: f32,
    bias: &[Vec<f32>],
    allowed: &[Vec<bool>],
) -> Vec<f32> {
    let mut out = Vec::new();
    for (i, qi) in q.iter().enumerate() {
        let s: Vec<f64> = k
            .iter()
            .enumerate()
            .map(|(j, kj)| {
                if allowed[i][j] {
                    ((qi[0] * kj[0] + qi[1] * kj[1]) * scale + bias[i][j]) as f64
                } else {
                    f64::NEG_INFINITY
                }
            })
            .collect();
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        for d in 0..2 {
            out.push((e.iter().zip(v).map(|(p, vj)| p * vj[d] as f64).sum::<f64>() / z) as f32);
        }
    }
    out
}

#[test]
fn attention_with_scale_bias_and_mask() {
    let dir = checkpoint("attn", &[]);
    let q = [[1.0f32, 0.5], [-1.0, 2.0]];
    let k = [[0.5f32, 1.0], [2.0, -1.0], [0.0, 1.5]];
    let v = [[1.0f32, 2.0], [3.0, -1.0], [0.5, 0.5]];
    let bias = vec![vec![0.1f32, -0.2, 0.3], vec![0.0, 0.5, -0.5]];
    let allowed = vec![vec![true, true, false], vec![true, true, true]];
    let flat = |m: &[[f32; 2]]| m.iter().flatten().copied().collect::<Vec<f32>>();
    let scale = 0.7f32;
    let outs = run(
        &dir,
        false,
        |b| {
            let q = b.input("q", Elem::F32, fixed(&[1, 1, 2, 2]));
            let k = b.input("k", Elem::F32, fixed(&[1, 1, 3, 2]));
            let v = b.input("v", Elem::F32, fixed(&[1, 1, 3, 2]));
            let bias = b.input("bias", Elem::F32, fixed(&[1, 1, 2, 3]));
            let m = b.input("allowed", Elem::Bool, fixed(&[1, 1, 2, 3]));
            let a = blocks::attention(b, "/plain", &q, &k, &v, Some(scale), None, None);
            b.output(&a, "plain", Elem::F32, fixed(&[1, 2, 2]));
            let a = blocks::attention(b, "/biased", &q, &k, &v, None, Some(&bias), Some(&m));
            b.output(&a, "biased", Elem::F32, fixed(&[1, 2, 2]));
        },
        vec![
            ("q", f32_input(&[1, 1, 2, 2], flat(&q))),
            ("k", f32_input(&[1, 1, 3, 2], flat(&k))),
            ("v", f32_input(&[1, 1, 3, 2], flat(&v))),
            ("bias", f32_input(&[1, 1, 2, 3], bias.concat())),
            (
                "allowed",
                Tensor::from_array(
                    ArrayD::from_shape_vec(IxDyn(&[1, 1, 2, 3]), allowed.concat()).unwrap(),
                )
                .unwrap()
                .into_dyn(),
            ),
        ],
    );
    let zero = vec![vec![0.0; 3]; 2];
    let all = vec![vec![true; 3]; 2];
    assert_near("scaled attention", &outs[0], &attention_ref(&q, &k, &v, scale, &zero, &all), 1e-5);
    assert_near(
        "biased, masked attention",
        &outs[1],
        &attention_ref(&q, &k, &v, 1.0, &bias, &allowed),
        1e-5,
    );
}

#[test]
fn fused_attention_is_scaled_dot_product_attention() {
    // MultiHeadAttention on unsplit heads: 2 heads of size 2, [B, S, H*D] in and out.
    let dir = checkpoint("mha", &[]);
    let q: Vec<f32> = vec![1.0, 0.5, 0.2, -0.3, -1.0, 2.0, 0.7, 0.1];
    let k: Vec<f32> = vec![0.5, 1.0, 1.0, 0.0, 2.0, -1.0, -0.5, 0.5, 0.0, 1.5, 0.3, 0.3];
    let v: Vec<f32> = vec![1.0, 2.0, 0.0, 1.0, 3.0, -1.0, 2.0, 2.0, 0.5, 0.5, -1.0, 0.0];
    let outs = run(
        &dir,
        true,
        |b| {
            let qi = b.input("q", Elem::F32, fixed(&[1, 2, 4]));
            let ki = b.input("k", Elem::F32, fixed(&[1, 3, 4]));
            let vi = b.input("v", Elem::F32, fixed(&[1, 3, 4]));
            let a = blocks::fused_attention(b, "/mha", &qi, &ki, &vi, 2);
            b.output(&a, "out", Elem::F32, fixed(&[1, 2, 4]));
        },
        vec![
            ("q", f32_input(&[1, 2, 4], q.clone())),
            ("k", f32_input(&[1, 3, 4], k.clone())),
            ("v", f32_input(&[1, 3, 4], v.clone())),
        ],
    );
    // Per head h: rows take columns 2h..2h+2.
    let head = |x: &[f32], rows: usize, h: usize| -> Vec<[f32; 2]> {
        (0..rows).map(|r| [x[r * 4 + 2 * h], x[r * 4 + 2 * h + 1]]).collect()
    };
    let mut want = vec![0f32; 8];
    for h in 0..2 {
        let o = attention_ref(
            &head(&q, 2, h),
            &head(&k, 3, h),
            &head(&v, 3, h),
            0.5f32.sqrt(),
            &[vec![0.0; 3], vec![0.0; 3]],
            &[vec![true; 3], vec![true; 3]],
        );
        for r in 0..2 {
            want[r * 4 + 2 * h] = o[r * 2];
            want[r * 4 + 2 * h + 1] = o[r * 2 + 1];
        }
    }
    assert_near("MultiHeadAttention", &outs[0], &want, 1e-5);
}

#[test]
fn causal_positions_allow_earlier_keys_only() {
    let dir = checkpoint("causal", &[]);
    let outs = run(
        &dir,
        false,
        |b| {
            let past = b.input("past", Elem::I64, vec![]);
            let total = b.input("total", Elem::I64, vec![]);
            let (q, k, causal) = blocks::causal_positions(b, "/causal", &past, &total);
            b.output(&q, "qpos", Elem::I64, vec![Dim::Named("s".into())]);
            b.output(&k, "kpos", Elem::I64, vec![Dim::Named("t".into())]);
            b.output(
                &causal,
                "causal",
                Elem::Bool,
                vec![Dim::Named("s".into()), Dim::Named("t".into())],
            );
        },
        vec![("past", i64_input(&[], vec![2])), ("total", i64_input(&[], vec![4]))],
    );
    assert_near("query positions", &outs[0], &[2.0, 3.0], 0.0);
    assert_near("key positions", &outs[1], &[0.0, 1.0, 2.0, 3.0], 0.0);
    assert_near("causal", &outs[2], &[1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0], 0.0);
}

#[test]
fn image_embeddings_replace_the_image_tokens_in_order() {
    let dir = checkpoint("scatter", &[]);
    // Row: text, image, image, text, text; two image embeddings of width 3.
    let ids = vec![4i64, 9, 9, 5, 6];
    let tok: Vec<f32> = (0..15).map(|i| i as f32).collect();
    let img: Vec<f32> = vec![100.0, 101.0, 102.0, 200.0, 201.0, 202.0];
    let outs = run(
        &dir,
        false,
        |b| {
            let ids = b.input("ids", Elem::I64, fixed(&[1, 5]));
            let img = b.input(
                "img",
                Elem::F32,
                vec![Dim::Fixed(1), Dim::Named("n".into()), Dim::Fixed(3)],
            );
            let tok = b.input("tok", Elem::F32, fixed(&[1, 5, 3]));
            let e = blocks::scatter_image_embeds(b, &ids, &img, &tok, 9, None);
            b.output(&e, "embeds", Elem::F32, fixed(&[1, 5, 3]));
        },
        vec![
            ("ids", i64_input(&[1, 5], ids)),
            ("img", f32_input(&[1, 2, 3], img)),
            ("tok", f32_input(&[1, 5, 3], tok)),
        ],
    );
    let want = [
        0.0, 1.0, 2.0, 100.0, 101.0, 102.0, 200.0, 201.0, 202.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0,
    ];
    assert_near("scattered embeddings", &outs[0], &want, 0.0);
}

#[test]
fn only_the_image_slots_take_image_embeddings() {
    // A decoder row: two image slots (positions 0 and 1), a text token, then a generated
    // token that happens to be the image token's id (position 3): it keeps its own
    // embedding, with one or with no image embeddings fed (a decode step feeds none).
    let dir = checkpoint("scatter_slots", &[]);
    let ids = vec![9i64, 9, 4, 9];
    let tok: Vec<f32> = (0..8).map(|i| i as f32).collect();
    let build = |b: &mut Builder| {
        let ids = b.input("ids", Elem::I64, fixed(&[1, 4]));
        let pos = b.input("pos", Elem::I64, fixed(&[1, 4]));
        let img =
            b.input("img", Elem::F32, vec![Dim::Fixed(1), Dim::Named("n".into()), Dim::Fixed(2)]);
        let tok = b.input("tok", Elem::F32, fixed(&[1, 4, 2]));
        let e = blocks::scatter_image_embeds(b, &ids, &img, &tok, 9, Some((&pos, 2)));
        b.output(&e, "embeds", Elem::F32, fixed(&[1, 4, 2]));
    };
    let outs = run(
        &dir,
        false,
        build,
        vec![
            ("ids", i64_input(&[1, 4], ids)),
            ("pos", i64_input(&[1, 4], vec![0, 1, 2, 3])),
            ("img", f32_input(&[1, 2, 2], vec![100.0, 101.0, 200.0, 201.0])),
            ("tok", f32_input(&[1, 4, 2], tok)),
        ],
    );
    assert_near("prompt", &outs[0], &[100.0, 101.0, 200.0, 201.0, 4.0, 5.0, 6.0, 7.0], 0.0);
    // The step alone: the image token's id at position 3, no image embeddings.
    let outs = run(
        &dir,
        false,
        |b| {
            let ids = b.input("ids", Elem::I64, fixed(&[1, 1]));
            let pos = b.input("pos", Elem::I64, fixed(&[1, 1]));
            let img = b.input(
                "img",
                Elem::F32,
                vec![Dim::Fixed(1), Dim::Named("n".into()), Dim::Fixed(2)],
            );
            let tok = b.input("tok", Elem::F32, fixed(&[1, 1, 2]));
            let e = blocks::scatter_image_embeds(b, &ids, &img, &tok, 9, Some((&pos, 2)));
            b.output(&e, "embeds", Elem::F32, fixed(&[1, 1, 2]));
        },
        vec![
            ("ids", i64_input(&[1, 1], vec![9])),
            ("pos", i64_input(&[1, 1], vec![3])),
            ("img", f32_input(&[1, 0, 2], vec![])),
            ("tok", f32_input(&[1, 1, 2], vec![6.0, 7.0])),
        ],
    );
    assert_near("step", &outs[0], &[6.0, 7.0], 0.0);
}

#[test]
fn device_token_selection_takes_the_first_of_tied_logits() {
    // next_token is the lowest id among a row's largest logits (torch.argmax), whatever
    // order a kernel would break ties in; top_k [1] is fed straight to TopK.
    let dir = checkpoint("select", &[]);
    let logits = vec![
        1.0, 5.0, 5.0, 2.0, 5.0, // row 0: ties at 1, 2 and 4
        -3.0, -1.0, -2.0, -1.0, -7.0, // row 1: ties at 1 and 3
        9.0, 0.0, 0.0, 0.0, 9.0, // row 2: ties at 0 and 4
    ];
    let outs = run(
        &dir,
        false,
        |b| {
            let l = b.input("logits", Elem::F32, fixed(&[3, 1, 5]));
            blocks::select_tokens(b, &l, "/select", 5);
        },
        vec![
            ("logits", f32_input(&[3, 1, 5], logits)),
            ("top_k", Tensor::from_array(ndarray::arr1(&[2i64])).unwrap().into_dyn()),
        ],
    );
    assert_near("next_token", &outs[0], &[1.0, 1.0, 0.0], 0.0);
    // top_ids, the second output after the log-probabilities: two per row.
    assert_eq!(outs[2].shape(), [3, 2]);
}

#[test]
fn t5_relative_position_buckets_are_transformers() {
    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("blocks").join("t5_buckets.json")).unwrap(),
    )
    .unwrap();
    let c = blip2_export::config::T5Config::default();
    assert_eq!((c.relative_attention_num_buckets, c.relative_attention_max_distance), (32, 128));
    for (name, bidirectional) in [("bidirectional", true), ("causal", false)] {
        let want: Vec<i64> =
            doc[name].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        assert_eq!(blip2_export::t5::bucket_table(&c, bidirectional), want, "{name} buckets");
    }
}
