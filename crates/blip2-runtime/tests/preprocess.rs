//! Pixel values against transformers' BlipImageProcessorPil (tests/fixtures/preprocess and
//! each tiny checkpoint's reference/pixels, tests/fixtures/photos for JPEG variants and EXIF
//! orientation): every input bit for bit, JPEG included (libjpeg-turbo, as in Pillow).

use std::path::{Path, PathBuf};

use blip2_core::ImageConfig;
use blip2_runtime::preprocess::{self, ImageLimits, PreprocessError};
use image::DynamicImage;
use ndarray::ArrayD;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn photo(name: &str) -> DynamicImage {
    preprocess::load_image(&root().join("tests/data/photos").join(name), &ImageLimits::default())
        .unwrap()
}

/// A minimal .npy reader: little-endian float32, C order, header dict parsed for dtype,
/// order and shape.
fn read_npy(path: &Path) -> ArrayD<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}: not a .npy file", path.display());
    let (hlen, hstart) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12),
        v => panic!("{}: .npy version {v}", path.display()),
    };
    let header = std::str::from_utf8(&bytes[hstart..hstart + hlen]).unwrap();
    let field = |key: &str| {
        let at =
            header.find(&format!("'{key}':")).unwrap_or_else(|| panic!("no {key} in {header}"));
        header[at + key.len() + 3..].trim_start()
    };
    assert!(field("descr").starts_with("'<f4'"), "{header}");
    assert!(field("fortran_order").starts_with("False"), "{header}");
    let shape = field("shape");
    let shape: Vec<usize> = shape[1..shape.find(')').unwrap()]
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let data: Vec<f32> = bytes[hstart + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    ArrayD::from_shape_vec(shape, data).unwrap()
}

/// BLIP's processor settings at `size` (the defaults of cases.json and the checkpoints).
fn config(size: u32) -> ImageConfig {
    ImageConfig {
        height: size,
        width: size,
        do_resize: true,
        resample: 3,
        do_rescale: true,
        rescale_factor: 1.0 / 255.0,
        do_normalize: true,
        // Python floats cast to float32, as transformers' normalize does.
        image_mean: [0.48145466f64, 0.4578275, 0.40821073].map(|v| v as f32),
        image_std: [0.26862954f64, 0.26130258, 0.27577711].map(|v| v as f32),
        do_convert_rgb: true,
    }
}

/// The settings as a checkpoint stores them: nested `image_processor` in
/// processor_config.json (transformers 5) or flat preprocessor_config.json (older).
fn checkpoint_config(name: &str) -> ImageConfig {
    let dir = root().join("tests/fixtures").join(name).join("checkpoint");
    let read = |f: &str| -> Option<serde_json::Value> {
        std::fs::read_to_string(dir.join(f)).ok().map(|s| serde_json::from_str(&s).unwrap())
    };
    let ip = match read("preprocessor_config.json") {
        Some(v) => v,
        None => read("processor_config.json").unwrap()["image_processor"].clone(),
    };
    let f32s = |k: &str| -> [f32; 3] {
        let v: Vec<f32> =
            ip[k].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        v.try_into().unwrap()
    };
    ImageConfig {
        height: ip["size"]["height"].as_u64().unwrap() as u32,
        width: ip["size"]["width"].as_u64().unwrap() as u32,
        do_resize: ip["do_resize"].as_bool().unwrap(),
        resample: ip["resample"].as_u64().unwrap() as u32,
        do_rescale: ip["do_rescale"].as_bool().unwrap(),
        rescale_factor: ip["rescale_factor"].as_f64().unwrap(),
        do_normalize: ip["do_normalize"].as_bool().unwrap(),
        image_mean: f32s("image_mean"),
        image_std: f32s("image_std"),
        do_convert_rgb: ip["do_convert_rgb"].as_bool().unwrap(),
    }
}

/// Largest difference in 8-bit levels before normalization: |a - b| * std * 255.
fn max_level_diff(got: &ArrayD<f32>, want: &ArrayD<f32>, cfg: &ImageConfig) -> f32 {
    assert_eq!(got.shape(), want.shape());
    let plane = got.len() / 3;
    got.iter()
        .zip(want.iter())
        .enumerate()
        .map(|(i, (a, b))| (a - b).abs() * cfg.image_std[i / plane] * 255.0)
        .fold(0.0, f32::max)
}

