//! Helpers shared by the cross-crate tests in tests/ and the benches: fixture paths,
//! a .npy reader for transformers' recorded outputs, and tolerance checks.

use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `tests/fixtures/NAME`.
pub fn fixture(name: &str) -> PathBuf {
    root().join("tests").join("fixtures").join(name)
}

/// The tiny OPT checkpoints made by scripts/make_fixtures.py.
pub const CHECKPOINTS: &[&str] = &["opt-tiny-sharded", "opt-tiny"];

/// Every tiny checkpoint, Flan-T5 shaped one included.
pub const ALL_CHECKPOINTS: &[&str] = &["opt-tiny-sharded", "opt-tiny", "t5-tiny"];

/// Reads a little-endian float32 or int64 .npy file (C order) as f32 values.
pub fn read_npy(path: &Path) -> ArrayD<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}: not a .npy file", path.display());
    let (hlen, start) = if bytes[6] == 1 {
        (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10)
    } else {
        (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12)
    };
    let header = std::str::from_utf8(&bytes[start..start + hlen]).expect("ascii header");
    assert!(header.contains("'fortran_order': False"), "{}: Fortran order", path.display());
    let shape_txt =
        header.split("'shape': (").nth(1).and_then(|s| s.split(')').next()).expect("shape");
    let shape: Vec<usize> = shape_txt.split(',').filter_map(|s| s.trim().parse().ok()).collect();
    let data = &bytes[start + hlen..];
    let values: Vec<f32> = if header.contains("'<f4'") {
        data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    } else if header.contains("'<i8'") {
        data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32).collect()
    } else {
        panic!("{}: unsupported dtype in {header}", path.display())
    };
    ArrayD::from_shape_vec(IxDyn(&shape), values).expect("shape matches data")
}

/// Max |a - b| and the reference's scale (max |b|).
pub fn max_abs_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> (f32, f32) {
    assert_eq!(a.shape(), b.shape(), "shapes differ");
    let d = a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let s = b.iter().map(|x| x.abs()).fold(0f32, f32::max);
    (d, s)
}

/// Asserts `a` matches the reference `b` within 1e-4 of the reference's scale.
pub fn assert_close(what: &str, a: &ArrayD<f32>, b: &ArrayD<f32>) {
    let (d, s) = max_abs_diff(a, b);
    assert!(
        d.is_finite() && d <= 1e-4 * s.max(1e-6),
        "{what}: max abs diff {d:e} exceeds 1e-4 of scale {s}"
    );
}

/// Cargo's target folder this test binary was built into: the first folder above the
/// running executable that holds cargo's `CACHEDIR.TAG` (so `CARGO_TARGET_DIR` or
/// `build.target-dir` pointing elsewhere is followed), else `$CARGO_TARGET_DIR`, else
/// `target/` in the repository.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().ok().and_then(|e| e.canonicalize().ok());
    if let Some(dir) =
        exe.iter().flat_map(|e| e.ancestors()).find(|d| d.join("CACHEDIR.TAG").is_file())
    {
        return dir.to_path_buf();
    }
    match std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => root().join(dir),
        None => root().join("target"),
    }
}

/// A fresh, empty temporary folder `test-tmp/NAME` under cargo's target folder
/// ([`target_dir`]; removed first if present).
pub fn temp_dir(name: &str) -> PathBuf {
    let d = target_dir().join("test-tmp").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

/// Builds sessions on the CPU profile (ONNX Runtime found as `blip2-ort` finds it: run
/// `blip2-ort install-runtime` once, or set ORT_DYLIB_PATH).
pub fn session_factory() -> Box<blip2_runtime::model::SessionFactory<'static>> {
    blip2_runtime::session_cache::session_factory(
        blip2_runtime::config::Profile::cpu(),
        Some(blip2_runtime::session_cache::optimized_cache_root()),
        |w| eprintln!("warning: {w}"),
    )
}

/// A search config from a recorded generate() call's keyword arguments, over the
/// model's defaults.
pub fn config(
    p: &blip2_runtime::pipeline::Pipeline,
    kw: &serde_json::Value,
) -> blip2_runtime::generation::GenerationConfig {
    let recorded: blip2_core::GenerationDefaults =
        serde_json::from_value(kw.clone()).expect("recorded generate() settings");
    p.default_config().overridden(&recorded)
}

/// A JSON array of integers.
pub fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

/// A photo in tests/data/photos.
pub fn photo(name: &str) -> PathBuf {
    root().join("tests/data/photos").join(name)
}

/// Runs one recorded generate() case on `p`: blip2-ort's sequences (rows x
/// num_return_sequences, row-major, as transformers returns them) and transformers' ones.
pub fn run_case(
    p: &mut blip2_runtime::pipeline::Pipeline,
    case: &serde_json::Value,
) -> (Vec<blip2_runtime::pipeline::Generated>, Vec<Vec<i64>>) {
    let strs = |k: &str| -> Vec<String> {
        case[k].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
    };
    let images: Vec<_> = strs("images").iter().map(|s| p.load_image(&photo(s)).unwrap()).collect();
    let cfg = config(p, &case["generate"]);
    let got = p.generate(&images, &strs("prompts"), &cfg).unwrap();
    let want = case["sequences"].as_array().unwrap().iter().map(ids).collect();
    (got.into_iter().flatten().collect(), want)
}

