//! The `serve` command line end to end: a detached head prints where it
//! listens, `serve status` reads it, `serve shutdown` leaves no process, and
//! a request to an unknown path gets a JSON 404.

use std::process::Command;
use std::time::Duration;

use serval_tests::*;

fn serve(data_dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(serve_bin())
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env("SERVAL_PYTHON", venv_python())
        .env_remove("SERVAL_ADDRESS")
        .env_remove("SERVAL_TOKEN")
        .output()
        .expect("run serve")
}

fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

/// Kills a detached head's process group if the test fails before shutdown.
struct GroupGuard(u32);
impl Drop for GroupGuard {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0)])
            .status();
    }
}

#[test]
fn detached_head_status_and_shutdown() {
    let tmp = tempfile::Builder::new()
        .prefix("sv-")
        .tempdir_in("/tmp")
        .unwrap();
    let (control, http) = (free_port(), free_port());
    let out = serve(
        tmp.path(),
        &[
            "start",
            "--head",
            "--detach",
            "--control-port",
            &control.to_string(),
            "--http-port",
            &http.to_string(),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("controller listening on 127.0.0.1:{control}")),
        "{text}"
    );
    assert!(
        text.contains(&format!("http proxy listening on 127.0.0.1:{http}")),
        "{text}"
    );
    let pid: u32 = text
        .lines()
        .find_map(|l| l.strip_prefix("pid: "))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in {text}"));
    let _guard = GroupGuard(pid);

    let status = serve(tmp.path(), &["status"]);
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{table}");
    for section in ["HEADS", "NODES", "ENDPOINTS", "BACKENDS", "REPLICAS"] {
        assert!(table.contains(section), "{table}");
    }
    assert!(
        table.contains("leader") && table.contains("(head)") && table.contains("alive"),
        "{table}"
    );

    let (code, body) = http_get(http, "/nowhere").unwrap();
    assert_eq!(code, 404);
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON 404 body");
    assert!(
        v["error"].as_str().unwrap_or("").contains("/nowhere"),
        "{body}"
    );

    // A wrong token is refused and changes nothing.
    let refused = Command::new(serve_bin())
        .args([
            "--data-dir",
            tmp.path().to_str().unwrap(),
            "--token",
            "wrong",
            "status",
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("token"),
        "{:?}",
        refused
    );

    let down = serve(tmp.path(), &["shutdown"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    wait_for("the head to exit", Duration::from_secs(30), || {
        (!pid_alive(pid)).then_some(())
    });
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", http)).is_err(),
        "proxy still listening"
    );
}

#[test]
fn bad_flags_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = serve(
        tmp.path(),
        &["start", "--head", "--http-location", "Somewhere"],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--http-location"),
        "{:?}",
        out
    );
    let out = serve(tmp.path(), &["start"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--head"),
        "{:?}",
        out
    );
}
