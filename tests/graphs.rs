//! Graph-level parity: each tiny checkpoint is exported in fp32 and every graph's outputs
//! are compared with what transformers computed (scripts/make_fixtures.py): image
//! features, projected query embeddings, LM logits for the prefill and two cached
//! decode steps. Tolerance: max abs difference at most 1e-4 of the output's scale.

use blip2_ort_suite::{assert_close, fixture, read_npy, session_factory, temp_dir, CHECKPOINTS};
use blip2_runtime::model::{f32_value, Blip2Model};
use blip2_runtime::state::opt::OptState;
use ndarray::{Array4, ArrayD, IxDyn};

fn export(name: &str, force_external: bool) -> std::path::PathBuf {
    let opts =
        blip2_export::ExportOptions { force_external_data: force_external, ..Default::default() };
    export_with(name, &format!("graphs-{name}-{force_external}"), &opts)
}

fn export_with(name: &str, test: &str, opts: &blip2_export::ExportOptions) -> std::path::PathBuf {
    let out = temp_dir(test).join("export");
    blip2_export::export(
        &fixture(name).join("checkpoint"),
        &out,
        opts,
        &mut blip2_export::NoProgress,
    )
    .unwrap();
    out
}

/// Every OPT graph output of the export in `dir` against transformers' fp32 output:
/// (what, max abs difference, the reference's scale, whether the last axis' argmax agrees).
fn errors(name: &str, dir: &std::path::Path) -> Vec<(String, f32, f32, bool)> {
    let refd = fixture(name).join("reference");
    let mut model = Blip2Model::load(dir, &mut session_factory()).unwrap();
    let mut errs = Vec::new();
    let mut record = |what: &str, got: &ArrayD<f32>, want: &ArrayD<f32>| {
        let (d, s) = blip2_ort_suite::max_abs_diff(got, want);
        errs.push((format!("{name}: {what}"), d, s, argmax_last(got) == argmax_last(want)));
    };

    let px = read_npy(&refd.join("pixel_values.npy"));
    let px: Array4<f32> = px.into_dimensionality().unwrap();
    let feats = model.vision_features(px).unwrap();
    let ref_feats = read_npy(&refd.join("image_features.npy"));
    record("image features", &feats, &ref_feats);

    // The Q-Former is fed transformers' own features, so each graph is judged alone.
    let embeds = model.qformer_embeds(ref_feats.clone()).unwrap();
    let ref_embeds = read_npy(&refd.join("image_embeds.npy"));
    record("image embeds", &embeds, &ref_embeds);

    let graphs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(refd.join("graphs.json")).unwrap()).unwrap();
    let steps = graphs["lm_steps"].as_array().unwrap();
    let ids = |s: &serde_json::Value, k: &str| -> Vec<i64> {
        s[k].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect()
    };
    let first = &steps[0];
    let q = ref_embeds.shape()[1];
    let d = ref_embeds.shape()[2];
    let img: Vec<f32> = ref_embeds.iter().take(q * d).copied().collect();
    let img = ArrayD::from_shape_vec(IxDyn(&[1, q, d]), img).unwrap();
    let img = blip2_runtime::model::lm_value(&model, img).unwrap();
    let (mut state, logits) = OptState::prefill(
        &mut model,
        &[ids(first, "input_ids")],
        &[ids(first, "attention_mask")],
        img,
    )
    .unwrap();
    let ref_logits = read_npy(&refd.join(first["logits"].as_str().unwrap()));
    record("prefill logits", &logits.into_dyn(), &ref_logits);
    for (k, s) in steps.iter().enumerate().skip(1) {
        let logits = state.step(&mut model, &ids(s, "input_ids")).unwrap();
        let ref_logits = read_npy(&refd.join(s["logits"].as_str().unwrap()));
        let ref_logits = ref_logits.into_shape_with_order(IxDyn(&[1, logits.ncols()])).unwrap();
        record(&format!("decode step {k} logits"), &logits.into_dyn(), &ref_logits);
    }
    errs
}

fn check(name: &str, force_external: bool) {
    let dir = export(name, force_external);
    for (what, d, s, _) in errors(name, &dir) {
        assert!(
            d.is_finite() && d <= 1e-4 * s.max(1e-6),
            "{what}: max abs diff {d:e} exceeds 1e-4 of scale {s}"
        );
    }
}

