//! The playground page of `blip2-ort serve`, driven in headless Chromium over the
//! WebDriver protocol (chromedriver; a small client over std's TCP below): every task's
//! answer in the page equals `blip2-ort infer`'s for the same image and prompt, an
//! invalid file shows the API's error, a retrieval export's scores equal `infer itm`'s
//! and its search grid `blip2-ort search`'s. `--no-ui` and `--api-key` are checked too.
//!
//! Chromium comes from the system's packages (`chromium`, `chromium-driver`); when they
//! are missing the test installs them with apt-get if it runs as root, and otherwise
//! skips with a message saying so (scripts/test installs them first). With
//! `BLIP2_ORT_SCREENSHOTS=DIR` it writes the page's screenshots (desktop and phone
//! width) there: docs/serving.md shows the ones in docs/.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

mod common;
use common::test_tmp;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn photo(name: &str) -> String {
    root().join("tests/data/photos").join(name).canonicalize().unwrap().display().to_string()
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blip2-ort"))
}

fn tmp(test: &str) -> PathBuf {
    let d = test_tmp().join("playground").join(test);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn export(fixture: &str, dir: &Path) -> PathBuf {
    let out = dir.join(fixture);
    let o = bin()
        .args(["export", "--quiet"])
        .arg(root().join("tests/fixtures").join(fixture).join("checkpoint"))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// `blip2-ort ARGS --json`'s JSON lines.
fn cli_json(args: &[&str], stdin: &str) -> Vec<Value> {
    let mut child = bin()
        .args(args)
        .arg("--json")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Whether Chromium and its driver are here, installing them with apt-get when this
/// test runs as root and they are not.
fn chromium_ready() -> bool {
    let present = || Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists();
    if present() {
        return true;
    }
    #[cfg(unix)]
    if unsafe { libc::geteuid() } == 0 {
        eprintln!("installing chromium and chromium-driver with apt-get");
        let _ = Command::new("apt-get")
            .args(["install", "-y", "chromium", "chromium-driver"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
    }
    if !present() {
        eprintln!(
            "SKIPPED: the playground's browser test needs {CHROMIUM} and {CHROMEDRIVER} \
             (Debian's chromium and chromium-driver), which are missing and could not be installed \
             (apt-get install -y chromium chromium-driver, as root; scripts/test does it)"
        );
    }
    present()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One HTTP/1.1 request; the status and the body (by Content-Length, chunked, or to
/// the end). chromedriver keeps connections open, so the body is read by its length.
fn http(addr: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (mut length, mut chunked) = (None, false);
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim();
        if l.is_empty() {
            break;
        }
        let (name, value) = l.split_once(':').unwrap_or((l, ""));
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse::<usize>().ok(),
            "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Some(n) = length {
        out.resize(n, 0);
        r.read_exact(&mut out).unwrap();
    } else if chunked {
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            let n = usize::from_str_radix(line.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).unwrap();
            out.extend_from_slice(&chunk[..n]);
        }
    } else {
        r.read_to_end(&mut out).unwrap();
    }
    (status, String::from_utf8_lossy(&out).into_owned())
}

/// One browser at a time: Chromium is heavy for a small machine.
static BROWSER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A `blip2-ort serve` process, killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let mut child = bin()
            .args(["serve", "--quiet", "--port", "0"])
            .args(args)
            .env_remove("BLIP2_ORT_API_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
        let addr = first
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("serve's first line: {first:?}"))
            .to_string();
        Server { child, addr }
    }

    fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// chromedriver and one headless Chromium session.
struct Browser {
    driver: Child,
    addr: String,
    session: String,
    profile: PathBuf,
}

impl Browser {
    fn start(dir: &Path) -> Browser {
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr = format!("127.0.0.1:{port}");
        let t = Instant::now();
        while TcpStream::connect(&addr).is_err() {
            assert!(t.elapsed() < Duration::from_secs(30), "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        // A fresh profile, and nothing that reaches for the network (this machine has none).
        let profile = dir.join("chromium-profile");
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,900",
            &format!("--user-data-dir={}", profile.display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }}});
        let mut b = Browser { driver, addr, session: String::new(), profile };
        let v = b.call("POST", "/session", Some(caps));
        b.session = v["sessionId"].as_str().unwrap_or_else(|| panic!("new session: {v}")).into();
        b
    }

    /// A WebDriver command; its `value`.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = if path.starts_with("/session/") || path == "/session" {
            path.to_string()
        } else {
            format!("/session/{}{path}", self.session)
        };
        let (status, text) = http(&self.addr, method, &path, body.as_ref());
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: {status} {text:?}: {e}"));
        assert_eq!(status, 200, "{method} {path}: {v}");
        v["value"].clone()
    }

    fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({"url": url})));
        self.wait_for("return document.body.dataset.ready === 'true'", "the page to start");
    }

    fn find(&self, css: &str) -> String {
        let v = self.call("POST", "/element", Some(json!({"using": "css selector", "value": css})));
        v[ELEMENT].as_str().unwrap_or_else(|| panic!("{css}: {v}")).to_string()
    }

    fn click(&self, css: &str) {
        let e = self.find(css);
        self.call("POST", &format!("/element/{e}/click"), Some(json!({})));
    }

    /// Types `text` into the element, after clearing it (a file input takes a path).
    fn fill(&self, css: &str, text: &str) {
        let e = self.find(css);
        if !css.contains("image") {
            self.call("POST", &format!("/element/{e}/clear"), Some(json!({})));
        }
        self.call("POST", &format!("/element/{e}/value"), Some(json!({"text": text})));
    }

    fn js(&self, script: &str) -> Value {
        self.call("POST", "/execute/sync", Some(json!({"script": script, "args": []})))
    }

    fn text(&self, css: &str) -> String {
        let e = self.find(css);
        self.call("GET", &format!("/element/{e}/property/textContent"), None)
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    fn wait_for(&self, script: &str, what: &str) {
        let t = Instant::now();
        while self.js(script) != json!(true) {
            assert!(t.elapsed() < Duration::from_secs(120), "waited 120 s for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Clicks `button` and waits until the page has handled the answer.
    fn run(&self, button: &str) {
        let before = self.js("return document.body.dataset.done");
        self.click(button);
        let script = format!("return document.body.dataset.done !== {before}");
        self.wait_for(&script, "the request to finish");
    }

    fn select(&self, css: &str, value: &str) {
        self.click(css);
        self.click(&format!("{css} option[value={value}]"));
    }

    fn resize(&self, width: u32, height: u32) {
        self.call("POST", "/window/rect", Some(json!({"width": width, "height": height})));
    }

    /// The page as a PNG in `$BLIP2_ORT_SCREENSHOTS/NAME.png`, when that is set.
    /// The whole page, beyond the window's height (Chromium's own screenshot command,
    /// through chromedriver's DevTools passthrough).
    fn screenshot(&self, name: &str) {
        let Some(dir) = std::env::var_os("BLIP2_ORT_SCREENSHOTS") else { return };
        self.js("window.scrollTo(0, 0)");
        let cdp = |cmd: &str, params: Value| {
            self.call("POST", "/goog/cdp/execute", Some(json!({"cmd": cmd, "params": params})))
        };
        let size = &cdp("Page.getLayoutMetrics", json!({}))["cssContentSize"];
        let clip =
            json!({"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1});
        let shot = cdp(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true, "clip": clip}),
        );
        let png = &shot["data"];
        let bytes =
            base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap();
        let path = Path::new(&dir).join(format!("{name}.png"));
        std::fs::write(&path, bytes).unwrap();
        eprintln!("wrote {}", path.display());
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = http(&self.addr, "DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

fn error_text(b: &Browser) -> String {
    b.text("#error")
}

#[test]
fn every_task_in_the_page_answers_what_infer_prints() {
    if !chromium_ready() {
        return;
    }
    let _one = BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmp("captioning");
    let model = export("opt-tiny", &dir);
    let m = model.to_str().unwrap();
    let camera = photo("camera.png");
    let infer = |args: &[&str], stdin: &str| -> Vec<String> {
        let mut a = vec!["infer", "--model", m];
        a.extend_from_slice(args);
        cli_json(&a, stdin).iter().map(|v| v["text"].as_str().unwrap().to_string()).collect()
    };
    let server = Server::start(&["--model", m]);
    let b = Browser::start(&dir);
    b.goto(&server.url());

    // Labels for the controls, and the live region for the streamed answer.
    for id in ["image", "task", "prompt", "api-key", "max-tokens", "beams", "temperature", "seed"] {
        assert_eq!(
            b.js(&format!("return !!document.querySelector('label[for={id}]')")),
            json!(true),
            "#{id}'s label"
        );
    }
    assert_eq!(
        b.js("return document.getElementById('answer').getAttribute('aria-live')"),
        json!("polite")
    );
    assert_eq!(
        b.js("return document.getElementById('key-section').hidden"),
        json!(true),
        "no key asked for"
    );

    b.fill("#image", &camera);
    b.wait_for("return !document.getElementById('preview').hidden", "the image's preview");

    b.select("#task", "caption");
    b.run("#run");
    assert_eq!(error_text(&b), "");
    assert_eq!(b.text("#answer"), infer(&["caption", &camera], "")[0], "caption");
    assert!(b.text("#stats").contains("tokens/s"), "{}", b.text("#stats"));

    // The settings panel starts collapsed; its max tokens reaches the request.
    assert_eq!(b.js("return document.getElementById('settings').open"), json!(false));
    b.select("#task", "prompted");
    b.fill("#prompt", "a dog");
    b.click("#settings summary");
    b.fill("#max-tokens", "7");
    b.run("#run");
    let want = infer(&["--max-new-tokens", "7", "caption", &camera, "--prompt", "a dog"], "");
    assert_eq!(b.text("#answer"), want[0], "prompted caption");
    b.fill("#max-tokens", "");

    b.select("#task", "vqa");
    b.fill("#prompt", "what is in the picture?");
    b.run("#run");
    let want = infer(&["vqa", &camera, "--question", "what is in the picture?"], "");
    assert_eq!(b.text("#answer"), want[0], "vqa");
    b.screenshot("playground-desktop");

    // Chat keeps its turns: the second answer sees the first, as `infer chat`'s does.
    let questions = ["what is it?", "and the colour?"];
    let want = infer(&["chat", &camera], &format!("{}\n{}\n", questions[0], questions[1]));
    b.select("#task", "chat");
    for (q, a) in questions.iter().zip(&want) {
        b.fill("#prompt", q);
        b.run("#run");
        assert_eq!(error_text(&b), "");
        assert_eq!(&b.text("#answer"), a, "chat answer to {q:?}");
    }
    assert_eq!(b.js("return document.querySelectorAll('#chat-log li').length"), json!(2));
    b.resize(390, 844);
    b.screenshot("playground-phone");
    b.resize(1280, 900);
    b.click("#reset");
    assert_eq!(b.js("return document.querySelectorAll('#chat-log li').length"), json!(0));

    // A file that is no image: the API's 400, in words.
    let bad = dir.join("not-an-image.png");
    std::fs::write(&bad, "this is text, not a PNG").unwrap();
    b.fill("#image", bad.to_str().unwrap());
    b.select("#task", "caption");
    b.run("#run");
    let err = error_text(&b);
    assert!(
        err.starts_with("The server could not use this request:") && err.contains("image_url"),
        "{err:?}"
    );
}

#[test]
fn a_retrieval_export_shows_infer_itm_scores_and_a_search_grid() {
    if !chromium_ready() {
        return;
    }
    let _one = BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmp("retrieval");
    let model = export("itm-tiny", &dir);
    let m = model.to_str().unwrap();
    let db = dir.join("photos.db");
    let o = bin()
        .args(["index", "--quiet", "--model", m, "--db"])
        .arg(&db)
        .arg(root().join("tests/data/photos").canonicalize().unwrap())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let server = Server::start(&["--model", m, "--db", db.to_str().unwrap()]);
    let b = Browser::start(&dir);
    b.goto(&server.url());

    let camera = photo("camera.png");
    let texts = ["a man with a camera", "a cat", "a rocket"];
    b.fill("#image", &camera);
    b.fill("#texts", &texts.join("\n"));
    b.run("#run");
    assert_eq!(error_text(&b), "");
    let shown = b.js(
        "return [...document.querySelectorAll('#scores li')].map(li => [li.dataset.text, Number(li.dataset.itm), Number(li.dataset.itc)])",
    );
    let mut args = vec!["infer", "--model", m, "itm", &camera];
    for t in &texts {
        args.extend(["--text", t]);
    }
    let want = cli_json(&args, "");
    let shown = shown.as_array().unwrap();
    assert_eq!(shown.len(), want.len(), "{shown:?}");
    for (s, w) in shown.iter().zip(&want) {
        assert_eq!(s[0], w["text"]);
        for (i, key) in [(1, "itm"), (2, "itc")] {
            let (got, exp) = (s[i].as_f64().unwrap(), w[key].as_f64().unwrap());
            assert!((got - exp).abs() < 1e-5, "{key} of {}: page {got}, infer {exp}", w["text"]);
        }
    }

    b.fill("#query", "a cat");
    b.run("#search-run");
    assert_eq!(error_text(&b), "");
    let shown = b.js(
        "return [...document.querySelectorAll('#results li')].map(li => [li.dataset.image, Number(li.dataset.itc), li.querySelector('img') ? li.querySelector('img').src.slice(0, 23) : ''])",
    );
    let want = cli_json(
        &["search", "--model", m, "--db", db.to_str().unwrap(), "--top", "12", "a cat"],
        "",
    );
    let shown = shown.as_array().unwrap();
    assert_eq!(shown.len(), want.len(), "{shown:?}");
    for (s, w) in shown.iter().zip(&want) {
        assert_eq!(s[0], w["image"]);
        let (got, exp) = (s[1].as_f64().unwrap(), w["itc"].as_f64().unwrap());
        assert!((got - exp).abs() < 1e-5, "itc of {}: page {got}, search {exp}", w["image"]);
        assert_eq!(s[2], json!("data:image/jpeg;base64,"), "{}'s thumbnail", w["image"]);
    }
    b.screenshot("playground-retrieval");
}

#[test]
fn with_an_api_key_the_page_asks_for_it_and_sends_it() {
    if !chromium_ready() {
        return;
    }
    let _one = BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmp("api-key");
    let model = export("opt-tiny", &dir);
    let m = model.to_str().unwrap();
    let camera = photo("camera.png");
    let server = Server::start(&["--model", m, "--api-key", "sekrit"]);
    let b = Browser::start(&dir);
    b.goto(&server.url());
    assert_eq!(b.js("return document.getElementById('key-section').hidden"), json!(false));
    b.fill("#image", &camera);
    b.run("#run");
    let err = error_text(&b);
    assert!(err.starts_with("The server needs its API key"), "{err:?}");
    b.fill("#api-key", "sekrit");
    b.run("#run");
    assert_eq!(error_text(&b), "");
    let want = cli_json(&["infer", "--model", m, "caption", &camera], "");
    assert_eq!(b.text("#answer"), want[0]["text"].as_str().unwrap());
}

#[test]
fn no_ui_turns_the_page_off_and_leaves_the_api() {
    let dir = tmp("no-ui");
    let model = export("opt-tiny", &dir);
    let m = model.to_str().unwrap();
    let on = Server::start(&["--model", m]);
    let (status, page) = http(&on.addr, "GET", "/", None);
    assert_eq!(status, 200);
    for id in ["image", "task", "prompt", "run", "answer", "error"] {
        assert!(page.contains(&format!("id=\"{id}\"")), "#{id} in the page");
    }
    drop(on);
    let off = Server::start(&["--model", m, "--no-ui"]);
    for path in ["/", "/ui/app.js", "/ui/config"] {
        assert_eq!(http(&off.addr, "GET", path, None).0, 404, "{path} with --no-ui");
    }
    assert_eq!(http(&off.addr, "GET", "/v1/models", None).0, 200);
}
