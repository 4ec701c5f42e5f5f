//! Execution-provider profiles and the ONNX Runtime set-up, end to end.
//!
//! The tests that need the ONNX Runtime library (`blip2-ort install-runtime`) print a note
//! and pass when it is not installed; everything else runs anywhere. The CLI's built-in
//! `models.toml` is tested in the CLI crate; these tests bring their own profiles.

use std::path::{Path, PathBuf};
use std::process::Command;

use blip2_runtime::config::{Config, ConfigError, GraphOptimization, Profile, Provider};
use blip2_runtime::ort_env::{self, RuntimeSetupError};
use blip2_runtime::providers::{self, ProviderError, Warning};
use ort::session::Session;
use ort::value::Tensor;

/// An ONNX model computing `c = a + b` on float[3] (opset 13, IR 8), 80 bytes. Made once
/// with the `onnx` Python package:
///   g = helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"])], "g", [a, b], [c])
///   helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
/// where a, b, c are `make_tensor_value_info(name, TensorProto.FLOAT, [3])`.
const ADD_ONNX: [u8; 80] = [
    8, 8, 58, 70, 10, 14, 10, 1, 97, 10, 1, 98, 18, 1, 99, 34, 3, 65, 100, 100, 18, 1, 103, 90, 15,
    10, 1, 97, 18, 10, 10, 8, 8, 1, 18, 4, 10, 2, 8, 3, 90, 15, 10, 1, 98, 18, 10, 10, 8, 8, 1, 18,
    4, 10, 2, 8, 3, 98, 15, 10, 1, 99, 18, 10, 10, 8, 8, 1, 18, 4, 10, 2, 8, 3, 66, 4, 10, 0, 16,
    13,
];

/// Profiles shaped like the CLI's built-in ones, as a base to lay user files over.
const BASE: &str = r#"
[profiles.cpu]
providers = ["cpu"]

[profiles.cuda]
providers = ["cuda", "cpu"]
device_id = 0

[profiles.tensorrt]
providers = ["tensorrt", "cuda", "cpu"]
engine_cache_path = "tensorrt-engines"

[profiles.tensorrt.graphs.language_model]
providers = ["cuda", "cpu"]
"#;

fn base() -> Config {
    Config::from_toml(BASE, "base.toml").unwrap()
}

/// A warning sink for calls that must not warn.
fn no_warnings(w: Warning) {
    panic!("unexpected warning: {w}");
}