/// Whether `got` passes for `photo`: bitwise equal (JPEG too, since it is decoded by
/// libjpeg-turbo as Pillow decodes it).
fn matches(
    _photo: &str,
    got: &ArrayD<f32>,
    want: &ArrayD<f32>,
    cfg: &ImageConfig,
) -> Result<f32, String> {
    if got.shape() != want.shape() {
        return Err(format!("shape {:?}, want {:?}", got.shape(), want.shape()));
    }
    let n = got.iter().zip(want.iter()).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    if n == 0 {
        return Ok(0.0);
    }
    Err(format!("{n} values differ, up to {} levels", max_level_diff(got, want, cfg)))
}

fn check(photo_name: &str, cfg: &ImageConfig, want: &Path) -> f32 {
    let got = preprocess::preprocess(&photo(photo_name), cfg).unwrap().into_dyn();
    let want = read_npy(want);
    matches(photo_name, &got, &want, cfg)
        .unwrap_or_else(|e| panic!("{photo_name} at {}: {e}", cfg.width))
}

const PHOTOS: [&str; 5] =
    ["chelsea.png", "camera.png", "chelsea_rgba.png", "no_time_for_that_tiny.gif", "rocket.jpg"];

#[test]
fn pixel_values_match_transformers() {
    let dir = root().join("tests/fixtures/preprocess");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let mut cfg_mean = [0f32; 3];
    let mut cfg_std = [0f32; 3];
    for c in 0..3 {
        cfg_mean[c] = cases["image_mean"][c].as_f64().unwrap() as f32;
        cfg_std[c] = cases["image_std"][c].as_f64().unwrap() as f32;
    }
    let mut n = 0;
    for c in cases["cases"].as_array().unwrap() {
        let (name, size) = (c["photo"].as_str().unwrap(), c["size"].as_u64().unwrap() as u32);
        let mut cfg = config(size);
        cfg.image_mean = cfg_mean;
        cfg.image_std = cfg_std;
        let d = check(name, &cfg, &dir.join(c["pixels"].as_str().unwrap()));
        let how =
            if d == 0.0 { "bit-identical".to_string() } else { format!("up to {d} levels apart") };
        eprintln!("{name} at {size}: {how}");
        n += 1;
    }
    assert_eq!(n, 10);
}

#[test]
fn pixel_values_match_at_each_checkpoint_size() {
    // 32 and 28 upscale the GIF (14x25) both ways; 24 shrinks its height only, where
    // Pillow 13 runs the vertical pass first.
    for (name, size) in [("opt-tiny-sharded", 32), ("opt-tiny", 28), ("t5-tiny", 24)] {
        let cfg = checkpoint_config(name);
        assert_eq!((cfg.width, cfg.height, cfg.resample), (size, size, 3), "{name}");
        let dir = root().join("tests/fixtures").join(name).join("reference/pixels");
        for p in PHOTOS {
            let stem = p.rsplit_once('.').unwrap().0;
            let d = check(p, &cfg, &dir.join(format!("{stem}.npy")));
            if d > 0.0 {
                eprintln!("{name}: {p} up to {d} levels apart");
            }
        }
    }
}

#[test]
fn the_comparison_catches_wrong_pixels() {
    // Guards the test itself: a wrong filter, a wrong pass order or a single level off
    // must all fail the comparison.
    let want = read_npy(&root().join("tests/fixtures/preprocess/chelsea_61.npy"));
    let mut cfg = config(61);
    cfg.resample = 2;
    let bilinear = preprocess::preprocess(&photo("chelsea.png"), &cfg).unwrap().into_dyn();
    assert!(matches("chelsea.png", &bilinear, &want, &cfg).is_err());

    // The GIF at 24 with the horizontal pass first (by resizing in two explicit steps).
    let cfg = config(24);
    let want24 =
        read_npy(&root().join("tests/fixtures/t5-tiny/reference/pixels/no_time_for_that_tiny.npy"));
    let gif = preprocess::to_rgb(&photo("no_time_for_that_tiny.gif"));
    let (w, h) = (gif.width(), gif.height());
    let hv = preprocess::resize_rgb(&preprocess::resize_rgb(&gif, 24, h, 3).unwrap(), 24, 24, 3)
        .unwrap();
    let vh = preprocess::resize_rgb(&preprocess::resize_rgb(&gif, w, 24, 3).unwrap(), 24, 24, 3)
        .unwrap();
    let direct = preprocess::resize_rgb(&gif, 24, 24, 3).unwrap();
    assert_eq!(direct, vh, "Pillow 13 shrinks 25 rows to 24 before widening 14 columns to 24");
    assert_ne!(direct, hv);
    let mut cfg_no_resize = cfg.clone();
    cfg_no_resize.do_resize = false;
    let hv =
        preprocess::preprocess(&DynamicImage::ImageRgb8(hv), &cfg_no_resize).unwrap().into_dyn();
    assert!(matches("x.gif", &hv, &want24, &cfg).is_err());

    // One value one level off.
    let mut off = want.clone();
    off[[1, 30, 30]] += 1.0 / 255.0 / cfg.image_std[1];
    assert!(matches("chelsea.png", &off, &want, &cfg).is_err());
    // JPEG is held to the same standard.
    assert!(matches("rocket.jpg", &off, &want, &cfg).is_err());
}

