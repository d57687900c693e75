//! Router tests against real replica frame servers (serval-node's `serve`),
//! each on its own runtime thread so a test can kill one like a crashed
//! process: dropping the runtime closes every socket it owned.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use serval_node::replica_server::{EchoHandler, Handler, Reply};
use serval_node::test_util::{HoldHandler, ThreadedReplica};
use serval_protos::control::{
    Backend as PbBackend, BackendConfig, ClusterSnapshot, Endpoint, Replica as PbReplica,
};
use serval_protos::frame::{HttpRequest, Payload, Request, Response};

use super::*;

/// The defaults, with the key of the test replicas' cluster.
fn test_config() -> RouterConfig {
    RouterConfig {
        data_key: Some(serval_protos::handshake::Key::data_plane(
            serval_node::test_util::TEST_TOKEN,
        )),
        ..RouterConfig::default()
    }
}

/// A native replica on its own runtime thread (`kill` = a crashed process).
type TestReplica = ThreadedReplica;

/// Answers every request `hold` kept with "released"; returns how many.
fn release(hold: &HoldHandler) -> usize {
    hold.release_all_with(&Response {
        status: 200,
        headers: vec![],
        body: b"released".to_vec(),
    })
}

/// Answers with its tag and counts requests.
struct TagHandler {
    tag: &'static str,
    seen: AtomicUsize,
}

impl TagHandler {
    fn new(tag: &'static str) -> Arc<Self> {
        Arc::new(Self {
            tag,
            seen: AtomicUsize::new(0),
        })
    }
}

impl Handler for TagHandler {
    fn handle(&self, _request: Request, reply: Reply) {
        self.seen.fetch_add(1, Ordering::SeqCst);
        reply.send(&Response {
            status: 200,
            headers: vec![],
            body: self.tag.as_bytes().to_vec(),
        });
    }
}

fn backend(name: &str, max_concurrent_queries: u32) -> PbBackend {
    PbBackend {
        name: name.into(),
        config: Some(BackendConfig {
            max_concurrent_queries,
            ..Default::default()
        }),
        state: "running".into(),
        ..Default::default()
    }
}

fn endpoint(name: &str, traffic: &[(&str, f64)], shadow: &[(&str, f64)]) -> Endpoint {
    let map = |v: &[(&str, f64)]| {
        v.iter()
            .map(|(k, w)| (k.to_string(), *w))
            .collect::<HashMap<_, _>>()
    };
    Endpoint {
        name: name.into(),
        route: format!("/{name}"),
        methods: vec!["GET".into()],
        traffic: map(traffic),
        shadow: map(shadow),
        ..Default::default()
    }
}

fn snapshot(
    backends: Vec<PbBackend>,
    endpoints: Vec<Endpoint>,
    replicas: Vec<PbReplica>,
) -> ClusterSnapshot {
    ClusterSnapshot {
        version: 1,
        backends,
        endpoints,
        replicas,
        ..Default::default()
    }
}

fn http_request(path: &str) -> Request {
    method_request("GET", path)
}

fn method_request(method: &str, path: &str) -> Request {
    Request {
        method_name: None,
        payload: Payload::Http(HttpRequest {
            method: method.into(),
            path: path.into(),
            ..Default::default()
        }),
    }
}

/// Polls `cond` until it holds or `what` times out (a deadline, not a sleep
/// standing in for synchronisation).
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn body(r: &Response) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

#[tokio::test]
async fn echo_round_trip_and_unknown_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let rep = TestReplica::start(dir.path(), "r1", Arc::new(EchoHandler));
    let router = Router::new(test_config());
    router.update(&snapshot(
        vec![backend("b", 0)],
        vec![endpoint("ep", &[("b", 1.0)], &[])],
        vec![rep.record("b")],
    ));
    assert!(router.has_endpoint("ep"));
    assert!(!router.has_endpoint("nope"));

    for i in 0..20 {
        let r = router
            .call("ep", http_request(&format!("/ep/{i}")))
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert!(body(&r).contains(&format!("/ep/{i}")), "{}", body(&r));
    }
    assert_eq!(router.in_flight("b"), 0);
    assert_eq!(
        router.call("nope", http_request("/")).await.unwrap_err(),
        RouterError::UnknownEndpoint("nope".into())
    );
}

