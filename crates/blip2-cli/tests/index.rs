//! `blip2-ort index` and `blip2-ort search` on the tiny retrieval checkpoint: search
//! gives `infer rank`'s order and scores (transformers' ITC within 1e-5); re-indexing
//! after adding, changing, touching and deleting files does only what changed; an index
//! run killed midway resumes; two runs at once share the file; bad files are named.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use blip2_index::{ExportIdentity, OpenMode, Store};
use serde_json::Value;

mod common;
use common::test_tmp;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn photo(name: &str) -> PathBuf {
    root().join("tests/data/photos").join(name)
}

fn tmp(test: &str) -> PathBuf {
    let d = test_tmp().join("index-cli").join(test);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blip2-ort"))
}

fn export(name: &str, dir: &Path) -> PathBuf {
    let out = dir.join(format!("model-{name}"));
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

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `index` with `args` after the model and db; asserts success; its summary line.
fn index(model: &Path, db: &Path, args: &[&str]) -> String {
    let mut a = vec!["index", "--quiet", "--model", s(model), "--db", s(db)];
    a.extend(args);
    let o = run(&a);
    assert!(o.status.success(), "{a:?}: {}", stderr(&o));
    stdout(&o).trim().to_string()
}

fn json_lines(o: &Output) -> Vec<Value> {
    stdout(o).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// (image, itc, itm) of `search --json` or `infer rank --json`.
fn results(o: &Output) -> Vec<(String, f32, Option<f32>)> {
    assert!(o.status.success(), "{}", stderr(o));
    json_lines(o)
        .iter()
        .map(|l| {
            (
                l["image"].as_str().unwrap().to_string(),
                l["itc"].as_f64().unwrap() as f32,
                l.get("itm").map(|v| v.as_f64().unwrap() as f32),
            )
        })
        .collect()
}

fn search(model: &Path, db: &Path, text: &str, extra: &[&str]) -> Vec<(String, f32, Option<f32>)> {
    let mut a = vec!["search", "--json", "--model", s(model), "--db", s(db), text];
    a.extend(extra);
    results(&run(&a))
}

fn rank(
    model: &Path,
    text: &str,
    images: &[PathBuf],
    extra: &[&str],
) -> Vec<(String, f32, Option<f32>)> {
    let mut a = vec!["infer", "--json", "--model", s(model), "rank", "--text", text];
    a.extend(extra);
    a.extend(images.iter().map(|p| s(p)));
    results(&run(&a))
}

/// Same images in the same order, scores within 1e-5.
fn assert_same(
    what: &str,
    got: &[(String, f32, Option<f32>)],
    want: &[(String, f32, Option<f32>)],
) {
    let names =
        |v: &[(String, f32, Option<f32>)]| v.iter().map(|r| r.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(got), names(want), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert!((g.1 - w.1).abs() <= 1e-5, "{what}: {}: itc {} vs {}", g.0, g.1, w.1);
        match (g.2, w.2) {
            (Some(a), Some(b)) => assert!((a - b).abs() <= 1e-5, "{what}: {}: itm {a} vs {b}", g.0),
            (None, None) => {}
            _ => panic!("{what}: {}: itm {:?} vs {:?}", g.0, g.2, w.2),
        }
    }
}

const TEXTS: [&str; 3] = [
    "a photo of a cat",
    "A rocket launch!",
    "two men standing near the large grey camera on the street",
];

/// Copies photos into `dir` under new names; their canonical paths.
fn copy_photos(dir: &Path, names: &[(&str, &str)]) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    names
        .iter()
        .map(|(from, to)| {
            let p = dir.join(to);
            std::fs::copy(photo(from), &p).unwrap();
            p.canonicalize().unwrap()
        })
        .collect()
}

#[test]
fn search_gives_rank_order_and_scores_and_reranks_as_rank_does() {
    let d = tmp("rank");
    let model = export("itm-tiny", &d);
    let photos = copy_photos(
        &d.join("photos"),
        &[
            ("chelsea.png", "chelsea.png"),
            ("camera.png", "camera.png"),
            ("no_time_for_that_tiny.gif", "tiny.gif"),
        ],
    );
    let db = d.join("photos.db");
    assert_eq!(
        index(&model, &db, &[s(&d.join("photos"))]),
        format!(
            "{}: 3 images (3 added, 0 updated, 0 unchanged, 0 removed, 0 skipped)",
            db.display()
        )
    );
    // transformers' ITC of each photo with the first text (tests/fixtures/itm-tiny/reference).
    let reference: Vec<f32> = {
        let b = std::fs::read(root().join("tests/fixtures/itm-tiny/reference/itc.npy")).unwrap();
        let h = u16::from_le_bytes([b[8], b[9]]) as usize;
        b[10 + h..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    };
    for text in TEXTS {
        let want = rank(&model, text, &photos, &[]);
        assert_same(&format!("{text:?}"), &search(&model, &db, text, &[]), &want);
        let want = rank(&model, text, &photos, &["--rerank", "2"]);
        assert_same(
            &format!("{text:?} --rerank 2"),
            &search(&model, &db, text, &["--rerank", "2"]),
            &want,
        );
        // --top 2 prints the first two.
        assert_same(
            &format!("{text:?} --top 2"),
            &search(&model, &db, text, &["--top", "2"]),
            &rank(&model, text, &photos, &[])[..2],
        );
    }
    // The first text against transformers (4 texts per photo in the reference).
    let got = search(&model, &db, TEXTS[0], &[]);
    for (i, p) in photos.iter().enumerate() {
        let r = got.iter().find(|r| r.0 == s(p)).unwrap();
        assert!(
            (r.1 - reference[i * 4]).abs() <= 1e-5,
            "{}: {} vs transformers {}",
            r.0,
            r.1,
            reference[i * 4]
        );
    }
    // Plain output: score and path, tab-separated.
    let o = run(&["search", "--model", s(&model), "--db", s(&db), TEXTS[0], "--top", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let line = stdout(&o);
    let fields: Vec<&str> = line.trim().split('\t').collect();
    assert_eq!(fields.len(), 2, "{line}");
    assert_eq!(fields[1], got[0].0);
}

#[test]
fn reindexing_does_only_what_changed() {
    let d = tmp("incremental");
    let model = export("itm-tiny", &d);
    let dir = d.join("photos");
    copy_photos(
        &dir,
        &[
            ("chelsea.png", "a.png"),
            ("camera.png", "b.png"),
            ("no_time_for_that_tiny.gif", "c.gif"),
        ],
    );
    copy_photos(&dir.join("sub"), &[("chelsea_rgba.png", "e.png")]);
    std::fs::write(dir.join("notes.txt"), "not an image, not indexed").unwrap();
    let db = d.join("photos.db");
    let summary = |added, updated, unchanged, removed, total| {
        format!("{}: {total} images ({added} added, {updated} updated, {unchanged} unchanged, {removed} removed, 0 skipped)", db.display())
    };
    assert_eq!(
        index(&model, &db, &[s(&dir)]),
        summary(3, 0, 0, 0, 3),
        "subfolders only with --recursive"
    );
    assert_eq!(index(&model, &db, &[s(&dir)]), summary(0, 0, 3, 0, 3));
    // Add d.png, change a.png's bytes, delete c.gif, touch b.png (same bytes, new time).
    std::fs::copy(photo("chelsea_rgba.png"), dir.join("d.png")).unwrap();
    std::fs::copy(photo("rocket.jpg"), dir.join("a.png")).unwrap();
    std::fs::remove_file(dir.join("c.gif")).unwrap();
    let b = std::fs::File::options().write(true).open(dir.join("b.png")).unwrap();
    b.set_modified(std::time::SystemTime::now() + Duration::from_secs(5)).unwrap();
    drop(b);
    assert_eq!(index(&model, &db, &[s(&dir)]), summary(1, 1, 1, 1, 3));
    let now: Vec<PathBuf> =
        ["a.png", "b.png", "d.png"].iter().map(|n| dir.join(n).canonicalize().unwrap()).collect();
    for text in TEXTS {
        assert_same(
            &format!("{text:?} after the changes"),
            &search(&model, &db, text, &[]),
            &rank(&model, text, &now, &[]),
        );
    }
    assert_eq!(index(&model, &db, &[s(&dir)]), summary(0, 0, 3, 0, 3));
    // --recursive takes the subfolder's image; a file named alone is indexed too.
    assert_eq!(index(&model, &db, &["--recursive", s(&dir)]), summary(1, 0, 3, 0, 4));
    // Deleting the subfolder drops its image on the next recursive run.
    std::fs::remove_dir_all(dir.join("sub")).unwrap();
    assert_eq!(index(&model, &db, &["-r", s(&dir)]), summary(0, 0, 3, 1, 3));
}

fn try_open(model: &Path, db: &Path) -> Option<Store> {
    let m = blip2_core::RetrievalManifest::load(model).unwrap();
    Store::open(db, &ExportIdentity::of(model, &m).unwrap(), OpenMode::Existing).ok()
}

fn open(model: &Path, db: &Path) -> Store {
    try_open(model, db).expect("the index opens")
}

/// Eight copies of the photos, for runs long enough to interrupt.
fn many_photos(dir: &Path) -> Vec<PathBuf> {
    let names = ["chelsea.png", "camera.png", "no_time_for_that_tiny.gif", "chelsea_rgba.png"];
    let pairs: Vec<(&str, String)> = (0..8)
        .map(|i| (names[i % 4], format!("p{i}.{}", if i % 4 == 2 { "gif" } else { "png" })))
        .collect();
    let pairs: Vec<(&str, &str)> = pairs.iter().map(|(a, b)| (*a, b.as_str())).collect();
    copy_photos(dir, &pairs)
}

fn slow_index(model: &Path, db: &Path, dir: &Path) -> std::process::Child {
    bin()
        .args(["index", "--quiet", "--batch-size", "1", "--model", s(model), "--db", s(db), s(dir)])
        .env("BLIP2_ORT_TEST_INDEX_DELAY_MS", "300")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn an_index_run_killed_midway_resumes() {
    let d = tmp("interrupted");
    let model = export("itm-tiny", &d);
    let dir = d.join("photos");
    let photos = many_photos(&dir);
    let db = d.join("photos.db");
    let mut child = slow_index(&model, &db, &dir);
    // Wait for two committed batches, then kill -9 (no chance to clean up).
    let started = Instant::now();
    let done = loop {
        // The first run may still be making the file.
        let n = try_open(&model, &db).and_then(|s| s.len().ok()).unwrap_or(0);
        if n >= 2 {
            break n;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no batch committed in 60 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the run was killed, not finished");
    let kept = open(&model, &db).len().unwrap();
    assert!((done..8).contains(&kept), "{kept} images kept after the kill ({done} seen before it)");
    // The next run does the rest only.
    let left = 8 - kept;
    assert_eq!(
        index(&model, &db, &[s(&dir)]),
        format!(
            "{}: 8 images ({left} added, 0 updated, {kept} unchanged, 0 removed, 0 skipped)",
            db.display()
        )
    );
    assert_same(
        "after resuming",
        &search(&model, &db, TEXTS[0], &[]),
        &rank(&model, TEXTS[0], &photos, &[]),
    );
}

#[test]
fn two_index_runs_at_once_share_the_file() {
    let d = tmp("concurrent");
    let model = export("itm-tiny", &d);
    let dir = d.join("photos");
    let photos = many_photos(&dir);
    let db = d.join("photos.db");
    let runs = [slow_index(&model, &db, &dir), slow_index(&model, &db, &dir)];
    for r in runs {
        let o = r.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stdout(&o).contains(": 8 images ("), "{}", stdout(&o));
    }
    assert_eq!(
        index(&model, &db, &[s(&dir)]),
        format!(
            "{}: 8 images (0 added, 0 updated, 8 unchanged, 0 removed, 0 skipped)",
            db.display()
        )
    );
    assert_same(
        "after two runs",
        &search(&model, &db, TEXTS[1], &[]),
        &rank(&model, TEXTS[1], &photos, &[]),
    );
}

#[test]
fn bad_files_and_images_are_named() {
    let d = tmp("bad");
    let model = export("itm-tiny", &d);
    let other = export("itm-tiny-sharded", &d);
    let dir = d.join("photos");
    copy_photos(&dir, &[("chelsea.png", "good.png")]);
    std::fs::write(dir.join("broken.png"), b"\x89PNG but not really").unwrap();
    let db = d.join("photos.db");
    // An unreadable image and a missing path are listed and skipped; the rest is indexed.
    let missing = d.join("missing.jpg");
    let o = run(&["index", "--model", s(&model), "--db", s(&db), s(&dir), s(&missing)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("skipped") && e.contains("broken.png") && e.contains("missing.jpg"), "{e}");
    assert!(
        stdout(&o).contains("1 images (1 added, 0 updated, 0 unchanged, 0 removed, 2 skipped)"),
        "{}",
        stdout(&o)
    );

    let refused = |args: &[&str], says: &[&str]| {
        let o = run(args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(says.iter().all(|w| e.contains(w)), "{args:?}: {e}");
    };
    // Another export.
    refused(
        &["search", "--model", s(&other), "--db", s(&db), "a cat"],
        &["photos.db", "another export"],
    );
    refused(
        &["index", "--model", s(&other), "--db", s(&db), s(&dir)],
        &["photos.db", "another export"],
    );
    // No index, a text file, another application's SQLite file, a damaged index.
    refused(
        &["search", "--model", s(&model), "--db", s(&d.join("none.db")), "a cat"],
        &["none.db", "no such index"],
    );
    let text = d.join("notes.db");
    std::fs::write(&text, "some notes, not a database").unwrap();
    refused(
        &["index", "--model", s(&model), "--db", s(&text), s(&dir)],
        &["notes.db", "not an SQLite database"],
    );
    let foreign = d.join("foreign.db");
    rusqlite::Connection::open(&foreign)
        .unwrap()
        .execute_batch("CREATE TABLE songs (title TEXT);")
        .unwrap();
    refused(
        &["index", "--model", s(&model), "--db", s(&foreign), s(&dir)],
        &["foreign.db", "another application"],
    );
    let damaged = d.join("damaged.db");
    let mut bytes = std::fs::read(&db).unwrap();
    for b in bytes.iter_mut().skip(100) {
        *b ^= 0x5a;
    }
    std::fs::write(&damaged, &bytes).unwrap();
    refused(&["search", "--model", s(&model), "--db", s(&damaged), "a cat"], &["damaged.db"]);
    // A captioning export.
    let captioning = export("opt-tiny", &d);
    refused(
        &["index", "--model", s(&captioning), "--db", s(&d.join("c.db")), s(&dir)],
        &["captioning export", "image-text retrieval export"],
    );
    let o = run(&["serve", "--model", s(&captioning), "--port", "0", "--db", s(&db)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--db"), "{}", stderr(&o));
    // Usage errors.
    let o = run(&["search", "--model", s(&model), "--db", s(&db), "a cat", "--top", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--top"), "{}", stderr(&o));
}
