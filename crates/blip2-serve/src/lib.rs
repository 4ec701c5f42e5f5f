//! `blip2-ort serve`: an OpenAI-compatible HTTP server for an exported BLIP-2 model.
//!
//! Routes: `GET /health`, `GET /metrics` (Prometheus), `GET /v1/models`; on a
//! captioning export `POST /v1/chat/completions` and `POST /v1/completions` (with
//! blip2-ort's `image` extension), streaming or not; on an image-text retrieval export
//! `POST /v1/embeddings`, `POST /v1/rerank`, `POST /v1/score` and, with an image index,
//! `POST /v1/search`; and the playground page at `GET /` ([`ui`], unless `--no-ui`). Requests from all clients are batched: generation by the
//! [`engine`] (each gets exactly the tokens it would get alone, and with greedy settings
//! the text `blip2-ort infer` gives for the same image and prompt), retrieval by the
//! [`retrieval`] worker.

pub mod engine;
pub mod error;
pub mod media;
pub mod metrics;
pub mod openai;
pub mod retrieval;
mod retrieval_api;
mod ui;

pub use retrieval_api::SearchIndex;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use blip2_runtime::generation::GenerationConfig;
use blip2_runtime::pipeline::Pipeline;
use blip2_runtime::retrieval::RetrievalModel;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::engine::{Engine, EngineOptions, Event, EventSender, Request as Job, SubmitError};
use crate::error::ApiError;
use crate::media::MediaPolicy;
use crate::metrics::{Metrics, RequestLabels};

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The model id clients name (`/v1/models`, the requests' `model`).
    pub served_model_name: String,
    pub engine: EngineOptions,
    /// Requests to `/v1/*` must send `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    pub media: MediaPolicy,
    /// Request bodies over this many bytes get 413.
    pub max_body_bytes: usize,
    /// Serve the playground page at `GET /` (`--no-ui` turns it off).
    pub ui: bool,
}

/// What a server serves: a captioning export's pipeline, or a retrieval export's model
/// with an optional image index for `/v1/search`.
// Made once at startup and moved into the workers: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Served {
    Captioning(Pipeline),
    Retrieval { model: RetrievalModel, index: Option<SearchIndex> },
}

impl From<Pipeline> for Served {
    fn from(p: Pipeline) -> Self {
        Served::Captioning(p)
    }
}

impl From<RetrievalModel> for Served {
    fn from(model: RetrievalModel) -> Self {
        Served::Retrieval { model, index: None }
    }
}

/// The threads behind the routes, to be shut down once the routes stop.
pub struct Workers {
    engine: Option<Arc<Engine>>,
    retrieval: Option<Arc<retrieval::Retrieval>>,
}

impl Workers {
    /// Stops taking work and waits until all admitted work has been answered.
    pub fn shutdown(&self) {
        if let Some(e) = &self.engine {
            e.shutdown();
        }
        if let Some(r) = &self.retrieval {
            r.shutdown();
        }
    }
}

struct App {
    /// The generation engine (captioning exports).
    engine: Option<Arc<Engine>>,
    /// The retrieval worker (retrieval exports).
    retrieval: Option<Arc<retrieval::Retrieval>>,
    search: Option<Arc<SearchIndex>>,
    metrics: Arc<Metrics>,
    opts: ServeOptions,
    created: u64,
    ids: AtomicU64,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The server's routes over a loaded model, and the workers behind them (to be shut
/// down once the routes stop).
pub fn router(served: impl Into<Served>, opts: ServeOptions) -> (Router, Workers) {
    let metrics = Arc::new(Metrics::new());
    let (engine, retrieval, search) = match served.into() {
        Served::Captioning(p) => {
            let engine = p
                .into_engine(opts.engine.clone(), metrics.clone())
                .expect("spawning the engine thread");
            (Some(engine), None, None)
        }
        Served::Retrieval { model, index } => (
            None,
            Some(retrieval::Retrieval::start(model, opts.engine.clone(), metrics.clone())),
            index.map(Arc::new),
        ),
    };
    let workers = Workers { engine: engine.clone(), retrieval: retrieval.clone() };
    let app = Arc::new(App {
        engine,
        retrieval,
        search,
        metrics,
        created: unix_now(),
        ids: AtomicU64::new(0),
        opts,
    });
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(retrieval_api::embeddings))
        .route("/v1/rerank", post(retrieval_api::rerank))
        .route("/v1/score", post(retrieval_api::score))
        .route("/v1/search", post(retrieval_api::search))
        .route_layer(middleware::from_fn_with_state(app.clone(), authorize));
    let mut router =
        Router::new().route("/health", get(health)).route("/metrics", get(metrics_text)).merge(v1);
    if app.opts.ui {
        router = router.merge(ui::routes());
    }
    let router = router
        .fallback(not_found)
        // Bodies up to twice the limit are read before the 413, so the client gets the
        // answer on a connection that stays open; beyond that the answer comes at once and
        // the connection closes, which a client still sending may see as a reset.
        .layer(DefaultBodyLimit::max(app.opts.max_body_bytes.saturating_mul(2)))
        .layer(middleware::from_fn_with_state(app.clone(), count_requests))
        .with_state(app);
    (router, workers)
}