#[tokio::test]
async fn tcp_is_used_when_the_socket_is_not_on_this_machine() {
    let dir = tempfile::tempdir().unwrap();
    let rep = TestReplica::start(dir.path(), "r1", Arc::new(EchoHandler));
    let mut pb = rep.record("b");
    pb.unix_path = dir
        .path()
        .join("elsewhere.sock")
        .to_string_lossy()
        .into_owned();
    let router = Router::new(test_config());
    router.update(&snapshot(
        vec![backend("b", 0)],
        vec![endpoint("ep", &[("b", 1.0)], &[])],
        vec![pb],
    ));
    assert_eq!(
        router.call("ep", http_request("/x")).await.unwrap().status,
        200
    );
}

#[tokio::test]
async fn full_replicas_queue_then_backpressure_and_counts_return_to_zero() {
    let dir = tempfile::tempdir().unwrap();
    let hold = Arc::new(HoldHandler::default());
    let rep = TestReplica::start(dir.path(), "r1", hold.clone());
    let config = RouterConfig {
        queue_capacity: 1,
        ..test_config()
    };
    let router = Router::new(config);
    router.update(&snapshot(
        vec![backend("b", 2)],
        vec![endpoint("ep", &[("b", 1.0)], &[])],
        vec![rep.record("b")],
    ));

    let mut calls = Vec::new();
    for _ in 0..2 {
        let r = router.clone();
        calls.push(tokio::spawn(async move {
            r.call("ep", http_request("/ep")).await
        }));
    }
    eventually("two requests held", || hold.held() == 2).await;
    assert_eq!(router.in_flight("b"), 2);

    let r = router.clone();
    calls.push(tokio::spawn(async move {
        r.call("ep", http_request("/ep")).await
    }));
    eventually("one request queued", || router.queued("b") == 1).await;

    // Replicas full and queue full: rejected at once, with a typed error.
    let err = router.call("ep", http_request("/ep")).await.unwrap_err();
    assert!(
        matches!(err, RouterError::Backpressure { ref backend, queued: 1 } if backend == "b"),
        "{err:?}"
    );
    // Never above the limit.
    assert_eq!(hold.held(), 2);

    assert_eq!(release(&hold), 2);
    eventually("queued request admitted", || hold.held() == 1).await;
    assert_eq!(router.queued("b"), 0);
    release(&hold);
    for c in calls {
        assert_eq!(body(&c.await.unwrap().unwrap()), "released");
    }
    assert_eq!(router.in_flight("b"), 0);
    assert_eq!(router.queued("b"), 0);
}

#[tokio::test]
async fn a_backends_max_queued_requests_bounds_its_queue_below_the_routers() {
    let dir = tempfile::tempdir().unwrap();
    let hold = Arc::new(HoldHandler::default());
    let rep = TestReplica::start(dir.path(), "r1", hold.clone());
    // The router would queue 1000; the backend allows one waiting call.
    let router = Router::new(test_config());
    let mut b = backend("b", 1);
    b.config.as_mut().unwrap().max_queued_requests = 1;
    router.update(&snapshot(
        vec![b],
        vec![endpoint("ep", &[("b", 1.0)], &[])],
        vec![rep.record("b")],
    ));
    let mut calls = Vec::new();
    for _ in 0..2 {
        let r = router.clone();
        calls.push(tokio::spawn(async move {
            r.call("ep", http_request("/ep")).await
        }));
    }
    eventually("one held, one queued", || {
        hold.held() == 1 && router.queued("b") == 1
    })
    .await;
    let err = router.call("ep", http_request("/ep")).await.unwrap_err();
    assert!(
        matches!(err, RouterError::Backpressure { queued: 1, .. }),
        "{err:?}"
    );
    release(&hold);
    eventually("queued request admitted", || hold.held() == 1).await;
    release(&hold);
    for c in calls {
        assert_eq!(body(&c.await.unwrap().unwrap()), "released");
    }
}

