//! Image-text retrieval exports (Blip2ForImageTextRetrieval) against transformers'
//! recorded outputs (scripts/make_retrieval_fixtures.py): each graph alone, then the
//! runtime end to end from the photos, in fp32 within 1e-5 of each output's scale; the
//! fp16 export's agreement is measured and bounded (docs/retrieval.md).

use blip2_ort_suite::{fixture, max_abs_diff, photo, read_npy, session_factory, temp_dir};
use blip2_runtime::retrieval::{itc, match_probability, ImageFeatures, RetrievalModel};
use ndarray::{Array2, Array3, ArrayD, Axis, Ix3};

/// The retrieval fixtures: transformers 5 layout with image_token_index and 224 px
/// images; older sharded layout without it and 60 px images.
const RETRIEVAL: &[&str] = &["itm-tiny", "itm-tiny-sharded"];

/// Exports fixture `name` into a folder of its own for `test` (tests run in parallel).
fn export(name: &str, dtype: blip2_core::Dtype, test: &str) -> std::path::PathBuf {
    let out = temp_dir(&format!("retrieval-{test}-{name}-{}", dtype.name())).join("export");
    let opts =
        blip2_export::ExportOptions { dtype, source_label: name.into(), ..Default::default() };
    let exported = blip2_export::export_any(
        &fixture(name).join("checkpoint"),
        &out,
        &opts,
        &mut blip2_export::NoProgress,
    )
    .unwrap();
    assert_eq!(exported.family(), "retrieval");
    out
}

struct Reference {
    photos: Vec<String>,
    texts: Vec<String>,
    token_ids: Vec<Vec<i64>>,
    image_features: ArrayD<f32>,
    image_embeds: ArrayD<f32>,
    text_embeds: ArrayD<f32>,
    itm: ArrayD<f32>,
    itm_logits: ArrayD<f32>,
    itc: ArrayD<f32>,
}

fn reference(name: &str) -> Reference {
    let d = fixture(name).join("reference");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("reference.json")).unwrap()).unwrap();
    let strs = |k: &str| -> Vec<String> {
        j[k].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
    };
    Reference {
        photos: strs("photos"),
        texts: strs("texts"),
        token_ids: j["token_ids"].as_array().unwrap().iter().map(blip2_ort_suite::ids).collect(),
        image_features: read_npy(&d.join("image_features.npy")),
        image_embeds: read_npy(&d.join("image_embeds.npy")),
        text_embeds: read_npy(&d.join("text_embeds.npy")),
        itm: read_npy(&d.join("itm.npy")),
        itm_logits: read_npy(&d.join("itm_logits.npy")),
        itc: read_npy(&d.join("itc.npy")),
    }
}

/// Max abs difference over the reference's scale.
fn rel_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    let (d, s) = max_abs_diff(a, b);
    d / s.max(1e-6)
}

fn assert_within(what: &str, a: &ArrayD<f32>, b: &ArrayD<f32>, tol: f32) {
    let r = rel_diff(a, b);
    assert!(
        r.is_finite() && r <= tol,
        "{what}: max abs diff is {r:e} of the reference's scale, over {tol:e}"
    );
}

/// Everything the runtime computes for the reference photos and texts: image features,
/// image embeddings, text embeddings, ITM logits [photos, texts, 2], ITC [photos, texts].
struct Computed {
    features: Array3<f32>,
    image_embeds: Array3<f32>,
    text_embeds: Array2<f32>,
    itm_logits: Array3<f32>,
    itm: Array2<f32>,
    itc: Array2<f32>,
}

fn compute(m: &mut RetrievalModel, r: &Reference, feats: Option<ImageFeatures>) -> Computed {
    let feats = feats.unwrap_or_else(|| {
        let images: Vec<_> = r.photos.iter().map(|p| m.load_image(&photo(p)).unwrap()).collect();
        m.image_features(m.pixels(&images).unwrap()).unwrap()
    });
    let image_embeds = m.embed_image_features(&feats).unwrap();
    let batch = m.tokenize(&r.texts).unwrap();
    let text_embeds = m.embed_text_batch(&batch).unwrap();
    let (n, t) = (r.photos.len(), r.texts.len());
    let mut itm_logits = Array3::zeros((n, t, 2));
    let mut itm = Array2::zeros((n, t));
    let mut scores = Array2::zeros((n, t));
    for i in 0..n {
        let l = m.itm_logits(&feats, i, &batch).unwrap();
        itm_logits.index_axis_mut(Axis(0), i).assign(&l);
        for j in 0..t {
            itm[[i, j]] = match_probability(l[[j, 0]], l[[j, 1]]);
            scores[[i, j]] = itc(image_embeds.index_axis(Axis(0), i), text_embeds.row(j));
        }
    }
    Computed { features: feats.to_f32(), image_embeds, text_embeds, itm_logits, itm, itc: scores }
}

