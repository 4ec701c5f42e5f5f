//! The retrieval endpoints: `POST /v1/embeddings` (OpenAI's shape), `POST /v1/rerank`
//! (Cohere's, Jina's and vLLM's), `POST /v1/score` (vLLM's pairs) and, with an index,
//! `POST /v1/search`. Requests are read and checked here; images are fetched and
//! preprocessed and texts tokenized off the async threads, then the work goes to the
//! [`crate::retrieval`] worker, which batches it with other clients' work.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use blip2_index::{Codes, Hit, IndexError, Store};
use blip2_runtime::retrieval::TokenRow;
use ndarray::Array3;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::engine::SubmitError;
use crate::error::ApiError;
use crate::retrieval::{Output, Retrieval, Work};
use crate::{media, App};

/// Inputs one request may hold at most (OpenAI's limit for embeddings).
const MAX_INPUTS: usize = 2048;

/// An image index opened for `/v1/search`: the file, and the scan's codes in memory,
/// read again when an index run has changed the file since.
pub struct SearchIndex {
    inner: Mutex<Indexed>,
}

struct Indexed {
    store: Store,
    codes: Arc<Codes>,
    version: i64,
}

impl SearchIndex {
    /// Reads the scan's codes of `store` (an empty index is fine: it finds nothing).
    pub fn open(store: Store) -> Result<Self, IndexError> {
        let version = store.data_version()?;
        let codes = Arc::new(store.load_codes()?);
        Ok(Self { inner: Mutex::new(Indexed { store, codes, version }) })
    }

    /// Images in the index (as last read).
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).codes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `k` best images by ITC with the text embedding `t`.
    fn search(&self, t: &[f32], k: usize) -> Result<Vec<Hit>, IndexError> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let version = g.store.data_version()?;
        if version != g.version {
            g.codes = Arc::new(g.store.load_codes()?);
            g.version = version;
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (hits, stats) = blip2_index::search(&g.store, &g.codes, t, k, threads)?;
        tracing::debug!(
            "search: {} images, {} candidates, scan {:.1} ms, rescoring {:.1} ms",
            stats.images,
            stats.candidates,
            stats.scan_ms,
            stats.rescore_ms
        );
        Ok(hits)
    }
}

/// An input of `/v1/embeddings`.
enum Input {
    Text(String),
    /// An image URL (same rules as chat).
    Image(String),
}

/// An image item `{"type": "image_url", "image_url": {"url": ...}}` (or `"image_url": URL`).
fn image_item(v: &Value) -> Option<String> {
    let o = v.as_object()?;
    if o.get("type").and_then(Value::as_str) != Some("image_url") {
        return None;
    }
    match o.get("image_url")? {
        Value::String(s) => Some(s.clone()),
        Value::Object(u) => u.get("url")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn inputs(v: &Value) -> Result<Vec<Input>, ApiError> {
    let bad = |m: String| ApiError::bad_param(m, "input");
    let items = match v {
        Value::String(s) => return Ok(vec![Input::Text(s.clone())]),
        Value::Array(a) => a,
        Value::Null => {
            return Err(
                bad("input is missing: give a text, a list of texts, or image items".into()),
            )
        }
        other => return Err(bad(format!("input must be a text or a list, not {other}"))),
    };
    if items.is_empty() {
        return Err(bad("input is an empty list".into()));
    }
    if items.len() > MAX_INPUTS {
        return Err(bad(format!("input has {} items; at most {MAX_INPUTS}", items.len())));
    }
    let token_ids = "token ids are not supported: send texts (BLIP-2's tokenizer is the server's)";
    if items.iter().all(Value::is_number) {
        return Err(bad(format!("input: {token_ids}")));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(s) => Ok(Input::Text(s.clone())),
            Value::Array(_) | Value::Number(_) => Err(bad(format!("input[{i}]: {token_ids}"))),
            Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("text") => o
                .get("text")
                .and_then(Value::as_str)
                .map(|t| Input::Text(t.to_string()))
                .ok_or_else(|| bad(format!("input[{i}]: a text item needs \"text\""))),
            other => image_item(other).map(Input::Image).ok_or_else(|| {
                bad(format!(
                    "input[{i}]: expected a text or {{\"type\": \"image_url\", \"image_url\": {{\"url\": ...}}}}, got {other}"
                ))
            }),
        })
        .collect()
}

/// Image URLs of `documents` (rerank) or `text_2` (score): a list of image URLs or image
/// items, one URL or item, or vLLM's `{"content": [items]}`.
fn documents(v: &Value, param: &str) -> Result<Vec<String>, ApiError> {
    let bad = |m: String| ApiError::bad_param(m, param);
    let one = |i: usize, item: &Value| -> Result<String, ApiError> {
        if let Some(url) = image_item(item) {
            return Ok(url);
        }
        match item {
            Value::String(s) if is_url(s) => Ok(s.clone()),
            Value::String(_) => Err(bad(format!(
                "{param}[{i}]: a text; BLIP-2 scores images against a text, so {param} holds images \
                 (image URLs or {{\"type\": \"image_url\", \"image_url\": {{\"url\": ...}}}} items)"
            ))),
            other => Err(bad(format!("{param}[{i}]: expected an image URL or image item, got {other}"))),
        }
    };
    let list: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        Value::Object(o) if o.contains_key("content") => match &o["content"] {
            Value::Array(a) => a.iter().collect(),
            other => vec![other],
        },
        Value::Null => return Err(bad(format!("{param} is missing"))),
        other => vec![other],
    };
    if list.is_empty() {
        return Err(bad(format!("{param} is an empty list")));
    }
    if list.len() > MAX_INPUTS {
        return Err(bad(format!("{param} has {} items; at most {MAX_INPUTS}", list.len())));
    }
    list.iter().enumerate().map(|(i, item)| one(i, item)).collect()
}