#[tokio::test]
async fn dropped_callers_release_their_slot_and_queue_place() {
    let dir = tempfile::tempdir().unwrap();
    let hold = Arc::new(HoldHandler::default());
    let rep = TestReplica::start(dir.path(), "r1", hold.clone());
    let router = Router::new(test_config());
    router.update(&snapshot(
        vec![backend("b", 1)],
        vec![endpoint("ep", &[("b", 1.0)], &[])],
        vec![rep.record("b")],
    ));

    let r = router.clone();
    let running = tokio::spawn(async move { r.call("ep", http_request("/ep")).await });
    eventually("request held", || hold.held() == 1).await;
    let r = router.clone();
    let waiting = tokio::spawn(async move { r.call("ep", http_request("/ep")).await });
    eventually("request queued", || router.queued("b") == 1).await;

    // The client goes away: the futures are dropped mid-flight.
    waiting.abort();
    eventually("queue place released", || router.queued("b") == 0).await;
    running.abort();
    eventually("slot released", || router.in_flight("b") == 0).await;

    // The late reply to the cancelled request is ignored; the slot is usable.
    release(&hold);
    let r = router.clone();
    let next = tokio::spawn(async move { r.call("ep", http_request("/ep")).await });
    eventually("next request held", || hold.held() == 1).await;
    release(&hold);
    assert_eq!(body(&next.await.unwrap().unwrap()), "released");
    assert_eq!(router.in_flight("b"), 0);
}

#[tokio::test]
async fn a_slow_replica_times_out_and_frees_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let hold = Arc::new(HoldHandler::default());
    let rep = TestReplica::start(dir.path(), "r1", hold.clone());
    let config = RouterConfig {
        request_timeout: Duration::from_millis(200),
        ..test_config()
    };
    let router = Router::new(config);
    router.update(&snapshot(
        vec![backend("b", 0)],
        vec![endpoint("ep", &[("b", 1.0)], &[])],
        vec![rep.record("b")],
    ));
    let err = router.call("ep", http_request("/ep")).await.unwrap_err();
    assert!(matches!(err, RouterError::Timeout { .. }), "{err:?}");
    assert_eq!(router.in_flight("b"), 0);
}

/// A POST is not idempotent: lost with its replica, it fails (the replica
/// may have run it) instead of being sent again.
#[tokio::test]
async fn a_replica_dying_mid_request_fails_it_and_traffic_moves_on() {
    let dir = tempfile::tempdir().unwrap();
    let hold = Arc::new(HoldHandler::default());
    let mut doomed = TestReplica::start(dir.path(), "a", hold.clone());
    let survivor = TestReplica::start(dir.path(), "b", TagHandler::new("survivor"));
    let router = Router::new(test_config());
    let eps = || vec![endpoint("ep", &[("be", 1.0)], &[])];
    // Only the doomed replica first, so the held request surely lands there.
    router.update(&snapshot(
        vec![backend("be", 0)],
        eps(),
        vec![doomed.record("be")],
    ));
    let r = router.clone();
    let stuck = tokio::spawn(async move { r.call("ep", method_request("POST", "/ep")).await });
    eventually("request held on the doomed replica", || hold.held() == 1).await;
    router.update(&snapshot(
        vec![backend("be", 0)],
        eps(),
        vec![doomed.record("be"), survivor.record("be")],
    ));
    assert_eq!(
        router.in_flight("be"),
        1,
        "the connection and its count survive the update"
    );

    let killed_at = Instant::now();
    doomed.kill();
    let err = tokio::time::timeout(Duration::from_secs(5), stuck)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(err, RouterError::ReplicaDied { ref replica, .. } if replica == "a"),
        "{err:?}"
    );
    assert!(
        killed_at.elapsed() < Duration::from_secs(2),
        "failure was not prompt"
    );
    assert_eq!(router.in_flight("be"), 0);

    // The snapshot still lists the dead replica; every request must still
    // succeed on the survivor, including after the reconnect backoff ends.
    let until = Instant::now() + Duration::from_millis(400);
    let mut n = 0;
    while n < 20 || Instant::now() < until {
        let resp = router.call("ep", http_request("/ep")).await.unwrap();
        assert_eq!(body(&resp), "survivor");
        n += 1;
    }
}

