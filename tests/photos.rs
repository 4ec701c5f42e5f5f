//! Real-photo loading against transformers' `generate()` on the tiny checkpoints, token for
//! token: JPEG variants (EXIF orientation 3 and 6, CMYK, grayscale, progressive, quality
//! 60) loaded as `transformers.image_utils.load_image(path)` loads them, then captioned
//! with and without a prompt (tests/fixtures/*/reference/photos.json, made by
//! scripts/make_photo_fixtures.py).

use blip2_ort_suite::{fixture, run_case, session_factory, temp_dir, ALL_CHECKPOINTS};
use blip2_runtime::pipeline::Pipeline;
use serde_json::Value;

#[test]
fn photo_variants_caption_as_transformers_does() {
    for name in ALL_CHECKPOINTS {
        let out = temp_dir(&format!("photos-{name}")).join("export");
        blip2_export::export(
            &fixture(name).join("checkpoint"),
            &out,
            &Default::default(),
            &mut blip2_export::NoProgress,
        )
        .unwrap();
        let mut p = Pipeline::load(&out, &mut session_factory()).unwrap();
        let path = fixture(name).join("reference/photos.json");
        let all: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cases = all["cases"].as_array().unwrap();
        assert!(cases.len() >= 12, "{name}: {} cases", cases.len());
        for case in cases {
            let (got, want) = run_case(&mut p, case);
            let got: Vec<Vec<i64>> = got.iter().map(|g| g.token_ids.clone()).collect();
            assert_eq!(got, want, "{name}/{}: token ids differ from transformers", case["name"]);
        }
    }
}
