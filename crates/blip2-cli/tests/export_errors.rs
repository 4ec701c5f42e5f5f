//! Bad checkpoints give one clear error line, a non-zero exit, and no output folder.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::test_tmp;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A copy of a fixture checkpoint in a fresh temporary folder.
fn copy_fixture(name: &str, test: &str) -> (PathBuf, PathBuf) {
    let base = test_tmp().join("export-errors").join(test);
    let _ = std::fs::remove_dir_all(&base);
    let ck = base.join("checkpoint");
    std::fs::create_dir_all(&ck).unwrap();
    let src = root().join("tests/fixtures").join(name).join("checkpoint");
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), ck.join(e.file_name())).unwrap();
    }
    (ck, base.join("out"))
}

/// Rewrites a JSON file in place.
fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

/// Runs `export CK -o OUT` with `flags` and returns (exit code, stderr).
fn export_with(flags: &[&str], ck: &Path, out: &Path) -> (i32, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_blip2-ort"))
        .arg("export")
        .args(flags)
        .arg(ck)
        .arg("-o")
        .arg(out)
        .output()
        .unwrap();
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// Runs a quiet export and returns (exit code, stderr).
fn export(ck: &Path, out: &Path) -> (i32, String) {
    export_with(&["--quiet"], ck, out)
}

fn assert_one_line_error(code: i32, stderr: &str, needles: &[&str], out: &Path) {
    assert_ne!(code, 0, "export should fail; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "error line lacks {n:?}: {stderr}");
    }
    assert!(!out.exists(), "no output folder may be left behind");
    let parent = out.parent().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".partial-"))
        .collect();
    assert!(leftovers.is_empty(), "partial folder left behind");
}

#[test]
fn truncated_safetensors() {
    let (ck, out) = copy_fixture("opt-tiny", "truncated");
    let f = ck.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
    file.set_len(len - 1000).unwrap();
    let (code, err) = export(&ck, &out);
    assert_one_line_error(
        code,
        &err,
        &["model.safetensors", "corrupt safetensors", "truncated"],
        &out,
    );
}

#[test]
fn missing_tensor() {
    let (ck, out) = copy_fixture("opt-tiny", "missing-tensor");
    let f = ck.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let dropped = "qformer.encoder.layer.1.crossattention.attention.key.weight";
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        st.tensors().into_iter().filter(|(n, _)| n != dropped).collect();
    let data = safetensors::serialize(kept, None).unwrap();
    std::fs::write(&f, data).unwrap();
    let (code, err) = export(&ck, &out);
    assert_one_line_error(code, &err, &[dropped, "missing"], &out);
}

#[test]
fn misshapen_tensor() {
    let (ck, out) = copy_fixture("opt-tiny-sharded", "misshapen");
    // The config now promises a wider Q-Former feed-forward than the weights have.
    edit_json(&ck.join("config.json"), |cfg| {
        cfg["qformer_config"]["intermediate_size"] = serde_json::json!(41)
    });
    let (code, err) = export(&ck, &out);
    assert_one_line_error(
        code,
        &err,
        &["intermediate_query.dense.weight", "shape [40, 32]", "expected [41, 32]"],
        &out,
    );
}

#[test]
fn wrong_model_type() {
    let (ck, out) = copy_fixture("opt-tiny", "model-type");
    edit_json(&ck.join("config.json"), |cfg| cfg["model_type"] = serde_json::json!("llava"));
    let (code, err) = export(&ck, &out);
    assert_one_line_error(code, &err, &["config.json", "\"llava\"", "blip-2"], &out);
}

#[test]
fn unsupported_language_model() {
    let (ck, out) = copy_fixture("opt-tiny", "text-type");
    edit_json(&ck.join("config.json"), |cfg| {
        cfg["text_config"]["model_type"] = serde_json::json!("llama")
    });
    let (code, err) = export(&ck, &out);
    assert_one_line_error(code, &err, &["text_config.model_type", "\"llama\""], &out);
}

#[test]
fn missing_config() {
    let (ck, out) = copy_fixture("opt-tiny", "no-config");
    std::fs::remove_file(ck.join("config.json")).unwrap();
    let (code, err) = export(&ck, &out);
    assert_one_line_error(code, &err, &["config.json", "missing"], &out);
}

#[test]
fn missing_shard() {
    let (ck, out) = copy_fixture("opt-tiny-sharded", "no-shard");
    std::fs::remove_file(ck.join("model-00002-of-00002.safetensors")).unwrap();
    let (code, err) = export(&ck, &out);
    assert_one_line_error(code, &err, &["model-00002-of-00002.safetensors", "missing"], &out);
}