/// Holds one `method` request on a replica, kills that replica while a
/// survivor is routable, and returns what the call got and
/// `serval_router_retries_total` for the backend.
fn lose_a_held_request(
    method: &str,
    retry_idempotent: bool,
) -> (Result<Response, RouterError>, Option<f64>) {
    let recorder = crate::metrics::prometheus_builder().build_recorder();
    let handle = recorder.handle();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = ::metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let hold = Arc::new(HoldHandler::default());
            let mut doomed = TestReplica::start(dir.path(), "a", hold.clone());
            let survivor_seen = TagHandler::new("survivor");
            let survivor = TestReplica::start(dir.path(), "b", survivor_seen.clone());
            let router = Router::new(test_config());
            let mut be = backend("be", 0);
            be.config.as_mut().unwrap().no_idempotent_retry = !retry_idempotent;
            let eps = || vec![endpoint("ep", &[("be", 1.0)], &[])];
            router.update(&snapshot(
                vec![be.clone()],
                eps(),
                vec![doomed.record("be")],
            ));
            let r = router.clone();
            let request = method_request(method, "/ep");
            let stuck = tokio::spawn(async move { r.call("ep", request).await });
            eventually("request held on the doomed replica", || hold.held() == 1).await;
            router.update(&snapshot(
                vec![be],
                eps(),
                vec![doomed.record("be"), survivor.record("be")],
            ));
            doomed.kill();
            let result = tokio::time::timeout(Duration::from_secs(10), stuck)
                .await
                .expect("the call ended within its bound")
                .unwrap();
            if result.is_ok() {
                assert_eq!(
                    survivor_seen.seen.load(Ordering::SeqCst),
                    1,
                    "sent again exactly once"
                );
            }
            assert_eq!(router.in_flight("be"), 0);
            result
        })
    });
    let retries = handle.render().lines().find_map(|l| {
        l.strip_prefix(r#"serval_router_retries_total{backend="be"}"#)?
            .trim()
            .parse()
            .ok()
    });
    (result, retries)
}

#[test]
fn a_get_lost_with_its_replica_is_retried_once_on_another_and_counted() {
    for method in ["GET", "HEAD"] {
        let (result, retries) = lose_a_held_request(method, true);
        let response = result.unwrap_or_else(|e| panic!("{method} failed: {e:?}"));
        assert_eq!(body(&response), "survivor");
        assert_eq!(retries, Some(1.0), "{method}");
    }
}

#[test]
fn a_backend_that_turns_retry_idempotent_off_fails_a_lost_get_and_a_post_is_never_retried() {
    for (method, retry) in [("GET", false), ("POST", true)] {
        let (result, retries) = lose_a_held_request(method, retry);
        assert!(
            matches!(result, Err(RouterError::ReplicaDied { ref replica, .. }) if replica == "a"),
            "{method}: {result:?}"
        );
        assert_eq!(retries, None, "{method}");
    }
}

#[tokio::test]
async fn weights_one_and_zero_send_everything_to_one_backend_and_shadow_gets_copies() {
    let dir = tempfile::tempdir().unwrap();
    let (one, zero, shadow) = (
        TagHandler::new("one"),
        TagHandler::new("zero"),
        TagHandler::new("shadow"),
    );
    let r1 = TestReplica::start(dir.path(), "r1", one.clone());
    let r2 = TestReplica::start(dir.path(), "r2", zero.clone());
    let r3 = TestReplica::start(dir.path(), "r3", shadow.clone());
    let router = Router::new(test_config());
    router.update(&snapshot(
        vec![backend("b1", 0), backend("b2", 0), backend("b3", 0)],
        vec![endpoint("ep", &[("b1", 1.0), ("b2", 0.0)], &[("b3", 1.0)])],
        vec![r1.record("b1"), r2.record("b2"), r3.record("b3")],
    ));
    for _ in 0..50 {
        assert_eq!(
            body(&router.call("ep", http_request("/ep")).await.unwrap()),
            "one"
        );
    }
    assert_eq!(one.seen.load(Ordering::SeqCst), 50);
    assert_eq!(zero.seen.load(Ordering::SeqCst), 0);
    eventually("shadow copies", || shadow.seen.load(Ordering::SeqCst) == 50).await;
}

