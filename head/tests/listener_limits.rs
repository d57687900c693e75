//! The head's listeners under their bounds (issue 19), through the real
//! `serve` binary: the control service refuses an oversize message with a
//! clear status, and `--metrics-port` is served by the proxy's bounded
//! server (metrics on any path; over `--http-max-connections`, 503).
// Test code: an unwrap is an assertion (clippy.toml allows it only in #[test] fns).
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the head when the test ends, however it ends.
struct Head(Child);

impl Drop for Head {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

fn start_head(dir: &Path, extra: &[&str]) -> (Head, String) {
    let control_port = free_port();
    let log = std::fs::File::create(dir.join("head.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_serve"))
        .arg("--data-dir")
        .arg(dir)
        .args(["start", "--head", "--http-location", "NoServer"])
        .args(["--control-port", &control_port.to_string()])
        .args(["--num-cpus", "1", "--num-gpus", "0"])
        .args(extra)
        .env_remove("SERVAL_ADDRESS")
        .env_remove("SERVAL_TOKEN")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let head = Head(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dir.join("cluster.json").exists() {
        assert!(
            Instant::now() < deadline,
            "head not ready: {}",
            std::fs::read_to_string(dir.join("head.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (head, format!("127.0.0.1:{control_port}"))
}

#[test]
fn an_oversize_control_message_is_refused_with_a_clear_status() {
    let dir = tempfile::tempdir().unwrap();
    let (_head, control) = start_head(dir.path(), &[]);
    let token = std::fs::read_to_string(dir.path().join("token")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        let mut client = serval_protos::client::connect(&control, token.trim())
            .await
            .unwrap();
        client
            .put_blob(serval_protos::control::PutBlobRequest {
                digest: "0".repeat(64),
                data: vec![0; 65 * 1024 * 1024],
            })
            .await
            .unwrap_err()
    });
    // Refused by the decoder, before the service (which would say the blob
    // is over 48 MiB, INVALID_ARGUMENT) ever saw it.
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("too large"), "{status:?}");
}

/// One HTTP/1.1 GET on a fresh connection: the status and body, or `None`
/// when the connection closed without an answer.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    conn.read_to_string(&mut text).ok()?;
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

#[test]
fn the_metrics_port_serves_any_path_under_the_connection_cap() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (_head, _) = start_head(
        dir.path(),
        &[
            "--metrics-port",
            &port.to_string(),
            "--http-max-connections",
            "2",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let (status, body) = loop {
        if let Some(answer) = get(port, "/any/path") {
            break answer;
        }
        assert!(Instant::now() < deadline, "metrics port never answered");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("# TYPE"), "{body}");

    // Two held open (each proven accepted by an answer), a third refused.
    let held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
            write!(conn, "GET / HTTP/1.1\r\nhost: t\r\n\r\n").unwrap();
            let mut buf = [0u8; 64];
            let n = conn.read(&mut buf).unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            conn
        })
        .collect();
    let (status, body) = get(port, "/-/metrics").expect("a refusal is an answer");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("too many open connections"), "{body}");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(port, "/-/metrics").map(|(s, _)| s) != Some(200) {
        assert!(Instant::now() < deadline, "still refused after closing");
        std::thread::sleep(Duration::from_millis(50));
    }
}
