//! Prometheus metrics of the service (the `prometheus` crate's registry,
//! rendered in the text exposition format at `GET /metrics`).

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub queue_depth: IntGaugeVec,
    pub batch_size: HistogramVec,
    pub queue_wait: HistogramVec,
    pub compute_seconds: HistogramVec,
    pub request_seconds: HistogramVec,
    pub requests: IntCounterVec,
    pub errors: IntCounterVec,
    pub dropped_disconnected: IntCounter,
}

const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let queue_depth = IntGaugeVec::new(
            Opts::new("clasp_queue_depth", "Items waiting in the batching queue"),
            &["kind"],
        )
        .unwrap();
        let batch_size = HistogramVec::new(
            HistogramOpts::new("clasp_batch_size", "Items per model batch")
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
            &["kind"],
        )
        .unwrap();
        let queue_wait = HistogramVec::new(
            HistogramOpts::new(
                "clasp_queue_wait_seconds",
                "Time an item waited before its batch started",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["kind"],
        )
        .unwrap();
        let compute_seconds = HistogramVec::new(
            HistogramOpts::new("clasp_batch_compute_seconds", "Model time per batch")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["kind"],
        )
        .unwrap();
        let request_seconds = HistogramVec::new(
            HistogramOpts::new("clasp_request_duration_seconds", "Request latency")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["endpoint"],
        )
        .unwrap();
        let requests = IntCounterVec::new(
            Opts::new("clasp_requests_total", "Requests by endpoint and status"),
            &["endpoint", "status"],
        )
        .unwrap();
        let errors = IntCounterVec::new(
            Opts::new("clasp_errors_total", "Errors by class"),
            &["class"],
        )
        .unwrap();
        let dropped_disconnected = IntCounter::new(
            "clasp_dropped_disconnected_total",
            "Queued items dropped before compute because the client disconnected",
        )
        .unwrap();
        for c in [
            Box::new(queue_depth.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(batch_size.clone()),
            Box::new(queue_wait.clone()),
            Box::new(compute_seconds.clone()),
            Box::new(request_seconds.clone()),
            Box::new(requests.clone()),
            Box::new(errors.clone()),
            Box::new(dropped_disconnected.clone()),
        ] {
            registry.register(c).unwrap();
        }
        Self {
            registry,
            queue_depth,
            batch_size,
            queue_wait,
            compute_seconds,
            request_seconds,
            requests,
            errors,
            dropped_disconnected,
        }
    }

    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# metrics encoding failed: {e}\n"))
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
