//! `/-/dashboard`: a web page over this proxy's view of the cluster (its
//! last snapshot from the Watch stream, its router's live numbers and the
//! per-second [`history`] of each endpoint), with a JSON API and one
//! server-sent event stream per open page.
//!
//! The page (`page.html`, embedded) holds no data and is served to anyone;
//! everything under `/-/dashboard/api/` needs the cluster token as
//! `Authorization: Bearer`, compared in constant time before any other
//! work, and answers 401 without it. The page takes the token from a login
//! form or the URL fragment (which browsers never send), so it is never in
//! a URL a server logs.

pub(crate) mod history;
mod state;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, StatusCode};
use serval_protos::client::Client;
use serval_protos::control::{Job, ListJobsRequest};
use serval_protos::frame::LogsRequest;
use serval_protos::handshake::{Credential, Key, Role};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::errors::{json_error, HttpResponse};
use crate::proxy::Proxy;
use history::History;

pub(crate) const PREFIX: &str = "/-/dashboard";
const PAGE: &str = include_str!("page.html");
/// Event streams open at once on one proxy (one per open page); beyond
/// it a page gets 503 and retries.
const MAX_STREAMS: usize = 16;
/// How often a stream sends the latest numbers (and the history sampler
/// takes its sample).
const TICK: Duration = Duration::from_secs(1);
/// A page that reads nothing for this long loses its stream.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// The most of a replica's log one request shows: its tail.
const LOG_TAIL_BYTES: u32 = 64 * 1024;
const LOG_TIMEOUT: Duration = Duration::from_secs(5);

/// Batch jobs live in the controller's job store, not in the snapshot:
/// they are read with `ListJobs` at most this often, and only while a
/// page asks.
const JOBS_EVERY: Duration = Duration::from_secs(5);
/// The newest jobs shown.
const MAX_JOBS: usize = 100;

/// The dashboard's state in a [`Proxy`].
pub(crate) struct Dashboard {
    /// The cluster token; empty refuses every API call.
    token: String,
    /// The agents' key (from the token), to read replica logs as their agent.
    agents: Key,
    pub(crate) history: History,
    streams: Arc<Semaphore>,
    control_addr: String,
    /// The last `ListJobs` answer (newest [`MAX_JOBS`]), read by `state`.
    jobs: std::sync::Mutex<Arc<Vec<Job>>>,
    /// When jobs were last read, and the client that reads them (made on
    /// first use); held while reading, so pages share one call.
    jobs_read: tokio::sync::Mutex<(Option<tokio::time::Instant>, Option<Client>)>,
    /// Set when the server stops: open streams end, so connections drain.
    closing: tokio::sync::watch::Sender<bool>,
}