#[tokio::test]
async fn waits_for_a_replica_then_gives_up_with_no_replica() {
    let dir = tempfile::tempdir().unwrap();
    let config = RouterConfig {
        no_replica_timeout: Duration::from_millis(300),
        ..test_config()
    };
    let router = Router::new(config);
    let eps = || vec![endpoint("ep", &[("b", 1.0)], &[])];
    router.update(&snapshot(vec![backend("b", 0)], eps(), vec![]));

    let started = Instant::now();
    let err = router.call("ep", http_request("/ep")).await.unwrap_err();
    assert_eq!(
        err,
        RouterError::NoReplica {
            endpoint: "ep".into()
        }
    );
    assert!(started.elapsed() >= Duration::from_millis(300));

    // A replica reported while the call waits serves it.
    let rep = TestReplica::start(dir.path(), "r1", TagHandler::new("late"));
    let config = RouterConfig {
        no_replica_timeout: Duration::from_secs(10),
        ..test_config()
    };
    let router = Router::new(config);
    router.update(&snapshot(vec![backend("b", 0)], eps(), vec![]));
    let r = router.clone();
    let waiting = tokio::spawn(async move { r.call("ep", http_request("/ep")).await });
    // The call subscribes to updates first thing; updates after that wake it.
    eventually("call waiting", || {
        router.inner.updates.receiver_count() == 1
    })
    .await;
    let mut starting = rep.record("b");
    starting.state = "starting".into();
    router.update(&snapshot(vec![backend("b", 0)], eps(), vec![starting]));
    router.update(&snapshot(
        vec![backend("b", 0)],
        eps(),
        vec![rep.record("b")],
    ));
    let resp = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(body(&resp), "late");
}

#[test]
fn draw_respects_zero_weights() {
    let t = vec![("a".to_string(), 0.0), ("b".to_string(), 1.0)];
    for i in 0..100 {
        assert_eq!(draw(&t, f64::from(i) / 100.0), Some("b"));
    }
    assert_eq!(draw(&[("a".to_string(), 0.0)], 0.5), None);
    assert_eq!(draw(&[], 0.5), None);
}

#[test]
fn draw_lays_the_weights_end_to_end_in_name_order() {
    let t = vec![
        ("a".to_string(), 0.25),
        ("b".to_string(), 0.0),
        ("c".to_string(), 0.75),
    ];
    assert_eq!(draw(&t, 0.0), Some("a"));
    assert_eq!(draw(&t, 0.2499), Some("a"));
    assert_eq!(draw(&t, 0.25), Some("c"));
    assert_eq!(draw(&t, 0.9999), Some("c"));
}

#[test]
fn a_shard_key_has_one_point_in_the_unit_interval() {
    // SHA-256("abc") begins ba7816bf8f01cfea: the point is fixed by the
    // key alone (every proxy and handle agrees), not by this process.
    let expected = (0xba78_16bf_8f01_cfea_u64 >> 11) as f64 / (1u64 << 53) as f64;
    assert_eq!(shard_point("abc"), expected);
    for key in ["", "a", "user-17", &"x".repeat(MAX_SHARD_KEY_BYTES)] {
        let p = shard_point(key);
        assert!((0.0..1.0).contains(&p), "{key:?} -> {p}");
    }
}