fn is_url(s: &str) -> bool {
    let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    s.starts_with("data:")
        || lower.starts_with("file://")
        || lower.starts_with("http://")
        || lower.starts_with("https://")
}

/// Texts and image URLs made into work for the worker, off the async threads: each text
/// tokenized, each image fetched, decoded and preprocessed. Each comes with the name it
/// has in errors (`input[3]`); `param` is the parameter a 400 names.
async fn prepare(
    app: &Arc<App>,
    texts: Vec<(String, String)>,
    images: Vec<(String, String)>,
    param: &'static str,
) -> Result<Work, ApiError> {
    let app = app.clone();
    let job = move || -> Result<Work, ApiError> {
        let r = app.retrieval.as_ref().expect("checked by the caller");
        let mut work = Work::default();
        for (name, text) in texts {
            let row: TokenRow = r
                .tokenizer
                .encode(&text)
                .map_err(|e| ApiError::bad_param(format!("{name}: {e}"), param))?;
            if row.truncated {
                tracing::warn!(
                    "{name}: the text was cut to the model's {} tokens",
                    r.manifest.text.max_length
                );
            }
            work.texts.push(row);
        }
        for (name, url) in images {
            let (bytes, src) = media::fetch(&url, &app.opts.media)
                .map_err(|e| ApiError::bad_param(format!("{name}: {e}"), param))?;
            let px: Array3<f32> = blip2_runtime::preprocess::on_cpu_slot(|| {
                let img = blip2_runtime::preprocess::load_image_bytes(&bytes, &src, &r.limits)?;
                blip2_runtime::preprocess::preprocess(&img, &r.manifest.image)
            })
            .map_err(|e| ApiError::bad_param(format!("{name}: {e}"), param))?;
            work.images.push(px);
        }
        Ok(work)
    };
    tokio::task::spawn_blocking(job)
        .await
        .map_err(|e| ApiError::internal(format!("preparing the request failed: {e}")))?
}

async fn run(r: &Retrieval, work: Work) -> Result<Output, ApiError> {
    match r.run(work).await {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(e)) => Err(ApiError::internal(format!("the model failed: {e}"))),
        Err(e @ (SubmitError::Full(_) | SubmitError::Closed | SubmitError::Stopped)) => {
            Err(ApiError::unavailable(e.to_string()))
        }
    }
}

fn retrieval<'a>(app: &'a App, endpoint: &str) -> Result<&'a Arc<Retrieval>, ApiError> {
    app.retrieval.as_ref().ok_or_else(|| crate::wrong_kind(app, endpoint))
}

fn tokens(work: &Work, queries: usize) -> usize {
    work.texts.iter().map(|r| r.ids.len()).sum::<usize>() + work.images.len() * queries
}

fn usage(n: usize) -> Value {
    json!({"prompt_tokens": n, "total_tokens": n})
}

