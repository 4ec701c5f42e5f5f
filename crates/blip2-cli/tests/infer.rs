//! The `infer` command line: tasks against transformers' recorded outputs, output format,
//! and bad input (unreadable images, bad batch lines, over-long prompts, providers).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

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
    let d = test_tmp().join("infer").join(test);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blip2-ort"))
}

/// Exports a fixture checkpoint with the CLI and returns the export folder.
fn export(name: &str, test: &str) -> PathBuf {
    export_with(name, test, &[])
}

/// [`export`] with extra `blip2-ort export` flags.
fn export_with(name: &str, test: &str, flags: &[&str]) -> PathBuf {
    let out = tmp(test).join("model");
    let o = bin()
        .args(["export", "--quiet"])
        .arg(root().join("tests/fixtures").join(name).join("checkpoint"))
        .arg("-o")
        .arg(&out)
        .args(flags)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

fn run(args: &[&str], model: &Path) -> Output {
    bin().args(["infer", "--model"]).arg(model).args(args).output().unwrap()
}

fn run_stdin(args: &[&str], model: &Path, stdin: &[u8]) -> Output {
    let mut child = bin()
        .args(["infer", "--model"])
        .arg(model)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn json_lines(o: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn reference(name: &str, case: &str) -> Value {
    let p = root().join("tests/fixtures").join(name).join("reference/generate.json");
    let all: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    all["cases"].as_array().unwrap().iter().find(|c| c["name"] == case).unwrap().clone()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn caption_vqa_and_prompted_caption_match_transformers() {
    let m = export("opt-tiny-sharded", "tasks");
    let o = run(
        &["caption", photo("chelsea.png").to_str().unwrap(), "--max-new-tokens", "10", "--json"],
        &m,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let r = reference("opt-tiny-sharded", "caption");
    let got = json_lines(&o);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["token_ids"], r["sequences"][0]);
    assert_eq!(got[0]["text"], r["texts"][0]);

    let o = run(
        &[
            "caption",
            photo("rocket.jpg").to_str().unwrap(),
            "--prompt",
            "a photo of",
            "--max-new-tokens",
            "10",
            "--json",
        ],
        &m,
    );
    assert_eq!(
        json_lines(&o)[0]["token_ids"],
        reference("opt-tiny-sharded", "prompted_caption")["sequences"][0]
    );

    let o = run(
        &[
            "vqa",
            photo("camera.png").to_str().unwrap(),
            "--question",
            "what is in the picture?",
            "--max-new-tokens",
            "10",
            "--json",
        ],
        &m,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let r = reference("opt-tiny-sharded", "vqa");
    assert_eq!(json_lines(&o)[0]["token_ids"], r["sequences"][0]);
    assert_eq!(json_lines(&o)[0]["prompt"], r["prompts"][0]);

    // Without --json: the text alone, one line per image, in order.
    let o = run(
        &[
            "caption",
            photo("chelsea.png").to_str().unwrap(),
            photo("camera.png").to_str().unwrap(),
            "--max-new-tokens",
            "10",
        ],
        &m,
    );
    let text = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        vec![
            reference("opt-tiny-sharded", "caption")["texts"][0].as_str().unwrap(),
            reference("opt-tiny-sharded", "caption_gray")["texts"][0].as_str().unwrap(),
        ]
    );
}

#[test]
fn beam_search_flags_match_transformers() {
    let m = export("opt-tiny-sharded", "beam");
    let img = photo("chelsea.png");
    let args = [
        "caption",
        img.to_str().unwrap(),
        "--prompt",
        "a photo of",
        "--max-new-tokens",
        "10",
        "--num-beams",
        "3",
        "--length-penalty",
        "0.5",
        "--num-return-sequences",
        "2",
        "--json",
    ];
    let o = run(&args, &m);
    assert!(o.status.success(), "{}", stderr(&o));
    let got: Vec<Value> = json_lines(&o).iter().map(|l| l["token_ids"].clone()).collect();
    let want: Vec<Value> =
        reference("opt-tiny-sharded", "beam")["sequences"].as_array().unwrap().clone();
    assert_eq!(got, want);
}

#[test]
fn chat_keeps_the_seed_format_across_turns() {
    let m = export("opt-tiny-sharded", "chat");
    let o = run_stdin(
        &["chat", photo("chelsea.png").to_str().unwrap(), "--max-new-tokens", "10", "--json"],
        &m,
        b"what is this?\n\nwhere is it?\n",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let got = json_lines(&o);
    assert_eq!(got.len(), 2, "the empty line is skipped");
    for (g, case) in got.iter().zip(["chat_turn1", "chat_turn2"]) {
        let r = reference("opt-tiny-sharded", case);
        assert_eq!(g["prompt"], r["prompts"][0], "{case}");
        assert_eq!(g["token_ids"], r["sequences"][0], "{case}");
    }
}

#[test]
fn chat_drops_the_oldest_turns_beyond_the_context() {
    let m = export("opt-tiny", "chat-context");
    // A context of 40 tokens leaves room for little history.
    let manifest = m.join("blip2_manifest.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    v["text"]["max_context"] = serde_json::json!(40);
    std::fs::write(&manifest, v.to_string()).unwrap();
    let questions =
        b"what is this?\nwhere is it?\nwhat color is the sky in the picture?\nhow many?\n";
    let o = run_stdin(
        &["chat", photo("chelsea.png").to_str().unwrap(), "--max-new-tokens", "3", "--json"],
        &m,
        questions,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json_lines(&o).len(), 4);
    assert!(stderr(&o).contains("dropped the"), "{}", stderr(&o));
}

/// The number of positions a chat prompt takes in the language model.
fn prompt_positions(model: &Path, prompt: &str) -> usize {
    let manifest = blip2_core::Manifest::load(model).unwrap();
    let p = blip2_runtime::prompt::Prompter::load(model, &manifest).unwrap();
    p.prompt_len(prompt).unwrap()
}

/// Item 1: with the fixtures' 128 positions and 20 new tokens a chat used to stop after two
/// or three answers ("the prompt (118 tokens) plus --max-new-tokens 20 exceeds ..."); the
/// oldest turns must go instead, leaving room for the new tokens. Several question
/// lengths on both OPT fixtures, so that prompts land in the range that used to fail.
#[test]
fn chat_drops_turns_to_leave_room_for_the_new_tokens() {
    let questions = [
        "what is this?",
        "where is it?",
        "what is the cat doing?",
        "what color is the sky in the picture?",
        "is it day or night?",
    ];
    for name in ["opt-tiny", "opt-tiny-sharded"] {
        let m = export(name, &format!("chat-positions-{name}"));
        let positions = blip2_core::Manifest::load(&m).unwrap().text.max_position_embeddings;
        for q in questions {
            let input = format!("{q}\n").repeat(6);
            let o = run_stdin(
                &[
                    "chat",
                    photo("chelsea.png").to_str().unwrap(),
                    "--max-new-tokens",
                    "20",
                    "--json",
                ],
                &m,
                input.as_bytes(),
            );
            assert!(o.status.success(), "{name}, {q:?}: {}", stderr(&o));
            let got = json_lines(&o);
            assert_eq!(got.len(), 6, "one answer per question: {}", stderr(&o));
            for g in &got {
                let prompt = g["prompt"].as_str().unwrap();
                assert!(prompt.ends_with(&format!("Question: {q} Answer:")), "{prompt}");
                let len = prompt_positions(&m, prompt);
                assert!(len + 20 <= positions, "{len} + 20 > {positions}: {prompt}");
            }
        }
    }
}

/// Item 1: a question too long on its own fails only its line; the session goes on with
/// its history, and the exit status says a line failed.
#[test]
fn chat_question_too_long_alone_fails_only_its_line() {
    let m = export("opt-tiny", "chat-long-question");
    let long = "is the cat on the red car? ".repeat(30);
    let input = format!("what is this?\n{long}\nwhere is it?\n");
    let o = run_stdin(
        &["chat", photo("chelsea.png").to_str().unwrap(), "--max-new-tokens", "5", "--json"],
        &m,
        input.as_bytes(),
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let got = json_lines(&o);
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got[0]["token_ids"].is_array());
    assert_eq!(got[1]["line"], 2);
    let err = got[1]["error"].as_str().unwrap();
    assert!(err.contains("question alone") && err.contains("128"), "{err}");
    assert!(stderr(&o).contains("error: line 2:"), "{}", stderr(&o));
    // The third question still sees the first turn.
    let third = got[2]["prompt"].as_str().unwrap();
    assert!(
        third.starts_with("Question: what is this? Answer:")
            && third.ends_with("Question: where is it? Answer:"),
        "{third}"
    );
    // Too many new tokens for any question: each line says so, nothing else breaks.
    let o = run_stdin(
        &["chat", photo("chelsea.png").to_str().unwrap(), "--max-new-tokens", "127"],
        &m,
        b"hi\n",
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--max-new-tokens"), "{}", stderr(&o));
}

/// Item 6: an unreadable image in a later batch fails the command before anything is
/// printed, so no partial list of captions looks like the whole answer.
#[test]
fn caption_prints_nothing_when_a_later_image_is_unreadable() {
    let m = export("opt-tiny", "caption-later-bad");
    let bad = m.parent().unwrap().join("broken.png");
    std::fs::write(&bad, b"not a png").unwrap();
    let good = photo("chelsea.png");
    let o = run(
        &[
            "caption",
            "--batch-size",
            "1",
            good.to_str().unwrap(),
            good.to_str().unwrap(),
            bad.to_str().unwrap(),
        ],
        &m,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty(), "stdout: {}", String::from_utf8_lossy(&o.stdout));
    assert!(stderr(&o).contains("broken.png"), "{}", stderr(&o));
    let o =
        run(&["caption", "--batch-size", "1", good.to_str().unwrap(), "/no/such/later.png"], &m);
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
    // Batching is unchanged: the same captions at any batch size.
    let one = run(
        &[
            "caption",
            "--batch-size",
            "1",
            good.to_str().unwrap(),
            photo("camera.png").to_str().unwrap(),
            "--max-new-tokens",
            "10",
        ],
        &m,
    );
    let two = run(
        &[
            "caption",
            "--batch-size",
            "2",
            good.to_str().unwrap(),
            photo("camera.png").to_str().unwrap(),
            "--max-new-tokens",
            "10",
        ],
        &m,
    );
    assert!(one.status.success(), "{}", stderr(&one));
    assert_eq!(one.stdout, two.stdout);
    assert_eq!(
        String::from_utf8_lossy(&one.stdout).lines().next().unwrap(),
        reference("opt-tiny", "caption")["texts"][0].as_str().unwrap()
    );
}

/// Item 7: an export folder whose manifest is gone is named as such, not exported as if
/// it were a checkpoint.
#[test]
fn an_export_folder_without_its_manifest_is_named() {
    let m = export("opt-tiny", "no-manifest");
    std::fs::remove_file(m.join("blip2_manifest.json")).unwrap();
    let o = run(&["caption", photo("chelsea.png").to_str().unwrap()], &m);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("export folder without its blip2_manifest.json") && e.contains("--force"),
        "{e}"
    );
    assert!(!e.contains("model.safetensors"), "{e}");
    assert!(!e.contains("exporting"), "{e}");
}

/// Item 8: a cause the message already shows is not repeated.
#[test]
fn error_causes_are_not_repeated() {
    let m = export("opt-tiny", "ort-error");
    // The manifest now claims the Q-Former makes fp16 query embeddings: they reach the fp32
    // language model as fp16 and ONNX Runtime refuses them, with a message that used to be
    // printed twice.
    let path = m.join("blip2_manifest.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for t in v["graphs"]["qformer"]["outputs"].as_array_mut().unwrap() {
        if t["name"] == "image_embeds" {
            t["dtype"] = "float16".into();
        }
    }
    std::fs::write(&path, v.to_string()).unwrap();
    let o = run(&["caption", photo("chelsea.png").to_str().unwrap()], &m);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("float16"), "{e}");
    assert_no_repeats(&e);
}

/// Fails if some stretch of 30 or more characters of the error line occurs twice.
fn assert_no_repeats(e: &str) {
    let line = e
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line: {e}"));
    let chars: Vec<char> = line.chars().collect();
    for i in 0..chars.len().saturating_sub(30) {
        let piece: String = chars[i..i + 30].iter().collect();
        assert_eq!(line.matches(&piece).count(), 1, "{piece:?} is said twice in: {line}");
    }
}

#[test]
fn batch_runs_good_lines_and_reports_bad_ones() {
    let m = export("opt-tiny-sharded", "batch");
    let dir = m.parent().unwrap();
    std::fs::copy(photo("chelsea.png"), dir.join("cat.png")).unwrap();
    std::fs::write(dir.join("notes.txt"), "not an image").unwrap();
    let mut lines: Vec<u8> = Vec::new();
    lines.extend_from_slice(b"{\"image\": \"cat.png\"}\n");
    lines.extend_from_slice(
        format!(
            "{{\"image\": \"{}\", \"prompt\": \"a photo of the\"}}\n",
            photo("rocket.jpg").display()
        )
        .as_bytes(),
    );
    lines.extend_from_slice(b"\n"); // empty: skipped
    lines.extend_from_slice(b"{not json\n");
    lines.extend_from_slice(b"{\"image\": \"notes.txt\"}\n");
    lines.extend_from_slice(b"{\"image\": \"missing.png\"}\n");
    lines.extend_from_slice(b"\xff\xfe not utf-8\n");
    lines.extend_from_slice(
        format!(
            "{{\"image\": \"{}\", \"question\": \"what is in the picture?\"}}\n",
            photo("no_time_for_that_tiny.gif").display()
        )
        .as_bytes(),
    );
    std::fs::write(dir.join("requests.jsonl"), &lines).unwrap();
    let o =
        run(&["batch", dir.join("requests.jsonl").to_str().unwrap(), "--max-new-tokens", "10"], &m);
    assert_eq!(o.status.code(), Some(1), "bad lines make the exit code non-zero");
    let got = json_lines(&o);
    let line_nos: Vec<i64> = got.iter().map(|g| g["line"].as_i64().unwrap()).collect();
    assert_eq!(
        line_nos,
        vec![1, 2, 4, 5, 6, 7, 8],
        "one result per non-empty line, in input order"
    );
    assert_eq!(got[0]["token_ids"], reference("opt-tiny-sharded", "batch_row0")["sequences"][0]);
    assert_eq!(got[1]["token_ids"], reference("opt-tiny-sharded", "batch_row1")["sequences"][0]);
    assert_eq!(got[6]["token_ids"], reference("opt-tiny-sharded", "batch_row2")["sequences"][0]);
    assert!(got[2]["error"].as_str().unwrap().contains("JSON"), "{}", got[2]);
    assert!(got[3]["error"].as_str().unwrap().contains("notes.txt"), "{}", got[3]);
    assert!(got[4]["error"].as_str().unwrap().contains("missing.png"), "{}", got[4]);
    assert!(got[5]["error"].as_str().unwrap().contains("UTF-8"), "{}", got[5]);
}

#[test]
fn unreadable_image_names_the_file() {
    let m = export("opt-tiny", "bad-image");
    let bad = m.parent().unwrap().join("photo.jpg");
    std::fs::write(&bad, b"this is not a jpeg").unwrap();
    let o = run(&["caption", bad.to_str().unwrap()], &m);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.starts_with("error: ") && e.contains("photo.jpg"), "{e}");
    assert!(o.stdout.is_empty());
    let o = run(&["caption", "/no/such/file.png"], &m);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("/no/such/file.png"), "{}", stderr(&o));
}

#[test]
fn over_long_prompt_is_refused() {
    let m = export("opt-tiny", "long-prompt");
    let prompt = "a photo of the cat ".repeat(200);
    let o = run(&["caption", photo("chelsea.png").to_str().unwrap(), "--prompt", &prompt], &m);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("context limit"), "{}", stderr(&o));
}

#[test]
fn generation_flags_are_validated() {
    let m = export("opt-tiny", "flags");
    let o = run(
        &["caption", photo("chelsea.png").to_str().unwrap(), "--num-return-sequences", "2"],
        &m,
    );
    assert_eq!(o.status.code(), Some(2), "flags that contradict each other are a usage error");
    assert!(stderr(&o).contains("--num-return-sequences"), "{}", stderr(&o));
    let o = run(
        &["caption", photo("chelsea.png").to_str().unwrap(), "--do-sample", "--top-p", "1.5"],
        &m,
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--top-p"), "{}", stderr(&o));
}

/// Item 12 of the reliability issue: a flag the search would not use is checked all the
/// same, so `--top-p 1.5` never passes silently.
#[test]
fn unused_generation_flags_are_checked_too() {
    let m = export("opt-tiny", "unused-flags");
    let img = photo("chelsea.png");
    for (flag, value) in
        [("--top-p", "1.5"), ("--top-p", "0"), ("--temperature", "0"), ("--temperature", "-2")]
    {
        let o = run(&["caption", img.to_str().unwrap(), flag, value], &m);
        assert_eq!(o.status.code(), Some(2), "{flag} {value} without --do-sample: {}", stderr(&o));
        assert!(stderr(&o).contains(flag), "{}", stderr(&o));
        assert!(o.stdout.is_empty());
    }
    // Values in range are accepted without sampling, and change nothing.
    let plain = run(&["caption", img.to_str().unwrap(), "--max-new-tokens", "10", "--json"], &m);
    let with = run(
        &[
            "caption",
            img.to_str().unwrap(),
            "--max-new-tokens",
            "10",
            "--json",
            "--top-p",
            "0.5",
            "--temperature",
            "0.7",
        ],
        &m,
    );
    assert!(with.status.success(), "{}", stderr(&with));
    assert_eq!(plain.stdout, with.stdout);
}

/// Item 9: negative numbers reach the flag's own check (clap's tip `use '-- -1'` led
/// nowhere), and every usage error exits with status 2.
#[test]
fn negative_and_out_of_range_values_name_their_flag_and_exit_2() {
    let m = export("opt-tiny", "negative");
    let img = photo("chelsea.png");
    for (flag, value) in [
        ("--top-k", "-1"),
        ("--max-new-tokens", "-5"),
        ("--max-new-tokens", "0"),
        ("--num-beams", "-2"),
        ("--temperature", "-1"),
        ("--repetition-penalty", "-1.5"),
        ("--seed", "-3"),
        ("--batch-size", "0"),
        ("--threads", "-1"),
    ] {
        let o = run(&["caption", img.to_str().unwrap(), flag, value], &m);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{flag} {value}: {e}");
        assert!(e.contains(flag), "{flag} {value}: {e}");
        assert!(!e.contains("'-- "), "no tip to write `-- {value}`: {e}");
        assert!(o.stdout.is_empty());
    }
    // A negative length penalty is valid (it favours shorter beams).
    let o = run(
        &[
            "caption",
            img.to_str().unwrap(),
            "--num-beams",
            "2",
            "--length-penalty",
            "-0.5",
            "--max-new-tokens",
            "3",
        ],
        &m,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // Other usage errors: an unknown flag, no --model.
    let o = run(&["caption", img.to_str().unwrap(), "--no-such-flag"], &m);
    assert_eq!(o.status.code(), Some(2));
    let o = bin().args(["infer", "caption", img.to_str().unwrap()]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--model"), "{}", stderr(&o));
}

#[test]
fn sampling_with_a_seed_is_reproducible_from_the_cli() {
    let m = export("opt-tiny", "seed");
    let img = photo("rocket.jpg");
    let args = [
        "caption",
        img.to_str().unwrap(),
        "--do-sample",
        "--seed",
        "11",
        "--top-k",
        "0",
        "--temperature",
        "2.0",
        "--max-new-tokens",
        "12",
        "--json",
    ];
    let a = run(&args, &m);
    let b = run(&args, &m);
    assert!(a.status.success(), "{}", stderr(&a));
    assert_eq!(a.stdout, b.stdout);
}

#[test]
fn unknown_or_unavailable_providers_fail_clearly() {
    let m = export("opt-tiny", "providers");
    let o = run(&["--ep", "rocm", "caption", photo("chelsea.png").to_str().unwrap()], &m);
    // An unknown profile is a usage error (issue 23, item 14).
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("rocm") && stderr(&o).contains("cpu"), "{}", stderr(&o));
    if Path::new("/dev/nvidia0").exists() {
        return; // a GPU machine can run the cuda profile
    }
    let o = run(&["--ep", "cuda", "caption", photo("chelsea.png").to_str().unwrap()], &m);
    assert_eq!(o.status.code(), Some(1), "no silent CPU fallback");
    assert!(stderr(&o).to_lowercase().contains("cuda"), "{}", stderr(&o));
}

#[test]
fn cuda_graph_profile_names_the_exports_it_cannot_capture() {
    // The cuda-graph profile captures the decode step of an OPT --target cuda export; any
    // other export is refused before a session is built, naming the profile and why.
    let chelsea = photo("chelsea.png");
    for (name, flags, kind) in [
        ("opt-tiny", &[][..], "opt portable"),
        ("t5-tiny", &["--target", "cuda"][..], "t5 --target cuda"),
    ] {
        let m = export_with(name, &format!("cuda-graph-{name}"), flags);
        let o = run(&["--ep", "cuda-graph", "caption", chelsea.to_str().unwrap()], &m);
        assert_eq!(o.status.code(), Some(1));
        let e = stderr(&o);
        assert!(
            e.contains("profile \"cuda-graph\" sets cuda_graph = true") && e.contains(kind),
            "{e}"
        );
    }
    // GroupQueryAttention runs on CUDA in fp16 only: an fp32 CUDA-target export is refused.
    let m = export_with("opt-tiny", "cuda-graph-fp32", &["--target", "cuda"]);
    let o = run(&["--ep", "cuda-graph", "caption", chelsea.to_str().unwrap()], &m);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("fp32 export") && stderr(&o).contains("--dtype fp16"),
        "{}",
        stderr(&o)
    );
    if Path::new("/dev/nvidia0").exists() {
        return; // a GPU machine can run it
    }
    // A capturable export on a machine without CUDA: the provider's own clear failure.
    let m =
        export_with("opt-tiny", "cuda-graph-capturable", &["--target", "cuda", "--dtype", "fp16"]);
    let o = run(&["--ep", "cuda-graph", "caption", chelsea.to_str().unwrap()], &m);
    assert_eq!(o.status.code(), Some(1), "no silent CPU fallback");
    assert!(stderr(&o).contains("CUDA"), "{}", stderr(&o));
}

/// `infer --model CK caption chelsea.png` with its own blip2-ort cache folder (where a
/// checkpoint's export is kept), ONNX Runtime found where the tests found it.
fn caption_with_cache(cache: &Path, ck: &Path) -> Output {
    let dylib = blip2_runtime::ort_env::find_dylib()
        .expect("ONNX Runtime installed (scripts/test does it)");
    bin()
        .env("BLIP2_ORT_CACHE", cache)
        .env("ORT_DYLIB_PATH", &dylib)
        .args(["infer", "--model"])
        .arg(ck)
        .args([
            "caption",
            photo("chelsea.png").to_str().unwrap(),
            "--max-new-tokens",
            "10",
            "--json",
        ])
        .output()
        .unwrap()
}

#[test]
fn a_checkpoint_folder_is_exported_once_into_the_cache() {
    let dir = tmp("cache");
    let ck = root().join("tests/fixtures/opt-tiny/checkpoint");
    let go = || caption_with_cache(&dir.join("cache"), &ck);
    let first = go();
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(stderr(&first).contains("exporting"), "{}", stderr(&first));
    let second = go();
    assert!(!stderr(&second).contains("exporting"), "the second run reuses the cached export");
    assert_eq!(first.stdout, second.stdout);
    assert_eq!(
        json_lines(&first)[0]["token_ids"],
        reference("opt-tiny", "caption")["sequences"][0]
    );
}

/// Item 3: another checkpoint put at the same path gets its own export, not the old
/// model's answers.
#[test]
fn the_cached_export_follows_the_checkpoint_content() {
    let dir = tmp("cache-content");
    let ck = dir.join("checkpoint");
    let put = |name: &str| {
        let _ = std::fs::remove_dir_all(&ck);
        std::fs::create_dir_all(&ck).unwrap();
        for e in
            std::fs::read_dir(root().join("tests/fixtures").join(name).join("checkpoint")).unwrap()
        {
            let e = e.unwrap();
            std::fs::copy(e.path(), ck.join(e.file_name())).unwrap();
        }
    };
    let go = || caption_with_cache(&dir.join("cache"), &ck);
    put("opt-tiny");
    let first = go();
    assert!(first.status.success(), "{}", stderr(&first));
    assert_eq!(
        json_lines(&first)[0]["token_ids"],
        reference("opt-tiny", "caption")["sequences"][0]
    );
    put("opt-tiny-sharded");
    let second = go();
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(
        stderr(&second).contains("exporting"),
        "a changed checkpoint is exported again: {}",
        stderr(&second)
    );
    assert_eq!(
        json_lines(&second)[0]["token_ids"],
        reference("opt-tiny-sharded", "caption")["sequences"][0]
    );
    // Only the export of the current content is kept.
    let local = dir.join("cache/models/local");
    assert_eq!(std::fs::read_dir(&local).unwrap().count(), 1);
}

#[test]
fn bench_reports_the_keys_hf_generate_bench_uses() {
    // Also on fp16 exports (the vision encoder's fp16 features feed the Q-Former) and
    // CUDA-target exports (decoding through static KV buffers, here on the CPU kernels).
    for (test, flags, target) in [
        ("bench", &[][..], "portable"),
        ("bench-fp16", &["--dtype", "fp16"][..], "portable"),
        ("bench-cuda-target", &["--target", "cuda"][..], "cuda"),
    ] {
        let m = export_with("opt-tiny", test, flags);
        let o = bin()
            .args(["bench", "--model"])
            .arg(&m)
            .args(["--batch", "1,2", "--new-tokens", "3", "--reps", "1", "--json"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{test}: {}", stderr(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        for k in [
            "generate_b1_ms",
            "generate_b2_ms",
            "images_per_s_b1",
            "images_per_s_b2",
            "peak_rss_MB",
            "qformer_b1_ms",
            "ttft_b1_ms",
            "decode_step_b1_ms",
            "qformer_b2_ms",
            "prefill_b2_ms",
            "decode_step_b2_ms",
        ] {
            assert!(v[k].as_f64().is_some_and(|x| x > 0.0), "{test}: missing or bad {k}: {v}");
        }
        for k in ["vision_b1_ms", "vision_b2_ms"] {
            assert!(v[k].as_f64().is_some_and(|x| x >= 0.0), "{test}: missing or bad {k}: {v}");
        }
        // A difference of two timings: present, but timing noise on a busy machine can make
        // it negative for a model this small.
        assert!(v["decode_ms_per_token_b1"].as_f64().is_some(), "{test}: {v}");
        assert_eq!(v["target"], target, "{test}");
        assert_eq!(v["cuda_graph"], false, "{test}: the cpu profile captures nothing");
        // The derived figures are what their names say, from the timings beside them.
        let f = |k: &str| v[k].as_f64().unwrap();
        assert_eq!(v["new_tokens"], 3, "{test}");
        for b in [1.0, 2.0] {
            let per_s = b * 1000.0 / f(&format!("generate_b{b}_ms"));
            let got = f(&format!("images_per_s_b{b}"));
            assert!(
                (got - per_s).abs() <= 0.006,
                "{test}: images/s at batch {b}: {got} vs {per_s}"
            );
        }
        let per_token = (f("generate_b1_ms") - f("ttft_b1_ms")) / 2.0;
        let got = f("decode_ms_per_token_b1");
        assert!((got - per_token).abs() <= 0.0006, "{test}: ms/token {got} vs {per_token}");
        assert_eq!(f("ttft_b1_ms"), f("generate_b1_1tok_ms"), "{test}: TTFT is the 1-token run");
    }
}

#[test]
fn cuda_target_exports_answer_like_transformers_from_the_cli() {
    let m = export_with("opt-tiny", "infer-cuda-target", &["--target", "cuda"]);
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(m.join("blip2_manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["target"], "cuda");
    let chelsea = photo("chelsea.png");
    let o = run(&["caption", chelsea.to_str().unwrap(), "--max-new-tokens", "10", "--json"], &m);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json_lines(&o)[0]["token_ids"], reference("opt-tiny", "caption")["sequences"][0]);
    // Beam search: the buffers follow the beams through kv_reorder.
    let args = [
        "caption",
        chelsea.to_str().unwrap(),
        "--prompt",
        "a photo of",
        "--max-new-tokens",
        "10",
        "--num-beams",
        "3",
        "--length-penalty",
        "0.5",
        "--num-return-sequences",
        "2",
        "--json",
    ];
    let o = run(&args, &m);
    assert!(o.status.success(), "{}", stderr(&o));
    let got: Vec<Value> = json_lines(&o).iter().map(|l| l["token_ids"].clone()).collect();
    let want = reference("opt-tiny", "beam")["sequences"].as_array().unwrap().clone();
    assert_eq!(got, want);
}

/// A case of the photo variants' references (scripts/make_photo_fixtures.py).
fn photo_reference(name: &str, case: &str) -> Value {
    let p = root().join("tests/fixtures").join(name).join("reference/photos.json");
    let all: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    all["cases"].as_array().unwrap().iter().find(|c| c["name"] == case).unwrap().clone()
}

#[test]
fn truncated_jpeg_is_refused_and_a_batch_goes_on() {
    let m = export("t5-tiny", "truncated");
    let cut = photo("variants/truncated.jpg");
    let o = run(&["caption", cut.to_str().unwrap()], &m);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.starts_with("error: ") && e.contains("truncated.jpg: image file is truncated"),
        "{e}"
    );
    assert!(o.stdout.is_empty(), "nothing is printed for a refused image");

    // In a batch the line reports the error and the other lines run, upright.
    let dir = m.parent().unwrap();
    let lines = format!(
        "{{\"image\": \"{}\"}}\n{{\"image\": \"{}\"}}\n",
        cut.display(),
        photo("variants/exif6.jpg").display()
    );
    std::fs::write(dir.join("requests.jsonl"), lines).unwrap();
    let o =
        run(&["batch", dir.join("requests.jsonl").to_str().unwrap(), "--max-new-tokens", "10"], &m);
    assert_eq!(o.status.code(), Some(1));
    let got = json_lines(&o);
    assert_eq!(got.len(), 2);
    assert!(got[0]["error"].as_str().unwrap().contains("image file is truncated"), "{}", got[0]);
    assert_eq!(got[1]["token_ids"], photo_reference("t5-tiny", "exif6_caption")["sequences"][0]);
}

/// libjpeg-turbo's SIMD decoder is in the build wherever nasm is installed (x86-64). A build
/// made before nasm was installed keeps its C-only decoder (2x slower, same pixels), as
/// cargo does not run mozjpeg-sys's build script again: `bench --image` says so, and this
/// test fails until that build is cleaned.
#[test]
fn jpeg_decoder_runs_its_simd_code_where_nasm_is_installed() {
    let o = bin()
        .args(["bench", "--reps", "1", "--workers", "1", "--json", "--image"])
        .arg(photo("rocket.jpg"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let simd = v["jpeg_simd"].as_bool().unwrap_or_else(|| panic!("no jpeg_simd: {v}"));
    assert_eq!(stderr(&o).contains("without its SIMD code"), !simd, "{}", stderr(&o));
    let nasm = std::process::Command::new("nasm").arg("-v").output();
    if cfg!(target_arch = "x86_64") && nasm.is_ok_and(|o| o.status.success()) {
        assert!(
            simd,
            "nasm is installed but libjpeg-turbo was built without it (before nasm was installed): run `cargo clean -p mozjpeg-sys && cargo clean --release -p mozjpeg-sys` (scripts/test does)"
        );
    }
}

#[test]
fn bench_image_times_preprocessing_and_names_bad_input() {
    let o = bin()
        .args(["bench", "--reps", "1", "--workers", "1,2", "--json", "--image"])
        .arg(photo("rocket.jpg"))
        .arg("--image")
        .arg(photo("chelsea.png"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["size"], serde_json::json!([224, 224]), "BLIP-2's size without --model: {v}");
    for mode in ["exact", "fast"] {
        for k in ["w1_ms_per_image", "w2_ms_per_image", "decode_ms", "resize_normalize_ms"] {
            let k = format!("{mode}_{k}");
            assert!(v[&k].as_f64().is_some_and(|x| x > 0.0), "missing or bad {k}: {v}");
        }
    }
    // With --model, the export's image size.
    let m = export("opt-tiny", "bench-image");
    let o = bin()
        .args(["bench", "--reps", "1", "--workers", "1", "--json", "--model"])
        .arg(&m)
        .arg("--image")
        .arg(photo("rocket.jpg"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["size"], serde_json::json!([28, 28]), "{v}");
    // A missing file is named before anything is timed; --workers 0 is a usage error.
    let o = bin().args(["bench", "--image", "no-such.jpg"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no-such.jpg"), "{}", stderr(&o));
    let o = bin().args(["bench", "--workers", "0", "--image"]).arg(photo("rocket.jpg")).output();
    let o = o.unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--workers"), "{}", stderr(&o));
    // Neither --model nor --image: clap names what is missing.
    let o = bin().args(["bench"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--model"), "{}", stderr(&o));
}

#[test]
fn fast_decode_from_the_flag_and_from_the_profile_key() {
    // opt-tiny's input is 28x28, so rocket.jpg (640x427) decodes at 1/4 with --fast-decode:
    // its pixels, hence (on these random weights) its tokens, change; the flag and the
    // profile key give the same; a PNG is read exactly either way.
    let m = export("opt-tiny", "fast-decode");
    let dir = tmp("fast-decode-config");
    let config = dir.join("fast.toml");
    std::fs::write(&config, "[profiles.cpu]\nfast_decode = true\n").unwrap();
    let caption = |extra: &[&str], image: &str| -> Vec<Value> {
        let mut args =
            vec!["caption", "--json", "--max-new-tokens", "12", "--min-new-tokens", "12"];
        args.extend_from_slice(extra);
        let o = bin()
            .args(["infer", "--model"])
            .arg(&m)
            .args(&args)
            .arg(photo(image))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        json_lines(&o).into_iter().map(|v| v["token_ids"].clone()).collect()
    };
    let exact = caption(&[], "rocket.jpg");
    let flag = caption(&["--fast-decode"], "rocket.jpg");
    let key = caption(&["--config", config.to_str().unwrap()], "rocket.jpg");
    assert_ne!(exact, flag, "--fast-decode changed nothing on a JPEG it scales");
    assert_eq!(flag, key, "the profile key and the flag differ");
    assert_eq!(caption(&[], "chelsea.png"), caption(&["--fast-decode"], "chelsea.png"));
    // batch gives each request what caption gives it, with the flag too; serve takes it.
    let requests = dir.join("requests.jsonl");
    std::fs::write(&requests, format!("{{\"image\": {:?}}}\n", photo("rocket.jpg"))).unwrap();
    let batch = |extra: &[&str]| -> Value {
        let mut args = vec!["batch", requests.to_str().unwrap()];
        args.extend_from_slice(&["--max-new-tokens", "12", "--min-new-tokens", "12"]);
        args.extend_from_slice(extra);
        let o = run(&args, &m);
        assert!(o.status.success(), "{}", stderr(&o));
        json_lines(&o)[0]["token_ids"].clone()
    };
    assert_eq!(batch(&[]), exact[0]);
    assert_eq!(batch(&["--fast-decode"]), flag[0]);
    let o = bin().args(["serve", "--fast-decode", "--help"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

/// `BLIP2_ORT_PROFILE=DIR`: every graph's session writes ONNX Runtime's profile of its
/// runs into DIR when it ends, with the runs and each node's provider and operator.
#[test]
fn blip2_ort_profile_writes_each_sessions_profile() {
    let m = export("opt-tiny", "profile");
    let dir = tmp("profile-out").join("profiles");
    let o = bin()
        .env("BLIP2_ORT_PROFILE", &dir)
        .args(["infer", "--model"])
        .arg(&m)
        .args(["caption", "--max-new-tokens", "3", "--min-new-tokens", "3"])
        .arg(photo("chelsea.png"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let mut graphs = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        let events: Vec<Value> =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let runs = events.iter().filter(|e| e["name"] == "model_run").count();
        if runs == 0 {
            continue; // a session that never ran (kv_reorder)
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let graph = name.split("_2").next().unwrap().to_string();
        assert!(
            events.iter().any(|e| e["cat"] == "Node"
                && e["args"]["provider"] == "CPUExecutionProvider"
                && e["args"]["op_name"].is_string()),
            "{name}: no node events with provider and operator"
        );
        graphs.push((graph, runs));
    }
    graphs.sort();
    let names: Vec<&str> = graphs.iter().map(|(g, _)| g.as_str()).collect();
    assert_eq!(names, ["language_model", "qformer", "vision_encoder"], "{graphs:?}");
    // The prompt and two decode steps.
    assert_eq!(graphs[0].1, 3, "{graphs:?}");
}