#[test]
fn batches_stack_single_images() {
    let cfg = config(28);
    let images = [photo("chelsea.png"), photo("camera.png"), photo("rocket.jpg")];
    let batch = preprocess::preprocess_batch(&images, &cfg).unwrap();
    assert_eq!(batch.shape(), &[3, 3, 28, 28]);
    for (i, img) in images.iter().enumerate() {
        assert_eq!(
            batch.index_axis(ndarray::Axis(0), i),
            preprocess::preprocess(img, &cfg).unwrap()
        );
    }
    assert_eq!(preprocess::preprocess_batch(&[], &cfg).unwrap().shape(), &[0, 3, 28, 28]);
    // Without resizing, an image of another size cannot join the batch.
    let mut cfg = cfg;
    cfg.do_resize = false;
    let e = preprocess::preprocess_batch(&images[..1], &cfg).unwrap_err();
    assert!(
        matches!(e, PreprocessError::BatchSize { index: 0, width: 451, height: 300, .. }),
        "{e}"
    );
}

#[test]
fn unsupported_resampling_filters_are_errors() {
    let img = preprocess::to_rgb(&photo("camera.png"));
    assert!(matches!(preprocess::resize_rgb(&img, 10, 10, 8), Err(PreprocessError::Resample(8))));
    assert!(matches!(preprocess::resize_rgb(&img, 10, 10, 99), Err(PreprocessError::Resample(99))));
    let mut cfg = config(61);
    cfg.resample = 42;
    let e = preprocess::preprocess(&photo("chelsea.png"), &cfg).unwrap_err();
    assert!(matches!(e, PreprocessError::Resample(42)), "{e}");
    assert!(e.to_string().contains("42"), "{e}");
    assert!(matches!(preprocess::resize_rgb(&img, 0, 10, 3), Err(PreprocessError::BadSize { .. })));
    // Every Pillow filter number resizes.
    for f in 0..8 {
        let out = preprocess::resize_rgb(&img, 37, 23, f).unwrap();
        assert_eq!((out.width(), out.height()), (37, 23));
    }
}