#[test]
fn opt_fp16_agrees_with_fp32_reference() {
    // fp16 vision encoder and language model (the Q-Former stays fp32, as transformers
    // keeps it): every output within 1% of its scale of transformers' fp32 output, and
    // the same most likely token.
    for name in CHECKPOINTS {
        let opts =
            blip2_export::ExportOptions { dtype: blip2_core::Dtype::Fp16, ..Default::default() };
        let dir = export_with(name, &format!("graphs-fp16-{name}"), &opts);
        let errs = errors(name, &dir);
        // Vision, Q-Former, the prefill and three decode steps (the third fed the image
        // token's id).
        assert_eq!(errs.len(), 6, "{name}: every graph output compared");
        for (what, d, s, same) in errs {
            eprintln!("{what}: fp16 error {d:.2e} of scale {s:.3}");
            assert!(d <= 1e-2 * s, "{what}: fp16 error {d} vs scale {s}");
            assert!(same, "{what}: fp16 picks another token");
        }
    }
}

#[test]
fn every_graph_matches_transformers() {
    for name in CHECKPOINTS {
        check(name, false);
    }
}

#[test]
fn external_data_layout_matches_too() {
    check("opt-tiny", true);
    let dir = export("opt-tiny", true);
    assert!(dir.join("language_model.onnx.data").exists());
    let m = blip2_core::Manifest::load(&dir).unwrap();
    assert_eq!(m.graphs.language_model.external_data.as_deref(), Some("language_model.onnx.data"));
}

/// Flan-T5 shaped checkpoint: vision, Q-Former, text encoder, then the decoder from
/// decoder_start_token_id and two cached steps.
fn check_t5(dtype: blip2_core::Dtype) -> Vec<(f32, f32, bool)> {
    let name = "t5-tiny";
    let out = temp_dir(&format!("graphs-t5-{}", dtype.name())).join("export");
    let opts = blip2_export::ExportOptions { dtype, ..Default::default() };
    blip2_export::export(
        &fixture(name).join("checkpoint"),
        &out,
        &opts,
        &mut blip2_export::NoProgress,
    )
    .unwrap();
    let refd = fixture(name).join("reference");
    let mut model = Blip2Model::load(&out, &mut session_factory()).unwrap();
    let graphs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(refd.join("graphs.json")).unwrap()).unwrap();
    let ints = |v: &serde_json::Value| -> Vec<i64> {
        v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
    };
    let ids = ints(&graphs["input_ids"]);
    let mask = ints(&graphs["attention_mask"]);
    let ref_embeds = read_npy(&refd.join("image_embeds.npy"));
    let (q, d) = (ref_embeds.shape()[1], ref_embeds.shape()[2]);
    let img =
        ArrayD::from_shape_vec(IxDyn(&[1, q, d]), ref_embeds.iter().take(q * d).copied().collect())
            .unwrap();
    let mut errs = Vec::new();
    let mut record = |what: &str, a: &ArrayD<f32>, b: &ArrayD<f32>| {
        let (diff, scale) = blip2_ort_suite::max_abs_diff(a, b);
        let same_argmax = a.shape().last() == b.shape().last() && argmax_last(a) == argmax_last(b);
        if dtype == blip2_core::Dtype::Fp32 {
            assert_close(&format!("t5-tiny: {what}"), a, b);
        }
        errs.push((diff, scale, same_argmax));
    };
    let px: Array4<f32> = read_npy(&refd.join("pixel_values.npy")).into_dimensionality().unwrap();
    let feats = model.vision_features(px).unwrap();
    record("image features", &feats, &read_npy(&refd.join("image_features.npy")));
    let n = ids.len();
    let hidden = model
        .text_encoder_hidden(
            ndarray::Array2::from_shape_vec((1, n), ids.clone()).unwrap(),
            ndarray::Array2::from_shape_vec((1, n), mask.clone()).unwrap(),
            blip2_runtime::model::lm_value(&model, img.clone()).unwrap(),
        )
        .unwrap();
    record("encoder hidden states", &hidden, &read_npy(&refd.join("encoder_hidden_states.npy")));
    let steps = graphs["decoder_steps"].as_array().unwrap();
    let start = ints(&steps[0]["decoder_input_ids"])[0];
    let (mut state, logits) =
        blip2_runtime::state::t5::T5State::prefill(&mut model, &[ids], &[mask], img, start, 20)
            .unwrap();
    let mut logits = logits;
    for (k, s) in steps.iter().enumerate() {
        if k > 0 {
            logits = state.step(&mut model, &ints(&s["decoder_input_ids"])).unwrap();
        }
        let r = read_npy(&refd.join(s["logits"].as_str().unwrap()));
        let r = r.into_shape_with_order(IxDyn(&[1, logits.ncols()])).unwrap();
        record(&format!("decoder step {k} logits"), &logits.clone().into_dyn(), &r);
    }
    errs
}