/// A fresh folder under the system temp dir, removed when dropped.
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(tag: &str) -> Scratch {
    let p = std::env::temp_dir().join(format!("blip2-providers-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    Scratch(p)
}

/// Whether the ONNX Runtime library is installed; prints why a test is skipped if not.
/// The ONNX Runtime library this suite runs on; a test without it fails (scripts/test
/// installs it first), rather than passing without having run.
fn require_runtime() -> PathBuf {
    ort_env::find_dylib().unwrap_or_else(|e| {
        panic!("the ONNX Runtime library is not installed ({e}); run `blip2-ort install-runtime`")
    })
}

/// Whether the CUDA profile can work here: an NVIDIA GPU, and a runtime built with the
/// CUDA provider (its library beside the runtime's).
fn cuda_usable() -> bool {
    let lib = require_runtime();
    Path::new("/dev/nvidia0").exists()
        && lib.parent().is_some_and(|d| d.join("libonnxruntime_providers_cuda.so").exists())
}

fn run_add(session: &mut Session) -> Vec<f32> {
    let a = Tensor::from_array(([3usize], vec![1.0f32, 2.0, 3.0])).unwrap();
    let b = Tensor::from_array(([3usize], vec![10.0f32, 20.0, 30.0])).unwrap();
    let out = session.run(ort::inputs!["a" => a, "b" => b]).unwrap();
    out["c"].try_extract_array::<f32>().unwrap().iter().copied().collect()
}

// ---- profiles --------------------------------------------------------------------------

#[test]
fn profiles_resolve_with_defaults() {
    let c = base();
    assert_eq!(c.profile_names(), ["cpu", "cuda", "tensorrt"]);

    let cpu = c.profile("cpu").unwrap();
    assert_eq!(cpu.providers, [Provider::Cpu]);
    assert!(!cpu.uses_gpu());
    assert_eq!(cpu.graph_optimization, GraphOptimization::All);
    assert!(!cpu.allow_fallback);

    let cuda = c.profile("cuda").unwrap();
    assert_eq!(cuda.providers, [Provider::Cuda, Provider::Cpu]);
    assert_eq!(cuda.device_id, 0);
    assert_eq!(cuda.gpu_mem_limit, None);
    assert!(!cuda.allow_fallback, "asking for CUDA must not quietly run on the CPU");
    assert!(cuda.uses_gpu());

    let trt = c.profile("tensorrt").unwrap();
    assert_eq!(trt.providers, [Provider::TensorRt, Provider::Cuda, Provider::Cpu]);
    assert_eq!(
        trt.providers_for("vision_encoder"),
        [Provider::TensorRt, Provider::Cuda, Provider::Cpu]
    );
    assert_eq!(trt.providers_for("language_model"), [Provider::Cuda, Provider::Cpu]);
    let engines = trt.engine_cache_dir().unwrap();
    assert!(
        engines.starts_with(ort_env::cache_root()) && engines.ends_with("tensorrt-engines"),
        "{}",
        engines.display()
    );
}

#[test]
fn user_file_overrides_and_adds_profiles() {
    let dir = scratch("override");
    let path = dir.join("blip2-ort.toml");
    std::fs::write(
        &path,
        r#"
[profiles.cuda]
device_id = 1
gpu_mem_limit = 8589934592
allow_fallback = true

[profiles.cuda.graphs.language_model]
providers = ["cpu"]

[profiles.lean]
providers = ["cpu"]
intra_op_threads = 2
graph_optimization = "basic"
"#,
    )
    .unwrap();
    let mut c = base();
    c.overlay_file(&path).unwrap();
    assert_eq!(c.profile_names(), ["cpu", "cuda", "lean", "tensorrt"]);

    // Only the keys the user set change.
    let cuda = c.profile("cuda").unwrap();
    assert_eq!(cuda.providers, [Provider::Cuda, Provider::Cpu]);
    assert_eq!(cuda.device_id, 1);
    assert_eq!(cuda.gpu_mem_limit, Some(8 << 30));
    assert!(cuda.allow_fallback);
    assert_eq!(cuda.providers_for("language_model"), [Provider::Cpu]);
    assert_eq!(cuda.providers_for("qformer"), [Provider::Cuda, Provider::Cpu]);

    let lean = c.profile("lean").unwrap();
    assert_eq!(lean.intra_op_threads, Some(2));
    assert_eq!(lean.graph_optimization, GraphOptimization::Basic);

    // A fresh base is untouched by another config's overlay.
    assert_eq!(base().profile("cuda").unwrap().device_id, 0);
}

#[test]
fn unknown_profile_lists_known_ones() {
    let err = base().profile("rocm").unwrap_err();
    assert!(matches!(err, ConfigError::UnknownProfile { .. }));
    assert_eq!(err.to_string(), "unknown profile \"rocm\"; known profiles: cpu, cuda, tensorrt");
}

#[test]
fn unknown_provider_is_an_error() {
    let mut c = base();
    let err = c
        .overlay_toml("[profiles.fast]\nproviders = [\"cuda\", \"directml\"]\n", "my.toml")
        .unwrap_err();
    assert!(
        matches!(err, ConfigError::UnknownProvider { ref name, .. } if name == "directml"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "my.toml: profile \"fast\": unknown provider \"directml\" (known: cpu, cuda, tensorrt)"
    );
}

#[test]
fn bad_user_files_name_the_file() {
    let cases = [
        ("[profiles.x]\nprovider = [\"cpu\"]\n", "unknown field `provider`"),
        (
            "[profiles.x]\nproviders = [\"cpu\"]\n[profiles.x.graphs.decoder]\nproviders = [\"cpu\"]\n",
            "unknown graph \"decoder\"",
        ),
        ("[profiles.x]\ndevice_id = 1\n", "no providers list"),
        ("[profiles.x]\nproviders = [\"cpu\"]\ngraph_optimization = \"max\"\n", "unknown graph_optimization \"max\""),
        ("[profile.cpu]\nproviders = [\"cpu\"]\n", "unknown field `profile`"),
        ("[models.\"a/b\"]\nfamily = \"opt\"\n", "unknown field `models`"),
    ];
    for (text, want) in cases {
        let err = base().overlay_toml(text, "user.toml").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("user.toml"), "{msg}");
        assert!(msg.contains(want), "{want:?} not in {msg:?}");
    }

    let dir = scratch("missing");
    let missing = dir.join("none.toml");
    let err = base().overlay_file(&missing).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    assert!(err.to_string().contains("none.toml"), "{err}");
}

// ---- with the ONNX Runtime library -----------------------------------------------------

#[test]
fn cpu_profile_runs_a_model() {
    require_runtime();
    ort_env::init().unwrap();
    ort_env::init().unwrap(); // idempotent
    assert!(ort_env::loaded_dylib().is_some());

    let cpu = Profile::cpu();
    let env = ort_env::environment().unwrap();
    let builder =
        providers::apply(Session::builder(env).unwrap(), &cpu, "vision_encoder", &mut no_warnings)
            .unwrap();
    let mut builder = builder;
    let mut session = builder.commit_from_memory(&ADD_ONNX).unwrap();
    assert_eq!(run_add(&mut session), [11.0, 22.0, 33.0]);

    // The same through open_session, from a file.
    let dir = scratch("session");
    let path = dir.join("add.onnx");
    std::fs::write(&path, ADD_ONNX).unwrap();
    let mut session =
        blip2_runtime::session_cache::open_session(&cpu, "qformer", &path, None, &mut no_warnings)
            .unwrap();
    assert_eq!(run_add(&mut session), [11.0, 22.0, 33.0]);

    // A missing model file names itself.
    let gone = path.with_file_name("gone.onnx");
    let err =
        blip2_runtime::session_cache::open_session(&cpu, "qformer", &gone, None, &mut no_warnings)
            .unwrap_err();
    assert!(
        matches!(err, ProviderError::Commit { .. }) && err.to_string().contains("gone.onnx"),
        "{err}"
    );
}

#[test]
fn cuda_profile_without_gpu_is_a_clear_error() {
    let env = ort_env::environment().unwrap();
    let c = base();
    if cuda_usable() {
        // Where CUDA can run, the profile must run the model instead.
        let profile = c.profile("cuda").unwrap();
        let mut builder = providers::apply(
            Session::builder(env).unwrap(),
            profile,
            "vision_encoder",
            &mut no_warnings,
        )
        .unwrap();
        let mut session = builder.commit_from_memory(&ADD_ONNX).unwrap();
        assert_eq!(run_add(&mut session), [11.0, 22.0, 33.0]);
        return;
    }
    for name in ["cuda", "tensorrt"] {
        let profile = c.profile(name).unwrap();
        let applied = providers::apply(
            Session::builder(env).unwrap(),
            profile,
            "vision_encoder",
            &mut no_warnings,
        );
        let Err(err) = applied else {
            panic!("{name}: the profile applied on a machine without a GPU");
        };
        let msg = err.to_string();
        assert!(
            matches!(err, ProviderError::Unavailable { provider, .. } if provider.is_gpu()),
            "{msg}"
        );
        assert!(msg.contains(&format!("profile \"{name}\", graph vision_encoder")), "{msg}");
        assert!(msg.contains("allow_fallback = true"), "{msg}");
        eprintln!("{name}: {msg}");
    }
}

#[test]
fn allow_fallback_warns_and_runs_on_cpu() {
    let usable = cuda_usable();
    let mut c = base();
    c.overlay_toml("[profiles.cuda]\nallow_fallback = true\n", "test").unwrap();
    let env = ort_env::environment().unwrap();
    let mut warnings = Vec::new();
    let cuda = c.profile("cuda").unwrap();
    let builder =
        providers::apply(Session::builder(env).unwrap(), cuda, "language_model", &mut |w| {
            warnings.push(w)
        })
        .unwrap();
    let mut builder = builder;
    let mut session = builder.commit_from_memory(&ADD_ONNX).unwrap();
    assert_eq!(run_add(&mut session), [11.0, 22.0, 33.0]);
    if usable {
        assert!(warnings.is_empty(), "CUDA runs here, nothing to fall back from: {warnings:?}");
        return;
    }
    // The fallback is told to the caller, naming the profile, the graph and both providers.
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let said = warnings[0].to_string();
    assert!(
        said.starts_with(
            "profile \"cuda\", graph language_model: cannot use CUDAExecutionProvider ("
        ) && said.ends_with("); falling back to cpu"),
        "{said}"
    );
}

// ---- start-up failures, each in a child process -----------------------------------------
// ort loads its library once per process, so a test of a failed load runs this test
// binary again with a filter and a clean environment.

const CHILD_ENV: &str = "BLIP2_PROVIDERS_TEST_CHILD";

fn run_child(test: &str, envs: &[(&str, &Path)], remove: &[&str]) -> String {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"]).env(CHILD_ENV, "1");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    for k in remove {
        cmd.env_remove(k);
    }
    let out = cmd.output().unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "child failed:\n{text}");
    text
}

