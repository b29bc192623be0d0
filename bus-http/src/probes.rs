use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bus_core::{Bus, BusHealth, HealthStatus};

use crate::Metrics;

#[derive(Clone)]
struct Served {
    bus: Bus,
    metrics: Option<Metrics>,
}

/// The routes `/health/live`, `/health/ready` and (with `metrics`) `/metrics` of `bus`, to
/// serve with [`serve`] or to merge into a service's own axum router.
pub fn router(bus: Bus, metrics: Option<Metrics>) -> Router {
    let routes = Router::new().route("/health/live", get(live)).route("/health/ready", get(ready));
    let routes = match metrics {
        Some(_) => routes.route("/metrics", get(render_metrics)),
        None => routes,
    };
    routes.with_state(Served { bus, metrics })
}

/// Serves `router` on `listener` until the task is dropped or the listener fails.
pub async fn serve(listener: tokio::net::TcpListener, router: Router) -> std::io::Result<()> {
    axum::serve(listener, router).await
}

/// The bus's health as JSON, with `status` when it allows.
fn health_response(health: &BusHealth, ok: bool) -> Response {
    let endpoints: Vec<serde_json::Value> = health
        .endpoints
        .iter()
        .map(|e| {
            serde_json::json!({ "endpoint": e.endpoint, "status": e.status.to_string(), "reason": e.reason, "node": e.node })
        })
        .collect();
    let body = serde_json::json!({ "status": health.status.to_string(), "endpoints": endpoints });
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// How long a probe waits for the bus's health (it waits while the bus starts or stops).
const HEALTH_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The bus's health, unless the bus is busy starting or stopping.
async fn health(bus: &Bus) -> Option<BusHealth> {
    tokio::time::timeout(HEALTH_WAIT, bus.health()).await.ok()
}

fn busy(ok: bool) -> Response {
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = serde_json::json!({ "status": "busy", "reason": "the bus is starting or stopping" });
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// Live while the bus runs: what the broker or an endpoint goes through (an outage, a
/// refused queue) is readiness's business, since restarting the process mends none of it.
async fn live(State(served): State<Served>) -> Response {
    let started = served.bus.is_started();
    match health(&served.bus).await {
        Some(health) => health_response(&health, started),
        None => busy(started),
    }
}

/// Ready only while every endpoint consumes as it should.
async fn ready(State(served): State<Served>) -> Response {
    match health(&served.bus).await {
        Some(health) => health_response(&health, health.status == HealthStatus::Healthy),
        None => busy(false),
    }
}

async fn render_metrics(State(served): State<Served>) -> Response {
    let Some(metrics) = &served.metrics else { return StatusCode::NOT_FOUND.into_response() };
    match metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(error) => {
            tracing::warn!(error = %error, "could not render the metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response()
        }
    }
}
