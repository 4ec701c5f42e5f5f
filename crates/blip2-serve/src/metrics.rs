//! `GET /metrics`: Prometheus text format. Requests by endpoint and status, request
//! latency and time to first token, cohort batch sizes, how the engine thread's time
//! splits between taking requests in and decode steps, tokens generated, the retrieval
//! worker's batch sizes, requests waiting and in flight.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: String,
    pub status: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    /// Seconds from admission to the last token of a generation request.
    pub request_latency: Histogram,
    /// Seconds from admission to the first generated token.
    pub ttft: Histogram,
    /// Rows in each batch the engine started.
    pub batch_rows: Histogram,
    /// Times newcomers' rows joined a running batch.
    pub joins: Counter,
    pub tokens: Counter,
    /// Rows of the requests taken in together, each time.
    pub admission_rows: Histogram,
    /// Seconds the engine thread spent taking requests in, each time.
    pub admission_seconds: Histogram,
    /// Seconds of each decode step of a running batch (picks included).
    pub step_seconds: Histogram,
    /// Images, texts or pairs in each call the retrieval worker made.
    pub retrieval_batch_items: Histogram,
    /// Admitted requests not yet in a running batch.
    pub queue_depth: Gauge,
    /// Admitted requests, waiting or generating.
    pub in_flight: Gauge,
}

/// Buckets of the histograms that count rows or items of a batch.
const ROW_BUCKETS: [f64; 7] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("blip2");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by endpoint and status code",
            requests.clone(),
        );
        let request_latency = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        registry.register(
            "request_latency_seconds",
            "Seconds from a generation request's admission to its last token",
            request_latency.clone(),
        );
        let ttft = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "time_to_first_token_seconds",
            "Seconds from a generation request's admission to its first token",
            ttft.clone(),
        );
        let batch_rows = Histogram::new(ROW_BUCKETS);
        registry.register(
            "batch_rows",
            "Rows (sequences) in each batch the engine started",
            batch_rows.clone(),
        );
        let joins = Counter::default();
        registry.register(
            "batch_joins",
            "Times newly admitted requests' rows joined a batch already generating",
            joins.clone(),
        );
        let admission_rows = Histogram::new(ROW_BUCKETS);
        registry.register(
            "admission_rows",
            "Rows of the requests the engine took in together (one encoder batch and one prefill)",
            admission_rows.clone(),
        );
        let admission_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "admission_seconds",
            "Seconds the engine thread spent taking requests in (images, prefill, joining), while running batches waited",
            admission_seconds.clone(),
        );
        let step_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "decode_step_seconds",
            "Seconds of each decode step of a running batch, its picks included",
            step_seconds.clone(),
        );
        let retrieval_batch_items = Histogram::new(ROW_BUCKETS);
        registry.register(
            "retrieval_batch_items",
            "Images, texts or (image, text) pairs in each call of a retrieval export's graphs",
            retrieval_batch_items.clone(),
        );
        let tokens = Counter::default();
        registry.register("generated_tokens", "Tokens generated", tokens.clone());
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Admitted requests waiting for a batch",
            queue_depth.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Admitted requests, waiting or generating",
            in_flight.clone(),
        );
        Self {
            registry,
            requests,
            request_latency,
            ttft,
            batch_rows,
            joins,
            tokens,
            admission_rows,
            admission_seconds,
            step_seconds,
            retrieval_batch_items,
            queue_depth,
            in_flight,
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
