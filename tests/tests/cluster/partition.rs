//! A network partition between heads (issue 6): the leader is cut off from
//! the two others in both directions. The isolated leader cannot commit (a
//! write sent to it fails in bounded time), the majority elects a new
//! leader and keeps accepting writes, and once healed the old leader steps
//! down and catches up.
//!
//! How the partition is made, without root: every head advertises
//! (`--advertise-address`) the port of a TCP proxy in this test process that
//! forwards to its real control port, so all head-to-head traffic (raft,
//! forwarded writes, joins) goes through the proxies. A proxy knows which
//! head is calling by finding the process that owns the other end of the
//! accepted loopback socket (`/proc/net/tcp` gives the socket's inode,
//! `/proc/<pid>/fd` the process holding it). Isolating head X closes every
//! proxied connection, then each proxy refuses connections that cross the
//! cut: into X's proxy from the others, and into theirs from X. The test
//! itself talks to each head on its real port, so it reaches all of them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serval_tests::*;

/// Who may talk to whom, and every open proxied connection.
#[derive(Default)]
struct NetState {
    /// The serve process of each head, by index.
    pids: Vec<u32>,
    /// The head cut off from the others, if any.
    isolated: Option<usize>,
    /// Open proxied connections (closed all at once when isolating).
    conns: Vec<tokio::task::AbortHandle>,
    /// Connections whose calling head was recognised (a sanity check).
    identified: usize,
}

impl NetState {
    /// `from` is the calling head (None: not recognised), `to` the head
    /// behind the proxy.
    fn allowed(&self, from: Option<usize>, to: usize) -> bool {
        match (self.isolated, from) {
            (None, _) => true,
            // During a partition only recognised heads on the same side pass.
            (Some(_), None) => false,
            (Some(x), Some(f)) => (f == x) == (to == x),
        }
    }
}

/// One proxy per head, on its own tokio runtime.
struct Net {
    state: Arc<Mutex<NetState>>,
    proxy_ports: Vec<u16>,
    _runtime: tokio::runtime::Runtime,
}

impl Net {
    /// Proxies in front of the control ports `targets`.
    fn new(targets: &[u16]) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let state = Arc::new(Mutex::new(NetState::default()));
        let proxy_ports = targets
            .iter()
            .enumerate()
            .map(|(to, target)| {
                let listener = runtime
                    .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                    .unwrap();
                let port = listener.local_addr().unwrap().port();
                runtime.spawn(proxy(listener, to, *target, state.clone()));
                port
            })
            .collect();
        Self {
            state,
            proxy_ports,
            _runtime: runtime,
        }
    }

    fn advertised(&self, head: usize) -> String {
        format!("127.0.0.1:{}", self.proxy_ports[head])
    }

    fn set_pid(&self, head: usize, pid: u32) {
        let mut s = self.state.lock().unwrap();
        if s.pids.len() <= head {
            s.pids.resize(head + 1, 0);
        }
        s.pids[head] = pid;
    }

    /// Cuts `head` off from the others, both ways, closing what is open.
    fn isolate(&self, head: usize) {
        let mut s = self.state.lock().unwrap();
        s.isolated = Some(head);
        for c in s.conns.drain(..) {
            c.abort();
        }
    }

    fn heal(&self) {
        self.state.lock().unwrap().isolated = None;
    }
}

async fn proxy(
    listener: tokio::net::TcpListener,
    to: usize,
    target: u16,
    state: Arc<Mutex<NetState>>,
) {
    let port = listener.local_addr().unwrap().port();
    loop {
        let Ok((mut inbound, peer)) = listener.accept().await else {
            continue;
        };
        let pids = state.lock().unwrap().pids.clone();
        let from = calling_head(peer.port(), port, &pids);
        let mut s = state.lock().unwrap();
        s.identified += from.is_some() as usize;
        if !s.allowed(from, to) {
            // Dropped: the caller sees its connection closed at once.
            continue;
        }
        let conn = tokio::spawn(async move {
            let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
            else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        });
        s.conns.retain(|c| !c.is_finished());
        s.conns.push(conn.abort_handle());
    }
}

/// The head (index into `pids`) whose process owns the client end of a
/// loopback connection from `peer_port` to `proxy_port`.
fn calling_head(peer_port: u16, proxy_port: u16, pids: &[u32]) -> Option<usize> {
    let port = |addr: &str| {
        addr.rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    let tcp = std::fs::read_to_string("/proc/net/tcp").ok()?;
    // Fields: sl local_address rem_address st queues timer retransmits uid timeout inode
    let inode = tcp.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 9 && port(f[1]) == Some(peer_port) && port(f[2]) == Some(proxy_port))
            .then(|| f[9].to_string())
    })?;
    let socket = format!("socket:[{inode}]");
    pids.iter().position(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == socket.as_str()))
    })
}

struct Head {
    proc: ServeProcess,
    raft_id: u64,
}

