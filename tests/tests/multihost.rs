//! Many machines, on one: each head and node runs in its own network
//! namespace on a bridge (`serval_tests::netns`), binds 0.0.0.0 on the
//! default ports and advertises its own address, as on separate hosts.
//! The scenarios cut links and slow the network down; they skip (with the
//! reason) where the test bed cannot be built: not root, no `ip netns`.
//!
//! The hosts share one filesystem, where a replica's Unix socket would be
//! reachable from every "host": every process on the bed runs with
//! `SERVAL_DATA_PLANE_TCP=1`, so routers reach replicas over TCP, as they
//! must across machines.

use std::sync::Mutex;
use std::time::Duration;

use serval_tests::netns::{self, Bed};
use serval_tests::*;

/// One scenario at a time: each runs five serve processes and their
/// replicas, which is what a 2-core machine takes.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn skip() -> bool {
    if let Some(why) = netns::unavailable() {
        eprintln!("SKIPPED: {why}");
        return true;
    }
    false
}

/// `heads` heads then `nodes` nodes, one per host, plus one host running
/// nothing (a driver). Fields drop in order: processes before the bed.
struct Cluster {
    heads: Vec<ServeProcess>,
    nodes: Vec<ServeProcess>,
    token: String,
    bed: Bed,
    tmp: tempfile::TempDir,
}

const TCP_ONLY: (&str, &str) = ("SERVAL_DATA_PLANE_TCP", "1");

impl Cluster {
    fn start(heads: usize, nodes: usize) -> Cluster {
        let tmp = tempfile::Builder::new()
            .prefix("sv-")
            .tempdir_in("/tmp")
            .unwrap();
        let bed = Bed::new(heads + nodes + 1);
        let mut cluster = Cluster {
            heads: Vec::new(),
            nodes: Vec::new(),
            token: String::new(),
            bed,
            tmp,
        };
        for i in 0..heads {
            let advertise = cluster.bed.control_address(i);
            let mut args = vec![
                "--head",
                "--control-host",
                "0.0.0.0",
                "--num-cpus",
                "0",
                "--http-location",
                "EveryNode",
                "--node-timeout-s",
                "5",
                "--advertise-address",
                &advertise,
            ];
            let first = cluster.bed.control_address(0);
            let token = cluster.token.clone();
            if i > 0 {
                args.extend(["--join", &first, "--token", &token]);
            }
            let head = cluster.bed.serve(
                i,
                cluster.tmp.path(),
                &format!("h{i}"),
                &args,
                &[TCP_ONLY],
                "http proxy listening",
            );
            if i == 0 {
                cluster.token = head.token();
            }
            cluster.heads.push(head);
        }
        let all_heads = (0..heads)
            .map(|i| cluster.bed.control_address(i))
            .collect::<Vec<_>>()
            .join(",");
        for n in 0..nodes {
            let token = cluster.token.clone();
            let node = cluster.bed.serve(
                heads + n,
                cluster.tmp.path(),
                &format!("n{n}"),
                &["--address", &all_heads, "--token", &token, "--num-cpus", "2"],
                &[TCP_ONLY],
                "joined the head",
            );
            cluster.nodes.push(node);
        }
        let expected = heads + nodes;
        wait_for("every node alive", Duration::from_secs(60), || {
            let s = cluster.heads[0].status_json();
            let alive = s["nodes"]
                .as_array()?
                .iter()
                .filter(|n| n["alive"] == true)
                .count();
            let voters = s["heads"]
                .as_array()?
                .iter()
                .filter(|h| h["role"] != "learner")
                .count();
            (alive == expected && voters == heads).then_some(())
        });
        cluster
    }

    fn driver(&self) -> &netns::Host {
        self.bed.hosts.last().unwrap()
    }

    /// Deploys `where`, a backend answering with its network namespace, as
    /// `replicas` replicas of one CPU each, from the driver host.
    fn deploy_where(&self, replicas: usize) {
        let script = format!(
            r#"
import os
from serval import serve
serve.connect(os.environ["ADDR"], token=os.environ["TOKEN"])
def where(request):
    return {{"net": os.readlink("/proc/self/ns/net"), "pid": os.getpid()}}
serve.create_backend("where", where, config={{"num_replicas": {replicas}}}, ray_actor_options={{"num_cpus": 1}})
serve.create_endpoint("where", backend="where", route="/where")
print("deployed")
"#
        );
        let out = self.driver().python(&script, &self.driver_env());
        assert!(out.contains("deployed"), "{out}");
    }

    fn driver_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("ADDR", self.bed.control_address(0)),
            ("TOKEN", self.token.clone()),
            (TCP_ONLY.0, TCP_ONLY.1.into()),
        ]
    }

    /// Every serve process, heads first, with its host index.
    fn all(&self) -> impl Iterator<Item = (usize, &ServeProcess)> {
        self.heads.iter().chain(self.nodes.iter()).enumerate()
    }
}

/// The network namespace (`net:[inode]`) of host `h`, as a replica on it
/// reports its own.
fn net_of(h: &netns::Host) -> String {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(format!("/run/netns/{}", h.ns))
        .unwrap()
        .ino();
    format!("net:[{ino}]")
}

/// GET /where through the proxy at `ip`: the namespace that answered.
fn where_via(ip: &str) -> Option<String> {
    let (status, body) =
        http_request_to(ip, netns::HTTP_PORT, "GET", "/where", "").ok()?;
    if status != 200 {
        eprintln!("GET /where via {ip}: {status} {body}");
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["net"].as_str().map(str::to_string)
}

fn replicas_of(s: &serde_json::Value, backend: &str) -> Vec<serde_json::Value> {
    s["replicas"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter(|r| r["backend"] == backend)
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_hosts_proxy_and_a_remote_driver_reach_replicas_on_other_hosts() {
    if skip() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(3, 2);
    c.deploy_where(2);
    // The nodes' namespaces: one replica on each (placement spreads).
    let node_nets: Vec<String> = (3..5).map(|i| net_of(&c.bed.hosts[i])).collect();
    let s = c.heads[1].status_json();
    for r in replicas_of(&s, "where") {
        let addr = r["tcp_addr"].as_str().unwrap_or_default();
        let subnet = c.bed.gateway.trim_end_matches("254");
        assert!(
            addr.starts_with(subnet),
            "a replica advertises {addr:?}, not its host's address: {r}"
        );
    }
    // Through every host's proxy, both nodes' replicas answer: each proxy
    // reaches at least one replica on another host.
    for (i, p) in c.all() {
        let ip = c.bed.hosts[i].ip.clone();
        let mut seen = std::collections::BTreeSet::new();
        wait_for(
            &format!("both replicas through the proxy of host {ip} ({})", p.data_dir.display()),
            Duration::from_secs(60),
            || {
                if let Some(net) = where_via(&ip) {
                    seen.insert(net);
                }
                node_nets.iter().all(|n| seen.contains(n)).then_some(())
            },
        );
        eprintln!("through {ip}: {seen:?}");
    }
    // A handle on the driver host (no serve process there) calls both.
    let out = c.driver().python(
        r#"
import os
from serval import serve
serve.connect(os.environ["ADDR"], token=os.environ["TOKEN"])
h = serve.get_handle("where")
seen = set()
for _ in range(200):
    seen.add(h.remote().result()["net"])
    if len(seen) == 2:
        break
print(" ".join(sorted(seen)))
"#,
        &c.driver_env(),
    );
    eprintln!("the driver's handle reached {out}");
    let mut want = node_nets.clone();
    want.sort();
    assert_eq!(out.trim(), want.join(" "), "the driver's handle reached: {out}");
}