#[test]
fn missing_folder() {
    let base = test_tmp().join("export-errors/no-folder");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let (code, err) = export(&base.join("nope"), &base.join("out"));
    assert_one_line_error(code, &err, &["nope"], &base.join("out"));
}

#[test]
fn existing_output_needs_force_and_keeps_user_folders() {
    let (ck, out) = copy_fixture("opt-tiny", "force");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let (code, err) = export(&ck, &out);
    assert_ne!(code, 0);
    assert!(err.contains("already exists") && err.contains("--force"), "{err}");
    // --force never replaces a folder that is not an export.
    let (code, _) = export_with(&["--quiet", "--force"], &ck, &out);
    assert_ne!(code, 0);
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "mine");
    // An earlier export is replaced with --force.
    std::fs::remove_dir_all(&out).unwrap();
    let (code, err) = export(&ck, &out);
    assert_eq!(code, 0, "{err}");
    let (code, err) = export_with(&["--quiet", "--force"], &ck, &out);
    assert_eq!(code, 0, "{err}");
    assert!(out.join("blip2_manifest.json").exists());
}

#[test]
fn offline_hub_id_fails_clearly() {
    let base = test_tmp().join("export-errors/hub");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_blip2-ort"))
        .current_dir(&base)
        .env("HF_HOME", base.join("hf"))
        .env("HF_HUB_OFFLINE", "1")
        .args(["export", "--quiet", "Salesforce/blip2-opt-2.7b", "-o"])
        .arg(base.join("out"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("Salesforce/blip2-opt-2.7b") && err.contains("HF_HUB_OFFLINE"), "{err}");
}

#[test]
fn older_checkpoints_without_an_image_token_get_the_next_free_id() {
    // As transformers' Blip2Processor adds <image> to such a tokenizer: one past the
    // largest id. The fixture's <image> is that token already, so removing it from both
    // files must give the same id back.
    let (ck, out) = copy_fixture("opt-tiny", "no-image-token");
    let cfg_path = ck.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let want = cfg["image_token_index"].as_i64().unwrap();
    cfg.as_object_mut().unwrap().remove("image_token_index");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let tok_path = ck.join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tok_path).unwrap()).unwrap();
    tok["added_tokens"].as_array_mut().unwrap().retain(|t| t["content"] != "<image>");
    std::fs::write(&tok_path, tok.to_string()).unwrap();
    let (code, err) = export(&ck, &out);
    assert_eq!(code, 0, "{err}");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("blip2_manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["tokens"]["image_token_id"].as_i64().unwrap(), want);
}

#[test]
fn quantized_encoders_need_fp32() {
    let (ck, out) = copy_fixture("opt-tiny", "quantize-encoders-fp16");
    let (code, stderr) =
        export_with(&["--quiet", "--dtype", "fp16", "--quantize-encoders", "int8"], &ck, &out);
    assert_one_line_error(code, &stderr, &["--quantize-encoders", "--dtype fp32"], &out);
    assert_eq!(code, 2, "flags at odds are a usage error");
}

#[test]
fn int8_lm_activations_need_int8_weights_and_the_portable_target() {
    let (ck, out) = copy_fixture("opt-tiny", "lm-activations-alone");
    let (code, stderr) = export_with(&["--quiet", "--quantize-lm-activations", "int8"], &ck, &out);
    assert_one_line_error(code, &stderr, &["--quantize-lm-activations", "--quantize int8"], &out);
    assert_eq!(code, 2, "flags at odds are a usage error");
    let (ck, out) = copy_fixture("opt-tiny", "lm-activations-cuda");
    let args =
        ["--quiet", "--target", "cuda", "--quantize", "int8", "--quantize-lm-activations", "int8"];
    let (code, stderr) = export_with(&args, &ck, &out);
    assert_one_line_error(code, &stderr, &["--quantize-lm-activations", "--target cuda"], &out);
}

#[test]
fn int8_lm_activations_export_from_the_command_line() {
    let (ck, out) = copy_fixture("opt-tiny", "lm-activations");
    let (code, stderr) =
        export_with(&["--quantize", "int8", "--quantize-lm-activations", "int8"], &ck, &out);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("int8-per-row language-model activations"), "{stderr}");
    let m = blip2_core::Manifest::load(&out).unwrap();
    assert_eq!(m.lm_activation_quantization, Some(blip2_core::ActivationQuantization::Int8PerRow));
    let lm = std::fs::read(out.join(&m.graphs.language_model.file)).unwrap();
    assert!(lm.windows(13).any(|w| w == b"MatMulInteger"), "the LM uses MatMulInteger");
    assert!(lm.windows(11).any(|w| w == b"MatMulNBits"), "its LM head stays MatMulNBits");
}