/// The child's report line (the test harness prints its own text before it on the line).
fn child_line(out: &str) -> &str {
    out.lines()
        .find_map(|l| l.split_once("CHILD: ").map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("no child output:\n{out}"))
}

#[test]
fn init_names_a_library_that_will_not_load() {
    if std::env::var_os(CHILD_ENV).is_some() {
        let err = ort_env::init().unwrap_err();
        assert!(matches!(err, RuntimeSetupError::Load { .. }), "{err}");
        println!("CHILD: {err}");
        return;
    }
    let dir = scratch("badlib");
    let bad = dir.join("libonnxruntime.so.1.31.1");
    std::fs::write(&bad, b"this is not a shared library").unwrap();
    let out =
        run_child("init_names_a_library_that_will_not_load", &[("ORT_DYLIB_PATH", &bad)], &[]);
    let line = child_line(&out);
    assert!(
        line.contains(&bad.display().to_string()) && line.contains("cannot load ONNX Runtime"),
        "{line}"
    );
}

#[test]
fn init_without_runtime_says_how_to_install() {
    if std::env::var_os(CHILD_ENV).is_some() {
        let err = ort_env::init().unwrap_err();
        assert!(matches!(err, RuntimeSetupError::NotInstalled { .. }), "{err}");
        println!("CHILD: {}", err.to_string().replace('\n', " "));
        return;
    }
    let empty = scratch("emptycache");
    let out = run_child(
        "init_without_runtime_says_how_to_install",
        &[("BLIP2_ORT_CACHE", &empty)],
        &["ORT_DYLIB_PATH"],
    );
    let line = child_line(&out);
    assert!(
        line.contains("`blip2-ort install-runtime`")
            && line.contains("`blip2-ort install-runtime --gpu`"),
        "{line}"
    );
    assert!(line.contains(&empty.join("onnxruntime-1.31.1").display().to_string()), "{line}");
}