/// A fresh scratch folder for this test process.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("blip2-preprocess-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn bad_files_are_named_in_errors() {
    let dir = scratch("bad");
    let text = dir.join("notes.png");
    std::fs::write(&text, "hello, not a picture").unwrap();
    let e = preprocess::load_image(&text, &ImageLimits::default()).unwrap_err();
    assert!(matches!(e, PreprocessError::UnknownFormat { .. }), "{e}");
    assert!(e.to_string().contains("notes.png"), "{e}");

    let e = preprocess::load_image(&dir.join("absent.jpg"), &ImageLimits::default()).unwrap_err();
    assert!(matches!(e, PreprocessError::Read { .. }), "{e}");
    assert!(e.to_string().contains("absent.jpg"), "{e}");

    // A truncated PNG: the header is fine, the pixels are not.
    let png = std::fs::read(root().join("tests/data/photos/chelsea.png")).unwrap();
    let cut = dir.join("cut.png");
    std::fs::write(&cut, &png[..png.len() / 2]).unwrap();
    let e = preprocess::load_image(&cut, &ImageLimits::default()).unwrap_err();
    assert!(matches!(e, PreprocessError::Decode { .. }), "{e}");
    assert!(e.to_string().contains("cut.png"), "{e}");

    let e = preprocess::load_image_bytes(b"", "empty.webp", &ImageLimits::default()).unwrap_err();
    assert!(e.to_string().contains("empty.webp"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
}

#[test]
fn images_over_the_pixel_limit_are_refused_before_decoding() {
    // A real image with a tiny limit.
    let dir = scratch("limit");
    let small = dir.join("small.png");
    image::RgbImage::from_pixel(40, 30, image::Rgb([1, 2, 3])).save(&small).unwrap();
    let e = preprocess::load_image(&small, &ImageLimits { max_pixels: 1000, ..Default::default() })
        .unwrap_err();
    match &e {
        PreprocessError::TooLarge { width, height, pixels, limit, .. } => {
            assert_eq!((*width, *height, *pixels, *limit), (40, 30, 1200, 1000))
        }
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains("small.png") && e.to_string().contains("40x30"), "{e}");
    assert!(preprocess::load_image(
        &small,
        &ImageLimits { max_pixels: 1200, ..Default::default() }
    )
    .is_ok());
    std::fs::remove_dir_all(&dir).ok();

    // A PNG whose header claims 30000 x 30000 pixels with a few bytes of data behind it:
    // decoding it would need 2.7 GB; it must be refused from the header alone.
    let mut bomb = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&30_000u32.to_be_bytes());
    ihdr.extend_from_slice(&30_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png_chunk(&mut bomb, b"IHDR", &ihdr);
    png_chunk(&mut bomb, b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    png_chunk(&mut bomb, b"IEND", &[]);
    let e = preprocess::load_image_bytes(&bomb, "bomb.png", &ImageLimits::default()).unwrap_err();
    assert!(matches!(e, PreprocessError::TooLarge { width: 30_000, height: 30_000, .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("bomb.png") && msg.contains("30000x30000") && msg.contains("64000000"),
        "{msg}"
    );
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// The photo variants of tests/data/photos/variants (scripts/make_photo_fixtures.py):
/// `load_image` then the processor at the upright size, against transformers'
/// `load_image(path)` + BlipImageProcessorPil, every value bit for bit.
fn photo_variant_mismatches() -> Vec<String> {
    let dir = root().join("tests/fixtures/photos");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let mut bad = Vec::new();
    for c in cases["cases"].as_array().unwrap() {
        let name = c["photo"].as_str().unwrap();
        let (w, h) = (c["width"].as_u64().unwrap() as u32, c["height"].as_u64().unwrap() as u32);
        let mut cfg = config(w);
        cfg.height = h;
        let img = photo(&format!("variants/{name}"));
        let got = preprocess::preprocess(&img, &cfg).unwrap().into_dyn();
        let want = read_npy(&dir.join("pixels").join(c["pixels"].as_str().unwrap()));
        if got.shape() != want.shape() {
            bad.push(format!(
                "{name}: shape {:?}, want {:?} (orientation?)",
                got.shape(),
                want.shape()
            ));
            continue;
        }
        let n = got.iter().zip(want.iter()).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        if n > 0 {
            bad.push(format!(
                "{name}: {n} values differ, up to {} levels",
                max_level_diff(&got, &want, &cfg)
            ));
        }
    }
    assert!(cases["cases"].as_array().unwrap().len() >= 29);
    bad
}

#[test]
fn photo_variants_match_transformers_bit_for_bit() {
    // JPEG (quality 60/75/95, 4:4:4, 4:2:2, 4:2:0, progressive, grayscale, RGB, CMYK with
    // and without the Adobe marker, YCCK), EXIF orientation 1-8 in JPEG, PNG, WebP and
    // TIFF, little-endian and LONG-typed EXIF, orientation from XMP alone (attribute and
    // element forms), and a text-typed EXIF Orientation, which Pillow ignores (XMP too).
    let bad = photo_variant_mismatches();
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn truncated_jpegs_are_refused_as_pillow_refuses_them() {
    let dir = root().join("tests/fixtures/photos");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let refused = cases["refused"].as_array().unwrap();
    assert_eq!(refused.len(), 2);
    for r in refused {
        let name = r["photo"].as_str().unwrap();
        // transformers' own message for this file.
        assert!(r["error"].as_str().unwrap().starts_with("image file is truncated"), "{r}");
        let path = root().join("tests/data/photos/variants").join(name);
        let e = preprocess::load_image(&path, &ImageLimits::default()).unwrap_err();
        assert!(matches!(e, PreprocessError::Truncated { .. }), "{name}: {e}");
        let msg = e.to_string();
        assert!(msg.contains(name) && msg.contains("image file is truncated"), "{msg}");
    }
    // Cuts of one JPEG, each as Pillow took it: every cut refused (even one missing only
    // its end-of-image marker), the whole file read.
    let whole = std::fs::read(root().join("tests/data/photos/variants/q95.jpg")).unwrap();
    let cuts = cases["q95_cuts"].as_array().unwrap();
    assert!(cuts.len() >= 8);
    for c in cuts {
        let n = c["bytes"].as_u64().unwrap() as usize;
        let got = preprocess::load_image_bytes(&whole[..n], "cut.jpg", &ImageLimits::default());
        match (&got, c["error"].is_null()) {
            (Ok(_), true) => {}
            (Err(PreprocessError::Truncated { .. }), false) => {}
            _ => panic!(
                "{n} of {} bytes: {:?}, Pillow: {}",
                whole.len(),
                got.err().map(|e| e.to_string()),
                c["error"]
            ),
        }
    }
}

#[test]
fn corrupt_jpegs_are_refused_with_libjpeg_s_reason() {
    let mut bad = std::fs::read(root().join("tests/data/photos/variants/q95.jpg")).unwrap();
    // The SOF0 segment's precision byte: 8 -> 7, which libjpeg refuses.
    let sof = bad.windows(2).position(|w| w == [0xff, 0xc0]).unwrap();
    bad[sof + 4] = 7;
    let e = preprocess::load_image_bytes(&bad, "bad.jpg", &ImageLimits::default()).unwrap_err();
    assert!(matches!(e, PreprocessError::Corrupt { .. }), "{e}");
    assert!(e.to_string().starts_with("bad.jpg: cannot decode the image: "), "{e}");
    // A JPEG over the pixel limit is refused from its header.
    let ok = std::fs::read(root().join("tests/data/photos/variants/q95.jpg")).unwrap();
    let e = preprocess::load_image_bytes(
        &ok,
        "big.jpg",
        &ImageLimits { max_pixels: 100, ..Default::default() },
    )
    .unwrap_err();
    assert!(matches!(e, PreprocessError::TooLarge { width: 37, height: 25, .. }), "{e}");
}

#[test]
fn images_preprocessed_on_workers_are_each_images_own_in_order() {
    // The workers take files in turn; each result is exactly what the image gives alone,
    // in argument order, errors included (a missing file, a truncated JPEG).
    let cfg = config(61);
    let limits = ImageLimits::default();
    let dir = root().join("tests/data/photos");
    let mut paths: Vec<PathBuf> =
        ["chelsea.png", "rocket.jpg", "camera.png", "no_time_for_that_tiny.gif"]
            .iter()
            .map(|p| dir.join(p))
            .collect();
    paths.insert(2, dir.join("variants/truncated.jpg"));
    paths.push(dir.join("no-such-photo.png"));
    for v in ["exif6.jpg", "gray.jpg", "progressive.jpg", "cmyk_adobe.jpg"] {
        paths.push(dir.join("variants").join(v));
    }
    let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    let alone: Vec<Result<ndarray::Array4<f32>, String>> = refs
        .iter()
        .map(|p| {
            let img = preprocess::load_image(p, &limits).map_err(|e| e.to_string())?;
            preprocess::preprocess_batch(std::slice::from_ref(&img), &cfg)
                .map_err(|e| e.to_string())
        })
        .collect();
    assert_eq!(alone.iter().filter(|r| r.is_err()).count(), 2, "the two bad files fail");
    for threads in [1, 3, 16] {
        let got: Vec<Result<ndarray::Array4<f32>, String>> =
            preprocess::load_and_preprocess(&refs, &limits, &cfg, threads)
                .into_iter()
                .map(|r| r.map_err(|e| e.to_string()))
                .collect();
        assert_eq!(got, alone, "{threads} threads");
    }
    assert!(preprocess::load_and_preprocess(&[], &limits, &cfg, 4).is_empty());
}

/// Every photo fixture (tests/data/photos and its variants, JPEG variants, PNG, GIF, WebP,
/// TIFF, the truncated files): the worker pool gives each the bytes the sequential path
/// gives it, at the model size the photos are captioned at and at an odd one.
#[test]
fn workers_give_every_photo_fixture_the_sequential_bytes() {
    let dir = root().join("tests/data/photos");
    let mut paths = Vec::new();
    for d in [dir.clone(), dir.join("variants"), dir.join("fast")] {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() && p.extension().is_some_and(|x| x != "md") {
                paths.push(p);
            }
        }
    }
    paths.sort();
    assert!(paths.len() >= 40, "{} photo fixtures", paths.len());
    let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    let bits = |r: Result<ndarray::Array4<f32>, PreprocessError>| -> Result<Vec<u32>, String> {
        r.map(|a| a.iter().map(|v| v.to_bits()).collect()).map_err(|e| e.to_string())
    };
    for limits in [ImageLimits::default(), ImageLimits::default().fast_decode(&config(16))] {
        for size in [224, 37] {
            let cfg = config(size);
            let alone: Vec<_> = refs
                .iter()
                .map(|p| {
                    bits(preprocess::load_image(p, &limits).and_then(|img| {
                        preprocess::preprocess_batch(std::slice::from_ref(&img), &cfg)
                    }))
                })
                .collect();
            assert!(alone.iter().filter(|r| r.is_ok()).count() >= 38);
            for threads in [2, 5] {
                let got: Vec<_> = preprocess::load_and_preprocess(&refs, &limits, &cfg, threads)
                    .into_iter()
                    .map(bits)
                    .collect();
                for ((p, g), a) in paths.iter().zip(&got).zip(&alone) {
                    assert!(g == a, "{}: {threads} workers differ at size {size}", p.display());
                }
            }
        }
    }
}

/// `--fast-decode` against Pillow's draft mode (scripts/make_fast_decode_fixtures.py):
/// the scale it picks for each minimum side, and every decoded pixel bit for bit (4:2:0,
/// 4:4:4, progressive, grayscale, CMYK, EXIF orientation 6).
#[test]
fn fast_decode_gives_pillow_s_draft_mode_pixels() {
    let dir = root().join("tests/fixtures/photos/fast");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 9);
    let mut scales = std::collections::BTreeSet::new();
    for c in cases {
        let name = c["photo"].as_str().unwrap();
        let m = c["min_side"].as_u64().unwrap() as u32;
        let limits = ImageLimits { jpeg_min_side: Some(m), ..Default::default() };
        let img =
            preprocess::load_image(&root().join("tests/data/photos/fast").join(name), &limits)
                .unwrap();
        let (w, h) = (c["width"].as_u64().unwrap() as u32, c["height"].as_u64().unwrap() as u32);
        assert_eq!((img.width(), img.height()), (w, h), "{name} at min side {m}");
        scales.insert(c["scale"].as_u64().unwrap());
        let Some(px) = c["pixels"].as_str() else { continue };
        let mut cfg = config(w);
        cfg.height = h;
        let got = preprocess::preprocess(&img, &cfg).unwrap().into_dyn();
        let want = read_npy(&dir.join(px));
        assert_eq!(got.shape(), want.shape(), "{name}");
        let n = got.iter().zip(want.iter()).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(n, 0, "{name} at min side {m}: {n} values differ from Pillow's draft mode");
    }
    assert_eq!(scales.into_iter().collect::<Vec<_>>(), [1, 2, 4, 8]);
}

#[test]
fn fast_decode_leaves_other_formats_and_small_jpegs_exact() {
    // A PNG and a JPEG too small to scale come out as they do without the flag.
    let fast = ImageLimits::default().fast_decode(&config(224));
    assert_eq!(fast.jpeg_min_side, Some(448));
    for name in ["chelsea.png", "rocket.jpg", "variants/exif6.jpg"] {
        let path = root().join("tests/data/photos").join(name);
        let a = preprocess::load_image(&path, &ImageLimits::default()).unwrap();
        let b = preprocess::load_image(&path, &fast).unwrap();
        assert_eq!(a.as_bytes(), b.as_bytes(), "{name}");
    }
    // rocket.jpg (640x427) is scaled once the minimum side allows it.
    let rocket = root().join("tests/data/photos/rocket.jpg");
    let half =
        preprocess::load_image(&rocket, &ImageLimits::default().fast_decode(&config(100))).unwrap();
    assert_eq!((half.width(), half.height()), (320, 214));
}
