//! Bounded state (issue 19): commands over the controller's caps are
//! refused where they are proposed, with INVALID_ARGUMENT naming the field
//! and the cap, and never reach the raft log (the head's last applied log
//! index does not move), so a restarted head has nothing to replay; a node
//! offering absurd resources does not start. And a head whose raft storage
//! fails (its disk is full) stops with a non-zero exit instead of serving
//! on without being able to write.

use std::process::Command;
use std::time::Duration;

use serval_protos::client::Client;
use serval_protos::control::*;
use serval_tests::*;

/// This head's last applied raft log index.
async fn applied_index(c: &mut Client) -> u64 {
    let snapshot = c
        .get_snapshot(WatchRequest::default())
        .await
        .expect("snapshot")
        .into_inner();
    snapshot
        .heads
        .iter()
        .map(|h| h.last_applied)
        .max()
        .unwrap_or(0)
}

fn assert_refused(result: Result<impl std::fmt::Debug, tonic::Status>, needles: &[&str]) {
    let status = result.expect_err("the command must be refused");
    assert_eq!(
        status.code(),
        tonic::Code::InvalidArgument,
        "{}",
        status.message()
    );
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "'{needle}' not in: {}",
            status.message()
        );
    }
}

fn backend(name: &str, num_replicas: u32) -> Backend {
    Backend {
        name: name.into(),
        code_digest: serval_tests::placeholder_code_digest(),
        config: Some(BackendConfig {
            num_replicas,
            num_cpus: 1.0,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn commands_over_the_caps_are_refused_before_the_log_and_never_replayed() {
    let tmp = tempfile::Builder::new()
        .prefix("sv-")
        .tempdir_in("/tmp")
        .unwrap();
    let mut head = start_head_without_replicas(tmp.path(), "head", None);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let before = status_of(&head);
    rt.block_on(async {
        let mut c = head.client().await;
        // Settle: the head's own start-up writes are applied.
        let start = applied_index(&mut c).await;

        assert_refused(
            c.create_backend(backend("huge", 300_000)).await,
            &["num_replicas", "300000", "cap of 1000"],
        );
        assert_refused(
            c.register_node(RegisterNodeRequest {
                node_id: "gpu-farm".into(),
                hostname: "h".into(),
                num_cpus: 4.0,
                num_gpus: 1e13,
                ..Default::default()
            })
            .await,
            &["num_gpus", "64"],
        );
        assert_refused(
            c.create_job(JobSpec {
                api: "batch".into(),
                workers: 300_000,
                max_receive_count: 1,
                ..Default::default()
            })
            .await,
            &["workers", "300000", "cap of 256"],
        );
        assert_refused(
            c.create_job(JobSpec {
                api: "batch".into(),
                workers: 1,
                max_receive_count: 1,
                retention_s: 1e12,
                ..Default::default()
            })
            .await,
            &["retention", "cap of 2592000"],
        );
        assert_refused(
            c.update_backend_config(UpdateBackendConfigRequest {
                name: "huge".into(),
                config: Some(BackendConfig {
                    num_replicas: 1,
                    max_concurrent_queries: u32::MAX,
                    ..Default::default()
                }),
            })
            .await,
            &["max_concurrent_queries"],
        );
        assert_eq!(
            applied_index(&mut c).await,
            start,
            "a refused command must not reach the raft log"
        );
        // Within the caps the same calls succeed (the code stored first).
        put_placeholder_code(&mut c).await.unwrap();
        c.create_backend(backend("small", 2)).await.unwrap();
    });
    let after = status_of(&head);
    assert_eq!(names(&after, "backends"), vec!["small".to_string()]);
    assert_eq!(names(&after, "nodes"), names(&before, "nodes"));

    // Restarted, the head replays only what was committed: the same state.
    let (dir, control, http) = (head.data_dir.clone(), head.control_port, head.http_port);
    drop(head);
    head = ServeProcess::start(&dir, control, http, &["--head", "--num-cpus", "0"]);
    head.wait_log("http proxy listening");
    let restarted = status_of(&head);
    assert_eq!(names(&restarted, "backends"), vec!["small".to_string()]);
    assert_eq!(names(&restarted, "nodes"), names(&before, "nodes"));
    assert_eq!(
        restarted["replicas"].as_array().map(Vec::len),
        Some(2),
        "the small backend's replicas, nothing more: {restarted}"
    );
}

fn status_of(head: &ServeProcess) -> serde_json::Value {
    wait_for("serve status", Duration::from_secs(30), || {
        let s = head.status_json();
        (!s.is_null()).then_some(s)
    })
}

fn names(status: &serde_json::Value, key: &str) -> Vec<String> {
    let mut names: Vec<String> = status[key]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| {
            x.get("name")
                .or_else(|| x.get("id"))
                .and_then(|n| n.as_str())
                .map(String::from)
        })
        .collect();
    names.sort();
    names
}

#[test]
fn a_node_offering_too_many_gpus_does_not_start() {
    let tmp = tempfile::Builder::new()
        .prefix("sv-")
        .tempdir_in("/tmp")
        .unwrap();
    let head = start_head_without_replicas(tmp.path(), "head", None);
    let node_dir = tmp.path().join("node");
    let mut cmd = Command::new(serve_bin());
    cmd.arg("--data-dir")
        .arg(&node_dir)
        .args([
            "--address",
            &head.control_address(),
            "--token",
            &head.token(),
            "start",
            "--num-gpus",
            "1e13",
            "--http-port",
            &free_port().to_string(),
        ])
        .env("SERVAL_PYTHON", venv_python())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut node = ProcessGuard::spawn(cmd);
    let status = wait_for("the node to exit", Duration::from_secs(60), || {
        node.child.try_wait().ok().flatten()
    });
    let mut stderr = String::new();
    if let Some(mut e) = node.child.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut stderr).unwrap();
    }
    assert!(!status.success(), "the node must not start: {stderr}");
    assert!(
        stderr.contains("--num-gpus") && stderr.contains("64"),
        "the error names the flag and the cap: {stderr}"
    );
    assert_eq!(
        names(&status_of(&head), "nodes").len(),
        1,
        "only the head's own node is registered"
    );
}

/// A tmpfs mounted at a path for the test, unmounted when dropped (also
/// when the test fails).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// `None` (with the reason) where this process may not mount.
    fn mount(path: &std::path::Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(Self(path.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a process still holding a file open does not keep it mounted.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system holding `dir` until a write fails.
fn fill(dir: &std::path::Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("filler")).unwrap();
    let block = vec![7u8; 64 * 1024];
    while f.write_all(&block).and_then(|()| f.sync_all()).is_ok() {}
}

#[test]
fn a_head_whose_raft_disk_is_full_exits_non_zero() {
    let tmp = tempfile::Builder::new()
        .prefix("sv-")
        .tempdir_in("/tmp")
        .unwrap();
    let data_dir = tmp.path().join("head");
    // Declared before the head, so the head is killed before the unmount.
    let _raft_disk = match Tmpfs::mount(&data_dir.join("raft"), "16m") {
        Ok(m) => m,
        Err(reason) => {
            println!("SKIPPED: a tmpfs cannot be mounted here (needs root): {reason}");
            return;
        }
    };
    let mut head = start_head_without_replicas(tmp.path(), "head", None);
    fill(&data_dir.join("raft"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Writes now need room the disk does not have: each is refused, none
    // hangs, and the head stops.
    let refused = rt.block_on(async {
        let mut c = head.client().await;
        let mut refused = 0;
        for i in 0..4 {
            // 2 MiB of code, stored as a blob (in two raft entries).
            let code = vec![i as u8; 2 * 1024 * 1024];
            let put = PutBlobRequest {
                digest: serval_protos::blob::digest(&code),
                data: code,
            };
            let call = tokio::time::timeout(Duration::from_secs(30), c.put_blob(put));
            match call.await {
                Ok(Ok(_)) => {}
                Ok(Err(status)) => {
                    println!("write refused: {:?} {}", status.code(), status.message());
                    refused += 1;
                    break;
                }
                Err(_) => panic!("a write to a head with a full disk hung for 30 s"),
            }
        }
        refused
    });
    assert_eq!(refused, 1, "a write on a full disk must fail");
    let status = head.wait_exit(Duration::from_secs(60));
    assert!(
        !status.success(),
        "the head must exit non-zero; its log ends:\n{}",
        head.log_tail(30)
    );
    assert!(
        head.log().contains("raft stopped on an error"),
        "the head says why it stopped; its log ends:\n{}",
        head.log_tail(30)
    );
}