fn status_json(head: &Head) -> serde_json::Value {
    head.proc.status_json()
}

fn backends(s: &serde_json::Value) -> Vec<String> {
    s["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b["name"].as_str().map(String::from))
        .collect()
}

/// Creates one pending backend (no head offers CPUs) through `addr`.
fn create_backend(addr: &str, token: &str, name: &str) -> Result<(), tonic::Status> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = serval_protos::client::connect(addr, token)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        serval_tests::put_placeholder_code(&mut c).await?;
        c.create_backend(pending_backend(name)).await.map(|_| ())
    })
}

/// Three heads talking to each other through the proxies of `net`, once
/// all three are members and one leads; with the machine to itself (a
/// second cluster beside it, partitioned or not, slows its elections past
/// the tests' deadlines on a 2-core machine).
struct Cluster {
    heads: Vec<Head>,
    token: String,
    net: Net,
    _tmp: tempfile::TempDir,
    _alone: machine::Alone,
}

fn cluster() -> Cluster {
    let alone = machine::alone();
    let tmp = tempfile::Builder::new()
        .prefix("sv-")
        .tempdir_in("/tmp")
        .unwrap();
    let control_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let net = Net::new(&control_ports);
    let (heads, token) = start_heads(tmp.path(), &net, &control_ports);
    Cluster {
        heads,
        token,
        net,
        _tmp: tmp,
        _alone: alone,
    }
}