fn argmax_last(a: &ArrayD<f32>) -> Vec<usize> {
    let v = *a.shape().last().unwrap();
    a.as_slice()
        .unwrap()
        .chunks(v)
        .map(|row| {
            row.iter()
                .enumerate()
                .fold((0, f32::MIN), |m, (i, &x)| if x > m.1 { (i, x) } else { m })
                .0
        })
        .collect()
}

#[test]
fn t5_graphs_match_transformers() {
    let errs = check_t5(blip2_core::Dtype::Fp32);
    assert_eq!(errs.len(), 5);
}

#[test]
fn t5_fp16_agrees_with_fp32_reference() {
    // fp16 keeps wo and the residual stream in fp32; its logits stay within 1% of the
    // reference's scale and pick the same tokens.
    let errs = check_t5(blip2_core::Dtype::Fp16);
    for (i, (diff, scale, same)) in errs.iter().enumerate().skip(2) {
        assert!(*diff <= 1e-2 * scale, "output {i}: fp16 error {diff} vs scale {scale}");
        assert!(same, "output {i}: fp16 picks another token");
    }
}

/// The language model on its own, fed the way any ONNX Runtime deployment would feed it:
/// with `logits_to_keep` = 1 the prefill returns one position of logits, transformers'
/// last one; left out, it returns all of them (its default, 0).
#[test]
fn logits_to_keep_computes_the_last_positions_only() {
    use ort::value::{DynValue, Tensor};
    let name = "opt-tiny";
    let dir = temp_dir("graphs-logits-to-keep").join("export");
    blip2_export::export(
        &fixture(name).join("checkpoint"),
        &dir,
        &Default::default(),
        &mut blip2_export::NoProgress,
    )
    .unwrap();
    let m = blip2_core::Manifest::load(&dir).unwrap();
    let keep_info = m
        .graphs
        .language_model
        .inputs
        .iter()
        .find(|t| t.name == "logits_to_keep")
        .expect("listed in the manifest");
    assert!(keep_info.optional && keep_info.shape.is_empty());
    // Graph outputs (the KV cache above all) are named on the nodes that make them, not
    // copied by an Identity node at every step.
    let lm = std::fs::read(dir.join("language_model.onnx")).unwrap();
    assert!(!lm.windows(8).any(|w| w == b"Identity"), "an Identity node in the language model");

    let refd = fixture(name).join("reference");
    let graphs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(refd.join("graphs.json")).unwrap()).unwrap();
    let first = &graphs["lm_steps"][0];
    let vec_of = |k: &str| -> Vec<i64> {
        first[k].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect()
    };
    let (ids, mask) = (vec_of("input_ids"), vec_of("attention_mask"));
    let n = ids.len();
    assert!(mask.iter().all(|&m| m == 1), "the recorded prefill has no padding");
    let embeds = read_npy(&refd.join("image_embeds.npy"));
    let (q, d) = (embeds.shape()[1], embeds.shape()[2]);
    let img =
        ArrayD::from_shape_vec(IxDyn(&[1, q, d]), embeds.iter().take(q * d).copied().collect())
            .unwrap();
    let ref_logits = read_npy(&refd.join("prefill_logits.npy"));

    let mut session = session_factory()(
        blip2_runtime::model::GraphKind::LanguageModel,
        &dir.join("language_model.onnx"),
    )
    .unwrap();
    for keep in [Some(1i64), Some(3), None] {
        let mut feeds: Vec<(String, DynValue)> = vec![
            (
                "input_ids".into(),
                Tensor::from_array(ndarray::Array2::from_shape_vec((1, n), ids.clone()).unwrap())
                    .unwrap()
                    .into_dyn(),
            ),
            ("image_embeds".into(), Tensor::from_array(img.clone()).unwrap().into_dyn()),
            (
                "attention_mask".into(),
                Tensor::from_array(ndarray::Array2::from_shape_vec((1, n), mask.clone()).unwrap())
                    .unwrap()
                    .into_dyn(),
            ),
            (
                "position_ids".into(),
                Tensor::from_array(ndarray::Array2::from_shape_fn((1, n), |(_, j)| j as i64))
                    .unwrap()
                    .into_dyn(),
            ),
        ];
        for l in 0..m.text.num_layers {
            for kind in ["key", "value"] {
                let empty = ArrayD::<f32>::zeros(IxDyn(&[1, m.text.num_heads, 0, m.text.head_dim]));
                feeds.push((
                    format!("past_key_values.{l}.{kind}"),
                    Tensor::from_array(empty).unwrap().into_dyn(),
                ));
            }
        }
        if let Some(k) = keep {
            feeds.push((
                "logits_to_keep".into(),
                Tensor::from_array(ndarray::arr0(k)).unwrap().into_dyn(),
            ));
        }
        let out = session.run(feeds).unwrap();
        let logits = out["logits"].try_extract_array::<f32>().unwrap().to_owned();
        let kept = keep.map_or(n, |k| k as usize);
        assert_eq!(logits.shape(), &[1, kept, m.text.vocab_size], "logits_to_keep = {keep:?}");
        let want = ref_logits.slice(ndarray::s![.., n - kept.., ..]).to_owned().into_dyn();
        assert_close(&format!("{name}: prefill logits, logits_to_keep = {keep:?}"), &logits, &want);
    }
}