/// Serves on `listener` until `shutdown` completes; then stops accepting, lets every
/// request in flight finish, and returns.
pub async fn serve(
    served: impl Into<Served>,
    opts: ServeOptions,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (router, workers) = router(served, opts);
    let result = axum::serve(listener, router).with_graceful_shutdown(shutdown).await;
    tokio::task::spawn_blocking(move || workers.shutdown()).await.ok();
    result
}

/// Binds `addr`, calls `on_listening` with the address bound, and serves until SIGTERM or
/// Ctrl-C (then finishes the requests in flight). Blocks; runs its own async runtime.
/// The signals are listened for before `on_listening` is called, so a caller may drop
/// its own handlers there and no signal falls between the two.
pub fn run(
    served: impl Into<Served> + Send + 'static,
    opts: ServeOptions,
    addr: SocketAddr,
    on_listening: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("blip2-http")
        .build()?;
    rt.block_on(async move {
        let shutdown = shutdown_signal();
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        on_listening(listener.local_addr()?);
        serve(served, opts, listener, shutdown).await?;
        Ok(())
    })
}

/// Listens for Ctrl-C and SIGTERM from the call on (not from the first poll, as an async
/// fn would): the future completes on either. Call it inside a Tokio runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let (int, term) = {
        use tokio::signal::unix::{signal, SignalKind};
        (signal(SignalKind::interrupt()).ok(), signal(SignalKind::terminate()).ok())
    };
    async move {
        #[cfg(unix)]
        {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = wait(int) => {},
                _ = wait(term) => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutting down: no new connections; finishing the requests in flight");
    }
}

/// Counts every answer by endpoint and status (unknown paths as "other", so the label
/// set stays bounded).
async fn count_requests(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let endpoint = match path {
        "/health"
        | "/metrics"
        | "/v1/models"
        | "/v1/chat/completions"
        | "/v1/completions"
        | "/v1/embeddings"
        | "/v1/rerank"
        | "/v1/score"
        | "/v1/search" => path.to_string(),
        p if app.opts.ui && ui::PATHS.contains(&p) => path.to_string(),
        _ => "other".to_string(),
    };
    let method = req.method().clone();
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    let status = resp.status();
    app.metrics
        .requests
        .get_or_create(&RequestLabels {
            endpoint: endpoint.clone(),
            status: status.as_u16().to_string(),
        })
        .inc();
    tracing::info!(
        "{method} {endpoint} {} {:.1} ms",
        status.as_u16(),
        started.elapsed().as_secs_f64() * 1e3
    );
    resp
}