fn base64_f32<'a>(values: impl Iterator<Item = &'a f32>) -> String {
    let mut bytes = Vec::new();
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[derive(Deserialize)]
struct EmbeddingRequest {
    model: Option<String>,
    #[serde(default)]
    input: Value,
    encoding_format: Option<String>,
    dimensions: Option<i64>,
}

pub(crate) async fn embeddings(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let r = retrieval(&app, "/v1/embeddings")?.clone();
    let req: EmbeddingRequest = crate::parse_body(&app, body)?;
    crate::check_model(&app, req.model.as_deref())?;
    let b64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_param(
                format!("encoding_format must be \"float\" or \"base64\", not {other:?}"),
                "encoding_format",
            ))
        }
    };
    let dim = r.manifest.embedding_dim;
    if let Some(d) = req.dimensions {
        if d != dim as i64 {
            return Err(ApiError::bad_param(
                format!("dimensions is {d}, but this model's embeddings have {dim} values (leave dimensions out)"),
                "dimensions",
            ));
        }
    }
    let inputs = inputs(&req.input)?;
    let (mut texts, mut images, mut order) = (Vec::new(), Vec::new(), Vec::new());
    for (i, input) in inputs.into_iter().enumerate() {
        match input {
            Input::Text(t) => {
                order.push((false, texts.len()));
                texts.push((format!("input[{i}]"), t));
            }
            Input::Image(u) => {
                order.push((true, images.len()));
                images.push((format!("input[{i}]"), u));
            }
        }
    }
    let work = prepare(&app, texts, images, "input").await?;
    let used = tokens(&work, r.manifest.num_query_tokens);
    let out = run(&r, work).await?;
    let data: Vec<Value> = order
        .iter()
        .enumerate()
        .map(|(index, &(image, j))| {
            let embedding = match (image, b64) {
                (false, false) => json!(out.texts[j]),
                (false, true) => json!(base64_f32(out.texts[j].iter())),
                (true, false) => {
                    json!(out.images[j].outer_iter().map(|q| q.to_vec()).collect::<Vec<_>>())
                }
                (true, true) => json!(base64_f32(out.images[j].iter())),
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": app.opts.served_model_name,
        "usage": usage(used),
    }))
    .into_response())
}

#[derive(Deserialize)]
struct RerankRequest {
    model: Option<String>,
    #[serde(default)]
    query: Value,
    #[serde(default)]
    documents: Value,
    top_n: Option<i64>,
}

fn query_text(v: &Value, param: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Err(ApiError::bad_param(
            format!("{param} is missing: give the text to match the images against"),
            param,
        )),
        other => Err(ApiError::bad_param(
            format!("{param} must be a text (BLIP-2 matches images against a text), not {other}"),
            param,
        )),
    }
}

fn top_n(v: Option<i64>, param: &str) -> Result<Option<usize>, ApiError> {
    match v {
        None | Some(0) => Ok(None),
        Some(n) if n < 0 => {
            Err(ApiError::bad_param(format!("{param} must be 0 or more, got {n}"), param))
        }
        Some(n) => Ok(Some(n as usize)),
    }
}

fn new_id(app: &App, prefix: &str) -> String {
    format!(
        "{prefix}-{:x}{:04x}",
        crate::unix_now(),
        app.ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed) & 0xffff
    )
}

/// Each image of `urls` matched with the one text: `(itm, itc)` per image.
async fn match_images(
    app: &Arc<App>,
    r: &Retrieval,
    text: String,
    urls: Vec<String>,
    param: &'static str,
    text_param: &str,
) -> Result<(Vec<(f32, f32)>, usize), ApiError> {
    let n = urls.len();
    let images = urls.into_iter().enumerate().map(|(i, u)| (format!("{param}[{i}]"), u)).collect();
    let mut work = prepare(app, vec![(text_param.to_string(), text)], images, param).await?;
    work.pairs = (0..n).map(|i| (0, i)).collect();
    let used = tokens(&work, r.manifest.num_query_tokens);
    Ok((run(r, work).await?.scores, used))
}

pub(crate) async fn rerank(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let r = retrieval(&app, "/v1/rerank")?.clone();
    let req: RerankRequest = crate::parse_body(&app, body)?;
    crate::check_model(&app, req.model.as_deref())?;
    let text = query_text(&req.query, "query")?;
    let urls = documents(&req.documents, "documents")?;
    let top = top_n(req.top_n, "top_n")?;
    let (scores, used) = match_images(&app, &r, text, urls, "documents", "query").await?;
    let mut results: Vec<(usize, f32, f32)> =
        scores.into_iter().enumerate().map(|(i, (p, s))| (i, p, s)).collect();
    // Highest ITM probability first; the sort is stable, so ties keep document order.
    results.sort_by(|a, b| b.1.total_cmp(&a.1));
    if let Some(n) = top {
        results.truncate(n);
    }
    let results: Vec<Value> = results
        .iter()
        .map(|&(index, p, s)| json!({"index": index, "relevance_score": p, "itc_score": s}))
        .collect();
    Ok(Json(json!({
        "id": new_id(&app, "rerank"),
        "model": app.opts.served_model_name,
        "results": results,
        "usage": {"total_tokens": used},
    }))
    .into_response())
}

