//! `blip2-ort export` and `infer itm / embed-image / embed-text / rank` on the tiny
//! retrieval checkpoints, against transformers' recorded outputs
//! (scripts/make_retrieval_fixtures.py), within 1e-5 of each output's scale; and the
//! errors for the wrong kind of export.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

mod common;
use common::test_tmp;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn photo(name: &str) -> String {
    root().join("tests/data/photos").join(name).to_str().unwrap().to_string()
}

fn tmp(test: &str) -> PathBuf {
    let d = test_tmp().join("retrieval-cli").join(test);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blip2-ort"))
}

fn export(name: &str, test: &str) -> PathBuf {
    let out = tmp(test).join("model");
    let o = bin()
        .args(["export", "--quiet"])
        .arg(root().join("tests/fixtures").join(name).join("checkpoint"))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

fn run(model: &Path, args: &[&str]) -> Output {
    bin().args(["infer", "--model"]).arg(model).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json_lines(o: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

struct Reference {
    photos: Vec<String>,
    texts: Vec<String>,
    /// Flattened values and shape of each recorded array.
    arrays: std::collections::HashMap<&'static str, (Vec<f32>, Vec<usize>)>,
}

fn npy(path: &Path) -> (Vec<f32>, Vec<usize>) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..8], b"\x93NUMPY\x01\x00", "{}", path.display());
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
    assert!(
        header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"),
        "{header}"
    );
    let shape_txt = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let shape: Vec<usize> = shape_txt.split(',').filter_map(|s| s.trim().parse().ok()).collect();
    let values: Vec<f32> =
        b[10 + hlen..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(values.len(), shape.iter().product::<usize>(), "{}", path.display());
    (values, shape)
}

fn reference(name: &str) -> Reference {
    let d = root().join("tests/fixtures").join(name).join("reference");
    let j: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("reference.json")).unwrap()).unwrap();
    let strs = |k: &str| -> Vec<String> {
        j[k].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
    };
    let mut arrays = std::collections::HashMap::new();
    for k in ["image_embeds", "text_embeds", "itm", "itc"] {
        arrays.insert(k, npy(&d.join(format!("{k}.npy"))));
    }
    Reference { photos: strs("photos"), texts: strs("texts"), arrays }
}

/// Asserts `got` equals `want` within 1e-5 of `want`'s scale.
fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: {} values, expected {}", got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    let d = got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(d <= 1e-5 * scale, "{what}: max abs diff {d:e} over 1e-5 of scale {scale}");
}

fn floats(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(a) => a.iter().flat_map(floats).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap() as f32],
        other => panic!("not a number: {other}"),
    }
}

