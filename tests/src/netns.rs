//! A multi-host test bed on one machine: each host is a Linux network
//! namespace with its own address on a private bridge, so heads and nodes
//! bind `0.0.0.0`, advertise their own address and reach each other over a
//! real (virtual) network that a test can cut (`ip link set .. down`) or
//! slow down (`tc netem`). Needs root and `ip netns`; [`unavailable`] says
//! why a test must skip.
//!
//! Names carry this process's pid (`svt<pid hex>b<bed>...`), so parallel
//! runs never collide, and [`Bed::new`] first removes what a dead test
//! process left behind (killed before its `Drop` ran). `tests/netns/up`
//! builds the same bed by hand (prefix `svm`, removed by `tests/netns/down`).

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{serve_bin, venv_python, ServeProcess};

/// Why this machine cannot run the test bed (not root, no `ip netns`), or
/// None when it can.
pub fn unavailable() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next().map(str::to_string));
    if uid.as_deref() != Some("0") {
        return Some("the network-namespace test bed needs root".into());
    }
    let probe = format!("svt{:x}probe", std::process::id());
    match Command::new("ip").args(["netns", "add", &probe]).output() {
        Ok(o) if o.status.success() => {
            let _ = ip(&["netns", "del", &probe]);
            None
        }
        Ok(o) => Some(format!(
            "`ip netns add` fails here: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("no `ip` command (install iproute2): {e}")),
    }
}

/// Runs `ip ARGS`; Err with its stderr when it fails.
fn ip(args: &[&str]) -> Result<Output, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn must(args: &[&str]) {
    if let Err(e) = ip(args) {
        panic!("{e}");
    }
}

/// The pid in a test bed name (`svt<hex pid>b...`), if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("svt")?;
    let hex = &rest[..rest.find('b')?];
    u32::from_str_radix(hex, 16).ok()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Kills every process in namespace `ns` (what `ip netns del` leaves
/// running) and deletes it.
fn delete_namespace(ns: &str) {
    if let Ok(out) = ip(&["netns", "pids", ns]) {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
    let _ = ip(&["netns", "del", ns]);
}

/// Removes namespaces and links of test beds whose process is gone.
pub fn sweep_leftovers() {
    if let Ok(out) = ip(&["netns", "list"]) {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let ns = line.split_whitespace().next().unwrap_or_default();
            if owner_pid(ns).is_some_and(|p| !alive(p)) {
                delete_namespace(ns);
            }
        }
    }
    if let Ok(out) = ip(&["-o", "link", "show"]) {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "7: svt1a2b0br: <BROADCAST,..." or "8: svt1a2b0v1@if2: ..."
            let Some(name) = line.split(": ").nth(1) else {
                continue;
            };
            let name = name.split('@').next().unwrap_or_default();
            if owner_pid(name).is_some_and(|p| !alive(p)) {
                let _ = ip(&["link", "del", name]);
            }
        }
    }
}

/// One host: a namespace, its address, and the bridge end of its link.
pub struct Host {
    pub ns: String,
    pub ip: String,
    /// The veth end on the bridge (outside the namespace): set down, the
    /// host is cut off from every other host and from the test.
    pub link: String,
}

impl Host {
    /// `program` run inside this host's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]).arg(program);
        cmd
    }

    /// Pids of the processes in this host's namespace.
    pub fn pids(&self) -> Vec<u32> {
        ip(&["netns", "pids", &self.ns])
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Runs a Python script with the venv interpreter on this host; its
    /// stdout, or a panic with its stderr.
    pub fn python(&self, script: &str, envs: &[(&str, String)]) -> String {
        let out = self
            .command(venv_python())
            .arg("-c")
            .arg(script)
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "python on {} failed ({}):\nstdout: {}\nstderr: {}",
            self.ip,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// N hosts on one bridge; everything it made is removed on drop.
pub struct Bed {
    pub hosts: Vec<Host>,
    bridge: String,
    /// The test process's address on the bridge (the `.254`).
    pub gateway: String,
}

static BEDS: AtomicU32 = AtomicU32::new(0);

/// The ports every head and node uses inside its own namespace: the
/// defaults, as on separate machines.
pub const CONTROL_PORT: u16 = serval_protos::DEFAULT_CONTROL_PORT;
pub const HTTP_PORT: u16 = serval_protos::DEFAULT_HTTP_PORT;

impl Bed {
    /// Creates `n` hosts, 10.X.Y.1 to 10.X.Y.n, on a bridge that has
    /// 10.X.Y.254 in this namespace (how the test reaches them). The
    /// namespaces have no other route: traffic stays on the bed.
    pub fn new(n: usize) -> Bed {
        assert!((1..=200).contains(&n), "1 to 200 hosts");
        sweep_leftovers();
        let pid = std::process::id();
        let bed = BEDS.fetch_add(1, Ordering::SeqCst);
        let tag = format!("svt{pid:x}b{bed}");
        let subnet = free_subnet(pid, bed);
        let bridge = format!("{tag}br");
        let mut made = Bed {
            hosts: Vec::new(),
            bridge: String::new(),
            gateway: format!("{subnet}.254"),
        };
        must(&["link", "add", &bridge, "type", "bridge"]);
        made.bridge = bridge.clone();
        must(&["addr", "add", &format!("{subnet}.254/24"), "dev", &bridge]);
        must(&["link", "set", &bridge, "up"]);
        for i in 1..=n {
            let ns = format!("{tag}h{i}");
            let link = format!("{tag}v{i}");
            let ip_addr = format!("{subnet}.{i}");
            must(&["netns", "add", &ns]);
            made.hosts.push(Host {
                ns: ns.clone(),
                ip: ip_addr.clone(),
                link: link.clone(),
            });
            must(&[
                "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            must(&["link", "set", &link, "master", &bridge, "up"]);
            must(&["-n", &ns, "link", "set", "lo", "up"]);
            must(&["-n", &ns, "addr", "add", &format!("{ip_addr}/24"), "dev", "eth0"]);
            must(&["-n", &ns, "link", "set", "eth0", "up"]);
        }
        made
    }

    /// Cuts host `i` off the network (its link goes down; the processes
    /// on it keep running).
    pub fn cut(&self, i: usize) {
        must(&["link", "set", &self.hosts[i].link, "down"]);
    }

    /// Brings host `i`'s link back up.
    pub fn restore(&self, i: usize) {
        must(&["link", "set", &self.hosts[i].link, "up"]);
    }

    /// Adds `tc netem ARGS` (e.g. `delay 50ms loss 2%`) to every host's
    /// link, in both directions; Err when this kernel has no netem.
    pub fn netem(&self, args: &[&str]) -> Result<(), String> {
        for h in &self.hosts {
            for (ns, dev) in [(None, h.link.as_str()), (Some(h.ns.as_str()), "eth0")] {
                let mut cmd = Command::new("tc");
                if let Some(ns) = ns {
                    cmd.args(["-n", ns]);
                }
                let out = cmd
                    .args(["qdisc", "add", "dev", dev, "root", "netem"])
                    .args(args)
                    .output()
                    .map_err(|e| format!("tc: {e}"))?;
                if !out.status.success() {
                    return Err(format!(
                        "tc qdisc add dev {dev} root netem {}: {}",
                        args.join(" "),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
            }
        }
        Ok(())
    }

    /// `serve start ARGS` on host `i` with `env`, its data under
    /// `root/name`, its proxy binding 0.0.0.0, on the default ports;
    /// returns once it printed `ready_line`.
    pub fn serve(
        &self,
        i: usize,
        root: &Path,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
        ready_line: &str,
    ) -> ServeProcess {
        let host = &self.hosts[i];
        let mut all = vec!["--http-host", "0.0.0.0"];
        all.extend_from_slice(args);
        let mut p = ServeProcess::start_on(
            &host.ip,
            &["ip", "netns", "exec", &host.ns],
            &root.join(name),
            CONTROL_PORT,
            HTTP_PORT,
            &all,
            env,
        );
        p.wait_log(ready_line);
        p
    }

    /// The control address of host `i`, as peers dial it.
    pub fn control_address(&self, i: usize) -> String {
        format!("{}:{CONTROL_PORT}", self.hosts[i].ip)
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for h in &self.hosts {
            delete_namespace(&h.ns);
        }
        if !self.bridge.is_empty() {
            let _ = ip(&["link", "del", &self.bridge]);
        }
    }
}

/// A 10.X.Y prefix no route of this machine uses, derived from the pid
/// and bed number (so parallel runs pick different ones).
fn free_subnet(pid: u32, bed: u32) -> String {
    let routes = ip(&["-4", "route", "show", "table", "all"])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut h = (pid.wrapping_mul(2654435761) ^ bed.wrapping_mul(40503)) & 0xffff;
    loop {
        let (x, y) = (h >> 8 & 0xff, h & 0xff);
        let prefix = format!("10.{x}.{y}");
        if x != 0 && !routes.contains(&format!("{prefix}.")) {
            return prefix;
        }
        h = (h + 1) & 0xffff;
    }
}

/// `serve status --json` of the head at `addr`, run on `host` (so a cut
/// host still answers about itself); Null when it fails.
pub fn status_on(host: &Host, addr: &str, token: &str) -> serde_json::Value {
    let out = host
        .command(serve_bin())
        .args(["--address", addr, "--token", token, "status", "--json"])
        .output()
        .expect("run serve status");
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}
