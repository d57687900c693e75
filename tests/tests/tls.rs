//! TLS on the control plane (issue 6): a head serving `--tls-cert/--tls-key`
//! is reached by the CLI, a second head (`--join`), a node, its own agent
//! and proxy, and the Python SDK, all verifying it against `--tls-ca`; a
//! plaintext client, a TLS client of a plaintext head and a certificate for
//! another name fail with errors that say TLS; a missing file is an error
//! naming its flag.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use serval_tests::*;

struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// A CA and a server certificate it issued for 127.0.0.1 and localhost.
fn make_pki(dir: &Path) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "serval test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "serval head");
    let cert = params.signed_by(&key, &issuer).unwrap();

    let pki = Pki {
        ca: dir.join("ca.pem"),
        cert: dir.join("head.pem"),
        key: dir.join("head.key"),
    };
    std::fs::write(&pki.ca, ca_cert.pem()).unwrap();
    std::fs::write(&pki.cert, cert.pem()).unwrap();
    std::fs::write(&pki.key, key.serialize_pem()).unwrap();
    pki
}

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

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
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
