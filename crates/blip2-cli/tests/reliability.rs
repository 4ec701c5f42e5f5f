//! What a new user ran into (issue 23): out-of-range counts, contradicting flags and
//! unresolved names are usage errors (exit status 2) naming the flag; a bad chat line
//! still gets its JSON line; `serve --host` takes host names.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

mod common;
use common::test_tmp;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn photo(name: &str) -> String {
    root().join("tests/data/photos").join(name).to_string_lossy().into_owned()
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_blip2-ort"));
    c.env_remove("BLIP2_ORT_CONFIG").env_remove("BLIP2_ORT_API_KEY");
    c
}

fn tmp(test: &str) -> PathBuf {
    let d = test_tmp().join("reliability").join(test);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The opt-tiny fixture exported into this test's folder.
fn export(test: &str) -> PathBuf {
    let out = tmp(test).join("model");
    let o = bin()
        .args(["export", "--quiet"])
        .arg(root().join("tests/fixtures/opt-tiny/checkpoint"))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    out
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn infer(model: &Path, args: &[&str]) -> Output {
    bin().args(["infer", "--model"]).arg(model).args(args).output().unwrap()
}

/// Exit status 2, the flags named on stderr, nothing on stdout.
fn assert_usage(o: &Output, what: &str, names: &[&str]) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(2), "{what}: {e}");
    for n in names {
        assert!(e.contains(n), "{what}: the error names {n}: {e}");
    }
    assert!(o.stdout.is_empty(), "{what}: nothing on stdout");
}

/// Item 4: `--threads 100000` started 19,371 threads. Past 4 per core it is refused in
/// every command that takes it, and in a profile, naming the key and the file.
#[test]
fn threads_beyond_four_per_core_are_refused() {
    let cores = std::thread::available_parallelism().unwrap().get();
    let too_many = (4 * cores + 1).to_string();
    for n in ["100000", too_many.as_str()] {
        for args in [
            vec!["infer", "--model", "x", "--threads", n, "caption", "a.png"],
            vec!["bench", "--model", "x", "--threads", n],
            vec!["serve", "--model", "x", "--threads", n],
        ] {
            let o = bin().args(&args).output().unwrap();
            assert_usage(&o, &format!("{args:?}"), &["--threads", n]);
        }
    }
    let m = export("threads");
    let at_most = (4 * cores).to_string();
    let o = infer(&m, &["--threads", &at_most, "caption", &photo("chelsea.png")]);
    assert!(o.status.success(), "4 per core is allowed: {}", stderr(&o));

    let config = m.parent().unwrap().join("my.toml");
    std::fs::write(&config, "[profiles.many]\nproviders = [\"cpu\"]\nintra_op_threads = 100000\n")
        .unwrap();
    let o = infer(
        &m,
        &["--config", config.to_str().unwrap(), "--ep", "many", "caption", &photo("chelsea.png")],
    );
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "a config file's mistake: {e}");
    assert!(e.contains("my.toml") && e.contains("intra_op_threads = 100000"), "{e}");
}