#[derive(Deserialize)]
struct ScoreRequest {
    model: Option<String>,
    #[serde(default)]
    text_1: Value,
    #[serde(default)]
    text_2: Value,
}

pub(crate) async fn score(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let r = retrieval(&app, "/v1/score")?.clone();
    let req: ScoreRequest = crate::parse_body(&app, body)?;
    crate::check_model(&app, req.model.as_deref())?;
    let texts: Vec<String> = match &req.text_1 {
        Value::Array(a) if !a.is_empty() => a
            .iter()
            .enumerate()
            .map(|(i, t)| query_text(t, &format!("text_1[{i}]")))
            .collect::<Result<_, _>>()
            .map_err(|mut e| {
                e.param = Some("text_1".into());
                e
            })?,
        Value::Array(_) => return Err(ApiError::bad_param("text_1 is an empty list", "text_1")),
        v => vec![query_text(v, "text_1")?],
    };
    let urls = documents(&req.text_2, "text_2")?;
    let pairs: Vec<(usize, usize)> = if texts.len() == 1 {
        (0..urls.len()).map(|i| (0, i)).collect()
    } else if texts.len() == urls.len() {
        (0..urls.len()).map(|i| (i, i)).collect()
    } else {
        return Err(ApiError::bad_param(
            format!(
                "text_1 has {} texts and text_2 {} images: give one text, or as many texts as images",
                texts.len(),
                urls.len()
            ),
            "text_2",
        ));
    };
    let texts = texts.into_iter().enumerate().map(|(i, t)| (format!("text_1[{i}]"), t)).collect();
    let images = urls.into_iter().enumerate().map(|(i, u)| (format!("text_2[{i}]"), u)).collect();
    let mut work = prepare(&app, texts, images, "text_2").await?;
    work.pairs = pairs;
    let used = tokens(&work, r.manifest.num_query_tokens);
    let out = run(&r, work).await?;
    let data: Vec<Value> = out
        .scores
        .iter()
        .enumerate()
        .map(|(i, &(p, s))| json!({"index": i, "object": "score", "score": p, "itc_score": s}))
        .collect();
    Ok(Json(json!({
        "id": new_id(&app, "score"),
        "object": "list",
        "created": crate::unix_now(),
        "model": app.opts.served_model_name,
        "data": data,
        "usage": usage(used),
    }))
    .into_response())
}

#[derive(Deserialize)]
struct SearchRequest {
    model: Option<String>,
    #[serde(default)]
    query: Value,
    top_n: Option<i64>,
    rerank: Option<i64>,
    /// blip2-ort's extension: a JPEG thumbnail of each result, this many pixels on its
    /// longer side, as a `data:` URL (the playground page shows them).
    thumbnails: Option<i64>,
}

/// Default `top_n` of `/v1/search`.
const SEARCH_TOP: usize = 10;

/// The largest `thumbnails` size.
const MAX_THUMBNAIL: u32 = 512;

/// A `data:image/jpeg` URL of `path` shrunk to `size` pixels on its longer side. Only
/// paths the index holds are read (the results of a search), never a path a client names.
fn thumbnail(
    path: &str,
    size: u32,
    limits: &blip2_runtime::preprocess::ImageLimits,
) -> Result<String, String> {
    let img = blip2_runtime::preprocess::load_image(std::path::Path::new(path), limits)
        .map_err(|e| e.to_string())?;
    // Shrunk only: a smaller image keeps its size.
    let small = if img.width().max(img.height()) > size { img.thumbnail(size, size) } else { img };
    let small = image::DynamicImage::ImageRgb8(small.to_rgb8());
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 80)
        .encode_image(&small)
        .map_err(|e| format!("{path}: making its thumbnail: {e}"))?;
    Ok(format!("data:image/jpeg;base64,{}", base64::engine::general_purpose::STANDARD.encode(jpeg)))
}

