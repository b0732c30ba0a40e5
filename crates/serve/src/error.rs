//! Error answers in OpenAI's shape, and the wrapper that runs every endpoint
//! under the request timeout and counts its status and error class once.

use std::time::Instant;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::metrics::Metrics;
use super::state::Limits;

/// An error answer: `{"error": {"message", "type", "param"}}`, OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub class: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn bad(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            class: "bad_request",
            message: message.into(),
            param: Some(param.into()),
            retry_after: None,
        }
    }
    pub(crate) fn new(status: StatusCode, class: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            class,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            json!({"error": {"message": self.message, "type": self.class, "param": self.param}});
        let mut r = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

pub(crate) type ApiResult = Result<Response, ApiError>;

/// Runs an endpoint under the request timeout, and records its latency,
/// status and error class.
pub(crate) async fn guarded<F>(
    limits: &Limits,
    metrics: &Metrics,
    endpoint: &'static str,
    fut: F,
) -> Response
where
    F: std::future::Future<Output = ApiResult>,
{
    let t = Instant::now();
    let r = match tokio::time::timeout(limits.request_timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!(
                "request took longer than {} ms",
                limits.request_timeout.as_millis()
            ),
        )),
    };
    let resp = match r {
        Ok(r) => r,
        Err(e) => {
            metrics.errors.with_label_values(&[e.class]).inc();
            e.into_response()
        }
    };
    metrics
        .request_seconds
        .with_label_values(&[endpoint])
        .observe(t.elapsed().as_secs_f64());
    metrics
        .requests
        .with_label_values(&[endpoint, resp.status().as_str()])
        .inc();
    resp
}
