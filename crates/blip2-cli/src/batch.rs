//! `infer batch`: one JSON request per line, results in input order. A bad line gets a
//! result with an "error" field, the other lines still run, and the exit code is 1.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use blip2_runtime::generation::GenerationConfig;
use blip2_runtime::pipeline::Pipeline;
use serde_json::{json, Value};

struct Request {
    line: usize,
    image: PathBuf,
    prompt: String,
}

/// Parses one line; `Err` is the message for that line's error result.
fn parse(line: &[u8], base: &Path, pipe: &Pipeline) -> Result<Option<(PathBuf, String)>, String> {
    let text = std::str::from_utf8(line).map_err(|_| "the line is not valid UTF-8".to_string())?;
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not a JSON object: {e}"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    let image = obj.get("image").and_then(Value::as_str).ok_or("missing \"image\" (a path)")?;
    let prompt = match (obj.get("prompt"), obj.get("question")) {
        (Some(_), Some(_)) => return Err("give \"prompt\" or \"question\", not both".into()),
        (Some(p), None) => p.as_str().ok_or("\"prompt\" must be a string")?.to_string(),
        (None, Some(q)) => {
            pipe.prompter.vqa_prompt(q.as_str().ok_or("\"question\" must be a string")?)
        }
        (None, None) => String::new(),
    };
    // Relative image paths are relative to the requests file.
    let path = Path::new(image);
    let path = if path.is_absolute() { path.to_path_buf() } else { base.join(path) };
    Ok(Some((path, prompt)))
}

pub fn run(
    pipe: &mut Pipeline,
    file: &Path,
    cfg: &GenerationConfig,
    batch_size: usize,
) -> Result<i32> {
    let f = std::fs::File::open(file)
        .with_context(|| format!("{}: cannot open the requests file", file.display()))?;
    let base = file.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut reader = std::io::BufReader::new(f);
    // Every line's result, in input order: Ok(index into requests) or Err(message).
    let mut results: Vec<(usize, Result<usize, String>)> = Vec::new();
    let mut requests = Vec::new();
    let mut buf = Vec::new();
    let mut n = 0;
    loop {
        buf.clear();
        if reader
            .read_until(b'\n', &mut buf)
            .with_context(|| format!("{}: read failed", file.display()))?
            == 0
        {
            break;
        }
        n += 1;
        match parse(&buf, &base, pipe) {
            Ok(None) => {}
            Ok(Some((image, prompt))) => {
                results.push((n, Ok(requests.len())));
                requests.push(Request { line: n, image, prompt });
            }
            Err(e) => results.push((n, Err(e))),
        }
    }

    // Read and preprocess every image up front (a worker per core), so a bad image fails
    // only its own line and only pixel values are kept.
    let mut outputs: Vec<Option<Result<Vec<blip2_runtime::pipeline::Generated>, String>>> =
        vec![None; requests.len()];
    let paths: Vec<&Path> = requests.iter().map(|r| r.image.as_path()).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let loaded = blip2_runtime::preprocess::load_and_preprocess(
        &paths,
        &pipe.limits,
        &pipe.model.manifest.image,
        threads,
    );
    let mut ready = Vec::new();
    for (i, r) in loaded.into_iter().enumerate() {
        match r {
            Ok(px) => ready.push((i, px)),
            Err(e) => outputs[i] = Some(Err(e.to_string())),
        }
    }
    for chunk in ready.chunks(batch_size) {
        let views: Vec<_> = chunk.iter().map(|(_, px)| px.view()).collect();
        let pixels = ndarray::concatenate(ndarray::Axis(0), &views)
            .context("joining the batch's pixel values")?;
        let prompts: Vec<String> = chunk.iter().map(|(i, _)| requests[*i].prompt.clone()).collect();
        match pipe.generate_pixels(pixels, &prompts, cfg) {
            Ok(res) => {
                for ((i, _), r) in chunk.iter().zip(res) {
                    outputs[*i] = Some(Ok(r));
                }
            }
            // A failing batch is retried row by row so one bad prompt fails only its line.
            Err(_) if chunk.len() > 1 => {
                for (i, px) in chunk {
                    let r = pipe.generate_pixels(
                        px.clone(),
                        std::slice::from_ref(&requests[*i].prompt),
                        cfg,
                    );
                    outputs[*i] = Some(r.map(|mut v| v.remove(0)).map_err(|e| e.to_string()));
                }
            }
            Err(e) => outputs[chunk[0].0] = Some(Err(e.to_string())),
        }
    }

    let mut failed = false;
    let mut stdout = std::io::stdout().lock();
    for (line, r) in results {
        let r = r.and_then(|i| outputs[i].take().expect("every request ran"));
        match r {
            Ok(gens) => {
                let req = requests.iter().find(|q| q.line == line).expect("request of this line");
                for (k, g) in gens.iter().enumerate() {
                    let mut o = json!({"line": line, "image": req.image.display().to_string(), "prompt": req.prompt,
                                       "text": g.text, "token_ids": g.token_ids});
                    if gens.len() > 1 {
                        o["sequence"] = json!(k);
                    }
                    writeln!(stdout, "{o}")?;
                }
            }
            Err(e) => {
                failed = true;
                writeln!(stdout, "{}", json!({"line": line, "error": e}))?;
                eprintln!("error: {}: line {line}: {e}", file.display());
            }
        }
    }
    stdout.flush()?;
    Ok(if failed { 1 } else { 0 })
}