#[tokio::test]
async fn one_shard_key_always_reaches_one_backend_of_a_split() {
    const TAGS: [&str; 5] = ["s0", "s1", "s2", "s3", "s4"];
    let dir = tempfile::tempdir().unwrap();
    let replicas: Vec<TestReplica> = TAGS
        .iter()
        .map(|tag| TestReplica::start(dir.path(), tag, TagHandler::new(tag)))
        .collect();
    let router = Router::new(test_config());
    router.update(&snapshot(
        TAGS.iter().map(|t| backend(t, 0)).collect(),
        vec![endpoint(
            "ep",
            &TAGS.iter().map(|t| (*t, 0.2)).collect::<Vec<_>>(),
            &[],
        )],
        replicas
            .iter()
            .zip(TAGS)
            .map(|(r, t)| r.record(t))
            .collect(),
    ));
    let call = |key: String| {
        let router = router.clone();
        async move {
            let response = router
                .call_sharded("ep", Some(&key), http_request("/ep"))
                .await
                .unwrap();
            body(&response)
        }
    };
    let mut reached = std::collections::HashSet::new();
    for k in 0..40 {
        let key = format!("key-{k}");
        let first = call(key.clone()).await;
        for _ in 0..5 {
            assert_eq!(call(key.clone()).await, first, "{key} moved");
        }
        reached.insert(first);
    }
    // The keys spread over the split as the weights say (SHA-256 decides,
    // so this holds on every run): 40 keys over five equal weights.
    assert!(reached.len() >= 4, "40 keys reached only {reached:?}");
}

/// Answers by path: `/hold` waits in `held`, `/missing` 404, `/boom` 500,
/// anything else 200; every answer but the held ones carries the replica's
/// batch-size header (a batch of 3).
#[derive(Default)]
struct ByPathHandler {
    held: HoldHandler,
}

impl Handler for ByPathHandler {
    fn handle(&self, request: Request, reply: Reply) {
        let Payload::Http(http) = &request.payload else {
            panic!("an HTTP request was expected");
        };
        let status = match http.path.as_str() {
            "/hold" => return self.held.handle(request, reply),
            "/missing" => 404,
            "/boom" => 500,
            _ => 200,
        };
        reply.send(&Response {
            status,
            headers: vec![
                (crate::metrics::BATCH_SIZE_HEADER.into(), "3".into()),
                ("content-type".into(), "text/plain".into()),
            ],
            body: vec![],
        });
    }
}