#[test]
fn tf32_is_off_unless_a_profile_asks() {
    // ONNX Runtime's CUDA provider would use TF32 products by default; fp32 on CUDA must
    // give the CPU's tokens, so a profile has to ask for them.
    let mut c = base();
    assert!(!c.profile("cuda").unwrap().tf32);
    c.overlay_toml("[profiles.cuda]\ntf32 = true\n", "user.toml").unwrap();
    assert!(c.profile("cuda").unwrap().tf32);
    assert!(!c.profile("tensorrt").unwrap().tf32, "only the profile that asked");
}

#[test]
fn cuda_graph_is_asked_for_and_needs_the_language_model_on_cuda() {
    let mut c = base();
    assert!(!c.profile("cuda").unwrap().cuda_graph);
    c.overlay_toml("[profiles.cuda]\ncuda_graph = true\n", "user.toml").unwrap();
    let cuda = c.profile("cuda").unwrap();
    assert!(cuda.cuda_graph);
    // Only the language model's session captures.
    assert!(providers::captures(cuda, "language_model"));
    for g in ["vision_encoder", "qformer", "text_encoder"] {
        assert!(!providers::captures(cuda, g), "{g}");
    }
    assert!(!c.profile("tensorrt").unwrap().cuda_graph, "only the profile that asked");
    // A language model on the CPU (or first on TensorRT) cannot be captured by CUDA.
    for (toml, who) in [
        ("[profiles.cpu]\ncuda_graph = true\n", "cpu"),
        ("[profiles.split]\nproviders = [\"cuda\", \"cpu\"]\ncuda_graph = true\n[profiles.split.graphs.language_model]\nproviders = [\"cpu\"]\n", "split"),
    ] {
        let before = c.profiles().clone();
        let e = c.overlay_toml(toml, "user.toml").unwrap_err().to_string();
        assert!(e.starts_with(&format!("user.toml: profile \"{who}\": cuda_graph = true")) && e.contains("must start with \"cuda\""), "{e}");
        assert_eq!(c.profiles(), &before);
    }
}
