//! Pixel values against transformers' BlipImageProcessorPil (tests/fixtures/preprocess and
//! each tiny checkpoint's reference/pixels): PNG and GIF inputs bit for bit, JPEG within
//! 1/255 before normalization where the decoders differ.

use std::path::{Path, PathBuf};

use blip2_core::ImageConfig;
use blip2_runtime::preprocess::{self, ImageLimits, PreprocessError};
use ndarray::ArrayD;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read_npy(path: &Path) -> ArrayD<f32> {
    let bytes = std::fs::read(path).unwrap();
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
    assert!(header.contains("'<f4'"), "{header}");
    let shape: Vec<usize> = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap()
        .split(',').filter_map(|s| s.trim().parse().ok()).collect();
    let data: Vec<f32> = bytes[10 + hlen..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    ArrayD::from_shape_vec(shape, data).unwrap()
}

fn config(size: u32) -> ImageConfig {
    ImageConfig {
        height: size,
        width: size,
        do_resize: true,
        resample: 3,
        do_rescale: true,
        rescale_factor: 1.0 / 255.0,
        do_normalize: true,
        image_mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
        image_std: [0.268_629_54, 0.261_302_58, 0.275_777_11],
        do_convert_rgb: true,
    }
}

/// Max difference in 8-bit levels before normalization.
fn max_level_diff(got: &ArrayD<f32>, want: &ArrayD<f32>, cfg: &ImageConfig) -> f32 {
    assert_eq!(got.shape(), want.shape());
    let plane = got.len() / 3;
    got.iter()
        .zip(want.iter())
        .enumerate()
        .map(|(i, (a, b))| (a - b).abs() * cfg.image_std[i / plane] * 255.0)
        .fold(0.0, f32::max)
}

fn check(photo: &str, size: u32, want: &Path) -> f32 {
    let cfg = config(size);
    let img = preprocess::load_image(&root().join("tests/data/photos").join(photo), &ImageLimits::default()).unwrap();
    let got = preprocess::preprocess(&img, &cfg).unwrap().into_dyn();
    let want = read_npy(want);
    if photo.ends_with(".jpg") {
        let d = max_level_diff(&got, &want, &cfg);
        assert!(d <= 1.0 + 1e-3, "{photo} at {size}: {d} levels apart");
        d
    } else {
        assert_eq!(got, want, "{photo} at {size}: pixel values differ from transformers");
        0.0
    }
}

#[test]
fn pixel_values_match_transformers() {
    let dir = root().join("tests/fixtures/preprocess");
    let cases: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let mut n = 0;
    for c in cases["cases"].as_array().unwrap() {
        let d = check(c["photo"].as_str().unwrap(), c["size"].as_u64().unwrap() as u32, &dir.join(c["pixels"].as_str().unwrap()));
        if d > 0.0 {
            eprintln!("{}: JPEG decoders differ by up to {d} levels", c["photo"]);
        }
        n += 1;
    }
    assert_eq!(n, 10);
}

#[test]
fn pixel_values_match_at_each_checkpoint_size() {
    for (name, size) in [("opt-tiny-sharded", 32), ("opt-tiny", 28), ("t5-tiny", 24)] {
        let dir = root().join("tests/fixtures").join(name).join("reference/pixels");
        for photo in ["chelsea.png", "camera.png", "chelsea_rgba.png", "no_time_for_that_tiny.gif", "rocket.jpg"] {
            let stem = photo.rsplit_once('.').unwrap().0;
            check(photo, size, &dir.join(format!("{stem}.npy")));
        }
    }
}

#[test]
fn a_wrong_filter_would_not_pass() {
    // Guards the test itself: bilinear output must differ from transformers' bicubic.
    let mut cfg = config(61);
    cfg.resample = 2;
    let img = preprocess::load_image(&root().join("tests/data/photos/chelsea.png"), &ImageLimits::default()).unwrap();
    let got = preprocess::preprocess(&img, &cfg).unwrap().into_dyn();
    let want = read_npy(&root().join("tests/fixtures/preprocess/chelsea_61.npy"));
    assert_ne!(got, want);
    cfg.resample = 4;
    assert!(matches!(preprocess::preprocess(&img, &cfg), Err(PreprocessError::Resample(4))));
}

#[test]
fn bad_files_are_named_in_errors() {
    let dir = root().join("target/test-tmp/preprocess");
    std::fs::create_dir_all(&dir).unwrap();
    let text = dir.join("notes.png");
    std::fs::write(&text, "hello").unwrap();
    let e = preprocess::load_image(&text, &ImageLimits::default()).unwrap_err().to_string();
    assert!(e.contains("notes.png"), "{e}");
    let e = preprocess::load_image(&dir.join("absent.jpg"), &ImageLimits::default()).unwrap_err().to_string();
    assert!(e.contains("absent.jpg"), "{e}");
    // A truncated PNG: the header is fine, the pixels are not.
    let png = std::fs::read(root().join("tests/data/photos/chelsea.png")).unwrap();
    let cut = dir.join("cut.png");
    std::fs::write(&cut, &png[..png.len() / 2]).unwrap();
    let e = preprocess::load_image(&cut, &ImageLimits::default()).unwrap_err().to_string();
    assert!(e.contains("cut.png"), "{e}");
}

#[test]
fn images_over_the_pixel_limit_are_refused_before_decoding() {
    let path = root().join("tests/data/photos/camera.png");
    let e = preprocess::load_image(&path, &ImageLimits { max_pixels: 1000 }).unwrap_err();
    match e {
        PreprocessError::TooLarge { width, height, limit, .. } => assert_eq!((width, height, limit), (512, 512, 1000)),
        other => panic!("{other}"),
    }
    // A PNG header claiming 100000 x 100000 pixels with no pixel data behind it.
    let mut bomb = Vec::new();
    bomb.extend_from_slice(b"\x89PNG\r\n\x1a\n");
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(b"IHDR");
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    bomb.extend_from_slice(&13u32.to_be_bytes());
    bomb.extend_from_slice(&ihdr);
    bomb.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    for chunk in [&b"IDAT"[..], &b"IEND"[..]] {
        bomb.extend_from_slice(&0u32.to_be_bytes());
        bomb.extend_from_slice(chunk);
        bomb.extend_from_slice(&crc32(chunk).to_be_bytes());
    }
    let e = preprocess::load_image_bytes(&bomb, Path::new("bomb.png"), &ImageLimits::default()).unwrap_err().to_string();
    assert!(e.contains("bomb.png") && e.contains("100000x100000"), "{e}");
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
