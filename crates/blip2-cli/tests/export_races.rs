//! Exports interrupted at any point, and exports racing into one folder (issue 23, items
//! 1-3), with real signals and real concurrent processes of the built binary.
//!
//! `BLIP2_ORT_TEST_FINISH_DELAY_MS` makes each export wait that long just before and
//! just after it is put in place, so that signals and rivals reach those moments on a
//! checkpoint that otherwise exports in a few milliseconds.
#![cfg(unix)]

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Instant;

const MANIFEST: &str = "blip2_manifest.json";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn checkpoint() -> PathBuf {
    root().join("tests/fixtures/opt-tiny/checkpoint")
}

/// A fresh folder for one test.
fn base(test: &str) -> PathBuf {
    let base = root().join("target/test-tmp/export-races").join(test);
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    base
}

/// `export MODEL -o OUT` with `flags`, started (stdout and stderr piped).
fn spawn(model: &str, out: &Path, flags: &[&str], delay_ms: u64) -> Child {
    Command::new(env!("CARGO_BIN_EXE_blip2-ort"))
        .arg("export")
        .args(flags)
        .arg(model)
        .arg("-o")
        .arg(out)
        .env("BLIP2_ORT_TEST_FINISH_DELAY_MS", delay_ms.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Reference exports of the fixture, made on demand for each model name and dtype (the
/// graphs record the model as named), to compare finished folders with.
struct Reference {
    base: PathBuf,
    made: std::cell::RefCell<Vec<(String, String, PathBuf)>>,
}

impl Reference {
    fn make(base: &Path) -> Self {
        Reference { base: base.join("references"), made: Default::default() }
    }

    fn get(&self, model: &str, dtype: &str) -> PathBuf {
        let mut made = self.made.borrow_mut();
        if let Some((_, _, dir)) = made.iter().find(|(m, d, _)| m == model && d == dtype) {
            return dir.clone();
        }
        let dir = self.base.join(made.len().to_string());
        let o = spawn(model, &dir, &["--quiet", "--dtype", dtype], 0).wait_with_output().unwrap();
        assert!(o.status.success(), "{}", text(&o.stderr));
        made.push((model.into(), dtype.into(), dir.clone()));
        dir
    }

    /// Asserts that `out` holds a complete export: a manifest, and every file of the
    /// reference export of the manifest's dtype, byte for byte; no replacement marker.
    /// Returns the manifest's (dtype, source).
    fn assert_complete(&self, out: &Path, context: &str) -> (String, String) {
        let m: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(MANIFEST))
                .unwrap_or_else(|e| panic!("{context}: no manifest in {}: {e}", out.display())),
        )
        .unwrap();
        let dtype = m["dtype"].as_str().unwrap().to_string();
        let source = m["source"].as_str().unwrap().to_string();
        let reference = self.get(&source, &dtype);
        for g in m["graphs"].as_object().unwrap().values() {
            let f = g["file"].as_str().unwrap();
            assert!(out.join(f).is_file(), "{context}: the manifest names {f}, which is missing");
        }
        for e in std::fs::read_dir(&reference).unwrap() {
            let name = e.unwrap().file_name();
            if name == MANIFEST {
                continue;
            }
            let want = std::fs::read(reference.join(&name)).unwrap();
            let got = std::fs::read(out.join(&name)).unwrap_or_default();
            assert!(
                got == want,
                "{context}: {} is not the {dtype} export's ({} bytes, expected {})",
                name.to_string_lossy(),
                got.len(),
                want.len()
            );
        }
        assert!(!out.join(".blip2-ort-replacing").exists(), "{context}: replacement marker left");
        (dtype, source)
    }
}

/// Hidden files beside `out` that belong to its exports (partial folders, lock files).
fn leftovers(out: &Path) -> Vec<String> {
    let name = out.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!(".{name}.")))
        .collect()
}

