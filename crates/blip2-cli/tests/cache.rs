//! `blip2-ort cache list | prune | clear`: output and exit codes, on a cache folder made
//! for the test (`BLIP2_ORT_CACHE`).

use std::path::Path;
use std::process::{Command, Output};

mod common;
use common::test_tmp;

fn cache(root: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_blip2-ort"));
    c.arg("cache")
        .args(args)
        .env("BLIP2_ORT_CACHE", root)
        .env_remove("BLIP2_ORT_OPTIMIZED_CACHE_MAX");
    for (k, v) in env {
        c.env(k, v);
    }
    let Output { status, stdout, stderr } = c.output().unwrap();
    (status.code().unwrap(), String::from_utf8(stdout).unwrap(), String::from_utf8(stderr).unwrap())
}

/// An optimized-graph entry for `source` (as the runtime stamps it), `bytes` big.
fn entry(root: &Path, key: &str, source: &Path, bytes: usize) {
    let dir = root.join("optimized").join(key);
    std::fs::create_dir_all(&dir).unwrap();
    let (size, mtime) = match std::fs::metadata(source) {
        Ok(m) => (
            m.len(),
            m.modified().unwrap().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos(),
        ),
        Err(_) => (1, 1),
    };
    std::fs::write(
        dir.join("stamp"),
        format!(
            "blip2-ort optimized graph v1\nsource {}\nsize {size}\nmtime {mtime}\n",
            source.display()
        ),
    )
    .unwrap();
    std::fs::write(dir.join("model.onnx"), vec![0u8; bytes]).unwrap();
}

#[test]
fn cache_lists_prunes_and_clears() {
    let base = test_tmp().join("cache-cmd");
    let _ = std::fs::remove_dir_all(&base);
    let root = base.join("cache");
    let export = base.join("exports/opt");
    std::fs::create_dir_all(&export).unwrap();
    let lm = export.join("language_model.onnx");
    std::fs::write(&lm, "graph").unwrap();
    entry(&root, "aaaa", &lm, 3000);
    entry(&root, "bbbb", &base.join("deleted/vision_encoder.onnx"), 5000);
    let model = root.join("models/local/ck-0123456789abcdef");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("blip2_manifest.json"), vec![b' '; 2000]).unwrap();
    std::fs::create_dir_all(root.join("onnxruntime-1.31.1")).unwrap();

    let (code, out, err) = cache(&root, &["list"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\noptimized graphs: 8."), "{out}");
    for want in [
        " KB in 2 entries (bound 21.5 GB, BLIP2_ORT_OPTIMIZED_CACHE_MAX)",
        &format!("in use       aaaa  language_model.onnx of {}", export.display()),
        &format!("export gone  bbbb  vision_encoder.onnx of {}", base.join("deleted").display()),
        "exported checkpoints: 2.0 KB in 1 entries",
        "local/ck-0123456789abcdef",
        "ONNX Runtime: 0 B in 1 entries",
        "\ntotal 10.",
    ] {
        assert!(out.contains(want), "`cache list` lacks {want:?}:\n{out}");
    }
    // A malformed bound names the variable (exit 1); a malformed flag is a usage error.
    let (code, _, err) = cache(&root, &["list"], &[("BLIP2_ORT_OPTIMIZED_CACHE_MAX", "lots")]);
    assert_eq!(code, 1);
    assert!(err.contains("error: BLIP2_ORT_OPTIMIZED_CACHE_MAX: \"lots\" is not a size"), "{err}");
    let (code, _, err) = cache(&root, &["prune", "--max-size", "big"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--max-size"), "{err}");
    let (code, _, err) = cache(&root, &["clear", "everything"], &[]);
    assert_eq!(code, 2, "{err}");

    // prune drops the deleted export's graph, then keeps the rest within the bound.
    let (code, out, err) = cache(&root, &["prune"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("bbbb (5.1 KB, export gone"), "{out}");
    assert!(out.contains("pruned 1 entries, freed 5.1 KB"), "{out}");
    assert!(root.join("optimized/aaaa").exists() && !root.join("optimized/bbbb").exists());
    let (code, out, _) = cache(&root, &["prune", "--max-size", "1K"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("pruned 1 entries"), "{out}");
    assert!(!root.join("optimized/aaaa").exists());

    // clear: one kind, then everything but ONNX Runtime, then ONNX Runtime by name.
    entry(&root, "cccc", &lm, 100);
    let (code, out, _) = cache(&root, &["clear", "optimized"], &[]);
    assert_eq!(code, 0);
    assert!(out.starts_with("removed 1 entries, freed "), "{out}");
    assert!(model.exists());
    let (code, out, _) = cache(&root, &["clear"], &[]);
    assert_eq!((code, out.trim()), (0, "removed 1 entries, freed 2.0 KB"));
    assert!(!model.exists() && root.join("onnxruntime-1.31.1").exists());
    let (code, _, _) = cache(&root, &["clear", "runtime"], &[]);
    assert_eq!(code, 0);
    assert!(!root.join("onnxruntime-1.31.1").exists());
    let _ = std::fs::remove_dir_all(&base);
}