impl Dashboard {
    pub(crate) fn new(token: &str, control_addr: &str) -> Self {
        Self {
            token: token.to_owned(),
            agents: Key::agents(token),
            history: History::default(),
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
            control_addr: control_addr.to_owned(),
            jobs: Default::default(),
            jobs_read: Default::default(),
            closing: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Ends every open event stream (the server is stopping).
    pub(crate) fn close_streams(&self) {
        self.closing.send_replace(true);
    }

    pub(crate) fn jobs(&self) -> Arc<Vec<Job>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads the jobs again when the last read is older than [`JOBS_EVERY`].
    async fn refresh_jobs(&self) {
        let mut guard = self.jobs_read.lock().await;
        let (read_at, client) = &mut *guard;
        if read_at.is_some_and(|t| t.elapsed() < JOBS_EVERY) {
            return;
        }
        *read_at = Some(tokio::time::Instant::now());
        if client.is_none() {
            match serval_protos::client::connect_lazy(&self.control_addr, &self.token) {
                Ok(c) => *client = Some(c),
                Err(e) => {
                    tracing::debug!(error = %e, "dashboard: no control client for jobs");
                    return;
                }
            }
        }
        let Some(client) = client.as_mut() else {
            return;
        };
        let listed = tokio::time::timeout(
            LOG_TIMEOUT,
            client.list_jobs(ListJobsRequest { api: String::new() }),
        )
        .await;
        match listed {
            Ok(Ok(reply)) => {
                let mut jobs = reply.into_inner().jobs;
                // Oldest first: keep the newest.
                let drop = jobs.len().saturating_sub(MAX_JOBS);
                jobs.drain(..drop);
                *self.jobs.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(jobs);
            }
            Ok(Err(status)) => {
                tracing::debug!(error = %status.message(), "dashboard: ListJobs failed")
            }
            Err(_) => tracing::debug!("dashboard: ListJobs timed out"),
        }
    }

    /// Whether `req` carries the cluster token.
    fn authorized<B>(&self, req: &hyper::Request<B>) -> bool {
        let presented = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        !self.token.is_empty()
            && serval_protos::auth::constant_time_eq(presented.as_bytes(), self.token.as_bytes())
    }
}

/// Where a process's `--metrics-port` listener finds the proxy whose
/// dashboard it serves: filled by [`crate::run`] once that proxy exists,
/// empty in a process that runs none.
#[derive(Clone, Default)]
pub struct DashboardSlot(Arc<std::sync::OnceLock<Arc<Proxy>>>);

impl DashboardSlot {
    pub(crate) fn set(&self, proxy: Arc<Proxy>) {
        let _ = self.0.set(proxy);
    }

    pub(crate) fn get(&self) -> Option<&Arc<Proxy>> {
        self.0.get()
    }
}

impl std::fmt::Debug for DashboardSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "DashboardSlot(set)"
        } else {
            "DashboardSlot(empty)"
        })
    }
}

pub(crate) fn is_dashboard(path: &str) -> bool {
    path == PREFIX || path.starts_with("/-/dashboard/")
}

/// A server-sent event stream's body: the events its task produces, and
/// its place under [`MAX_STREAMS`], counted in `serval_dashboard_streams`
/// while it lives.
pub(crate) struct EventStream {
    rx: mpsc::Receiver<Bytes>,
    _permit: OwnedSemaphorePermit,
    open: metrics::Gauge,
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.open.decrement(1.0);
    }
}

impl EventStream {
    pub(crate) fn poll_event(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Bytes>> {
        self.rx.poll_recv(cx)
    }
}

/// Answers a dashboard path: a whole response, or the head of an event
/// stream with its body.
pub(crate) async fn handle<B>(
    proxy: &Arc<Proxy>,
    req: hyper::Request<B>,
) -> (HttpResponse, Option<EventStream>) {
    let path = req.uri().path();
    if req.method() != Method::GET {
        return (
            json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "the dashboard is read-only: use GET",
            ),
            None,
        );
    }
    if path == PREFIX || path == "/-/dashboard/" {
        return (page(), None);
    }
    let Some(api) = path.strip_prefix("/-/dashboard/api/") else {
        return (
            json_error(StatusCode::NOT_FOUND, "no such dashboard page"),
            None,
        );
    };
    if !proxy.dashboard.authorized(&req) {
        let mut response = json_error(
            StatusCode::UNAUTHORIZED,
            "the dashboard's API needs the cluster token (Authorization: Bearer)",
        );
        response.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
        return (response, None);
    }
    match api {
        "state" => {
            proxy.dashboard.refresh_jobs().await;
            (json(&state::build(proxy, true)), None)
        }
        "events" => events(proxy),
        "logs" => {
            let replica = query_value(req.uri().query().unwrap_or(""), "replica");
            (logs(proxy, replica.as_deref().unwrap_or("")).await, None)
        }
        _ => (
            json_error(StatusCode::NOT_FOUND, "no such dashboard API"),
            None,
        ),
    }
}

fn page() -> HttpResponse {
    let mut response = hyper::Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Everything the page needs is inline or this origin's API.
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; frame-ancestors 'none'",
        ),
    );
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    response
}