pub(crate) async fn search(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let r = retrieval(&app, "/v1/search")?.clone();
    let Some(index) = app.search.clone() else {
        return Err(ApiError::bad(
            "this server has no image index: start it with --db FILE (made by `blip2-ort index`) to search",
        ));
    };
    let req: SearchRequest = crate::parse_body(&app, body)?;
    crate::check_model(&app, req.model.as_deref())?;
    let text = query_text(&req.query, "query")?;
    let top = match req.top_n {
        None => SEARCH_TOP,
        Some(n) if n >= 1 => n as usize,
        Some(n) => {
            return Err(ApiError::bad_param(format!("top_n must be at least 1, got {n}"), "top_n"))
        }
    };
    let rerank = match req.rerank {
        None => 0,
        Some(n) if n >= 0 => n as usize,
        Some(n) => {
            return Err(ApiError::bad_param(format!("rerank must be 0 or more, got {n}"), "rerank"))
        }
    };
    let thumbnails = match req.thumbnails {
        None | Some(0) => None,
        Some(n) if (1..=MAX_THUMBNAIL as i64).contains(&n) => Some(n as u32),
        Some(n) => {
            return Err(ApiError::bad_param(
                format!("thumbnails is the thumbnails' size in pixels, from 1 to {MAX_THUMBNAIL} (0: none), got {n}"),
                "thumbnails",
            ))
        }
    };
    let work = prepare(&app, vec![("query".into(), text.clone())], vec![], "query").await?;
    let mut used = tokens(&work, 0);
    let emb = run(&r, work).await?.texts.remove(0);
    let k = top.max(rerank);
    let hits = tokio::task::spawn_blocking(move || index.search(&emb, k))
        .await
        .map_err(|e| ApiError::internal(format!("the search failed: {e}")))?
        .map_err(|e| ApiError::internal(e.to_string()))?;
    // ITM over the best `rerank` images, read again from their files.
    let n = rerank.min(hits.len());
    let mut itm: Vec<Option<f32>> = vec![None; n];
    let mut errors: Vec<Option<String>> = vec![None; n];
    if n > 0 {
        let (app2, paths) =
            (app.clone(), hits[..n].iter().map(|h| h.path.clone()).collect::<Vec<_>>());
        let loaded = tokio::task::spawn_blocking(move || {
            let r = app2.retrieval.as_ref().expect("checked above");
            paths
                .iter()
                .map(|p| {
                    blip2_runtime::preprocess::load_image(std::path::Path::new(p), &r.limits)
                        .and_then(|img| {
                            blip2_runtime::preprocess::preprocess(&img, &r.manifest.image)
                        })
                        .map_err(|e| e.to_string())
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| ApiError::internal(format!("reading the images failed: {e}")))?;
        let row =
            r.tokenizer.encode(&text).map_err(|e| ApiError::bad_param(e.to_string(), "query"))?;
        let mut work = Work { texts: vec![row], ..Work::default() };
        let mut which = Vec::new();
        for (i, l) in loaded.into_iter().enumerate() {
            match l {
                Ok(px) => {
                    work.pairs.push((0, work.images.len()));
                    work.images.push(px);
                    which.push(i);
                }
                Err(e) => errors[i] = Some(e),
            }
        }
        if !which.is_empty() {
            used += tokens(&work, r.manifest.num_query_tokens);
            let scores = run(&r, work).await?.scores;
            for (&i, (p, _)) in which.iter().zip(scores) {
                itm[i] = Some(p);
            }
        }
    }
    let errors_by_path: std::collections::HashMap<String, String> = hits[..n]
        .iter()
        .zip(&errors)
        .filter_map(|(h, e)| e.clone().map(|e| (h.path.clone(), e)))
        .collect();
    let ranked: Vec<_> = blip2_index::rerank(hits, &itm).into_iter().take(top).collect();
    let thumbs: Vec<Option<Result<String, String>>> = match thumbnails {
        None => vec![None; ranked.len()],
        Some(size) => {
            let (app2, paths) =
                (app.clone(), ranked.iter().map(|(h, _)| h.path.clone()).collect::<Vec<_>>());
            tokio::task::spawn_blocking(move || {
                let limits = &app2.retrieval.as_ref().expect("checked above").limits;
                paths.iter().map(|p| Some(thumbnail(p, size, limits))).collect()
            })
            .await
            .map_err(|e| ApiError::internal(format!("making the thumbnails failed: {e}")))?
        }
    };
    let results: Vec<Value> = ranked
        .into_iter()
        .zip(thumbs)
        .enumerate()
        .map(|(i, ((h, p), thumb))| {
            let mut o = json!({"rank": i + 1, "image": h.path, "itc": h.itc});
            if let Some(p) = p {
                o["itm"] = json!(p);
            }
            let mut error = errors_by_path.get(&h.path).cloned();
            match thumb {
                Some(Ok(url)) => o["thumbnail"] = json!(url),
                Some(Err(e)) => error = error.or(Some(e)),
                None => {}
            }
            if let Some(e) = error {
                o["error"] = json!(e);
            }
            o
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "model": app.opts.served_model_name,
        "query": text,
        "results": results,
        "usage": usage(used),
    }))
    .into_response())
}