async fn authorize(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(key) = &app.opts.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given.map(str::trim) != Some(key.as_str()) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// 200 while the server can answer; 503 once its generation engine (or retrieval
/// worker) has stopped on a fault, or while it shuts down, so that a load balancer stops
/// sending it requests.
async fn health(State(app): State<Arc<App>>) -> Response {
    let running = app.engine.as_ref().is_none_or(|e| e.is_running())
        && app.retrieval.as_ref().is_none_or(|r| r.is_running());
    if running {
        return Json(json!({"status": "ok"})).into_response();
    }
    let body = json!({"status": "error", "error": SubmitError::Stopped.to_string()});
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], app.metrics.render())
        .into_response()
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!("no route for {} {}", req.method(), req.uri().path()))
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    let max_len = match (&app.engine, &app.retrieval) {
        (Some(e), _) => e.manifest.text.max_context,
        (None, Some(r)) => r.manifest.text.max_length,
        (None, None) => 0,
    };
    Json(json!({
        "object": "list",
        "data": [{
            "id": app.opts.served_model_name,
            "object": "model",
            "created": app.created,
            "owned_by": "blip2-ort",
            "max_model_len": max_len,
        }]
    }))
}

fn parse_body<T: serde::de::DeserializeOwned>(
    app: &App,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!(
                "the request body is over the server's limit of {} bytes (--max-body-mb)",
                app.opts.max_body_bytes
            ),
        )
    };
    let body = body.map_err(|r| {
        let status = r.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            ApiError::new(status, "invalid_request_error", r.body_text())
        }
    })?;
    if body.len() > app.opts.max_body_bytes {
        return Err(too_large());
    }
    openai::from_json(&body)
}

/// The request's search settings, within what one batch may hold: `n` samples and
/// `num_beams` beams are rows of a batch, so neither may pass `--max-batch`.
fn settings(app: &App, s: &openai::Sampling) -> Result<GenerationConfig, ApiError> {
    let cfg = openai::search_settings(s, &engine(app, "")?.defaults)?;
    let max = app.opts.engine.max_batch;
    for (v, name) in [(cfg.num_return_sequences, "n"), (cfg.num_beams, "num_beams")] {
        if v > max {
            return Err(ApiError::bad_param(
                format!(
                    "{name} is {v}, more than this server's batch of {max} sequences (--max-batch)"
                ),
                name,
            ));
        }
    }
    Ok(cfg)
}

/// The generation engine, or a 400 for `endpoint` on a retrieval export.
fn engine<'a>(app: &'a App, endpoint: &str) -> Result<&'a Arc<Engine>, ApiError> {
    app.engine.as_ref().ok_or_else(|| wrong_kind(app, endpoint))
}

/// The 400 for an endpoint the served export does not have, naming those it has.
fn wrong_kind(app: &App, endpoint: &str) -> ApiError {
    let retrieval = "/v1/embeddings, /v1/rerank, /v1/score and /v1/search (with --db)";
    let generation = "/v1/chat/completions and /v1/completions";
    match &app.engine {
        Some(e) => ApiError::bad(format!(
            "{endpoint}: this server serves a captioning export (family \"{}\"): it supports {generation}; \
             {retrieval} need an image-text retrieval export (e.g. of Salesforce/blip2-itm-vit-g)",
            e.manifest.family
        )),
        None => ApiError::bad(format!(
            "{endpoint}: this server serves an image-text retrieval export: it supports {retrieval}; \
             {generation} need a captioning export (e.g. of Salesforce/blip2-opt-2.7b)"
        )),
    }
}

fn check_model(app: &App, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != app.opts.served_model_name => {
            let mut e = ApiError::not_found(format!(
                "the model `{m}` does not exist; this server serves `{}`",
                app.opts.served_model_name
            ));
            e.param = Some("model".into());
            Err(e)
        }
        _ => Ok(()),
    }
}

/// What a request became once its image was read and its prompt tokenized.
struct Prepared {
    job: Job,
    events: mpsc::UnboundedReceiver<Event>,
}