/// `blip2-ort bench` reports ONNX Runtime's arena peak as GPU memory on CUDA profiles
/// (`Blip2Model::allocator_peak_bytes`); the statistics call is checked here on a CPU
/// session with ONNX Runtime's CPU arena on.
#[test]
fn allocator_statistics_report_the_peak() {
    use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
    use ort::session::Session;
    use ort::value::Tensor;
    let env = blip2_runtime::ort_env::environment().unwrap();
    let dir = temp_dir("graphs-allocator-stats").join("export");
    blip2_export::export(
        &fixture("opt-tiny").join("checkpoint"),
        &dir,
        &Default::default(),
        &mut blip2_export::NoProgress,
    )
    .unwrap();
    let mut session =
        Session::builder(env).unwrap().commit_from_file(dir.join("vision_encoder.onnx")).unwrap();
    let cpu = MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Arena, MemoryType::Default)
        .unwrap();
    let px = read_npy(&fixture("opt-tiny").join("reference/pixel_values.npy"));
    let out = session.run(ort::inputs!["pixel_values" => Tensor::from_array(px).unwrap()]).unwrap();
    let feats = out["image_features"].try_extract_array::<f32>().unwrap().len() * 4;
    drop(out);
    let peak = blip2_runtime::model::allocator_peak(&session, &cpu)
        .expect("the CPU arena keeps statistics");
    assert!(peak as usize >= feats, "peak {peak} bytes, below the {feats}-byte output");
}

/// Generation's prefill (`OptState::prefill_last`) feeds `logits_to_keep` = 1 when the
/// export lists that input and slices the full logits for exports made before it; both
/// give transformers' last-position logits.
#[test]
fn prefill_last_matches_with_and_without_logits_to_keep() {
    let name = "opt-tiny";
    let dir = temp_dir("graphs-prefill-last").join("export");
    blip2_export::export(
        &fixture(name).join("checkpoint"),
        &dir,
        &Default::default(),
        &mut blip2_export::NoProgress,
    )
    .unwrap();
    let refd = fixture(name).join("reference");
    let graphs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(refd.join("graphs.json")).unwrap()).unwrap();
    let first = &graphs["lm_steps"][0];
    let vec_of = |k: &str| -> Vec<i64> {
        first[k].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect()
    };
    let embeds = read_npy(&refd.join("image_embeds.npy"));
    let (q, d) = (embeds.shape()[1], embeds.shape()[2]);
    let img =
        ArrayD::from_shape_vec(IxDyn(&[1, q, d]), embeds.iter().take(q * d).copied().collect())
            .unwrap();
    let ref_logits = read_npy(&refd.join("prefill_logits.npy"));
    let n = ref_logits.shape()[1];
    let want = ref_logits.slice(ndarray::s![.., n - 1, ..]).to_owned().into_dyn();

    let manifest = dir.join("blip2_manifest.json");
    for older in [false, true] {
        if older {
            // An export from before logits_to_keep: its manifest does not list the input.
            let mut m: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
            m["graphs"]["language_model"]["inputs"]
                .as_array_mut()
                .unwrap()
                .retain(|t| t["name"] != "logits_to_keep");
            std::fs::write(&manifest, m.to_string()).unwrap();
        }
        let mut model = Blip2Model::load(&dir, &mut session_factory()).unwrap();
        assert_eq!(model.lm_takes_logits_to_keep(), !older);
        let (_, logits) = OptState::prefill_last(
            &mut model,
            &[vec_of("input_ids")],
            &[vec_of("attention_mask")],
            f32_value(img.clone()).unwrap(),
        )
        .unwrap();
        assert_close(
            &format!("{name}: last-position prefill logits (older export: {older})"),
            &logits.into_dyn(),
            &want,
        );
    }
}
