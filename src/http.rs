//! The sidecar's small HTTP listener: `GET /metrics` (Prometheus text format 0.0.4, from
//! [`crate::metrics::Metrics`]), `/healthz` and `/readyz` (from [`crate::health::Health`]),
//! and `POST /hint`, the leader's "look now" ([`crate::hint::Inbox`]: rate-limited, and only
//! ever a reason to read the store).

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use prometheus_client::encoding::prometheus_text;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::hint::Inbox;
use crate::metrics::Metrics;

/// How long [`serve`] waits for open connections after `shutdown` before returning anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Binds the metrics listener, so that a bad or busy address fails `run` at start.
///
/// # Errors
/// The address cannot be bound (in use, not local, not permitted); the error names it.
pub async fn bind(listen: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the metrics listener to {listen}"))
}

/// Serves `GET /metrics` (Prometheus text format 0.0.4), `/healthz` and `/readyz` (200 `ok`,
/// or 503 with the reason as the body) on `listener` until `shutdown` completes.
///
/// After `shutdown`, requests in flight get up to five seconds to finish; connections still
/// open then are dropped. A failed connection only ends that connection.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    health: Health,
    hints: Inbox,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("metrics listener address")?;
    let app = Router::new()
        .route("/metrics", get(get_metrics))
        .route("/healthz", get(get_healthz))
        .route("/readyz", get(get_readyz))
        // A body over the limit is refused before it is read, and counted as malformed.
        .route(
            "/hint",
            post(post_hint).layer(DefaultBodyLimit::max(crate::hint::MAX_BODY)),
        )
        .with_state(Endpoints {
            metrics,
            health,
            hints,
        });
    let stop = CancellationToken::new();
    let server = axum::serve(listener, app).with_graceful_shutdown(stop.clone().cancelled_owned());
    let mut server = std::pin::pin!(server.into_future());
    tracing::info!(%addr, "serving metrics and health checks");
    tokio::select! {
        r = &mut server => return r.with_context(|| format!("serving metrics on {addr}")),
        _ = shutdown => stop.cancel(),
    }
    // A scrape that holds its connection open must not hold up the daemon's exit.
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(r) => r.with_context(|| format!("serving metrics on {addr}")),
        Err(_) => {
            tracing::debug!(%addr, "metrics connections still open at shutdown; dropping them");
            Ok(())
        }
    }
}

#[derive(Clone)]
struct Endpoints {
    metrics: Metrics,
    health: Health,
    hints: Inbox,
}

async fn get_metrics(State(e): State<Endpoints>) -> Response {
    (
        [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
        e.metrics.encode(),
    )
        .into_response()
}

async fn get_healthz(State(e): State<Endpoints>) -> Response {
    check_response(e.health.live())
}

async fn get_readyz(State(e): State<Endpoints>) -> Response {
    check_response(e.health.ready())
}

async fn post_hint(
    State(e): State<Endpoints>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let answer = match body {
        Ok(body) => e.hints.receive(&body),
        // Too long (or not readable): still rate-limited, and counted.
        Err(_) => e.hints.receive(&[0u8; crate::hint::MAX_BODY + 1]),
    };
    let status = StatusCode::from_u16(answer.status()).unwrap_or(StatusCode::BAD_REQUEST);
    (status, format!("{answer:?}\n").to_lowercase()).into_response()
}

fn check_response((ok, reason): (bool, String)) -> Response {
    if ok {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::tests::sample;

    #[tokio::test]
    async fn bind_names_the_address_it_could_not_take() {
        let taken = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = bind(addr).await.unwrap_err();
        assert!(format!("{err:#}").contains(&addr.to_string()), "{err:#}");
    }

    #[tokio::test]
    async fn serves_metrics_and_health_over_http_until_shutdown() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let metrics = Metrics::new();
        let health = Health::new(
            crate::liveness::Liveness::new(Duration::from_secs(600)),
            Some(5),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let wake = std::sync::Arc::new(crate::hint::Hints::new());
        let inbox = Inbox::new("c1", wake.clone(), metrics.clone());
        let server = tokio::spawn(serve(
            listener,
            metrics.clone(),
            health.clone(),
            inbox,
            async {
                let _ = stopped.await;
            },
        ));
        let client = reqwest::Client::new();
        let get = |path: &str| client.get(format!("{base}{path}")).send();

        metrics.published(12, 100, 100, 1, 0, Duration::from_secs(1));
        let r = get("/metrics").await.unwrap();
        assert_eq!(r.status(), 200);
        let content_type = r.headers()[reqwest::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
        let body = r.text().await.unwrap();
        assert_eq!(
            sample(&body, "snaprelay_publishes_total"),
            Some(1.0),
            "{body}"
        );
        assert_eq!(sample(&body, "snaprelay_last_published_index"), Some(12.0));

        let r = get("/healthz").await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "ok\n");

        health.store_reachable(false);
        health.hook_reachable(true);
        let r = get("/readyz").await.unwrap();
        assert_eq!(r.status(), 503);
        assert!(r.headers()[reqwest::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        assert_eq!(r.text().await.unwrap(), "store unreachable\n");

        health.store_reachable(true);
        let r = get("/readyz").await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "ok\n");

        health.lag(Some(6));
        let r = get("/readyz").await.unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(
            r.text().await.unwrap(),
            "follower lag 6 exceeds max_lag 5\n"
        );

        assert_eq!(get("/nope").await.unwrap().status(), 404);
        let hint = |body: Vec<u8>| client.post(format!("{base}/hint")).body(body).send();
        let r = hint(br#"{"cluster_id":"c1"}"#.to_vec()).await.unwrap();
        assert_eq!(r.status(), 202);
        wake.notified().await;
        assert_eq!(hint(b"junk".to_vec()).await.unwrap().status(), 400);
        let r = hint(vec![b'x'; 64 << 10]).await.unwrap();
        assert_eq!(r.status(), 400, "too long");
        assert_eq!(get("/hint").await.unwrap().status(), 405);
        let body = get("/metrics").await.unwrap().text().await.unwrap();
        assert_eq!(sample(&body, "snaprelay_hints_received_total"), Some(1.0));
        assert_eq!(
            sample(&body, "snaprelay_hints_ignored_total{reason=\"malformed\"}"),
            Some(2.0)
        );
        let post = client.post(format!("{base}/metrics")).send().await.unwrap();
        assert_eq!(post.status(), 405);

        // The client keeps its connection open; shutdown must not wait out the grace period.
        stop.send(()).unwrap();
        let ended = tokio::time::timeout(SHUTDOWN_GRACE / 2, server)
            .await
            .expect("the server stops soon after shutdown");
        ended.unwrap().unwrap();
        assert!(
            get("/healthz").await.is_err(),
            "nothing listens after shutdown"
        );
    }
}
