//! The listener: accepts TCP connections and serves the router on each over HTTP/1.1, with a
//! deadline for a request's headers, a deadline for its whole body once the headers are in, and
//! a cap on connections open at once. `axum::serve` sets none of these (hyper applies its
//! timeout only with a timer), so a client sending a header or body byte a second kept a
//! connection and its task for as long as it liked, and enough of them would have exhausted
//! file descriptors.
//!
//! Past the cap a connection is still answered, by a small fixed responder that reads only a
//! request's head (within a second) and closes: `/health` says the process lives, anything else
//! is 503 `overloaded` with `Retry-After`. Those answers have a cap of their own
//! ([`OVERFLOW_CONNECTIONS`]); past both a connection is closed at once.

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// Connections answered by the overflow responder at once, past `max_connections`.
pub const OVERFLOW_CONNECTIONS: usize = 64;
/// How long the overflow responder waits for a request's head.
const OVERFLOW_HEADER_TIMEOUT: Duration = Duration::from_secs(1);

/// What one connection may take.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// For a request's headers (and an idle kept-alive connection's life).
    pub header_timeout: Duration,
    /// For a request's whole body, from when its headers arrived.
    pub body_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

/// Serves `app` on `listener` until `shutdown` completes, then waits for the connections that
/// are open to finish their requests (idle ones close at once). Past the cap, `overflow` answers.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    overflow: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    raise_open_file_limit(limits.max_connections);
    let graceful = GracefulShutdown::new();
    let served = Arc::new(Semaphore::new(limits.max_connections));
    let overflowing = Arc::new(Semaphore::new(OVERFLOW_CONNECTIONS));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, typically: let connections close, then go on.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let (permit, router, overflow_answer) = match served.clone().try_acquire_owned() {
            Ok(permit) => (permit, &app, false),
            Err(_) => match overflowing.clone().try_acquire_owned() {
                Ok(permit) => (permit, &overflow, true),
                Err(_) => {
                    metrics::counter!("wanserve_connections_refused_total", "answer" => "closed")
                        .increment(1);
                    drop(stream);
                    continue;
                }
            },
        };
        if overflow_answer {
            metrics::counter!("wanserve_connections_refused_total", "answer" => "503").increment(1);
        }
        spawn_connection(
            &graceful,
            stream,
            peer,
            router.clone(),
            limits,
            overflow_answer,
            permit,
        );
    }
    drop(listener);
    graceful.shutdown().await;
}

/// File descriptors kept for what is not a connection: models, the store, the database, plugins.
const DESCRIPTORS_BESIDES_CONNECTIONS: u64 = 1024;

/// Raises the soft open-file limit towards what the caps need (often 1024 by default, below
/// the default cap), up to the hard limit; says so when even that is short, since accepting then
/// fails before the cap is reached (the accept loop waits and goes on).
fn raise_open_file_limit(max_connections: usize) {
    let wanted = (max_connections + OVERFLOW_CONNECTIONS) as u64 + DESCRIPTORS_BESIDES_CONNECTIONS;
    match rlimit::increase_nofile_limit(wanted) {
        Ok(limit) if limit < wanted => tracing::warn!(
            limit,
            wanted,
            "the open-file limit is below what --max-connections needs; raise the hard limit \
             (ulimit -Hn, LimitNOFILE=) or lower --max-connections"
        ),
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(error) => tracing::warn!(%error, "cannot read or raise the open-file limit"),
    }
}

/// Serves one connection on its own task, holding `permit` (its place under a cap) until it ends.
fn spawn_connection(
    graceful: &GracefulShutdown,
    stream: TcpStream,
    peer: std::net::SocketAddr,
    app: Router,
    limits: ConnectionLimits,
    overflow: bool,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let body_timeout = limits.body_timeout;
    // What `into_make_service_with_connect_info` did: the peer for the auth plugin; and the
    // body's deadline, counted from here (its headers are in).
    let service = app.map_request(move |request: axum::http::Request<Incoming>| {
        let mut request = request.map(|body| Body::new(DeadlineBody::new(body, body_timeout)));
        request.extensions_mut().insert(ConnectInfo(peer));
        request
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new());
    if overflow {
        builder
            .header_read_timeout(OVERFLOW_HEADER_TIMEOUT.min(limits.header_timeout))
            .keep_alive(false);
    } else {
        builder.header_read_timeout(limits.header_timeout);
    }
    let connection = graceful
        .watch(builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service)));
    tokio::spawn(async move {
        let _permit = permit;
        let _open = (!overflow).then(OpenConnection::new);
        if let Err(error) = connection.await {
            // Timeouts and resets: the client's doing, not worth more than debug.
            tracing::debug!(%peer, %error, "connection ended with an error");
        }
    });
}

/// Counts a served connection in `wanserve_connections_open` while it lives.
struct OpenConnection;

impl OpenConnection {
    fn new() -> Self {
        metrics::gauge!("wanserve_connections_open").increment(1.0);
        Self
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!("wanserve_connections_open").decrement(1.0);
    }
}

/// A request body that fails once its deadline passes, however its bytes trickle in (tower-http's
/// `RequestBodyTimeoutLayer` restarts its clock on every frame, so a byte a second never ends).
struct DeadlineBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
}

impl DeadlineBody {
    fn new(inner: Incoming, timeout: Duration) -> Self {
        Self {
            inner,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout,
        }
    }
}

/// The error a body past its deadline ends with; `api::body_bytes` turns it into a 408.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {} s", .0.as_secs_f64())]
pub struct BodyDeadlinePassed(pub Duration);

impl hyper::body::Body for DeadlineBody {
    type Data = axum::body::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyDeadlinePassed(self.timeout))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
