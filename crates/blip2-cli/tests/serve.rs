//! The `serve` command line: it prints the address it listens on, answers, and exits 0
//! on SIGTERM; bad flags and bad models fail before it listens. The HTTP API itself is
//! tested in the workspace's tests/serve.rs and by scripts/serve_openai_check.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

mod common;
use common::test_tmp;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blip2-ort"))
}

fn export(test: &str) -> PathBuf {
    let out = test_tmp().join("serve-cli").join(test);
    let _ = std::fs::remove_dir_all(&out);
    let o = bin()
        .args(["export", "--quiet"])
        .arg(root().join("tests/fixtures/opt-tiny/checkpoint"))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// A plain HTTP/1.1 GET; returns the status line.
fn get_status(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines().next().unwrap_or("").to_string()
}

#[cfg(unix)]
#[test]
fn serve_prints_its_address_answers_and_exits_0_on_sigterm() {
    let model = export("sigterm");
    let mut child = bin()
        .args(["serve", "--port", "0", "--model"])
        .arg(&model)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    let addr = first
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("first stdout line: {first:?}"))
        .to_string();
    assert_eq!(get_status(&addr, "/health"), "HTTP/1.1 200 OK");
    assert_eq!(get_status(&addr, "/v1/models"), "HTTP/1.1 200 OK");
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "exit status {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(TcpStream::connect(&addr).is_err(), "no longer listening");
}

#[test]
fn bad_flags_exit_2_and_bad_models_exit_1_before_listening() {
    for (args, says) in [
        (vec!["serve", "--model", "x", "--max-batch", "0"], "--max-batch"),
        (vec!["serve", "--model", "x", "--max-queue", "0"], "--max-queue"),
        (vec!["serve", "--model", "x", "--port", "70000"], "--port"),
        (
            vec!["serve", "--model", "x", "--allowed-local-media-path", "/no/such/folder"],
            "--allowed-local-media-path",
        ),
        (vec!["serve"], "--model"),
    ] {
        let o = bin().args(&args).env_remove("BLIP2_ORT_API_KEY").output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(o.stdout.is_empty(), "{args:?}: nothing on stdout");
    }
    let missing = test_tmp().join("serve-cli/no-such-model");
    let o = bin().args(["serve", "--port", "0", "--model"]).arg(&missing).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("no-such-model"), "{err}");
    assert!(o.stdout.is_empty(), "it never listened");
}