#[test]
fn itm_prints_transformers_itm_and_itc_per_text() {
    for name in ["itm-tiny", "itm-tiny-sharded"] {
        let m = export(name, &format!("itm-{name}"));
        let r = reference(name);
        let (itm, _) = &r.arrays["itm"];
        let (itc, _) = &r.arrays["itc"];
        let t = r.texts.len();
        for (i, p) in r.photos.iter().enumerate() {
            // --batch-size 3 splits the four texts into two ITM calls.
            let mut args = vec![
                "itm".to_string(),
                photo(p),
                "--json".into(),
                "--batch-size".into(),
                "3".into(),
            ];
            for text in &r.texts {
                args.extend(["--text".into(), text.clone()]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let o = run(&m, &args);
            assert!(o.status.success(), "{}", stderr(&o));
            let lines = json_lines(&o);
            assert_eq!(lines.len(), t);
            for (j, l) in lines.iter().enumerate() {
                assert_eq!(l["text"], r.texts[j].as_str());
                assert_eq!(l["image"], photo(p).as_str());
            }
            let got_itm: Vec<f32> =
                lines.iter().map(|l| l["itm"].as_f64().unwrap() as f32).collect();
            let got_itc: Vec<f32> =
                lines.iter().map(|l| l["itc"].as_f64().unwrap() as f32).collect();
            assert_close(&format!("{name} {p}: itm"), &got_itm, &itm[i * t..(i + 1) * t]);
            assert_close(&format!("{name} {p}: itc"), &got_itc, &itc[i * t..(i + 1) * t]);
        }
        // Without --json: one tab-separated line per text: itm, itc, text.
        let o =
            run(&m, &["itm", &photo(&r.photos[0]), "--text", &r.texts[0], "--text", &r.texts[1]]);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert_eq!(lines[1].split('\t').nth(2), Some(r.texts[1].as_str()), "{out}");
        let p: f32 = lines[0].split('\t').next().unwrap().parse().unwrap();
        assert!((p - itm[0]).abs() < 1e-5, "{out}");
    }
}

#[test]
fn embeddings_equal_transformers_in_json_and_npy() {
    let name = "itm-tiny";
    let m = export(name, "embed");
    let r = reference(name);
    let photos: Vec<String> = r.photos.iter().map(|p| photo(p)).collect();
    let mut args = vec!["embed-image", "--json", "--batch-size", "2"];
    args.extend(photos.iter().map(String::as_str));
    let o = run(&m, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = json_lines(&o);
    assert_eq!(
        lines.iter().map(|l| l["image"].as_str().unwrap().to_string()).collect::<Vec<_>>(),
        photos
    );
    let (want, shape) = &r.arrays["image_embeds"];
    assert_eq!(lines[0]["embedding"].as_array().unwrap().len(), shape[1], "one row per query");
    let got: Vec<f32> = lines.iter().flat_map(|l| floats(&l["embedding"])).collect();
    assert_close("embed-image --json", &got, want);

    let out = tmp("embed-npy").join("images.npy");
    let mut args = vec!["embed-image", "--format", "npy", "--output", out.to_str().unwrap()];
    args.extend(photos.iter().map(String::as_str));
    let o = run(&m, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let (got, got_shape) = npy(&out);
    assert_eq!(&got_shape, shape);
    assert_close("embed-image --format npy", &got, want);

    let mut args = vec!["embed-text", "--json"];
    args.extend(r.texts.iter().map(String::as_str));
    let o = run(&m, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = json_lines(&o);
    assert_eq!(
        lines.iter().map(|l| l["text"].as_str().unwrap().to_string()).collect::<Vec<_>>(),
        r.texts
    );
    let got: Vec<f32> = lines.iter().flat_map(|l| floats(&l["embedding"])).collect();
    let (want, shape) = &r.arrays["text_embeds"];
    assert_close("embed-text --json", &got, want);

    let out = tmp("embed-text-npy").join("texts.npy");
    let mut args = vec!["embed-text", "--format", "npy", "-o", out.to_str().unwrap()];
    args.extend(r.texts.iter().map(String::as_str));
    let o = run(&m, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let (got, got_shape) = npy(&out);
    assert_eq!(&got_shape, shape);
    assert_close("embed-text --format npy", &got, want);
}

#[test]
fn rank_orders_images_by_itc_and_reranks_by_itm() {
    let name = "itm-tiny-sharded";
    let m = export(name, "rank");
    let r = reference(name);
    let (itm, _) = &r.arrays["itm"];
    let (itc, _) = &r.arrays["itc"];
    let t = r.texts.len();
    let photos: Vec<String> = r.photos.iter().map(|p| photo(p)).collect();
    for (j, text) in r.texts.iter().enumerate() {
        let col = |a: &[f32], i: usize| a[i * t + j];
        let mut by_itc: Vec<usize> = (0..photos.len()).collect();
        by_itc.sort_by(|&a, &b| col(itc, b).total_cmp(&col(itc, a)));
        let mut args = vec!["rank", "--json", "--batch-size", "2", "--text", text.as_str()];
        args.extend(photos.iter().map(String::as_str));
        let o = run(&m, &args);
        assert!(o.status.success(), "{}", stderr(&o));
        let lines = json_lines(&o);
        let order: Vec<String> =
            lines.iter().map(|l| l["image"].as_str().unwrap().to_string()).collect();
        assert_eq!(
            order,
            by_itc.iter().map(|&i| photos[i].clone()).collect::<Vec<_>>(),
            "{text:?}"
        );
        let scores: Vec<f32> = lines.iter().map(|l| l["itc"].as_f64().unwrap() as f32).collect();
        assert_close("rank itc", &scores, &by_itc.iter().map(|&i| col(itc, i)).collect::<Vec<_>>());
        assert!(lines.iter().all(|l| l.get("itm").is_none()));

        // --rerank 2: the two best by ITC, ordered by ITM, then the rest.
        args.splice(1..1, ["--rerank", "2"]);
        let o = run(&m, &args);
        assert!(o.status.success(), "{}", stderr(&o));
        let lines = json_lines(&o);
        let mut top = by_itc[..2].to_vec();
        top.sort_by(|&a, &b| col(itm, b).total_cmp(&col(itm, a)));
        top.extend(&by_itc[2..]);
        let order: Vec<String> =
            lines.iter().map(|l| l["image"].as_str().unwrap().to_string()).collect();
        assert_eq!(
            order,
            top.iter().map(|&i| photos[i].clone()).collect::<Vec<_>>(),
            "{text:?} reranked"
        );
        let p: Vec<f32> = lines[..2].iter().map(|l| l["itm"].as_f64().unwrap() as f32).collect();
        assert_close(
            "rank --rerank itm",
            &p,
            &top[..2].iter().map(|&i| col(itm, i)).collect::<Vec<_>>(),
        );
        assert!(lines[2].get("itm").is_none());
    }
}

#[test]
fn each_kind_of_export_refuses_the_other_kinds_tasks() {
    let retrieval = export("itm-tiny", "kinds-retrieval");
    let chelsea = photo("chelsea.png");
    for args in
        [vec!["caption", chelsea.as_str()], vec!["vqa", chelsea.as_str(), "--question", "what?"]]
    {
        let o = run(&retrieval, &args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let e = stderr(&o);
        assert!(
            e.contains("image-text retrieval export")
                && e.contains("itm, embed-image, embed-text and rank"),
            "{e}"
        );
    }
    let captioning = export("opt-tiny", "kinds-captioning");
    for args in [
        vec!["itm", chelsea.as_str(), "--text", "a cat"],
        vec!["embed-text", "a cat"],
        vec!["rank", "--text", "a cat", chelsea.as_str()],
    ] {
        let o = run(&captioning, &args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let e = stderr(&o);
        assert!(
            e.contains("captioning export (family \"opt\")")
                && e.contains("caption, vqa, chat and batch"),
            "{e}"
        );
    }
}

#[test]
fn bad_input_is_named() {
    let m = export("itm-tiny", "bad-input");
    // An unreadable image among good ones: its own error line, the others still embedded, exit 1.
    let missing = root().join("tests/data/photos/missing.png");
    let o = run(&m, &["embed-image", "--json", &photo("chelsea.png"), missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let lines = json_lines(&o);
    assert!(lines[0]["embedding"].is_array());
    assert!(lines[1]["error"].as_str().unwrap().contains("missing.png"), "{}", lines[1]);
    // --format npy writes nothing when an image fails.
    let out = tmp("bad-npy").join("x.npy");
    let o = run(
        &m,
        &[
            "embed-image",
            "--format",
            "npy",
            "-o",
            out.to_str().unwrap(),
            &photo("chelsea.png"),
            missing.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("missing.png"));
    assert!(!out.exists());
    // Usage errors (status 2): npy without a file, --rerank 0, --output without npy.
    let o = run(&m, &["embed-text", "--format", "npy", "a cat"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--output"), "{}", stderr(&o));
    let o = run(&m, &["rank", "--rerank", "0", "--text", "a cat", &photo("chelsea.png")]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--rerank"), "{}", stderr(&o));
    let o = run(&m, &["embed-text", "-o", "x.npy", "a cat"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--output is for --format npy"), "{}", stderr(&o));
    // A token outside the Q-Former's vocabulary (the processor's <image>) is named.
    let o = run(&m, &["embed-text", "<image> a cat"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("<image>") && stderr(&o).contains("vocabulary"), "{}", stderr(&o));
    // A text over the position table is cut, with a warning.
    let long = vec!["cat"; 60].join(" ");
    let o = run(&m, &["embed-text", "--json", &long]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("was cut to the model's 40 tokens"), "{}", stderr(&o));
}