/// The recorded generate() cases of a fixture checkpoint (`reference/generate.json`).
pub fn generate_cases(name: &str) -> serde_json::Value {
    let p = fixture(name).join("reference").join("generate.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Runs a recorded batch case as one batch, then each row alone: (batched, singles),
/// per row its sequences.
pub fn batch_and_single_runs(
    p: &mut blip2_runtime::pipeline::Pipeline,
    case: &serde_json::Value,
) -> (Vec<Vec<blip2_runtime::pipeline::Generated>>, Vec<Vec<blip2_runtime::pipeline::Generated>>) {
    let images: Vec<_> = case["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| p.load_image(&photo(s.as_str().unwrap())).unwrap())
        .collect();
    let prompts: Vec<String> = case["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    let cfg = config(p, &case["generate"]);
    let batched = p.generate(&images, &prompts, &cfg).unwrap();
    let singles = (0..images.len())
        .map(|i| p.generate(&images[i..i + 1], &prompts[i..i + 1], &cfg).unwrap().remove(0))
        .collect();
    (batched, singles)
}

/// Runs checkpoint `name`'s recorded batch case as one batch and each row alone, asserts
/// each batch row equals its single run, and returns the single runs.
pub fn assert_batch_rows_equal_single_runs(
    p: &mut blip2_runtime::pipeline::Pipeline,
    name: &str,
) -> Vec<Vec<blip2_runtime::pipeline::Generated>> {
    let all = generate_cases(name);
    let case = all["cases"].as_array().unwrap().iter().find(|c| c["name"] == "batch").unwrap();
    let (batched, singles) = batch_and_single_runs(p, case);
    for (i, single) in singles.iter().enumerate() {
        assert_eq!(&batched[i], single, "{name}: batch row {i} differs from its single run");
    }
    singles
}

/// Over every recorded case of `cases` that `keep` accepts: how many generated tokens
/// agree with transformers' (up to the first difference in each sequence), and how many
/// there are (the longer of the two sequences each).
pub fn token_agreement(
    p: &mut blip2_runtime::pipeline::Pipeline,
    cases: &serde_json::Value,
    keep: impl Fn(&serde_json::Value) -> bool,
) -> (usize, usize) {
    let (mut same, mut total) = (0, 0);
    for case in cases["cases"].as_array().unwrap().iter().filter(|c| keep(c)) {
        let (got, want) = run_case(p, case);
        for (g, w) in got.iter().zip(&want) {
            same += g.token_ids.iter().zip(w).take_while(|(a, b)| a == b).count();
            total += w.len().max(g.token_ids.len());
        }
    }
    (same, total)
}

/// Runs every recorded case of checkpoint `name` that `keep` accepts on `p` and asserts
/// transformers' token ids and decoded texts, naming `what` in failures; at least 15
/// cases must run.
pub fn assert_cases_match(
    p: &mut blip2_runtime::pipeline::Pipeline,
    name: &str,
    what: &str,
    keep: impl Fn(&serde_json::Value) -> bool,
) {
    let all = generate_cases(name);
    let mut checked = 0;
    for case in all["cases"].as_array().unwrap().iter().filter(|c| keep(c)) {
        let cname = case["name"].as_str().unwrap();
        let (got, want) = run_case(p, case);
        let got_ids: Vec<Vec<i64>> = got.iter().map(|g| g.token_ids.clone()).collect();
        assert_eq!(got_ids, want, "{name}/{cname} ({what}): token ids differ from transformers");
        let want_text: Vec<&str> =
            case["texts"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
        let got_text: Vec<&str> = got.iter().map(|g| g.text.as_str()).collect();
        assert_eq!(got_text, want_text, "{name}/{cname} ({what}): decoded text differs");
        checked += 1;
    }
    assert!(checked >= 15, "{name} ({what}): only {checked} cases ran");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prints `temp_dir("probe")` (run by the test below, in a binary placed elsewhere).
    #[test]
    #[ignore = "run by temp_dir_follows_the_target_folder"]
    fn print_temp_dir() {
        println!("temp_dir={}", temp_dir("probe").display());
    }

    /// The same test binary under another target folder (as `CARGO_TARGET_DIR` puts it)
    /// makes its temporary folders there, in the same layout, not in ./target.
    #[test]
    fn temp_dir_follows_the_target_folder() {
        let exe = std::env::current_exe().unwrap();
        let other = std::env::temp_dir().join(format!("blip2-ort-target-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&other);
        let deps = other.join("debug").join("deps");
        std::fs::create_dir_all(&deps).unwrap();
        std::fs::write(other.join("CACHEDIR.TAG"), "Signature: 8a477f597d28d172789f06886806bc55\n")
            .unwrap();
        let copy = deps.join(exe.file_name().unwrap());
        if std::fs::hard_link(&exe, &copy).is_err() {
            std::fs::copy(&exe, &copy).unwrap();
        }
        let out = std::process::Command::new(&copy)
            .args(["--ignored", "--exact", "tests::print_temp_dir", "--nocapture"])
            .env("CARGO_TARGET_DIR", &other)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let got = text.lines().find_map(|l| l.strip_prefix("temp_dir=")).unwrap_or_else(|| {
            panic!("no temp_dir line: {text}{}", String::from_utf8_lossy(&out.stderr))
        });
        let other = other.canonicalize().unwrap();
        assert_eq!(Path::new(got), other.join("test-tmp").join("probe"));
        assert!(other.join("test-tmp").join("probe").is_dir());
        let _ = std::fs::remove_dir_all(&other);
    }
}
