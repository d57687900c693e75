//! The `serve` command line end to end: a detached head prints where it
//! listens, `serve status` reads it, `serve shutdown` leaves no process, and
//! a request to an unknown path gets a JSON 404. Tokens: an empty or short
//! one is refused everywhere, `--token-file` / SERVAL_TOKEN_FILE work, and
//! the data dir and its files are their owner's only.

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
        .env_remove("SERVAL_TOKEN_FILE")
        .output()
        .expect("run serve")
}

/// The permission bits of `path`, in octal ("600").
fn mode(path: &std::path::Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode();
    format!("{:o}", mode & 0o777)
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
    // The detached head is no ProcessGuard's child: count it by hand.
    let _share = machine::share();
    let tmp = tempfile::Builder::new()
        .prefix("sv-")
        .tempdir_in("/tmp")
        .unwrap();
    // A data dir others may enter is tightened.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
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

    // A command of the Python SDK, through the binary, on this cluster.
    let get = serve(tmp.path(), &["get"]);
    assert!(get.status.success(), "{}", stderr(&get));
    assert_eq!(
        String::from_utf8_lossy(&get.stdout).trim(),
        "no APIs are deployed"
    );

    let (code, body) = http_get(http, "/nowhere").unwrap();
    assert_eq!(code, 404);
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON 404 body");
    assert!(
        v["error"].as_str().unwrap_or("").contains("/nowhere"),
        "{body}"
    );

    // The data dir and every file the head wrote are its owner's only.
    assert_eq!(mode(tmp.path()), "700", "data dir");
    for file in [
        "token",
        "cluster.json",
        "raft_id",
        "node_id",
        "raft/raft.redb",
        "logs/serve.log",
    ] {
        assert_eq!(mode(&tmp.path().join(file)), "600", "{file}");
    }
    assert_eq!(mode(&tmp.path().join("raft")), "700", "raft dir");
    let token = std::fs::read_to_string(tmp.path().join("token")).unwrap();

    // A wrong token, or none, is refused by the head.
    let elsewhere = tempfile::tempdir().unwrap();
    let address = format!("127.0.0.1:{control}");
    let wrong = serve(
        elsewhere.path(),
        &[
            "--address",
            &address,
            "--token",
            "wrong-but-long-enough",
            "status",
        ],
    );
    assert!(!wrong.status.success());
    assert!(stderr(&wrong).contains("wrong cluster token"), "{wrong:?}");
    let none = serve(elsewhere.path(), &["--address", &address, "status"]);
    assert!(!none.status.success());
    assert!(stderr(&none).contains("--token-file"), "{none:?}");

    // --token-file and SERVAL_TOKEN_FILE, from another directory.
    let token_file = elsewhere.path().join("cluster-token");
    std::fs::write(&token_file, &token).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let by_flag = serve(
        elsewhere.path(),
        &[
            "--address",
            &address,
            "--token-file",
            token_file.to_str().unwrap(),
            "status",
        ],
    );
    assert!(by_flag.status.success(), "{by_flag:?}");
    assert!(!stderr(&by_flag).contains("readable by other users"));
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let by_env = Command::new(serve_bin())
        .args(["--data-dir", elsewhere.path().to_str().unwrap()])
        .args(["--address", &address, "status"])
        .env_remove("SERVAL_TOKEN")
        .env("SERVAL_TOKEN_FILE", &token_file)
        .output()
        .unwrap();
    assert!(by_env.status.success(), "{by_env:?}");
    assert!(
        stderr(&by_env).contains("readable by other users"),
        "a token file others may read is warned about: {by_env:?}"
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

#[test]
fn empty_and_short_tokens_are_refused() {
    let tmp = tempfile::Builder::new()
        .prefix("sv-")
        .tempdir_in("/tmp")
        .unwrap();
    let ports = |_| {
        [
            "--control-port".to_string(),
            free_port().to_string(),
            "--http-port".to_string(),
            free_port().to_string(),
        ]
    };
    let short_file = tmp.path().join("short-token");
    std::fs::write(&short_file, "short\n").unwrap();
    let short_file = short_file.to_str().unwrap();
    for (args, named, why) in [
        (vec!["--token", "", "start", "--head"], "--token", "empty"),
        (
            vec!["--token", "short", "start", "--head"],
            "--token",
            "at least 16",
        ),
        (
            vec!["--token-file", short_file, "start", "--head"],
            "--token-file",
            "at least 16",
        ),
        (
            vec!["--token", "short", "start", "--address", "127.0.0.1:1"],
            "--token",
            "at least 16",
        ),
        (
            vec!["--token", "", "start", "--head", "--join", "127.0.0.1:1"],
            "--token",
            "empty",
        ),
        (vec!["--token", "", "status"], "--token", "empty"),
        (
            vec!["--token", "short", "shutdown"],
            "--token",
            "at least 16",
        ),
    ] {
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        if args.contains(&"start".to_string()) {
            // Were it to start, it would return (and be killed) at once.
            args.push("--detach".into());
            args.extend(ports(()));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = serve(tmp.path(), &args);
        if let Some(pid) = std::fs::read_to_string(tmp.path().join("cluster.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["pid"].as_u64())
        {
            let _guard = GroupGuard(pid as u32);
            panic!("serve {args:?} started a head: {out:?}");
        }
        assert!(!out.status.success(), "serve {args:?}: {out:?}");
        let err = stderr(&out);
        assert!(
            err.contains(named) && err.contains(why),
            "serve {args:?} should name {named} and say '{why}': {err}"
        );
    }
}

#[test]
fn the_binary_knows_the_python_commands() {
    let tmp = tempfile::Builder::new()
        .prefix("sv-")
        .tempdir_in("/tmp")
        .unwrap();
    let help = serve(tmp.path(), &["--help"]);
    let text = String::from_utf8_lossy(&help.stdout);
    for command in [
        "start", "status", "shutdown", "deploy", "run", "build", "get", "delete", "logs", "jobs",
    ] {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(&format!("{command} "))),
            "`serve --help` lacks {command}: {text}"
        );
    }
    // Handed to the SDK with every argument: its own help...
    let out = serve(tmp.path(), &["deploy", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("--no-wait"),
        "{out:?}"
    );
    // Ray Serve 2.x's commands too.
    let out = serve(tmp.path(), &["build", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("--output-path"),
        "{out:?}"
    );
    // ... and the global options (no cluster in this data dir).
    let out = serve(tmp.path(), &["get"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = stderr(&out);
    assert!(
        err.contains("no running Serval cluster")
            && err.contains(&tmp.path().display().to_string()),
        "{err}"
    );
    // An interpreter that cannot run them: the error says which, and how to fix it.
    for python in ["/nonexistent/python3", "/bin/false"] {
        let out = Command::new(serve_bin())
            .args(["logs", "some-api"])
            .env("SERVAL_PYTHON", python)
            .output()
            .expect("run serve");
        let err = stderr(&out);
        assert!(!out.status.success(), "{out:?}");
        assert!(
            err.contains("`serve logs` is a command of the Python SDK")
                && err.contains(python)
                && err.contains("SERVAL_PYTHON"),
            "{err}"
        );
    }
}
