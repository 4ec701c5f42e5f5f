//! Weight-only quantized exports (`--quantize int8|int4`) against transformers' fp32
//! reference: logit error of the LM prefill and token agreement over every recorded
//! generate() case. Quantization changes outputs by design; these tests bound how much
//! and print the numbers docs/PERFORMANCE.md reports.

use std::path::PathBuf;

use blip2_export::{ExportOptions, Quantize};
use blip2_ort_suite::{fixture, ids, max_abs_diff, read_npy, run_case, session_factory, temp_dir};
use blip2_runtime::model::{f32_value, Blip2Model, LmState};
use blip2_runtime::pipeline::Pipeline;
use ndarray::{ArrayD, IxDyn};
use serde_json::Value;

fn export(name: &str, q: Quantize) -> PathBuf {
    let out = temp_dir(&format!("quantize-{name}-{}", q.name())).join("export");
    let opts = ExportOptions { quantize: Some(q), ..Default::default() };
    blip2_export::export(&fixture(name).join("checkpoint"), &out, &opts, &mut blip2_export::NoProgress).unwrap();
    out
}

/// (prefill logit error / scale, agreeing tokens, total tokens)
fn measure(name: &str, q: Quantize) -> (f32, usize, usize) {
    let dir = export(name, q);
    let refd = fixture(name).join("reference");
    let mut model = Blip2Model::load(&dir, &mut session_factory()).unwrap();
    let m = model.manifest.clone();
    assert_eq!(m.quantization.as_deref(), Some(q.name()));
    let graphs: Value = serde_json::from_str(&std::fs::read_to_string(refd.join("graphs.json")).unwrap()).unwrap();
    let first = &graphs["lm_steps"][0];
    let e = read_npy(&refd.join("image_embeds.npy"));
    let (qn, d) = (e.shape()[1], e.shape()[2]);
    let img = ArrayD::from_shape_vec(IxDyn(&[1, qn, d]), e.iter().take(qn * d).copied().collect()).unwrap();
    let (_, logits) =
        LmState::prefill(&mut model, &[ids(&first["input_ids"])], &[ids(&first["attention_mask"])], f32_value(img).unwrap())
            .unwrap();
    let (diff, scale) = max_abs_diff(&logits.into_dyn(), &read_npy(&refd.join("prefill_logits.npy")));
    drop(model);

    let mut p = Pipeline::load(&dir, &mut session_factory()).unwrap();
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(refd.join("generate.json")).unwrap()).unwrap();
    let (mut same, mut total) = (0, 0);
    for case in cases["cases"].as_array().unwrap() {
        let (got, want) = run_case(&mut p, case);
        for (g, w) in got.iter().zip(&want) {
            same += g.token_ids.iter().zip(w).take_while(|(a, b)| a == b).count();
            total += w.len().max(g.token_ids.len());
        }
    }
    let rel = diff / scale;
    eprintln!("{name} {}: prefill logits max error {diff:.4} (scale {scale:.2}, {:.2}%); {same}/{total} tokens agree", q.name(), rel * 100.0);
    (rel, same, total)
}

#[test]
fn int8_weights_stay_close_to_fp32() {
    for name in ["opt-tiny-sharded", "opt-tiny"] {
        let (rel, same, total) = measure(name, Quantize::Int8);
        assert!(rel < 0.05, "{name}: int8 logits {:.2}% off", rel * 100.0);
        assert!(total > 100 && same * 2 >= total, "{name}: only {same}/{total} tokens agree");
    }
}

#[test]
fn int4_weights_run_and_report_their_agreement() {
    for name in ["opt-tiny-sharded", "opt-tiny"] {
        let (rel, _, total) = measure(name, Quantize::Int4);
        assert!(rel < 0.5, "{name}: int4 logits {:.2}% off", rel * 100.0);
        assert!(total > 100);
    }
}

#[test]
fn quantized_fp16_is_refused() {
    let out = temp_dir("quantize-fp16").join("export");
    let opts = ExportOptions { quantize: Some(Quantize::Int8), dtype: blip2_export::ExportDtype::Fp16, ..Default::default() };
    let e = blip2_export::export(&fixture("opt-tiny").join("checkpoint"), &out, &opts, &mut blip2_export::NoProgress).unwrap_err();
    assert!(e.to_string().contains("--quantize"), "{e}");
    assert!(!out.exists());
}
