//! The generation engine behind the HTTP routes: blip2-runtime's
//! [`blip2_runtime::engine`], one thread that owns the model and batches every client's
//! requests continuously. This module connects it to the server: a request's events go
//! to its handler over a channel whose closing (the client gone) ends its sequences, and
//! the engine's reports feed the Prometheus metrics.

use std::time::Duration;

use blip2_runtime::engine::{EngineMetrics, Sink};
use tokio::sync::mpsc::UnboundedSender;

pub use blip2_runtime::engine::{
    Engine, EngineOptions, Event, Finish, ImageStage, Request, SubmitError,
};

use crate::metrics::Metrics;

/// A request's events, on their way to its HTTP handler.
pub struct EventSender(pub UnboundedSender<Event>);

impl Sink for EventSender {
    fn send(&self, event: Event) {
        let _ = self.0.send(event);
    }

    /// The handler dropped its receiver: the client has gone.
    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

impl EngineMetrics for Metrics {
    fn queued(&self) {
        self.in_flight.inc();
        self.queue_depth.inc();
    }

    fn left_queue(&self, requests: usize) {
        self.queue_depth.dec_by(requests as i64);
    }

    fn batch_rows(&self, rows: usize) {
        self.batch_rows.observe(rows as f64);
    }

    fn joined(&self, _rows: usize) {
        self.joins.inc();
    }

    fn admitted(&self, rows: usize, took: Duration) {
        self.admission_rows.observe(rows as f64);
        self.admission_seconds.observe(took.as_secs_f64());
    }

    fn stepped(&self, _rows: usize, took: Duration) {
        self.step_seconds.observe(took.as_secs_f64());
    }

    fn first_token(&self, since_queued: Duration) {
        self.ttft.observe(since_queued.as_secs_f64());
    }

    fn token(&self) {
        self.tokens.inc();
    }

    fn finished(&self, since_queued: Duration) {
        self.request_latency.observe(since_queued.as_secs_f64());
    }

    fn released(&self) {
        self.in_flight.dec();
    }
}