#[test]
fn every_retrieval_graph_matches_transformers() {
    for &name in RETRIEVAL {
        let dir = export(name, blip2_core::Dtype::Fp32, "graphs");
        let r = reference(name);
        let mut m = RetrievalModel::load(&dir, &mut session_factory()).unwrap();

        // Tokens: [CLS] text [SEP] as the processor gives them, image tokens stripped.
        let batch = m.tokenize(&r.texts).unwrap();
        for (i, want) in r.token_ids.iter().enumerate() {
            let got: Vec<i64> = batch
                .ids
                .row(i)
                .iter()
                .zip(batch.mask.row(i))
                .filter(|(_, &k)| k == 1)
                .map(|(&x, _)| x)
                .collect();
            assert_eq!(&got, want, "{name}: token ids of {:?}", r.texts[i]);
        }

        // The Q-Former graphs fed transformers' own image features, each judged alone.
        let feats =
            ImageFeatures::F32(r.image_features.clone().into_dimensionality::<Ix3>().unwrap());
        let c = compute(&mut m, &r, Some(feats));
        assert_within(
            &format!("{name}: image embeddings"),
            &c.image_embeds.into_dyn(),
            &r.image_embeds,
            1e-5,
        );
        assert_within(
            &format!("{name}: text embeddings"),
            &c.text_embeds.into_dyn(),
            &r.text_embeds,
            1e-5,
        );
        assert_within(
            &format!("{name}: ITM logits"),
            &c.itm_logits.into_dyn(),
            &r.itm_logits,
            1e-5,
        );
        assert_within(&format!("{name}: ITM probabilities"), &c.itm.into_dyn(), &r.itm, 1e-5);
        assert_within(&format!("{name}: ITC scores"), &c.itc.into_dyn(), &r.itc, 1e-5);

        // End to end from the photos: preprocessing, the vision encoder, then the rest.
        let c = compute(&mut m, &r, None);
        assert_within(
            &format!("{name}: image features"),
            &c.features.into_dyn(),
            &r.image_features,
            1e-5,
        );
        assert_within(
            &format!("{name}: image embeddings from photos"),
            &c.image_embeds.into_dyn(),
            &r.image_embeds,
            1e-5,
        );
        assert_within(&format!("{name}: ITM from photos"), &c.itm.into_dyn(), &r.itm, 1e-5);
        assert_within(&format!("{name}: ITC from photos"), &c.itc.into_dyn(), &r.itc, 1e-5);
    }
}

#[test]
fn texts_alone_equal_texts_in_a_padded_batch() {
    let name = "itm-tiny";
    let dir = export(name, blip2_core::Dtype::Fp32, "padding");
    let r = reference(name);
    let mut m = RetrievalModel::load(&dir, &mut session_factory()).unwrap();
    let all = m.embed_texts(&r.texts).unwrap();
    for (i, t) in r.texts.iter().enumerate() {
        let one = m.embed_texts(std::slice::from_ref(t)).unwrap();
        assert_within(
            &format!("{t:?} alone"),
            &one.row(0).to_owned().into_dyn(),
            &all.row(i).to_owned().into_dyn(),
            1e-5,
        );
    }
}

/// fp16 vision encoder (the Q-Former graphs stay fp32, as transformers keeps them) against
/// transformers' fp32 outputs. Prints the measured agreement (`-- --nocapture`); the
/// bound is the documented one in docs/retrieval.md.
#[test]
fn fp16_export_agreement_is_measured() {
    for &name in RETRIEVAL {
        let dir = export(name, blip2_core::Dtype::Fp16, "fp16");
        let r = reference(name);
        let mut m = RetrievalModel::load(&dir, &mut session_factory()).unwrap();
        let c = compute(&mut m, &r, None);
        let rows = [
            ("image features", rel_diff(&c.features.into_dyn(), &r.image_features)),
            ("image embeddings", rel_diff(&c.image_embeds.into_dyn(), &r.image_embeds)),
            ("text embeddings", rel_diff(&c.text_embeds.into_dyn(), &r.text_embeds)),
            ("ITM probabilities", max_abs_diff(&c.itm.into_dyn(), &r.itm).0),
            ("ITC scores", max_abs_diff(&c.itc.into_dyn(), &r.itc).0),
        ];
        for (what, d) in rows {
            println!("fp16 {name}: {what}: {d:.2e}");
            assert!(
                d.is_finite() && d <= 5e-3,
                "fp16 {name}: {what} off by {d:e}, over the documented 5e-3"
            );
        }
    }
}