#[test]
fn requests_latency_batches_queue_and_in_flight_are_recorded_per_backend() {
    let recorder = crate::metrics::prometheus_builder().build_recorder();
    let handle = recorder.handle();
    let value = |series: &str| -> Option<f64> {
        handle
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    ::metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let replica = Arc::new(ByPathHandler::default());
            let rep = TestReplica::start(dir.path(), "r1", replica.clone());
            let router = Router::new(test_config());
            router.update(&snapshot(
                vec![backend("b", 1)],
                vec![endpoint("ep", &[("b", 1.0)], &[])],
                vec![rep.record("b")],
            ));
            for path in ["/ok", "/ok", "/missing", "/boom"] {
                let r = router.call("ep", http_request(path)).await.unwrap();
                assert_eq!(r.header(crate::metrics::BATCH_SIZE_HEADER), None, "the header is stripped");
                assert_eq!(r.header("content-type"), Some("text/plain"));
            }
            let requests = |outcome: &str| {
                value(&format!(
                    r#"serval_router_requests_total{{endpoint="ep",backend="b",outcome="{outcome}"}}"#
                ))
            };
            assert_eq!(requests("2xx"), Some(2.0));
            assert_eq!(requests("4xx"), Some(1.0));
            assert_eq!(requests("5xx"), Some(1.0));
            assert_eq!(
                value(r#"serval_router_request_duration_seconds_count{backend="b"}"#),
                Some(4.0)
            );
            assert_eq!(value(r#"serval_batch_size_count{backend="b"}"#), Some(4.0));
            assert_eq!(value(r#"serval_batch_size_sum{backend="b"}"#), Some(12.0));

            // One request in flight on the replica (its limit), one queued.
            let in_flight = || value(r#"serval_replica_in_flight{backend="b",replica="r1"}"#);
            let queued = || value(r#"serval_router_queue_length{backend="b"}"#);
            let spawn_hold = || {
                let r = router.clone();
                tokio::spawn(async move { r.call("ep", http_request("/hold")).await })
            };
            let first = spawn_hold();
            eventually("one request held", || replica.held.held() == 1).await;
            assert_eq!(in_flight(), Some(1.0));
            let second = spawn_hold();
            eventually("one request queued", || queued() == Some(1.0)).await;
            release(&replica.held);
            eventually("the queued request admitted", || replica.held.held() == 1).await;
            assert_eq!(queued(), Some(0.0));
            release(&replica.held);
            for call in [first, second] {
                assert_eq!(call.await.unwrap().unwrap().status, 200);
            }
            assert_eq!(in_flight(), Some(0.0));
            assert_eq!(requests("2xx"), Some(4.0));
            assert_eq!(value(r#"serval_batch_size_count{backend="b"}"#), Some(4.0), "no header, no observation");

            // No backend: not counted (the proxy counts its 404).
            router.call("nope", http_request("/")).await.unwrap_err();
            assert!(!handle.render().contains(r#"endpoint="nope""#));
        })
    });
}

/// A replica keeping models: it "loads" the model a request names, answers
/// its tag and reports every model it holds (`/hold` requests wait in
/// `held`, answered by the test).
struct ModelHandler {
    tag: &'static str,
    models: std::sync::Mutex<Vec<String>>,
    held: HoldHandler,
}

impl ModelHandler {
    fn new(tag: &'static str) -> Arc<Self> {
        Arc::new(Self {
            tag,
            models: Default::default(),
            held: Default::default(),
        })
    }
}

impl Handler for ModelHandler {
    fn handle(&self, request: Request, reply: Reply) {
        let Payload::Http(http) = &request.payload else {
            panic!("an HTTP request was expected");
        };
        if let Some(id) = models::model_id_of(&request) {
            let mut held = self.models.lock().unwrap();
            if !held.contains(&id) {
                held.push(id);
            }
        }
        if http.path == "/hold" {
            return self.held.handle(request, reply);
        }
        let report = serde_json::to_string(&*self.models.lock().unwrap()).unwrap();
        reply.send(&Response {
            status: 200,
            headers: vec![(models::MODELS_HEADER.into(), report)],
            body: self.tag.as_bytes().to_vec(),
        });
    }
}

fn model_request(path: &str, model: &str) -> Request {
    let mut request = http_request(path);
    if let Payload::Http(http) = &mut request.payload {
        http.headers = vec![(models::MODEL_ID_HEADER.into(), model.into())];
    }
    request
}

#[tokio::test]
async fn a_model_goes_to_the_replica_holding_it_while_it_has_room() {
    let dir = tempfile::tempdir().unwrap();
    let handlers = [ModelHandler::new("x"), ModelHandler::new("y")];
    let replicas: Vec<TestReplica> = handlers
        .iter()
        .map(|h| TestReplica::start(dir.path(), h.tag, h.clone()))
        .collect();
    let router = Router::new(test_config());
    router.update(&snapshot(
        vec![backend("b", 1)],
        vec![endpoint("ep", &[("b", 1.0)], &[])],
        replicas.iter().map(|r| r.record("b")).collect(),
    ));
    let call = |request: Request| {
        let router = router.clone();
        async move { router.call("ep", request).await.unwrap() }
    };
    let first = call(model_request("/", "m")).await;
    // The report is the router's: the caller never sees it.
    assert!(first.header(models::MODELS_HEADER).is_none());
    let holder = body(&first);
    for _ in 0..20 {
        assert_eq!(body(&call(model_request("/", "m")).await), holder);
    }
    // The holder busy (its one slot taken): the other replica gets the
    // model rather than the request waiting, and reports it too.
    let holding = handlers.iter().find(|h| h.tag == holder).unwrap();
    let other = handlers.iter().find(|h| h.tag != holder).unwrap();
    let busy = tokio::spawn(call(model_request("/hold", "m")));
    eventually("the held request", || holding.held.held() == 1).await;
    assert_eq!(body(&call(model_request("/", "m")).await), other.tag);
    assert_eq!(release(&holding.held), 1);
    busy.await.unwrap();
    // A request naming no model is routed as always.
    assert_eq!(call(http_request("/")).await.status, 200);
}

/// A streaming replica: answers each HTTP request with a stream head and
/// `chunks` chunk frames at once (more than the window: a replica that
/// breaks the protocol), and counts the credits and cancels it gets.
struct StreamHandler {
    chunks: usize,
    credits: std::sync::atomic::AtomicU32,
    cancels: AtomicUsize,
    /// The open streams' replies (kept so the stream stays open).
    open: std::sync::Mutex<Vec<Reply>>,
}

impl StreamHandler {
    fn new(chunks: usize) -> Arc<Self> {
        Arc::new(Self {
            chunks,
            credits: Default::default(),
            cancels: Default::default(),
            open: Default::default(),
        })
    }
}

impl Handler for StreamHandler {
    fn handle(&self, request: Request, reply: Reply) {
        match request.payload {
            Payload::Credit(n) => {
                self.credits.fetch_add(n, Ordering::SeqCst);
            }
            Payload::Cancel => {
                self.cancels.fetch_add(1, Ordering::SeqCst);
            }
            _ => {
                let head = Response {
                    status: 200,
                    headers: vec![(serval_protos::frame::STREAM_HEADER.into(), "1".into())],
                    body: vec![],
                };
                assert!(reply.send_frame(&head));
                for i in 0..self.chunks {
                    let chunk = serval_protos::frame::StreamFrame::Chunk(vec![i as u8]);
                    assert!(reply.send_frame(&chunk));
                }
                self.open.lock().unwrap().push(reply);
            }
        }
    }
}

#[tokio::test]
async fn a_stream_holds_its_slot_grants_credit_as_it_is_read_and_cancels_when_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let window = serval_protos::frame::STREAM_WINDOW as usize;
    let handler = StreamHandler::new(window);
    let rep = TestReplica::start(dir.path(), "r1", handler.clone());
    let router = Router::new(test_config());
    router.update(&snapshot(
        vec![backend("b", 1)],
        vec![endpoint("ep", &[("b", 1.0)], &[])],
        vec![rep.record("b")],
    ));
    let reply = router
        .call_streaming("ep", None, http_request("/ep"))
        .await
        .unwrap();
    // The marker is the frame layer's, not the client's.
    assert!(reply
        .response
        .header(serval_protos::frame::STREAM_HEADER)
        .is_none());
    let mut stream = reply.stream.expect("a streamed reply");
    assert_eq!(router.in_flight("b"), 1, "an open stream holds its slot");
    for i in 0..window / 2 {
        assert_eq!(stream.next().await.unwrap().unwrap().as_ref(), &[i as u8]);
    }
    eventually("half a window of credit", || {
        handler.credits.load(Ordering::SeqCst) == (window / 2) as u32
    })
    .await;
    assert_eq!(handler.cancels.load(Ordering::SeqCst), 0);
    drop(stream);
    assert_eq!(router.in_flight("b"), 0);
    eventually("the cancel", || handler.cancels.load(Ordering::SeqCst) == 1).await;
}

#[tokio::test]
async fn a_replica_that_overruns_the_window_has_its_stream_cut() {
    let dir = tempfile::tempdir().unwrap();
    let window = serval_protos::frame::STREAM_WINDOW as usize;
    let rep = TestReplica::start(dir.path(), "r1", StreamHandler::new(window * 4));
    let router = Router::new(test_config());
    router.update(&snapshot(
        vec![backend("b", 0)],
        vec![endpoint("ep", &[("b", 1.0)], &[])],
        vec![rep.record("b")],
    ));
    let mut stream = router
        .call_streaming("ep", None, http_request("/ep"))
        .await
        .unwrap()
        .stream
        .unwrap();
    // Wait until the replica's frames were all read (the connection is
    // shared, a ping behind them answers after them).
    assert_eq!(
        router
            .call(
                "ep",
                Request {
                    method_name: None,
                    payload: Payload::Ping
                }
            )
            .await
            .unwrap()
            .status,
        200
    );
    let mut read = 0;
    let end = loop {
        match stream.next().await {
            Some(Ok(_)) => read += 1,
            other => break other,
        }
    };
    assert!(read <= window + 1, "read {read} chunks beyond the window");
    assert!(matches!(end, Some(Err(StreamError::Lost(_)))), "{end:?}");
}
