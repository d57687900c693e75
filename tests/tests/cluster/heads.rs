//! Three heads on raft (issue 6): heads join a running one, writes sent to
//! any head reach the leader, and when the leader is SIGKILLed under a
//! stream of writes a new leader takes over, every acknowledged write
//! survives, and routes to healthy replicas keep answering.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serval_tests::*;

struct Head {
    proc: ServeProcess,
}

fn start_head(root: &std::path::Path, name: &str, join: Option<(&str, &str)>) -> Head {
    let (control, http) = (free_port(), free_port());
    let mut args = vec!["--head", "--num-cpus", "2", "--node-timeout-s", "5"];
    let join_args;
    if let Some((addr, token)) = join {
        join_args = [addr.to_string(), token.to_string()];
        args.extend(["--join", &join_args[0], "--token", &join_args[1]]);
    }
    let mut proc = ServeProcess::start(&root.join(name), control, http, &args);
    proc.wait_log("http proxy listening");
    Head { proc }
}

fn status_json(head: &Head) -> serde_json::Value {
    head.proc.status_json()
}

#[test]
fn three_heads_survive_the_loss_of_the_leader() {
    let tmp = tempfile::Builder::new()
        .prefix("sv-")
        .tempdir_in("/tmp")
        .unwrap();
    let first = start_head(tmp.path(), "h1", None);
    let token = first.proc.token();
    let addr = first.proc.control_address();
    let mut heads = vec![first];
    for name in ["h2", "h3"] {
        heads.push(start_head(tmp.path(), name, Some((&addr, &token))));
    }
    let three_heads = wait_for("three voting heads", Duration::from_secs(60), || {
        let s = status_json(&heads[2]);
        let n = s["heads"].as_array().map(|h| h.len()).unwrap_or(0);
        (n == 3 && leader_id(&s).is_some()).then_some(s)
    });
    let roles: Vec<&str> = three_heads["heads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles.iter().filter(|r| **r == "leader").count(),
        1,
        "{roles:?}"
    );

    // Deploy through a follower: the write is forwarded to the leader.
    let leader = leader_id(&status_json(&heads[0])).unwrap();
    let ids: Vec<u64> = heads
        .iter()
        .map(|h| {
            std::fs::read_to_string(h.proc.data_dir.join("raft_id"))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .collect();
    let leader_ix = ids.iter().position(|id| *id == leader).unwrap();
    let follower_ix = (leader_ix + 1) % 3;
    let survivor_ix = (leader_ix + 2) % 3;
    // A node told only the leader's address: it learns the other heads
    // from the cluster and must survive the leader's loss.
    let mut node = ServeProcess::start(
        &tmp.path().join("node"),
        free_port(),
        free_port(),
        &[
            "--address",
            &heads[leader_ix].proc.control_address(),
            "--token",
            &token,
            "--num-cpus",
            "2",
        ],
    );
    node.wait_log("joined the head");
    let node_id = std::fs::read_to_string(node.data_dir.join("node_id")).unwrap();
    let follower_addr = heads[follower_ix].proc.control_address();
    let envs = [("ADDR", follower_addr.clone()), ("TOKEN", token.clone())];
    run_python(
        r#"
import os
from serval import serve
serve.connect(os.environ["ADDR"], token=os.environ["TOKEN"])
def hello(request):
    return "hello"
serve.create_backend("hello", hello, config={"num_replicas": 3})
serve.create_endpoint("hello", backend="hello", route="/hello")
"#,
        &envs,
    );
    let survivor_http = heads[survivor_ix].proc.http_port;
    wait_for(
        "the route on a surviving head",
        Duration::from_secs(60),
        || {
            http_get(survivor_http, "/hello")
                .ok()
                .filter(|(s, _)| *s == 200)
        },
    );

    // A writer through the follower: creates and deletes backends in a loop
    // and prints each acknowledged write.
    let mut writer_cmd = Command::new(venv_python());
    writer_cmd
        .arg("-c")
        .arg(
            r#"
import os, sys
from serval import serve
client = serve.connect(os.environ["ADDR"], token=os.environ["TOKEN"])
def f(request):
    return "x"
i = 0
while sys.stdin.readline():
    # No node has 1000 CPUs: the backend stays pending and starts nothing.
    client.create_backend(f"w{i}", b"not-started", '{"num_replicas": 1, "num_cpus": 1000}')
    print(f"created w{i}", flush=True)
    i += 1
"#,
        )
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut writer = ProcessGuard::spawn(writer_cmd);
    let mut writer_in = writer.child.stdin.take().unwrap();
    let mut writer_out = BufReader::new(writer.child.stdout.take().unwrap());
    let mut acked = Vec::new();
    let mut write_one = |acked: &mut Vec<String>| {
        writeln!(writer_in, "go").unwrap();
        let mut line = String::new();
        writer_out.read_line(&mut line).unwrap();
        assert!(line.starts_with("created "), "write failed: {line:?}");
        acked.push(line.trim().trim_start_matches("created ").to_string());
    };
    for _ in 0..5 {
        write_one(&mut acked);
    }

    // SIGKILL the leader, keep writing and keep reading the route.
    let killed_at = Instant::now();
    let leader_head = heads.remove(leader_ix);
    drop(leader_head);
    let mut failed_requests = 0;
    let mut new_leader = None;
    let mut elected_after = None;
    let survivor = heads
        .iter()
        .find(|h| h.proc.http_port == survivor_http)
        .unwrap();
    while killed_at.elapsed() < Duration::from_secs(60) {
        match http_get(survivor_http, "/hello") {
            Ok((200, _)) => {}
            _ => failed_requests += 1,
        }
        if new_leader.is_none() {
            if let Some(id) = leader_id(&status_json(survivor)).filter(|id| *id != leader) {
                new_leader = Some(id);
                elected_after = Some(killed_at.elapsed());
            }
        } else {
            break;
        }
    }
    let elected_after = elected_after.expect("no new leader within 60 s");
    for _ in 0..5 {
        write_one(&mut acked);
    }
    for _ in 0..20 {
        match http_get(survivor_http, "/hello") {
            Ok((200, _)) => {}
            _ => failed_requests += 1,
        }
    }
    eprintln!("FIGURES: new leader elected {elected_after:?} after SIGKILL; {failed_requests} failed requests");

    // The killed head's node is declared dead (5 s timeout) and its replica
    // moves; the extra node, heartbeating through the other heads, stays.
    let alive = |s: &serde_json::Value, id: &str| {
        s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["id"] == id && n["alive"] == true)
    };
    let s = wait_for(
        "the dead head's node to be declared dead",
        Duration::from_secs(60),
        || {
            let s = status_json(survivor);
            let dead = s["nodes"]
                .as_array()?
                .iter()
                .filter(|n| n["alive"] == false)
                .count();
            (dead == 1).then_some(s)
        },
    );
    assert!(
        alive(&s, node_id.trim()),
        "the node that was told only the dead leader was declared dead: {s}"
    );
    // Generous: the re-placed replicas are Python processes starting on a
    // machine that may be busy with other tests. On a timeout the panic
    // shows the replicas as the survivor last saw them (this wait has been
    // seen to fail on CI; the state says why).
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let s = status_json(survivor);
        let replicas: Vec<serde_json::Value> = s["replicas"]
            .as_array()
            .map(|r| {
                r.iter()
                    .filter(|r| r["backend"] == "hello")
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        if replicas.iter().filter(|r| r["state"] == "running").count() == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for three running replicas again; replicas: {replicas:#?}; nodes: {:#}",
            s["nodes"]
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Every acknowledged write is there, on both surviving heads.
    for head in &heads {
        let s = status_json(head);
        let names: Vec<&str> = s["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["name"].as_str().unwrap())
            .collect();
        for name in &acked {
            assert!(
                names.contains(&name.as_str()),
                "acknowledged backend {name} lost on {}: {names:?}",
                head.proc.control_address()
            );
        }
    }
    drop(writer);
    drop(node);
}

/// Writes `n` pending backends (no node has CPU for them, so no process
/// starts) through `addr`.
fn write_backends(addr: &str, token: &str, prefix: &str, n: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = serval_protos::client::connect(addr, token).await.unwrap();
        serval_tests::put_placeholder_code(&mut c).await.unwrap();
        for i in 0..n {
            c.create_backend(pending_backend(&format!("{prefix}{i}")))
                .await
                .unwrap();
        }
    });
}

fn backend_count(head: &Head) -> usize {
    status_json(head)["backends"]
        .as_array()
        .map(|b| b.len())
        .unwrap_or(0)
}

#[test]
fn a_follower_catches_up_and_all_heads_recover_from_disk() {
    let tmp = tempfile::Builder::new()
        .prefix("sv-")
        .tempdir_in("/tmp")
        .unwrap();
    // Spawns a head without waiting for it: after a full stop no head can
    // be ready before a majority runs.
    let spawn = |name: &str, join: Option<(&str, &str)>, ports: Option<(u16, u16)>| {
        let (control, http) = ports.unwrap_or_else(|| (free_port(), free_port()));
        let mut args = vec!["--head", "--num-cpus", "0"];
        let join_args;
        if let Some((addr, token)) = join {
            join_args = [addr.to_string(), token.to_string()];
            args.extend(["--join", &join_args[0], "--token", &join_args[1]]);
        }
        Head {
            proc: ServeProcess::start(&tmp.path().join(name), control, http, &args),
        }
    };
    let start = |name: &str, join: Option<(&str, &str)>, ports: Option<(u16, u16)>| {
        let mut head = spawn(name, join, ports);
        head.proc.wait_log("http proxy listening");
        head
    };
    let first = start("h1", None, None);
    let (addr, token) = (first.proc.control_address(), first.proc.token());
    let mut heads = vec![first];
    heads.push(start("h2", Some((&addr, &token)), None));
    heads.push(start("h3", Some((&addr, &token)), None));
    wait_for(
        "a leader among three heads",
        Duration::from_secs(60),
        || {
            let s = status_json(&heads[0]);
            (s["heads"].as_array().map(|h| h.len()) == Some(3) && leader_id(&s).is_some())
                .then_some(())
        },
    );

    // Kill a follower, write past the snapshot policy, bring it back.
    let leader = leader_id(&status_json(&heads[0])).unwrap();
    let ix = heads
        .iter()
        .position(|h| h.proc.raft_id() != leader)
        .unwrap();
    let follower = heads.remove(ix);
    let ports = (follower.proc.control_port, follower.proc.http_port);
    let name = follower
        .proc
        .data_dir
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    drop(follower);
    let writer = heads[0].proc.control_address();
    write_backends(&writer, &token, "b", 600);
    let mut back = start(&name, Some((&addr, &token)), Some(ports));
    wait_for(
        "the follower to catch up (log or snapshot)",
        Duration::from_secs(120),
        || (backend_count(&back) == 600).then_some(()),
    );
    // The leader kept 100 entries past its snapshot of 500: the follower
    // got the snapshot (a file, written and read a record at a time).
    back.proc.wait_log("installed a snapshot from the leader");
    heads.push(back);

    // Stop every head, start them again on the same data dirs and ports.
    let saved: Vec<(String, (u16, u16))> = heads
        .iter()
        .map(|h| {
            (
                h.proc
                    .data_dir
                    .file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string(),
                (h.proc.control_port, h.proc.http_port),
            )
        })
        .collect();
    for h in &heads {
        let _ = Command::new("kill")
            .args(["-TERM", &h.proc.guard.pid().to_string()])
            .status();
    }
    for h in &mut heads {
        h.proc.wait_exit(Duration::from_secs(60));
    }
    drop(heads);
    // Restarted heads are members already: no --join needed, but harmless.
    let mut restarted: Vec<Head> = saved
        .iter()
        .map(|(name, ports)| spawn(name, None, Some(*ports)))
        .collect();
    for h in &mut restarted {
        h.proc.wait_log("http proxy listening");
    }
    wait_for(
        "a leader after a full restart",
        Duration::from_secs(60),
        || leader_id(&status_json(&restarted[0])),
    );
    for h in &restarted {
        wait_for(
            "the state recovered from disk",
            Duration::from_secs(60),
            || (backend_count(h) == 600).then_some(()),
        );
    }
}

const DEPLOY_WHOAMI: &str = r#"
import os
from serval import serve
serve.connect(os.environ["ADDR"], token=os.environ["TOKEN"])

def whoami(request):
    return {"token": os.environ.get("SERVAL_TOKEN")}

serve.create_backend("whoami", whoami, ray_actor_options={"num_cpus": 0})
serve.create_endpoint("whoami", backend="whoami", route="/whoami")
print("deployed")
"#;

/// Each credential opens only its own door: a replica holds a scoped token
/// (not the cluster token) that reads but does not deploy, and the raft
/// peer service refuses the cluster token.
#[test]
fn replicas_get_a_scoped_token_and_peers_refuse_the_cluster_token() {
    use serval_protos::control::*;

    let tmp = tempfile::Builder::new()
        .prefix("sv-")
        .tempdir_in("/tmp")
        .unwrap();
    let head = start_head(tmp.path(), "h1", None);
    let token = head.proc.token();
    let addr = head.proc.control_address();
    let envs = [("ADDR", addr.clone()), ("TOKEN", token.clone())];
    assert!(run_python(DEPLOY_WHOAMI, &envs).contains("deployed"));
    let (_, body) = wait_for("the whoami replica", Duration::from_secs(120), || {
        http_get(head.proc.http_port, "/whoami")
            .ok()
            .filter(|(s, _)| *s == 200)
    });
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let replica_token = v["token"].as_str().unwrap_or_default().to_string();
    assert_ne!(
        replica_token, token,
        "a replica was given the cluster token"
    );
    assert_eq!(
        replica_token,
        serval_protos::auth::replica_token(&token, "whoami"),
        "a replica's token is its backend's"
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = serval_protos::client::connect(&addr, &replica_token)
            .await
            .unwrap();
        let snapshot = c
            .get_snapshot(WatchRequest::default())
            .await
            .expect("a replica reads the routing table")
            .into_inner();
        assert!(snapshot.backends.iter().any(|b| b.name == "whoami"));
        let denied = c
            .delete_backend(DeleteBackendRequest {
                name: "whoami".into(),
                force: true,
            })
            .await
            .expect_err("a replica deleted a backend");
        assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
        assert!(
            denied.message().contains("replica credential"),
            "{denied:?}"
        );
        let denied = c
            .shutdown(Empty {})
            .await
            .expect_err("a replica shut down the cluster");
        assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");

        // Raft peers: the cluster token is refused before the message is
        // read; the peer key gets as far as decoding it.
        let vote = || RaftMessage { payload: vec![0] };
        let mut p = serval_protos::client::connect_peer_lazy(&addr, &token).unwrap();
        let refused = p.vote(vote()).await.expect_err("a client spoke raft");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
        let peer_key =
            serval_protos::auth::derive_hex(token.as_bytes(), serval_protos::auth::PURPOSE_PEER);
        let mut p = serval_protos::client::connect_peer_lazy(&addr, &peer_key).unwrap();
        let undecodable = p.vote(vote()).await.expect_err("a garbage vote");
        assert_eq!(
            undecodable.code(),
            tonic::Code::InvalidArgument,
            "{undecodable:?}"
        );
        // ... and the peer key is no control credential.
        let mut c = serval_protos::client::connect(&addr, &peer_key)
            .await
            .unwrap();
        let refused = c
            .get_snapshot(WatchRequest::default())
            .await
            .expect_err("peer key on Control");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    });
    // The cluster still holds the backend.
    assert!(head.proc.status_json()["backends"]
        .as_array()
        .is_some_and(|b| b.iter().any(|b| b["name"] == "whoami")));
}

/// The control plane's history under failures is linearizable: clients
/// create, update and delete backends and read them back through every
/// head while the leader is SIGKILLed (then restarted on its data dir) and
/// then the next leader is cut off from the others (SIGSTOP, then SIGCONT:
/// on loopback a paused process is the partition we can make without
/// root). Writes are checked as linearizable; reads from a head's applied
/// state as possibly stale (ARCHITECTURE.md, "Heads and the consistency
/// model"): never a value not yet written, never one never written.
#[test]
fn control_plane_history_is_linearizable_across_leader_loss_and_a_cut_off_head() {
    let tmp = tempfile::Builder::new()
        .prefix("sv-")
        .tempdir_in("/tmp")
        .unwrap();
    let (mut heads, leader_ix) = three_heads_without_replicas(tmp.path());
    let addrs: Vec<String> = heads.iter().map(|h| h.control_address()).collect();
    let history = linearizability::BackendHistory::start(&addrs, &heads[0].token(), 4);
    history.progress("calls before any failure", 60);

    // 1. SIGKILL the leader; a new one takes over; the old one comes back.
    let (killed, other) = kill_leader(&mut heads, leader_ix);
    history.progress("calls under the new leader", 40);
    heads.insert(leader_ix, killed.restart());
    history.progress("calls with the old leader back", 40);

    // 2. Cut the current leader off (SIGSTOP) until the others elect one.
    let cut_ix = addrs.iter().position(|a| *a == other).unwrap();
    let pid = heads[cut_ix].guard.pid().to_string();
    let signal = |sig: &str| {
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    };
    signal("-STOP");
    let rest = (cut_ix + 1) % 3;
    wait_for("a leader among the others", Duration::from_secs(60), || {
        leader_address(&heads[rest]).filter(|a| *a != other)
    });
    history.progress("calls while a head is cut off", 40);
    signal("-CONT");
    history.progress("calls after the head is back", 60);

    history.check("a leader killed, a head paused", 200);
}

/// `/-/readyz` says whether a head can commit writes, where `/-/healthz`
/// says only that its proxy holds a snapshot: a head that lost its quorum
/// stays healthy (its proxy serves the last routes) but is not ready, and
/// is ready again once a quorum is back; a head still joining says so on
/// its metrics port before its proxy runs.
#[test]
fn a_head_is_ready_only_while_it_can_write() {
    let tmp = tempfile::Builder::new()
        .prefix("sv-")
        .tempdir_in("/tmp")
        .unwrap();
    let ready = |head: &ServeProcess| {
        http_get(head.http_port, "/-/readyz")
            .ok()
            .filter(|(status, _)| *status == 200)
    };
    let (mut heads, leader) = three_heads_without_replicas(tmp.path());
    for head in &heads {
        wait_for("every head ready", Duration::from_secs(60), || ready(head));
    }

    // Two of three gone: the survivor keeps its proxy, loses its quorum.
    let (gone, _) = kill_leader(&mut heads, leader);
    drop(heads.remove(0));
    let survivor = &heads[0];
    let body = wait_for("the survivor not ready", Duration::from_secs(60), || {
        http_get(survivor.http_port, "/-/readyz")
            .ok()
            .filter(|(status, _)| *status == 503)
            .map(|(_, body)| body)
            // (Before its store is open, a head says so first.)
            .filter(|body| !body.contains("store is not open yet"))
    });
    assert!(body.starts_with("not ready: "), "{body}");
    assert_eq!(http_get(survivor.http_port, "/-/healthz").unwrap().0, 200);

    // A quorum again: ready again.
    let back = gone.restart();
    wait_for("the survivor ready again", Duration::from_secs(60), || {
        ready(survivor)
    });
    wait_for("the restarted head ready", Duration::from_secs(60), || {
        ready(&back)
    });

    // A head whose --join finds no cluster answers on its metrics port
    // while it keeps trying (its proxy starts only once it has joined).
    let metrics_port = free_port();
    let nowhere = format!("127.0.0.1:{}", free_port());
    let metrics_arg = metrics_port.to_string();
    let token = "a-token-of-sixteen-chars-or-more";
    let _joining = ServeProcess::start(
        &tmp.path().join("joining"),
        free_port(),
        free_port(),
        &[
            "--head",
            "--num-cpus",
            "0",
            "--join",
            &nowhere,
            "--token",
            token,
            "--metrics-port",
            &metrics_arg,
        ],
    );
    let body = wait_for("the joining head's answer", Duration::from_secs(60), || {
        http_get(metrics_port, "/-/readyz")
            .ok()
            .filter(|(status, _)| *status == 503)
            .map(|(_, body)| body)
            // (Before its store is open, a head says so first.)
            .filter(|body| !body.contains("store is not open yet"))
    });
    // The words the Kubernetes start script of the first head looks for
    // (deploy/kubernetes/heads.yaml; controller::store::NOT_A_MEMBER).
    assert_eq!(body, "not ready: not a member of a cluster yet");
}
