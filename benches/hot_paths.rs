//! Criterion benches for the per-request work blip2-ort does itself, outside ONNX
//! Runtime's kernels: preprocessing a photo, tokenizing and assembling prompts, and the
//! bookkeeping around one decode step (on the tiny test checkpoint, whose graph runs in
//! microseconds, so the step's cost is mostly ours: inputs, binding, logits copy).
//!
//!     cargo bench --bench hot_paths            # all
//!     cargo bench --bench hot_paths -- decode  # one group
//!
//! Whole-model timings on real sizes are `blip2-ort bench` (docs/PERFORMANCE.md).

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use blip2_core::ImageConfig;
use blip2_ort_suite::{fixture, root, session_factory, temp_dir};
use blip2_runtime::model::{lm_value, Blip2Model};
use blip2_runtime::preprocess::{self, ImageLimits};
use blip2_runtime::prompt::{Chat, Prompter};
use blip2_runtime::state::opt::OptState;
use criterion::{criterion_group, criterion_main, Criterion};

/// The tiny OPT checkpoint exported once per bench run.
fn tiny_export() -> PathBuf {
    let out = temp_dir("bench-opt-tiny").join("export");
    blip2_export::export(
        &fixture("opt-tiny").join("checkpoint"),
        &out,
        &Default::default(),
        &mut blip2_export::NoProgress,
    )
    .expect("export the tiny checkpoint");
    out
}

/// BLIP-2's real preprocessing: 224x224, bicubic, CLIP mean and std.
fn blip2_image_config() -> ImageConfig {
    ImageConfig {
        height: 224,
        width: 224,
        do_resize: true,
        resample: 3,
        do_rescale: true,
        rescale_factor: 1.0 / 255.0,
        do_normalize: true,
        image_mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
        image_std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
        do_convert_rgb: true,
    }
}

fn bench_preprocess(c: &mut Criterion) {
    // rocket.jpg is the largest photo in tests/data (640x427).
    let path = root().join("tests/data/photos/rocket.jpg");
    let bytes = std::fs::read(&path).expect("read the photo");
    let cfg = blip2_image_config();
    let limits = ImageLimits::default();
    let img = preprocess::load_image_bytes(&bytes, "rocket.jpg", &limits).expect("decode");
    let mut g = c.benchmark_group("preprocess");
    g.bench_function("resize+normalize 640x427 -> 224x224", |b| {
        b.iter(|| preprocess::preprocess(black_box(&img), &cfg).unwrap())
    });
    g.bench_function("decode jpeg + resize + normalize", |b| {
        b.iter(|| {
            let img =
                preprocess::load_image_bytes(black_box(&bytes), "rocket.jpg", &limits).unwrap();
            preprocess::preprocess(&img, &cfg).unwrap()
        })
    });
    g.finish();
}

fn bench_prompts(c: &mut Criterion) {
    let dir = tiny_export();
    let manifest = blip2_core::Manifest::load(&dir).expect("manifest");
    let p = Prompter::load(&dir, &manifest).expect("tokenizer");
    let vqa = p.vqa_prompt("what is the man on the left holding in his hand?");
    let mut chat = Chat::default();
    for i in 0..4 {
        chat.push(
            &format!("what is in the picture number {i}?"),
            "a cat sitting on a red car in the street",
        );
    }
    let texts: Vec<Vec<i64>> = ["a photo of", "", vqa.as_str(), "a picture of two dogs"]
        .iter()
        .map(|t| p.text_ids(t).unwrap())
        .collect();
    let mut g = c.benchmark_group("prompt");
    g.bench_function("tokenize vqa prompt", |b| b.iter(|| p.check_fits(black_box(&vqa)).unwrap()));
    g.bench_function("chat prompt, 4 turns of history", |b| {
        b.iter(|| {
            let mut h = chat.clone();
            h.fit(&p, black_box("and what colour is the car?"), 20).unwrap()
        })
    });
    g.bench_function("assemble batch of 4 (left padding)", |b| {
        b.iter(|| p.assemble(black_box(&texts)))
    });
    g.bench_function("decode 20 tokens to text", |b| {
        let ids: Vec<i64> = (10..30).collect();
        b.iter(|| p.decode(black_box(&ids)).unwrap())
    });
    g.finish();
}

fn bench_decode_step(c: &mut Criterion) {
    if let Err(e) = blip2_runtime::ort_env::find_dylib() {
        eprintln!("skipping the decode benches: {e}");
        return;
    }
    let dir = tiny_export();
    let mut factory = session_factory();
    let mut model = Blip2Model::load(&dir, &mut factory).expect("load the tiny export");
    let manifest = model.manifest.clone();
    let prompter = Prompter::load(&dir, &manifest).expect("tokenizer");
    let size = manifest.image.height as usize;
    let pixels = ndarray::Array4::<f32>::from_shape_fn((1, 3, size, size), |(_, c, y, x)| {
        ((c + y + x) % 7) as f32 / 7.0
    });
    let embeds =
        blip2_runtime::model::to_f32(&model.encode_images(pixels).expect("encode")).expect("f32");
    let batch = prompter.assemble(&[prompter.text_ids("a photo of").unwrap()]);
    let mut g = c.benchmark_group("decode");
    // One step after the prefill (fresh state each time, so the context stays the same).
    g.bench_function("one step, tiny OPT, batch 1", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let e = lm_value(&model, embeds.clone()).unwrap();
                let (mut st, _) =
                    OptState::prefill_last(&mut model, &batch.ids, &batch.mask, e).unwrap();
                let t = Instant::now();
                black_box(st.step(&mut model, &[5]).unwrap());
                total += t.elapsed();
            }
            total
        })
    });
    g.bench_function("prefill, tiny OPT, batch 1", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let e = lm_value(&model, embeds.clone()).unwrap();
                let t = Instant::now();
                black_box(OptState::prefill_last(&mut model, &batch.ids, &batch.mask, e).unwrap());
                total += t.elapsed();
            }
            total
        })
    });
    g.finish();
}

fn config() -> Criterion {
    // Short runs: these are for spotting regressions by eye, not for publication.
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_preprocess, bench_prompts, bench_decode_step
}
criterion_main!(benches);