#[test]
fn each_loader_names_the_other_kind_of_export() {
    let dir = export("itm-tiny", blip2_core::Dtype::Fp32, "kinds");
    let e = blip2_runtime::model::Blip2Model::load(&dir, &mut session_factory())
        .err()
        .expect("a retrieval export is no captioning model");
    let msg = e.to_string();
    assert!(
        msg.contains("image-text retrieval export")
            && msg.contains("itm, embed-image, embed-text and rank"),
        "{msg}"
    );

    let cap = temp_dir("retrieval-captioning").join("export");
    blip2_export::export(
        &fixture("opt-tiny").join("checkpoint"),
        &cap,
        &Default::default(),
        &mut blip2_export::NoProgress,
    )
    .unwrap();
    let e = RetrievalModel::load(&cap, &mut session_factory())
        .err()
        .expect("a captioning export is no retrieval model");
    let msg = e.to_string();
    assert!(
        msg.contains("captioning export (family \"opt\")")
            && msg.contains("caption, vqa, chat and batch"),
        "{msg}"
    );

    // The captioning exporter refuses a retrieval checkpoint by name.
    let e = blip2_export::export(
        &fixture("itm-tiny").join("checkpoint"),
        &temp_dir("retrieval-refused").join("x"),
        &Default::default(),
        &mut blip2_export::NoProgress,
    )
    .expect_err("export() is for captioning checkpoints");
    assert!(e.to_string().contains("image-text retrieval checkpoint"), "{e}");
}

/// A copy of fixture `name`'s checkpoint with `edit` applied to its config.json.
fn edited_checkpoint(
    name: &str,
    test: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> std::path::PathBuf {
    let dir = temp_dir(&format!("retrieval-{test}")).join("checkpoint");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(fixture(name).join("checkpoint")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, cfg.to_string()).unwrap();
    dir
}

#[test]
fn a_config_without_architectures_is_recognized_by_its_weights() {
    let ck = edited_checkpoint("itm-tiny-sharded", "no-architectures", |c| {
        c.as_object_mut().unwrap().remove("architectures");
    });
    assert!(blip2_export::is_retrieval(&ck).unwrap());
    let out = ck.parent().unwrap().join("export");
    let e = blip2_export::export_any(&ck, &out, &Default::default(), &mut blip2_export::NoProgress)
        .unwrap();
    assert_eq!(e.family(), "retrieval");
    // A captioning checkpoint stays one.
    assert!(!blip2_export::is_retrieval(&fixture("opt-tiny").join("checkpoint")).unwrap());
}

#[test]
fn retrieval_export_errors_name_the_problem() {
    let src = fixture("itm-tiny").join("checkpoint");
    let out = temp_dir("retrieval-export-errors").join("export");
    let run = |opts: &blip2_export::ExportOptions| {
        blip2_export::export_any(&src, &out, opts, &mut blip2_export::NoProgress)
            .expect_err("refused")
            .to_string()
    };
    let e = run(&blip2_export::ExportOptions {
        quantize: Some(blip2_core::Quantization::Int8),
        ..Default::default()
    });
    assert!(e.contains("--quantize") && e.contains("not quantized"), "{e}");
    let e = run(&blip2_export::ExportOptions {
        target: blip2_core::Target::Cuda,
        ..Default::default()
    });
    assert!(e.contains("--target") && e.contains("portable"), "{e}");
    assert!(!out.exists(), "nothing is written when the export is refused");

    // A Q-Former without its text feed-forward (use_qformer_text_input false) cannot
    // embed text: the missing tensor is named.
    let ck = temp_dir("retrieval-no-text-ffn").join("checkpoint");
    std::fs::create_dir_all(&ck).unwrap();
    for f in ["config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), ck.join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let t = safetensors::SafeTensors::deserialize(&bytes).unwrap().tensors();
    let kept: Vec<_> = t.into_iter().filter(|(n, _)| !n.contains(".intermediate.dense")).collect();
    safetensors::serialize_to_file(kept, None, &ck.join("model.safetensors")).unwrap();
    let e = blip2_export::export_any(
        &ck,
        &ck.parent().unwrap().join("export"),
        &Default::default(),
        &mut blip2_export::NoProgress,
    )
    .expect_err("text feed-forward missing")
    .to_string();
    assert!(e.contains("tensor qformer.encoder.layer.0.intermediate.dense.weight: missing"), "{e}");
}
