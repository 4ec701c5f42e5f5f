//! The commands the README and the docs show, run as written: every `$ blip2-ort ...`
//! line inside a code block, page by page (each page from a fresh folder holding the
//! repository's `tests/`, so relative paths work as they do from the root), in order.
//! A command shown with an `error:` line after it must fail; every other must succeed;
//! JSON lines shown with `token_ids` must be printed exactly. `serve` runs until
//! stopped and is left out, as is anything naming a Hub model (no network here).

use std::path::{Path, PathBuf};
use std::process::Command;

const PAGES: [&str; 10] = [
    "README.md",
    "docs/export.md",
    "docs/infer.md",
    "docs/retrieval.md",
    "docs/serving.md",
    "docs/gpu.md",
    "docs/flan-t5.md",
    "docs/PERFORMANCE.md",
    "docs/cache.md",
    "docs/any-runtime.md",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// A shown command and the lines shown after it (up to the next command or the end of
/// its code block).
struct Shown {
    line: usize,
    command: String,
    output: Vec<String>,
}

fn shown_commands(text: &str) -> Vec<Shown> {
    let mut out: Vec<Shown> = Vec::new();
    let mut in_block = false;
    let mut current: Option<Shown> = None;
    for (i, l) in text.lines().enumerate() {
        if l.trim_start().starts_with("```") {
            in_block = !in_block;
            out.extend(current.take());
            continue;
        }
        if !in_block {
            continue;
        }
        if let Some(cmd) = l.strip_prefix("$ ") {
            out.extend(current.take());
            if cmd.starts_with("blip2-ort ") {
                current = Some(Shown { line: i + 1, command: cmd.to_string(), output: vec![] });
            }
        } else if let Some(c) = current.as_mut() {
            c.output.push(l.to_string());
        }
    }
    out.extend(current);
    out
}

#[test]
fn every_shown_command_runs_as_shown() {
    let root = root();
    let bin = Path::new(env!("CARGO_BIN_EXE_blip2-ort"));
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("readme");
    let _ = std::fs::remove_dir_all(&base);
    let bin_dir = base.join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    std::os::unix::fs::symlink(bin, bin_dir.join("blip2-ort")).unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let mut ran = 0;
    for page in PAGES {
        let text = std::fs::read_to_string(root.join(page)).unwrap();
        let dir = base.join(page.replace('/', "-"));
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink(root.join("tests"), dir.join("tests")).unwrap();
        for s in shown_commands(&text) {
            if s.command.starts_with("blip2-ort serve") || s.command.contains("Salesforce/") {
                continue;
            }
            let o = Command::new("sh")
                .arg("-c")
                .arg(&s.command)
                .current_dir(&dir)
                .env("PATH", &path)
                .output()
                .unwrap();
            let (stdout, stderr) =
                (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            let at = format!("{page}:{} `{}`", s.line, s.command);
            let fails = s.output.iter().any(|l| l.starts_with("error:"));
            assert_eq!(
                !o.status.success(),
                fails,
                "{at}: exit {:?}, shown {}\nstdout: {stdout}\nstderr: {stderr}",
                o.status.code(),
                if fails { "failing" } else { "succeeding" }
            );
            for want in s.output.iter().filter(|l| l.starts_with('{') && l.contains("token_ids")) {
                assert!(stdout.lines().any(|l| l == want), "{at}: printed\n{stdout}\nnot\n{want}");
            }
            ran += 1;
        }
    }
    assert!(ran >= 15, "only {ran} commands found in the pages");
}