/// Item 9: beams and samples are bounded by the vocabulary (616 tokens in opt-tiny),
/// naming the flag, instead of running (or failing inside ONNX Runtime).
#[test]
fn beams_and_samples_beyond_the_vocabulary_are_refused() {
    let m = export("beams");
    let img = photo("chelsea.png");
    let o = infer(&m, &["caption", &img, "--num-beams", "700"]);
    assert_usage(&o, "--num-beams 700", &["--num-beams", "616"]);
    let o = infer(&m, &["caption", &img, "--do-sample", "--num-return-sequences", "700"]);
    assert_usage(&o, "--num-return-sequences 700", &["--num-return-sequences", "616"]);
    let o = bin().args(["bench", "--model"]).arg(&m).args(["--num-beams", "700"]).output().unwrap();
    assert_usage(&o, "bench --num-beams 700", &["--num-beams", "616"]);
    // The vocabulary itself is allowed.
    let o = infer(&m, &["caption", &img, "--num-beams", "616", "--max-new-tokens", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Item 10: a minimum over the maximum can never be met; refused naming both flags.
#[test]
fn min_new_tokens_over_max_new_tokens_is_a_usage_error() {
    let m = export("min-max");
    let o = infer(
        &m,
        &["caption", &photo("chelsea.png"), "--min-new-tokens", "50", "--max-new-tokens", "10"],
    );
    assert_usage(&o, "min 50 max 10", &["--min-new-tokens", "--max-new-tokens", "50", "10"]);
    let o = infer(
        &m,
        &["caption", &photo("chelsea.png"), "--min-new-tokens", "10", "--max-new-tokens", "10"],
    );
    assert!(o.status.success(), "min = max is fine: {}", stderr(&o));
}

/// Item 11: with --json every input line gets one stdout line, a line that is not UTF-8
/// an error object, besides the warning on stderr.
#[test]
fn chat_json_answers_a_non_utf8_line_with_an_error_object() {
    let m = export("chat-utf8");
    let mut child = bin()
        .args(["infer", "--model"])
        .arg(&m)
        .args(["chat", &photo("chelsea.png"), "--json", "--max-new-tokens", "3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"what is it?\n\xff\xfe bad\nand now?\n").unwrap();
    let o = child.wait_with_output().unwrap();
    let e = stderr(&o);
    let lines: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "one JSON line per input line: {lines:?} {e}");
    assert!(lines[0]["text"].is_string() && lines[2]["text"].is_string(), "{lines:?}");
    assert_eq!(lines[1]["line"], 2, "{lines:?}");
    assert!(lines[1]["error"].as_str().is_some_and(|s| s.contains("UTF-8")), "{lines:?}");
    assert!(e.contains("line 2") && e.contains("UTF-8"), "{e}");
    assert_eq!(o.status.code(), Some(1), "a failed line fails the session's exit status");
}

/// Item 12: `serve --host localhost` listens (names are resolved); a name that does not
/// resolve is a usage error naming --host.
#[cfg(unix)]
#[test]
fn serve_accepts_host_names() {
    let o = bin()
        .args(["serve", "--model", "x", "--host", "no-such-host.invalid", "--port", "0"])
        .output()
        .unwrap();
    assert_usage(&o, "--host no-such-host.invalid", &["--host", "no-such-host.invalid"]);

    let m = export("serve-host");
    let mut child = bin()
        .args(["serve", "--host", "localhost", "--port", "0", "--model"])
        .arg(&m)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    let addr = first.trim().strip_prefix("listening on http://").map(str::to_string);
    // It answers there (then it is stopped; SIGTERM is tested in tests/serve.rs).
    let health = addr.as_deref().map(|a| {
        let mut s = std::net::TcpStream::connect(a).unwrap();
        write!(s, "GET /health HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut s, &mut text).unwrap();
        text.lines().next().unwrap_or("").to_string()
    });
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let addr = addr.unwrap_or_else(|| panic!("first stdout line: {first:?}; {}", stderr(&out)));
    assert!(addr.starts_with("127.0.0.1:") || addr.starts_with("[::1]:"), "{addr}");
    assert_eq!(health.as_deref(), Some("HTTP/1.1 200 OK"));
}

/// Item 14: the README promises exit status 2 for usage errors: an unknown --ep, a batch
/// size of 0; bench's length check names bench's own flag.
#[test]
fn bench_and_ep_usage_errors_exit_2_naming_their_flag() {
    let o = bin().args(["bench", "--model", "x", "--batch", "0"]).output().unwrap();
    assert_usage(&o, "bench --batch 0", &["--batch"]);
    let m = export("usage");
    let o = infer(&m, &["--ep", "bogus", "caption", &photo("chelsea.png")]);
    assert_usage(&o, "--ep bogus", &["--ep", "bogus", "cpu"]);
    let o =
        bin().args(["bench", "--model"]).arg(&m).args(["--new-tokens", "500"]).output().unwrap();
    assert_usage(&o, "bench --new-tokens 500", &["--new-tokens"]);
    assert!(!stderr(&o).contains("--max-new-tokens"), "{}", stderr(&o));
}

/// A copy of a fixture checkpoint to spoil.
fn checkpoint_copy(name: &str, test: &str) -> PathBuf {
    let src = root().join("tests/fixtures").join(name).join("checkpoint");
    let dst = tmp(test).join("checkpoint");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

fn export_from(ck: &Path) -> (Output, PathBuf) {
    let out = ck.parent().unwrap().join("out");
    let o = bin().args(["export", "--quiet"]).arg(ck).arg("-o").arg(&out).output().unwrap();
    (o, out)
}

/// Item 6: a tokenizer.json that is JSON but no tokenizer exported fine and failed at
/// infer; export refuses it, naming the file, for captioning and retrieval checkpoints.
#[test]
fn a_garbage_tokenizer_is_refused_at_export() {
    for (fixture, garbage) in [
        ("opt-tiny", &b"{\"version\": \"1.0\", \"model\": 7}"[..]),
        ("itm-tiny", &b"{\"added_tokens\": []}"[..]),
        ("itm-tiny", &b"\x00\x01 not json"[..]),
    ] {
        let ck = checkpoint_copy(fixture, &format!("tokenizer-{fixture}"));
        std::fs::write(ck.join("tokenizer.json"), garbage).unwrap();
        let (o, out) = export_from(&ck);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{fixture}: {e}");
        assert!(e.contains(&ck.join("tokenizer.json").display().to_string()), "{fixture}: {e}");
        assert!(!out.exists(), "{fixture}: nothing written");
    }
}

/// Item 7: config.json with fewer layers than the weights exported a model that skipped
/// layers; refused naming the config key and the first unused tensors.
#[test]
fn a_config_with_fewer_layers_than_the_weights_is_refused() {
    for (fixture, section, key, prefix) in [
        ("opt-tiny", "text_config", "num_hidden_layers", "language_model.model.decoder.layers.2."),
        ("opt-tiny", "vision_config", "num_hidden_layers", "vision_model.encoder.layers.2."),
        ("t5-tiny", "text_config", "num_layers", "language_model.encoder.block."),
    ] {
        let ck = checkpoint_copy(fixture, &format!("layers-{fixture}-{section}"));
        let path = ck.join("config.json");
        let mut cfg: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let n = cfg[section][key].as_u64().unwrap_or_else(|| panic!("{fixture}: {section}.{key}"));
        cfg[section][key] = (n - 1).into();
        std::fs::write(&path, cfg.to_string()).unwrap();
        let (o, out) = export_from(&ck);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{fixture} {section}: {e}");
        for says in [path.display().to_string(), format!("{section}.{key}"), prefix.to_string()] {
            assert!(e.contains(&says), "{fixture} {section}: names {says}: {e}");
        }
        assert!(!out.exists());
    }
}

/// Item 8: a graph copied from another export failed at the first run with ONNX
/// Runtime's "Failed to find input name in the mapping"; the load names the file and
/// says to export again.
#[test]
fn a_graph_from_another_export_is_named_at_load() {
    let m = export("mixed");
    let other = tmp("mixed-other").join("model");
    let o = bin()
        .args(["export", "--quiet"])
        .arg(root().join("tests/fixtures/t5-tiny/checkpoint"))
        .arg("-o")
        .arg(&other)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    for file in ["language_model.onnx", "qformer.onnx"] {
        let keep = m.join(format!("{file}.orig"));
        std::fs::copy(m.join(file), &keep).unwrap();
        std::fs::copy(other.join(file), m.join(file)).unwrap();
        let o = infer(&m, &["caption", &photo("chelsea.png")]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{file}: {e}");
        assert!(
            e.contains(&m.join(file).display().to_string())
                && e.contains("does not belong to this export")
                && e.contains("blip2-ort export"),
            "{file}: {e}"
        );
        assert!(!e.contains("Failed to find"), "{file}: {e}");
        std::fs::rename(&keep, m.join(file)).unwrap();
    }
    let o = infer(&m, &["caption", &photo("chelsea.png")]);
    assert!(o.status.success(), "its own graphs load: {}", stderr(&o));
}

/// Item 16: after `scripts/quickstart`, the README's first export (to exports/opt-tiny)
/// failed with "already exists". The quickstart's export folder for its default model
/// must not be one the README's commands export to without --force.
#[test]
fn the_readme_commands_run_after_the_quickstart() {
    let script = std::fs::read_to_string(root().join("scripts/quickstart")).unwrap();
    // The folder the quickstart exports its default model to.
    let var = |name: &str| {
        script
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{name}=")))
            .map(|v| v.trim_matches('"').to_string())
    };
    let export_line =
        script.lines().find(|l| l.contains("$bin export")).expect("the quickstart exports");
    let out_arg = export_line.split(" -o ").nth(1).unwrap().split_whitespace().next().unwrap();
    let mut quickstart_out = out_arg.trim_matches('"').to_string();
    if quickstart_out == "$out" {
        quickstart_out = var("out").expect("out=...");
    }
    let quickstart_out = quickstart_out.replace("$name", "opt-tiny").replace("${name}", "opt-tiny");

    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let exports: Vec<&str> = readme
        .lines()
        .filter_map(|l| l.trim().strip_prefix("$ blip2-ort export "))
        .filter(|l| !l.contains("--force"))
        .filter_map(|l| l.split(" -o ").nth(1)?.split_whitespace().next())
        .collect();
    assert!(exports.contains(&"exports/opt-tiny"), "the README exports the tiny checkpoint");
    assert!(
        !exports.contains(&quickstart_out.as_str()),
        "the quickstart exports to {quickstart_out}, which the README exports to without --force"
    );
}

/// Item 17: the random checkpoints' tokenizers are smaller than their vocabularies, so
/// their text is often empty while token ids are not; infer says so where it happens.
#[test]
fn tokens_without_text_are_pointed_out() {
    let m = export("unknown-tokens");
    let o = infer(
        &m,
        &["caption", &photo("rocket.jpg"), "--prompt", "a photo of", "--max-new-tokens", "10"],
    );
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("596") && e.contains("no token in tokenizer.json"), "{e}");
    assert_eq!(e.matches("warning:").count(), 1, "once per run: {e}");
    // Ids the tokenizer has: no warning.
    let o = infer(
        &m,
        &[
            "vqa",
            &photo("camera.png"),
            "--question",
            "what is in the picture?",
            "--max-new-tokens",
            "10",
        ],
    );
    assert!(o.status.success() && !stderr(&o).contains("tokenizer.json"), "{}", stderr(&o));
}

/// A SIGTERM sent the moment `serve` says where it listens ends it: the server listens
/// for signals before it says so (the start-up handler used to be dropped first, and a
/// signal in between was lost, leaving the server running).
#[test]
fn serve_ends_on_a_sigterm_sent_as_soon_as_it_listens() {
    let m = export("serve-early-term");
    for round in 0..5 {
        let mut child = bin()
            .args(["serve", "--port", "0", "--model"])
            .arg(&m)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
        assert!(first.starts_with("listening on "), "round {round}: {first:?}");
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let status =
            status.unwrap_or_else(|| panic!("round {round}: still running 20 s after SIGTERM"));
        use std::os::unix::process::ExitStatusExt;
        assert!(
            status.code() == Some(0) || status.signal() == Some(libc::SIGTERM),
            "round {round}: {status:?}"
        );
    }
}
