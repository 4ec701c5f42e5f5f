//! The playground page at `GET /`: one HTML page with its script and style sheet, all
//! compiled into the binary (no CDN, nothing fetched from elsewhere), that drives this
//! server's own API. `--no-ui` leaves these routes out (404).
//!
//! `GET /ui/config` tells the page what it talks to (a captioning or a retrieval export,
//! whether `/v1/search` has an index, whether `/v1/*` needs a key) without needing the
//! key itself; the page then sends the key the user gives as `Authorization: Bearer`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::App;

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const APP_CSS: &str = include_str!("ui/app.css");

/// Everything the page loads comes from this server; scripts only from files (no inline
/// script), so an answer shown in the page can never run as code.
const CSP: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; \
                   connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'";

/// The page's paths, for the request counter's endpoint label.
pub(crate) const PATHS: [&str; 4] = ["/", "/ui/app.js", "/ui/app.css", "/ui/config"];

pub(crate) fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/", get(|| async { asset(INDEX_HTML, "text/html; charset=utf-8") }))
        .route("/ui/app.js", get(|| async { asset(APP_JS, "text/javascript; charset=utf-8") }))
        .route("/ui/app.css", get(|| async { asset(APP_CSS, "text/css; charset=utf-8") }))
        .route("/ui/config", get(config))
}

fn asset(body: &'static str, kind: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // The assets change with the binary, which a reload of the page should pick up.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// What the page needs to know before it can call the API.
async fn config(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    let kind = if app.engine.is_some() { "captioning" } else { "retrieval" };
    Json(json!({
        "kind": kind,
        "search": app.search.is_some(),
        "api_key_required": app.opts.api_key.is_some(),
    }))
}