/// Item 1: SIGINT at a spread of moments over a whole export, into a new folder and
/// replacing an earlier export with --force. Every run ends by the signal (the shell's
/// 130) or exits 0. Ended by the signal: nothing on stdout, no "exported", and the
/// destination as it was before (no folder, or the earlier export whole). Exit 0: the
/// folder printed holds the complete new export. Either way nothing is left beside it.
#[test]
fn sigint_at_any_moment_never_reports_success_over_a_broken_folder() {
    const DELAY_MS: u64 = 80;
    let base = base("sigint");
    let refs = Reference::make(&base);
    let ck = checkpoint();
    let out = base.join("out");
    // How long an export takes here, with the delays.
    let t = Instant::now();
    let o = spawn(ck.to_str().unwrap(), &out, &[], DELAY_MS).wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let full = t.elapsed();
    let runs = 24u32;
    let (mut stopped, mut finished) = (0, 0);
    for i in 0..runs {
        let force = i % 2 == 1;
        std::fs::remove_dir_all(&out).ok();
        if force {
            // An earlier fp32 export, to be replaced by an fp16 one.
            let o = spawn(ck.to_str().unwrap(), &out, &["--quiet"], 0).wait_with_output().unwrap();
            assert!(o.status.success(), "{}", text(&o.stderr));
        }
        let flags: &[&str] = if force { &["--force", "--dtype", "fp16"] } else { &[] };
        let at = full.mul_f64(1.1 * f64::from(i / 2) / f64::from(runs / 2 - 1));
        let child = spawn(ck.to_str().unwrap(), &out, flags, DELAY_MS);
        std::thread::sleep(at);
        // SAFETY: signals a child of this test, not yet waited for.
        assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) }, 0);
        let o: Output = child.wait_with_output().unwrap();
        let (stdout, stderr) = (text(&o.stdout), text(&o.stderr));
        let context = format!("run {i} (SIGINT after {at:?}, --force {force}): {stderr}");
        if o.status.signal() == Some(libc::SIGINT) {
            stopped += 1;
            assert!(stdout.is_empty(), "{context}: an interrupted export printed {stdout:?}");
            assert!(!stderr.contains("exported"), "{context}");
            if force {
                let (dtype, _) = refs.assert_complete(&out, &context);
                assert_eq!(dtype, "fp32", "{context}: the earlier export stays whole");
            } else {
                assert!(!out.join(MANIFEST).exists(), "{context}: a manifest was left");
            }
        } else {
            assert_eq!(o.status.code(), Some(0), "{context}: neither 130 nor 0: {:?}", o.status);
            finished += 1;
            assert_eq!(stdout.trim(), out.to_str().unwrap(), "{context}");
            assert!(stderr.contains("exported"), "{context}");
            let (dtype, _) = refs.assert_complete(&out, &context);
            assert_eq!(dtype, if force { "fp16" } else { "fp32" }, "{context}");
        }
        assert_eq!(leftovers(&out), Vec::<String>::new(), "{context}");
    }
    eprintln!("{stopped} runs stopped by SIGINT, {finished} finished");
    assert!(
        stopped > 0 && finished > 0,
        "the spread missed a side: {stopped} stopped, {finished} finished"
    );
}

/// Item 2: two exports into one new folder at once, without --force: one exports, the
/// other fails with "already exists", and the folder holds the one that succeeded.
#[test]
fn two_exports_into_one_new_folder_do_not_both_succeed() {
    let base = base("same-folder");
    let refs = Reference::make(&base);
    let ck = checkpoint();
    // The same checkpoint named two ways, so that the manifest tells whose it is.
    let models = [ck.to_str().unwrap().to_string(), format!("{}/.", ck.display())];
    for round in 0..2 {
        let out = base.join(format!("out-{round}"));
        let children: Vec<Child> = [("fp32", &models[0]), ("fp16", &models[1])]
            .into_iter()
            .map(|(dtype, model)| spawn(model, &out, &["--dtype", dtype], 300))
            .collect();
        let outputs: Vec<Output> =
            children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
        let all: String =
            outputs.iter().map(|o| text(&o.stderr)).collect::<Vec<_>>().join("\n---\n");
        let ok: Vec<usize> = (0..2).filter(|&i| outputs[i].status.success()).collect();
        assert_eq!(ok.len(), 1, "round {round}: exactly one export succeeds: {all}");
        let loser = &outputs[1 - ok[0]];
        assert_eq!(loser.status.code(), Some(1), "{all}");
        assert!(text(&loser.stderr).contains("already exists"), "{all}");
        assert!(loser.stdout.is_empty(), "{all}");
        let (dtype, source) = refs.assert_complete(&out, &all);
        assert_eq!(source, models[ok[0]], "the folder holds the export that succeeded: {all}");
        assert_eq!(dtype, ["fp32", "fp16"][ok[0]], "{all}");
        assert_eq!(leftovers(&out), Vec::<String>::new());
    }
}

/// Item 3: four --force exports replacing one export at once take turns: each succeeds,
/// and the folder holds the complete export of the one that finished last, with the dtype
/// it printed.
#[test]
fn concurrent_force_exports_take_turns() {
    let base = base("force");
    let refs = Reference::make(&base);
    let ck = checkpoint();
    let out = base.join("out");
    let o = spawn(ck.to_str().unwrap(), &out, &["--quiet"], 0).wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let models: Vec<String> =
        (0..4).map(|i| format!("{}{}", ck.display(), "/.".repeat(i))).collect();
    let dtypes = ["fp16", "fp32", "fp16", "fp32"];
    let waiters: Vec<_> = (0..4)
        .map(|i| {
            let child = spawn(&models[i], &out, &["--force", "--dtype", dtypes[i]], 150);
            std::thread::spawn(move || {
                let o = child.wait_with_output().unwrap();
                (Instant::now(), o)
            })
        })
        .collect();
    let results: Vec<(Instant, Output)> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
    let all: String =
        results.iter().map(|(_, o)| text(&o.stderr)).collect::<Vec<_>>().join("\n---\n");
    for (i, (_, o)) in results.iter().enumerate() {
        assert!(o.status.success(), "export {i} failed: {all}");
        assert!(text(&o.stderr).contains(&format!("(opt, {})", dtypes[i])), "{all}");
    }
    let (dtype, source) = refs.assert_complete(&out, &all);
    let last = (0..4).max_by_key(|&i| results[i].0).unwrap();
    assert_eq!(source, models[last], "the last to finish is the one in the folder: {all}");
    assert_eq!(dtype, dtypes[last], "{all}");
    assert_eq!(leftovers(&out), Vec::<String>::new(), "{all}");
}
