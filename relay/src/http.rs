//! The relay's HTTP listener: `/metrics` (Prometheus text), `/livez` and `/readyz`.
//!
//! - `/livez` answers 200 while every relay loop made progress within
//!   `http.stall_timeout`, 503 (naming the silent loops) otherwise: restart me.
//! - `/readyz` answers 200 when PostgreSQL answers a query and the broker connection is up,
//!   503 (naming what is down) otherwise: I cannot do my job right now.

use std::{net::SocketAddr, sync::Arc};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::relay::Relay;

#[derive(Clone)]
struct App {
    relay: Arc<Relay>,
    metrics: Option<PrometheusHandle>,
}

/// Binds `addr`; the error names the setting.
pub async fn bind(addr: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| anyhow::anyhow!("http.listen {addr:?} is not host:port ({e})"))?;
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (http.listen): {e}"))
}

/// Serves the endpoints on `listener` until `shutdown` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    relay: Arc<Relay>,
    metrics: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(App { relay, metrics });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn render_metrics(State(app): State<App>) -> impl IntoResponse {
    match &app.metrics {
        Some(handle) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            handle.render(),
        ),
        None => (
            StatusCode::NOT_FOUND,
            [("content-type", "text/plain")],
            "no metrics recorder installed\n".to_owned(),
        ),
    }
}

async fn livez(State(app): State<App>) -> impl IntoResponse {
    match app.relay.liveness() {
        Ok(()) => (StatusCode::OK, "live\n".to_owned()),
        Err(stalled) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stalled: {stalled}\n"),
        ),
    }
}

async fn readyz(State(app): State<App>) -> impl IntoResponse {
    match app.relay.readiness().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(problems) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", problems.join("; ")),
        ),
    }
}
