//! What a fresh clone must carry: the benchmark scripts the docs point to, and no path
//! into folders outside the repository.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn text_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name == ".git" || name == "target" || name == "fixtures" || name == "data" {
            continue;
        }
        if p.is_dir() {
            text_files(&p, out);
        } else if ["rs", "md", "sh", "py", "toml", "txt"]
            .iter()
            .any(|x| name.ends_with(&format!(".{x}")))
            || ["quickstart", "test", "run"].contains(&name.as_str())
        {
            out.push(p);
        }
    }
}

/// Item 13 of the reliability issue: the README, docs and scripts pointed at the
/// benchmark scripts of a folder beside the repository, which a clone does not have.
#[test]
fn nothing_points_outside_the_repository() {
    let root = root();
    let mut files = Vec::new();
    text_files(&root, &mut files);
    assert!(files.iter().any(|f| f.ends_with("README.md")));
    let outside = ["../", "shared/"].concat();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        assert!(!text.contains(&outside), "{} refers to {outside}", f.display());
    }
}

#[test]
fn the_benchmark_scripts_the_docs_name_are_here() {
    let root = root();
    for script in
        ["scripts/hf_generate_bench.py", "scripts/random_checkpoint.py", "scripts/compare_bench.sh"]
    {
        assert!(root.join(script).is_file(), "{script} missing");
    }
    // Every `scripts/NAME` that a script, the README or a doc names is in the repository.
    let mut files = Vec::new();
    text_files(&root, &mut files);
    let mut named = 0;
    for f in files.iter().filter(|f| {
        let rel = f.strip_prefix(&root).unwrap();
        rel.starts_with("scripts") || rel.starts_with("docs") || rel.ends_with("README.md")
    }) {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        for (i, _) in text.match_indices("scripts/") {
            let name: String = text[i + "scripts/".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
                .collect();
            let name = name.trim_end_matches('.');
            if name.is_empty() {
                continue;
            }
            named += 1;
            assert!(
                root.join("scripts").join(name).is_file(),
                "{} names scripts/{name}, which is not in the repository",
                f.display()
            );
        }
    }
    assert!(named > 10, "only {named} script references found");
    for doc in ["README.md", "docs/PERFORMANCE.md"] {
        let text = std::fs::read_to_string(root.join(doc)).unwrap();
        assert!(
            text.contains("scripts/hf_generate_bench.py")
                && text.contains("scripts/random_checkpoint.py"),
            "{doc}"
        );
    }
}