#[test]
fn quantized_encoders_export_from_the_command_line() {
    let (ck, out) = copy_fixture("opt-tiny", "quantize-encoders");
    let (code, stderr) =
        export_with(&["--quantize", "int8", "--quantize-encoders", "int8"], &ck, &out);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("int8 weights, int8-dynamic encoders"), "{stderr}");
    let m = blip2_core::Manifest::load(&out).unwrap();
    assert_eq!(m.quantization, Some(blip2_core::Quantization::Int8));
    assert_eq!(m.encoder_quantization, Some(blip2_core::EncoderQuantization::Int8Dynamic));
    let vision = std::fs::read(out.join(&m.graphs.vision_encoder.file)).unwrap();
    assert!(
        vision.windows(21).any(|w| w == b"DynamicQuantizeMatMul"),
        "vision encoder uses DynamicQuantizeMatMul"
    );
}

#[test]
fn cuda_target_refuses_cpu_only_encoders_and_prints_its_target() {
    let (ck, out) = copy_fixture("opt-tiny", "cuda-target-encoders");
    let (code, stderr) =
        export_with(&["--quiet", "--target", "cuda", "--quantize-encoders", "int8"], &ck, &out);
    assert_one_line_error(code, &stderr, &["--quantize-encoders", "--target cuda"], &out);
    let (code, stderr) = export_with(&["--target", "cuda", "--quantize", "int8"], &ck, &out);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("int8 weights, cuda target"), "{stderr}");
    assert!(out.join("kv_reorder.onnx").exists(), "{stderr}");
}

/// Item 4: `--force` replaces the files an export writes and keeps every other file.
#[test]
fn force_keeps_the_files_export_did_not_write() {
    let (ck, out) = copy_fixture("opt-tiny", "force-keeps");
    let (code, err) = export(&ck, &out);
    assert_eq!(code, 0, "{err}");
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    std::fs::create_dir_all(out.join("samples")).unwrap();
    std::fs::write(out.join("samples/a.txt"), "also mine").unwrap();
    // A file an earlier export wrote that this one does not: it goes.
    std::fs::write(out.join("language_model.onnx.data"), b"stale weights").unwrap();
    let (code, err) = export_with(&["--quiet", "--force", "--dtype", "fp16"], &ck, &out);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "mine");
    assert_eq!(std::fs::read_to_string(out.join("samples/a.txt")).unwrap(), "also mine");
    assert!(!out.join("language_model.onnx.data").exists(), "the old export's files are replaced");
    let m = blip2_core::Manifest::load(&out).unwrap();
    assert_eq!(m.dtype, blip2_core::Dtype::Fp16, "the new export is in place");
    let leftovers: Vec<_> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(!out.join(".blip2-ort-replacing").exists());
}

/// Item 10: a context limit beyond the language model's positions is refused, not
/// quietly lowered.
#[test]
fn max_context_beyond_the_positions_is_refused() {
    let (ck, out) = copy_fixture("opt-tiny", "max-context");
    let (code, err) = export_with(&["--quiet", "--max-context", "999"], &ck, &out);
    assert_one_line_error(code, &err, &["--max-context", "999", "128 positions"], &out);
    assert_eq!(code, 2, "a value out of range is a usage error");
    let (code, err) = export_with(&["--quiet", "--max-context", "4"], &ck, &out);
    assert_one_line_error(code, &err, &["--max-context", "image tokens"], &out);
    assert_eq!(code, 2);
    let (code, err) = export_with(&["--quiet", "--max-context", "-5"], &ck, &out);
    assert_eq!(code, 2, "a negative number is a usage error: {err}");
    assert!(err.contains("--max-context") && !err.contains("'-- "), "{err}");
    let (code, err) = export_with(&["--quiet", "--max-context", "100"], &ck, &out);
    assert_eq!(code, 0, "{err}");
    assert_eq!(blip2_core::Manifest::load(&out).unwrap().text.max_context, 100);
    // Without the flag: 512, lowered to the model's positions.
    std::fs::remove_dir_all(&out).unwrap();
    let (code, err) = export(&ck, &out);
    assert_eq!(code, 0, "{err}");
    assert_eq!(blip2_core::Manifest::load(&out).unwrap().text.max_context, 128);
}

