//! TLS on the control plane (issue 6): a head serving `--tls-cert/--tls-key`
//! is reached by the CLI, a second head (`--join`), a node, its own agent
//! and proxy, and the Python SDK, all verifying it against `--tls-ca`; a
//! plaintext client, a TLS client of a plaintext head and a certificate for
//! another name fail with errors that say TLS; a missing file is an error
//! naming its flag.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use serval_tests::*;

use crate::pki::make_pki;

fn serve(args: &[&str]) -> Output {
    Command::new(serve_bin())
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        .env_remove("SERVAL_TLS_CA")
        .env_remove("SERVAL_TLS_DOMAIN")
        .output()
        .unwrap()
}

fn status_json(addr: &str, token: &str, ca: &Path) -> Option<serde_json::Value> {
    let out = serve(&[
        "--address",
        addr,
        "--token",
        token,
        "--tls-ca",
        ca.to_str().unwrap(),
        "status",
        "--json",
    ]);
    if !out.status.success() {
        eprintln!("status failed: {}", stderr(&out));
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

#[test]
fn control_plane_over_tls() {
    let tmp = tempfile::Builder::new()
        .prefix("sv-tls-")
        .tempdir_in("/tmp")
        .unwrap();
    let pki = make_pki(tmp.path());
    let (ca, cert, key) = (
        pki.ca.to_str().unwrap(),
        pki.cert.to_str().unwrap(),
        pki.key.to_str().unwrap(),
    );
    let tls_head = [
        "--head",
        "--num-cpus",
        "1",
        "--tls-cert",
        cert,
        "--tls-key",
        key,
        "--tls-ca",
        ca,
    ];

    // A missing file is an error at start naming the flag and the path.
    let out = serve(&[
        "--data-dir",
        tmp.path().join("bad").to_str().unwrap(),
        "start",
        "--head",
        "--tls-cert",
        "/nonexistent/head.pem",
        "--tls-key",
        key,
        "--tls-ca",
        ca,
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--tls-cert /nonexistent/head.pem"),
        "{}",
        stderr(&out)
    );

    // The first head: its own node agent (registered before it prints its
    // addresses) and proxy connect over TLS.
    let mut h1 = ServeProcess::start(&tmp.path().join("h1"), free_port(), free_port(), &tls_head);
    h1.wait_log("http proxy listening");
    let (addr, token) = (h1.control_address(), h1.token());
    wait_for(
        "the head's proxy to follow the snapshot over TLS",
        Duration::from_secs(30),
        || matches!(http_get(h1.http_port, "/-/healthz"), Ok((200, _))).then_some(()),
    );

    // The CLI with the CA, for the address's IP and for a name (--tls-domain).
    let out = serve(&[
        "--address",
        &addr,
        "--token",
        &token,
        "--tls-ca",
        ca,
        "status",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("HEADS"));
    let out = serve(&[
        "--address",
        &addr,
        "--token",
        &token,
        "--tls-ca",
        ca,
        "--tls-domain",
        "localhost",
        "status",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Without the CA: a plaintext client of a TLS head is told so.
    let out = serve(&["--address", &addr, "--token", &token, "status"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("TLS") && err.contains("--tls-ca"), "{err}");

    // A certificate issued to another name is refused, and the error says
    // what was checked.
    let out = serve(&[
        "--address",
        &addr,
        "--token",
        &token,
        "--tls-ca",
        ca,
        "--tls-domain",
        "other.example",
        "status",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("certificate") && err.contains("other.example") && err.contains("TLS"),
        "{err}"
    );

    // A second head joins over TLS (joins, raft messages, forwarded writes).
    let mut h2 = ServeProcess::start(
        &tmp.path().join("h2"),
        free_port(),
        free_port(),
        &[&tls_head[..], &["--join", &addr, "--token", &token]].concat(),
    );
    h2.wait_log("http proxy listening");

    // A node joins over TLS, through the second head.
    let h2_addr = h2.control_address();
    let mut node = ServeProcess::start(
        &tmp.path().join("node"),
        free_port(),
        free_port(),
        &[
            "--address",
            &h2_addr,
            "--token",
            &token,
            "--tls-ca",
            ca,
            "--num-cpus",
            "1",
        ],
    );
    node.wait_log("joined the head");
    wait_for(
        "two heads and three nodes, seen from either head",
        Duration::from_secs(60),
        || {
            [&addr, &h2_addr]
                .iter()
                .all(|a| {
                    status_json(a, &token, &pki.ca).is_some_and(|s| {
                        s["heads"].as_array().map_or(0, |h| h.len()) == 2
                            && s["nodes"].as_array().map_or(0, |n| n.len()) == 3
                    })
                })
                .then_some(())
        },
    );

    // The Python SDK honours SERVAL_TLS_CA, and without it says TLS.
    let script = format!(
        "from serval import serve\n\
         import json\n\
         c = serve.connect(address={addr:?}, token={token:?})\n\
         print(len(json.loads(c.snapshot_json())['heads']))\n"
    );
    let out = run_python(&script, &[("SERVAL_TLS_CA", ca.to_string())]);
    assert_eq!(out.trim(), "2", "{out}");
    let script = format!(
        "from serval import serve\n\
         try:\n    serve.connect(address={addr:?}, token={token:?}).snapshot_json()\n    print('connected')\n\
         except Exception as e:\n    print(e)\n"
    );
    let out = run_python(&script, &[]);
    assert!(
        out.contains("TLS") && out.contains("SERVAL_TLS_CA"),
        "{out}"
    );

    // A TLS client of a plaintext head is told that the head does not
    // serve TLS.
    let mut plain = ServeProcess::start(
        &tmp.path().join("plain"),
        free_port(),
        free_port(),
        &["--head", "--num-cpus", "1"],
    );
    plain.wait_log("http proxy listening");
    let out = serve(&[
        "--address",
        &plain.control_address(),
        "--token",
        &plain.token(),
        "--tls-ca",
        ca,
        "status",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("does not seem to serve TLS"), "{err}");
}

/// Deploys a backend that echoes a query value, then calls it through a
/// handle in this (driver) process; prints the replica record and reads the
/// replica's log over TCP, with and without TLS.
const DEPLOY_AND_CALL: &str = r#"
import json, os
from serval import serve
client = serve.connect(os.environ["ADDR"], token=os.environ["TOKEN"])

def echo(request):
    return {"q": request.query_params.get("q")}

serve.create_backend("echo", echo)
serve.create_endpoint("echo", backend="echo", route="/echo")
print("handle:", serve.get_handle("echo").remote(q="by-handle").result())
replica = [r for r in serve.status()["replicas"] if r["backend"] == "echo"][0]
print("record:", json.dumps({"tls": replica.get("tls", False), "tcp_addr": replica["tcp_addr"]}))
data, size = client.replica_logs(replica["id"], "", replica["tcp_addr"], 0, 64, tls=True)
print("log over tls:", size > 0)
try:
    client.replica_logs(replica["id"], "", replica["tcp_addr"], 0, 64)
    print("log in plaintext: read")
except serve.ServeError as e:
    print("log in plaintext: refused", e)
"#;

/// Issue 19: a head started with `--tls-cert/--tls-key/--tls-ca` hands its
/// certificate to its replicas, which serve TLS on TCP; the replica record
/// says so; its proxy, a handle in a driver (both made to use TCP although
/// the Unix socket is on this machine) and a log read reach the replica
/// over TLS and get the right answers; a plaintext read of the TLS port
/// fails.
#[test]
fn data_plane_over_tls() {
    let tmp = tempfile::Builder::new()
        .prefix("sv-dtls-")
        .tempdir_in("/tmp")
        .unwrap();
    let pki = make_pki(tmp.path());
    let (ca, cert, key) = (
        pki.ca.to_str().unwrap(),
        pki.cert.to_str().unwrap(),
        pki.key.to_str().unwrap(),
    );
    // A node with a certificate but no CA is refused at start.
    let out = serve(&[
        "--data-dir",
        tmp.path().join("no-ca").to_str().unwrap(),
        "start",
        "--address",
        "127.0.0.1:1",
        "--token",
        "a-token-that-is-long-enough-0123456789",
        "--tls-cert",
        cert,
        "--tls-key",
        key,
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--tls-cert needs --tls-ca"),
        "{}",
        stderr(&out)
    );

    let tcp_only = [("SERVAL_DATA_PLANE_TCP", "1")];
    let mut head = ServeProcess::start_with_env(
        &tmp.path().join("h"),
        free_port(),
        free_port(),
        &[
            "--head",
            "--num-cpus",
            "1",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
            "--tls-ca",
            ca,
        ],
        &tcp_only,
    );
    head.wait_log("http proxy listening");
    let out = run_python(
        DEPLOY_AND_CALL,
        &[
            ("ADDR", head.control_address()),
            ("TOKEN", head.token()),
            ("SERVAL_TLS_CA", ca.to_string()),
            ("SERVAL_DATA_PLANE_TCP", "1".to_string()),
        ],
    );
    assert!(out.contains("handle: {'q': 'by-handle'}"), "{out}");
    assert!(out.contains(r#"record: {"tls": true"#), "{out}");
    assert!(out.contains("log over tls: True"), "{out}");
    assert!(out.contains("log in plaintext: refused"), "{out}");
    // Through the head's proxy, over TCP and TLS.
    let (status, body) = http_get(head.http_port, "/echo?q=over-tls").unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        serde_json::json!({"q": "over-tls"})
    );
}
