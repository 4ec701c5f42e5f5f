//! Graph-level parity: each tiny checkpoint is exported in fp32 and every graph's outputs
//! are compared with what transformers computed (scripts/make_fixtures.py): image
//! features, projected query embeddings, LM logits for the prefill and two cached
//! decode steps. Tolerance: max abs difference at most 1e-4 of the output's scale.

use blip2_ort_suite::{assert_close, fixture, read_npy, session_factory, temp_dir, CHECKPOINTS};
use blip2_runtime::model::{f32_value, Blip2Model, LmState};
use ndarray::{Array4, ArrayD, IxDyn};

fn export(name: &str, force_external: bool) -> std::path::PathBuf {
    let out = temp_dir(&format!("graphs-{name}-{force_external}")).join("export");
    let opts = blip2_export::ExportOptions { force_external_data: force_external, ..Default::default() };
    blip2_export::export(&fixture(name).join("checkpoint"), &out, &opts, &mut blip2_export::NoProgress).unwrap();
    out
}

fn check(name: &str, force_external: bool) {
    let dir = export(name, force_external);
    let refd = fixture(name).join("reference");
    let mut model = Blip2Model::load(&dir, &mut session_factory()).unwrap();

    let px = read_npy(&refd.join("pixel_values.npy"));
    let px: Array4<f32> = px.into_dimensionality().unwrap();
    let feats = model.vision_features(px).unwrap();
    let ref_feats = read_npy(&refd.join("image_features.npy"));
    assert_close(&format!("{name}: image features"), &feats, &ref_feats);

    // The Q-Former is fed transformers' own features, so each graph is judged alone.
    let embeds = model.qformer_embeds(ref_feats.clone()).unwrap();
    let ref_embeds = read_npy(&refd.join("image_embeds.npy"));
    assert_close(&format!("{name}: image embeds"), &embeds, &ref_embeds);

    let graphs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(refd.join("graphs.json")).unwrap()).unwrap();
    let steps = graphs["lm_steps"].as_array().unwrap();
    let ids = |s: &serde_json::Value, k: &str| -> Vec<i64> { s[k].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect() };
    let first = &steps[0];
    let q = ref_embeds.shape()[1];
    let d = ref_embeds.shape()[2];
    let img: Vec<f32> = ref_embeds.iter().take(q * d).copied().collect();
    let img = ArrayD::from_shape_vec(IxDyn(&[1, q, d]), img).unwrap();
    let (mut state, logits) =
        LmState::prefill(&mut model, &[ids(first, "input_ids")], &[ids(first, "attention_mask")], f32_value(img).unwrap()).unwrap();
    let ref_logits = read_npy(&refd.join(first["logits"].as_str().unwrap()));
    assert_close(&format!("{name}: prefill logits"), &logits.into_dyn(), &ref_logits);
    for (k, s) in steps.iter().enumerate().skip(1) {
        let logits = state.step(&ids(s, "input_ids")).unwrap();
        let ref_logits = read_npy(&refd.join(s["logits"].as_str().unwrap()));
        let ref_logits = ref_logits.into_shape_with_order(IxDyn(&[1, logits.ncols()])).unwrap();
        assert_close(&format!("{name}: decode step {k} logits"), &logits.into_dyn(), &ref_logits);
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