/// Item 8: a cause that the message already shows is not printed again.
#[test]
fn write_errors_name_the_cause_once() {
    let (ck, out) = copy_fixture("opt-tiny", "write-error");
    let blocker = out.parent().unwrap().join("a-file");
    std::fs::write(&blocker, b"").unwrap();
    let (code, err) = export(&ck, &blocker.join("out"));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("a-file"), "{err}");
    // The operating system's reason, said once.
    assert_eq!(err.matches("(os error").count(), 1, "{err}");
}

/// Item 2: partial folders of exports whose process is gone are removed by the next
/// export beside the same output; those of running exports are left alone.
#[test]
fn stale_partial_folders_are_removed_by_the_next_export() {
    let (ck, out) = copy_fixture("opt-tiny", "stale-partials");
    let parent = out.parent().unwrap();
    // A process id that has ended: a child that exited.
    let mut child = Command::new(env!("CARGO_BIN_EXE_blip2-ort"))
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = parent.join(format!(".out.partial-{dead}"));
    let running = parent.join(format!(".out.partial-{}", std::process::id()));
    let other = parent.join(format!(".other.partial-{dead}"));
    for d in [&stale, &running, &other] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("language_model.onnx"), vec![0u8; 1024]).unwrap();
    }
    let (code, err) = export(&ck, &out);
    assert_eq!(code, 0, "{err}");
    assert!(!stale.exists(), "the dead export's folder is removed");
    assert!(running.exists(), "a running export's folder is kept");
    assert!(other.exists(), "another output's folders are not this export's business");
}

/// Item 2: SIGTERM, SIGINT and SIGHUP during an export remove its partial folder, and the
/// process still ends by that signal.
#[cfg(unix)]
#[test]
fn signals_remove_the_partial_folder() {
    use std::os::unix::process::ExitStatusExt;
    for (sig, name) in [(libc::SIGTERM, "term"), (libc::SIGINT, "int"), (libc::SIGHUP, "hup")] {
        let (ck, out) = copy_fixture("opt-tiny", &format!("signal-{name}"));
        // The export copies special_tokens_map.json after writing the graphs; as a FIFO
        // with no writer, opening it blocks, holding the export half-way.
        let fifo = ck.join("special_tokens_map.json");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let mut child = Command::new(env!("CARGO_BIN_EXE_blip2-ort"))
            .args(["export", "--quiet"])
            .arg(&ck)
            .arg("-o")
            .arg(&out)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let partial = out.parent().unwrap().join(format!(".out.partial-{}", child.id()));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !partial.join("language_model.onnx").exists() {
            assert!(std::time::Instant::now() < deadline, "the export never reached its graphs");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(sig), "ends by the signal ({name}): {status:?}");
        assert!(!partial.exists(), "SIG{name}: the partial folder is removed");
        assert!(!out.exists());
    }
}

#[test]
fn malformed_generation_config_is_named_not_ignored() {
    // Valid JSON that transformers could not read as settings: it used to be replaced by
    // defaults without a word.
    let (ck, out) = copy_fixture("opt-tiny", "bad-generation-config");
    edit_json(&ck.join("generation_config.json"), |v| v["max_new_tokens"] = "twenty".into());
    let (code, stderr) = export(&ck, &out);
    assert_eq!(code, 1, "{stderr}");
    assert_one_line_error(code, &stderr, &["generation_config.json", "max_new_tokens"], &out);
}

#[test]
fn cuda_target_refuses_t5_head_sizes_the_cuda_kernel_lacks() {
    // ONNX Runtime's CUDA DecoderMaskedMultiHeadAttention has head sizes 32, 64 and 128
    // only: a Flan-T5 decoder of another d_kv is refused for --target cuda (with the
    // config key, the size and what to do), and exports as a portable graph.
    let (ck, out) = copy_fixture("t5-tiny", "t5-head-size");
    edit_json(&ck.join("config.json"), |v| v["text_config"]["d_kv"] = 16.into());
    let (code, err) = export_with(&["--quiet", "--target", "cuda"], &ck, &out);
    assert_eq!(code, 1, "{err}");
    assert_one_line_error(
        code,
        &err,
        &["config.json", "d_kv 16", "DecoderMaskedMultiHeadAttention", "without --target cuda"],
        &out,
    );
    // The fixture itself (d_kv 32) exports for the GPU.
    let (ck, out) = copy_fixture("t5-tiny", "t5-head-size-ok");
    let (code, err) = export_with(&["--quiet", "--target", "cuda"], &ck, &out);
    assert_eq!(code, 0, "{err}");
}
