//! Resolves a MODEL argument: a local checkpoint folder, or a Hugging Face Hub id
//! fetched with hf-hub into the standard Hugging Face cache (so a model Python already
//! downloaded is reused, and one downloaded here is reused by Python).

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use indicatif::{ProgressBar, ProgressStyle};

use crate::ResolveError;

type Result<T> = std::result::Result<T, ResolveError>;

fn hub_err(message: String) -> ResolveError {
    ResolveError::Hub(message)
}

/// Files a BLIP-2 checkpoint may have besides its weights; only config.json and
/// tokenizer.json are required (the exporter says which one is missing).
const OPTIONAL: &[&str] = &[
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

pub fn looks_like_hub_id(s: &str) -> bool {
    let p = Path::new(s);
    !p.exists()
        && s.split('/').count() == 2
        && !s.starts_with('.')
        && !s.starts_with('/')
        && !s.contains('\\')
}

struct Bar(ProgressBar);

impl hf_hub::api::Progress for Bar {
    fn init(&mut self, size: usize, filename: &str) {
        self.0.set_length(size as u64);
        self.0.set_position(0);
        self.0.set_message(filename.to_string());
    }
    fn update(&mut self, size: usize) {
        self.0.inc(size as u64);
    }
    fn finish(&mut self) {}
}

/// Returns the snapshot folder holding the checkpoint `id` at `revision`.
pub fn fetch(id: &str, revision: Option<&str>, quiet: bool) -> Result<PathBuf> {
    let repo = match revision {
        Some(r) => Repo::with_revision(id.to_string(), RepoType::Model, r.to_string()),
        None => Repo::new(id.to_string(), RepoType::Model),
    };
    let cache = Cache::from_env();
    let cached = cache.repo(repo.clone());
    let offline = std::env::var("HF_HUB_OFFLINE")
        .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
        .unwrap_or(false);

    // A complete cached snapshot needs no network at all.
    if let Some(cfg) = cached.get("config.json") {
        let dir = cfg.parent().expect("snapshot file has a folder").to_path_buf();
        let weights_ok = dir.join("model.safetensors").exists()
            || dir.join("model.safetensors.index.json").exists();
        if weights_ok && dir.join("tokenizer.json").exists() {
            return Ok(dir);
        }
    }
    if offline {
        return Err(hub_err(format!(
            "{id}: not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set; download it where the Hub is reachable, \
             or pass a local checkpoint folder",
            cache.path().display()
        )));
    }
    let api = ApiBuilder::from_env()
        .with_token(std::env::var("HF_TOKEN").ok().or_else(|| cache.token()))
        .with_progress(false)
        .build()
        .map_err(|e| hub_err(format!("cannot set up the Hub client: {e}")))?;
    let r = api.repo(repo);
    let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(0) };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:30} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .expect("valid template"),
    );
    let get = |f: &str| -> std::result::Result<PathBuf, hf_hub::api::sync::ApiError> {
        match cached.get(f) {
            Some(p) => Ok(p),
            None => r.download_with_progress(f, Bar(bar.clone())),
        }
    };
    let cfg = get("config.json").map_err(|e| {
        hub_err(format!(
            "cannot download {id} from the Hugging Face Hub: {e}. Check the network (or HF_ENDPOINT / HF_TOKEN for \
             private models), or pass a local checkpoint folder"
        ))
    })?;
    for f in OPTIONAL {
        let _ = get(f);
    }
    get("tokenizer.json")
        .map_err(|e| hub_err(format!("{id}: cannot download tokenizer.json: {e}")))?;
    match get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| ResolveError::Io {
                path: index.clone(),
                what: "cannot read",
                source: e,
            })?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| hub_err(format!("{}: not JSON: {e}", index.display())))?;
            let mut shards: Vec<String> = v["weight_map"]
                .as_object()
                .map(|m| m.values().filter_map(|s| s.as_str().map(String::from)).collect())
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for s in shards {
                get(&s).map_err(|e| hub_err(format!("{id}: cannot download {s}: {e}")))?;
            }
        }
        Err(_) => {
            get("model.safetensors").map_err(|e| {
                hub_err(format!(
                    "{id}: cannot download model.safetensors (blip2-ort reads safetensors weights only): {e}"
                ))
            })?;
        }
    }
    bar.finish_and_clear();
    Ok(cfg.parent().expect("snapshot file has a folder").to_path_buf())
}