/// Three heads under `root` talking to each other through `net`'s
/// proxies, once all three are members and one leads; and the token.
fn start_heads(root: &std::path::Path, net: &Net, control_ports: &[u16]) -> (Vec<Head>, String) {
    let mut heads: Vec<Head> = Vec::new();
    let mut token = String::new();
    for (i, control) in control_ports.iter().enumerate() {
        let advertised = net.advertised(i);
        let mut args = vec![
            "--head",
            "--num-cpus",
            "0",
            "--node-timeout-s",
            "3",
            "--advertise-address",
            &advertised,
        ];
        let join = net.advertised(0);
        if i > 0 {
            args.extend(["--join", &join, "--token", &token]);
        }
        let mut proc =
            ServeProcess::start(&root.join(format!("h{i}")), *control, free_port(), &args);
        net.set_pid(i, proc.guard.pid());
        proc.wait_log("http proxy listening");
        if i == 0 {
            token = proc.token();
        }
        let raft_id = std::fs::read_to_string(proc.data_dir.join("raft_id"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        heads.push(Head { proc, raft_id });
    }
    wait_for("three heads and a leader", Duration::from_secs(60), || {
        let s = status_json(&heads[2]);
        (s["heads"].as_array().map(|h| h.len()) == Some(3) && leader_id(&s).is_some()).then_some(())
    });
    (heads, token)
}

#[test]
fn an_isolated_leader_cannot_commit_and_steps_down_when_healed() {
    let Cluster {
        heads, token, net, ..
    } = &cluster();
    let s = status_json(&heads[2]);
    // Peers know each other by the advertised (proxy) addresses.
    let mut addresses: Vec<&str> = s["heads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["address"].as_str().unwrap())
        .collect();
    addresses.sort();
    let mut expected: Vec<String> = (0..3).map(|i| net.advertised(i)).collect();
    expected.sort();
    assert_eq!(addresses, expected, "heads should advertise their proxies");

    create_backend(&heads[1].proc.control_address(), token, "before")
        .expect("a write before the partition");
    for h in heads {
        wait_for(
            "the first write on every head",
            Duration::from_secs(30),
            || {
                backends(&status_json(h))
                    .contains(&"before".to_string())
                    .then_some(())
            },
        );
    }
    assert!(
        net.state.lock().unwrap().identified > 0,
        "the proxies recognised no head (is /proc/net/tcp readable?)"
    );

    // Cut the leader off from the two others.
    let old_leader = leader_id(&status_json(&heads[0])).unwrap();
    let old_ix = heads.iter().position(|h| h.raft_id == old_leader).unwrap();
    let old_term = s["heads"][0]["term"].as_u64().unwrap_or(0);
    let majority: Vec<usize> = (0..3).filter(|i| *i != old_ix).collect();
    let isolated_at = Instant::now();
    net.isolate(old_ix);

    // A write sent to the isolated leader cannot commit: it fails in
    // bounded time, while the majority elects.
    let minority_write = {
        let (addr, token) = (heads[old_ix].proc.control_address(), token.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            let result = create_backend(&addr, &token, "minority");
            (result, started.elapsed())
        })
    };
    let new_leader = wait_for(
        "a new leader among the majority",
        Duration::from_secs(30),
        || {
            let seen: Vec<Option<u64>> = majority
                .iter()
                .map(|i| leader_id(&status_json(&heads[*i])))
                .collect();
            match seen[..] {
                [Some(a), Some(b)] if a == b && a != old_leader => Some(a),
                _ => None,
            }
        },
    );
    let elected_after = isolated_at.elapsed();
    let (result, failed_after) = minority_write.join().unwrap();
    let status = result.expect_err("a write on the isolated leader was acknowledged");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(
        failed_after < Duration::from_secs(15),
        "the isolated leader's write took {failed_after:?} to fail"
    );
    let isolated_status = status_json(&heads[old_ix]);
    let still_claims_leadership = leader_id(&isolated_status) == Some(old_leader);
    assert!(
        !backends(&isolated_status).contains(&"minority".to_string()),
        "the minority committed a write"
    );

    // The majority keeps accepting writes, through its follower (forwarded)
    // and its leader.
    let new_ix = heads.iter().position(|h| h.raft_id == new_leader).unwrap();
    let follower_ix = *majority.iter().find(|i| **i != new_ix).unwrap();
    let during: Vec<String> = (0..4).map(|i| format!("during{i}")).collect();
    for (n, name) in during.iter().enumerate() {
        let via = if n % 2 == 0 { follower_ix } else { new_ix };
        create_backend(&heads[via].proc.control_address(), token, name)
            .unwrap_or_else(|e| panic!("the majority refused {name}: {e:?}"));
    }
    for i in &majority {
        // A follower applies what the leader committed on its next message.
        let names = wait_for(
            "the majority's writes on both its heads",
            Duration::from_secs(30),
            || {
                let names = backends(&status_json(&heads[*i]));
                during.iter().all(|n| names.contains(n)).then_some(names)
            },
        );
        assert!(!names.contains(&"minority".to_string()));
    }
    let names = backends(&status_json(&heads[old_ix]));
    assert!(
        during.iter().all(|n| !names.contains(n)),
        "the isolated head saw majority writes: {names:?}"
    );

    // Heal: the old leader hears of the newer term, steps down and catches
    // up; its uncommitted write is gone.
    let healed_at = Instant::now();
    net.heal();
    let s = wait_for(
        "the old leader to step down and catch up",
        Duration::from_secs(30),
        || {
            let s = status_json(&heads[old_ix]);
            let names = backends(&s);
            (leader_id(&s) == Some(new_leader) && during.iter().all(|n| names.contains(n)))
                .then_some(s)
        },
    );
    let stepped_down_after = healed_at.elapsed();
    let me = s["heads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["raft_id"] == old_leader)
        .unwrap();
    assert_eq!(me["role"], "follower", "{s}");
    assert!(me["term"].as_u64().unwrap() > old_term, "{s}");
    assert!(
        !backends(&s).contains(&"minority".to_string()),
        "the uncommitted write survived: {s}"
    );

    // The old leader now forwards writes to the new one.
    create_backend(&heads[old_ix].proc.control_address(), token, "after")
        .expect("a write after healing");
    for h in heads {
        wait_for(
            "the write after healing on every head",
            Duration::from_secs(30),
            || {
                let names = backends(&status_json(h));
                (names.contains(&"after".to_string()) && !names.contains(&"minority".to_string()))
                    .then_some(())
            },
        );
    }
    eprintln!(
        "FIGURES: new leader elected {elected_after:?} after isolating the leader; the isolated leader's write \
         failed after {failed_after:?} ({:?}); isolated leader still claimed leadership: {still_claims_leadership}; \
         it stepped down {stepped_down_after:?} after healing",
        status.code()
    );
}

/// The control plane's history across a real partition: clients create,
/// update, delete and read backends through every head, the isolated
/// leader included (the test reaches every head), while the leader is cut
/// off from the others and healed. Writes are checked as linearizable and
/// reads as possibly stale (the isolated head answers from the state it
/// has, see ARCHITECTURE.md, "What is checked").
#[test]
fn history_is_linearizable_while_the_leader_is_cut_off() {
    let Cluster {
        heads, token, net, ..
    } = &cluster();
    let addrs: Vec<String> = heads.iter().map(|h| h.proc.control_address()).collect();
    let history = linearizability::BackendHistory::start(&addrs, token, 4);
    history.progress("calls before the partition", 60);
    let old_leader = leader_id(&status_json(&heads[0])).unwrap();
    let old_ix = heads.iter().position(|h| h.raft_id == old_leader).unwrap();
    net.isolate(old_ix);
    let other = (old_ix + 1) % 3;
    let new_leader = wait_for(
        "a new leader among the majority",
        Duration::from_secs(60),
        || leader_id(&status_json(&heads[other])).filter(|l| *l != old_leader),
    );
    history.progress("calls during the partition", 60);
    net.heal();
    wait_for(
        "the old leader to step down",
        Duration::from_secs(60),
        || (leader_id(&status_json(&heads[old_ix])) == Some(new_leader)).then_some(()),
    );
    history.progress("calls after healing", 60);
    history.check("the leader cut off", 200);
}