/// Fetches and preprocesses the image, tokenizes the prompt and checks that it fits, off
/// the async threads.
async fn prepare(
    app: &Arc<App>,
    image_url: String,
    prompt: PromptSource,
    cfg: GenerationConfig,
    stop: Vec<String>,
) -> Result<Prepared, ApiError> {
    let app2 = app.clone();
    let work = move || -> Result<Prepared, ApiError> {
        let e = engine(&app2, "")?;
        let (bytes, name) = media::fetch(&image_url, &app2.opts.media)
            .map_err(|e| ApiError::bad_param(e.to_string(), "image_url"))?;
        // Decoding takes a core for tens of milliseconds at camera sizes: no more of them
        // at once than the machine has cores.
        let pixels = blip2_runtime::preprocess::on_cpu_slot(|| {
            let img = blip2_runtime::preprocess::load_image_bytes(&bytes, &name, &e.limits)?;
            blip2_runtime::preprocess::preprocess(&img, &e.manifest.image)
        })
        .map_err(|err| ApiError::bad_param(err.to_string(), "image_url"))?;
        let text = match prompt {
            PromptSource::Verbatim(p) => p,
            PromptSource::Chat(c) => openai::chat_prompt(&c, &e.prompter, cfg.max_new_tokens)?,
        };
        let text_ids = e
            .prompter
            .check_fits(&text)
            .map_err(|err| ApiError::bad_param(err.to_string(), "prompt"))?;
        e.prompter
            .check_room(e.prompter.num_query_tokens + text_ids.len(), cfg.max_new_tokens)
            .map_err(ApiError::from)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let sink = Box::new(EventSender(tx));
        let job = Job { pixels, text_ids, cfg, stop, first_stream: 0, sink };
        Ok(Prepared { job, events: rx })
    };
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("preparing the request failed: {e}")))?
}