fn json(value: &serde_json::Value) -> HttpResponse {
    let mut response = hyper::Response::new(Full::new(Bytes::from(value.to_string())));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The value of `key` in a query string, percent-decoded.
fn query_value(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| crate::percent::decode_path(v).ok().map(|v| v.into_owned()))?
    })
}

/// Opens an event stream: the whole state with the endpoints' series
/// first, then the state with each endpoint's latest sample every second
/// and whenever a new snapshot arrives.
fn events(proxy: &Arc<Proxy>) -> (HttpResponse, Option<EventStream>) {
    let Ok(permit) = proxy.dashboard.streams.clone().try_acquire_owned() else {
        let mut response = json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many dashboard pages are open on this proxy; retry later",
        );
        response
            .headers_mut()
            .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("5"));
        return (response, None);
    };
    let (tx, rx) = mpsc::channel::<Bytes>(2);
    let proxy = proxy.clone();
    tokio::spawn(async move {
        let mut changes = proxy.snapshot_changes();
        let mut closing = proxy.dashboard.closing.subscribe();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut with_series = true;
        loop {
            proxy.dashboard.refresh_jobs().await;
            let event = format!(
                "event: state\ndata: {}\n\n",
                state::build(&proxy, with_series)
            );
            with_series = false;
            match tokio::time::timeout(SEND_TIMEOUT, tx.send(Bytes::from(event))).await {
                Ok(Ok(())) => {}
                // The page went away, or reads nothing.
                _ => return,
            }
            tokio::select! {
                _ = tick.tick() => {}
                changed = changes.changed() => if changed.is_err() { return },
                _ = closing.wait_for(|c| *c) => return,
            }
        }
    });
    let mut response = hyper::Response::new(Full::new(Bytes::new()));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    let open = metrics::gauge!(crate::metrics::DASHBOARD_STREAMS);
    open.increment(1.0);
    (
        response,
        Some(EventStream {
            rx,
            _permit: permit,
            open,
        }),
    )
}

/// The tail of replica `id`'s log, read through the replica as its agent
/// (as `serve logs` reads it).
async fn logs(proxy: &Proxy, id: &str) -> HttpResponse {
    let snapshot = proxy.snapshot();
    let Some(replica) = snapshot.replicas.iter().find(|r| r.id == id) else {
        return json_error(StatusCode::NOT_FOUND, "no such replica");
    };
    let credential = Credential {
        role: Role::Agent,
        key: Key::replica_agent(&proxy.dashboard.agents, &replica.id),
    };
    let read = |offset| {
        serval_node::replica_server::fetch_logs(
            &replica.unix_path,
            &replica.tcp_addr,
            replica.tls,
            &credential,
            LogsRequest {
                offset,
                max_bytes: LOG_TAIL_BYTES,
            },
            LOG_TIMEOUT,
        )
    };
    // The first read tells the size; the tail is read from there.
    let tail = match read(0).await {
        Ok(chunk) if chunk.size <= u64::from(LOG_TAIL_BYTES) => Ok(chunk.bytes),
        Ok(chunk) => read(chunk.size - u64::from(LOG_TAIL_BYTES))
            .await
            .map(|c| c.bytes),
        Err(e) => Err(e),
    };
    match tail {
        Ok(bytes) => {
            let mut response = hyper::Response::new(Full::new(Bytes::from(bytes)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            response
        }
        Err(e) => {
            tracing::debug!(replica = %replica.id, error = %e, "dashboard: cannot read a replica log");
            json_error(
                StatusCode::BAD_GATEWAY,
                &format!("cannot read the replica's log: {e}"),
            )
        }
    }
}

/// Takes one history sample a second until aborted.
pub(crate) fn spawn_sampler(proxy: Arc<Proxy>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            proxy
                .dashboard
                .history
                .sample(now, &proxy.http_metrics.tallies());
        }
    })
}