enum PromptSource {
    Verbatim(String),
    Chat(openai::Conversation),
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

async fn chat_completions(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    engine(&app, "/v1/chat/completions")?;
    let req: openai::ChatRequest = parse_body(&app, body)?;
    check_model(&app, req.sampling.model.as_deref())?;
    let conv = openai::conversation(&req.messages)?;
    let cfg = settings(&app, &req.sampling)?;
    let stop = openai::stop_strings(&req.sampling)?;
    let url = conv.image_url.clone();
    let prepared = prepare(&app, url, PromptSource::Chat(conv), cfg, stop).await?;
    respond(app, prepared, &req.sampling, Kind::Chat).await
}

async fn completions(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    engine(&app, "/v1/completions")?;
    let req: openai::CompletionRequest = parse_body(&app, body)?;
    check_model(&app, req.sampling.model.as_deref())?;
    let prompt = req.prompt.single()?;
    let Some(image) = req.image else {
        return Err(ApiError::bad_param(
            "a BLIP-2 completion needs an image: add \"image\": {\"url\": \"data:image/...;base64,...\"} (blip2-ort's extension)",
            "image",
        ));
    };
    let cfg = settings(&app, &req.sampling)?;
    let stop = openai::stop_strings(&req.sampling)?;
    let prepared = prepare(&app, image.url, PromptSource::Verbatim(prompt), cfg, stop).await?;
    respond(app, prepared, &req.sampling, Kind::Completion).await
}

/// Submits the job and answers: one JSON object, or server-sent events.
async fn respond(
    app: Arc<App>,
    p: Prepared,
    s: &openai::Sampling,
    kind: Kind,
) -> Result<Response, ApiError> {
    let n = p.job.cfg.num_return_sequences;
    engine(&app, "")?.submit(p.job).map_err(|e| match e {
        SubmitError::Full(_) | SubmitError::Closed | SubmitError::Stopped => {
            ApiError::unavailable(e.to_string())
        }
    })?;
    let id = format!(
        "{}-{:x}{:04x}",
        if kind == Kind::Chat { "chatcmpl" } else { "cmpl" },
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64),
        app.ids.fetch_add(1, Ordering::Relaxed) & 0xffff
    );
    let head = Head { id, created: unix_now(), model: app.opts.served_model_name.clone(), kind };
    if s.stream {
        let usage = s.stream_options.as_ref().is_some_and(|o| o.include_usage);
        return Ok(stream(head, p.events, n, usage));
    }
    let mut events = p.events;
    let mut ends: Vec<Option<(String, &'static str, usize)>> = vec![None; n];
    loop {
        match events.recv().await {
            Some(Event::Delta { .. }) => {}
            Some(Event::End { index, text, finish, completion_tokens, .. }) => {
                if let Some(slot) = ends.get_mut(index) {
                    *slot = Some((text, finish.as_str(), completion_tokens));
                }
            }
            Some(Event::Done { prompt_tokens }) => {
                let completion: usize = ends.iter().flatten().map(|e| e.2).sum();
                let choices: Vec<Value> = ends
                    .into_iter()
                    .enumerate()
                    .map(|(i, e)| {
                        let (text, finish, _) = e.unwrap_or_default();
                        match kind {
                            Kind::Chat => json!({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish}),
                            Kind::Completion => json!({"index": i, "text": text, "logprobs": null, "finish_reason": finish}),
                        }
                    })
                    .collect();
                return Ok(Json(json!({
                    "id": head.id,
                    "object": if kind == Kind::Chat { "chat.completion" } else { "text_completion" },
                    "created": head.created,
                    "model": head.model,
                    "choices": choices,
                    "usage": usage_json(prompt_tokens, completion),
                }))
                .into_response());
            }
            Some(Event::Failed(e)) => return Err(ApiError::from(&*e).during("generation")),
            None => return Err(ApiError::internal("generation ended without a result")),
        }
    }
}

fn usage_json(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

struct Head {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

impl Head {
    fn chunk(&self, choices: Value, usage: Option<Value>) -> SseEvent {
        let mut c = json!({
            "id": self.id,
            "object": if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(u) = usage {
            c["usage"] = u;
        }
        SseEvent::default().data(c.to_string())
    }

    fn delta(&self, index: usize, text: &str, role: bool, finish: Option<&str>) -> SseEvent {
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = json!({});
                if role {
                    delta["role"] = json!("assistant");
                    delta["content"] = json!("");
                } else if finish.is_none() {
                    delta["content"] = json!(text);
                }
                json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": index, "text": text, "logprobs": null, "finish_reason": finish})
            }
        };
        self.chunk(json!([choice]), None)
    }
}

/// Server-sent events in OpenAI's chunk format: a role chunk per sequence (chat), the
/// content deltas, a final chunk per sequence with its `finish_reason`, the usage chunk
/// when asked for, then `data: [DONE]`. A failure after the stream started is sent as an
/// error object before `[DONE]`. A client that disconnects is noticed when the HTTP
/// connection drops the body, whether or not there was text to send: the request's
/// events are dropped and the engine stops generating for it.
fn stream(
    head: Head,
    mut events: mpsc::UnboundedReceiver<Event>,
    n: usize,
    usage: bool,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let send = |e: SseEvent| {
            let tx = tx.clone();
            async move { tx.send(Ok(e)).await.is_ok() }
        };
        if head.kind == Kind::Chat {
            for i in 0..n {
                if !send(head.delta(i, "", true, None)).await {
                    return;
                }
            }
        }
        let mut completion = 0;
        loop {
            // Waits for the engine's next event or for the client to go away, whichever
            // comes first: a sequence whose tokens decode to no text sends nothing, so a
            // failed send alone would not notice a client that left.
            let event = tokio::select! {
                event = events.recv() => event,
                () = tx.closed() => return,
            };
            let ok = match event {
                Some(Event::Delta { index, text }) => {
                    send(head.delta(index, &text, false, None)).await
                }
                Some(Event::End { index, finish, completion_tokens, .. }) => {
                    completion += completion_tokens;
                    send(head.delta(index, "", false, Some(finish.as_str()))).await
                }
                Some(Event::Done { prompt_tokens }) => {
                    if usage {
                        send(head.chunk(json!([]), Some(usage_json(prompt_tokens, completion))))
                            .await;
                    }
                    break;
                }
                Some(Event::Failed(e)) => {
                    send(
                        SseEvent::default()
                            .data(ApiError::from(&*e).during("generation").body().to_string()),
                    )
                    .await;
                    break;
                }
                None => {
                    send(SseEvent::default().data(
                        ApiError::internal("generation ended without a result").body().to_string(),
                    ))
                    .await;
                    break;
                }
            };
            // The client went away: dropping `events` (here or above, on `tx.closed()`)
            // tells the engine to stop the request's rows at their next token.
            if !ok {
                return;
            }
        }
        send(SseEvent::default().data("[DONE]")).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx)).into_response()
}

/// Default `--max-body-mb`.
pub const DEFAULT_MAX_BODY_MB: usize = 20;

/// Default `--max-wait-ms`.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_millis(5);
