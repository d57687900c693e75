//! A multi-host test bed on one machine: each host is a Linux network
//! namespace with its own address on a private bridge, so heads and nodes
//! bind `0.0.0.0`, advertise their own address and reach each other over a
//! real (virtual) network that a test can cut (`ip link set .. down`) or
//! slow down (`tc netem`). Needs root and `ip netns`; [`unavailable`] says
//! why a test must skip.
//!
//! Names carry this process's pid (`svt<pid hex>n<bed>...`), so parallel
//! runs never collide, and [`Bed::new`] first removes what a dead test
//! process left behind (killed before its `Drop` ran). `tests/netns/up`
//! builds the same bed by hand (prefix `svm`, removed by `tests/netns/down`).

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{serve_bin, venv_python, ServeProcess};

/// Why this machine cannot run the test bed (not root, no `ip netns`), or
/// None when it can. Probed once per process.
pub fn unavailable() -> Option<String> {
    static WHY: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    WHY.get_or_init(probe).clone()
}

fn probe() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next().map(str::to_string));
    if uid.as_deref() != Some("0") {
        return Some("the network-namespace test bed needs root".into());
    }
    let probe = probe_name();
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

/// A namespace name for a probe, unique in this process and swept like a
/// bed's if the process dies.
fn probe_name() -> String {
    let n = BEDS.fetch_add(1, Ordering::SeqCst);
    format!("svt{:x}n{n}probe", std::process::id())
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

/// The pid in a test bed name (`svt<hex pid>n<bed>...`), if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("svt")?;
    let hex = &rest[..rest.find('n')?];
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
            // "7: svt1a2bn0br: <BROADCAST,..." or "8: svt1a2bn0v1@if2: ..."
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

/// How hosts are linked to the bridge.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Links {
    /// A veth pair each: the kernel forwards, `tc netem` can impair it.
    Veth,
    /// Two TAP devices each (`eth0` in the host, one on the bridge) between
    /// which this process copies frames, delaying and dropping what the host
    /// sends as [`Bed::impair`] says: netem's effect where the kernel has no
    /// netem.
    Tap,
}

/// N hosts on one bridge; everything it made is removed on drop.
pub struct Bed {
    pub hosts: Vec<Host>,
    pub links: Links,
    /// What [`Links::Tap`] forwarders apply to each host's outgoing frames.
    impairment: Arc<Mutex<Impairment>>,
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
        Bed::with_links(n, Links::Veth)
    }

    /// [`Bed::new`] with `links`.
    pub fn with_links(n: usize, links: Links) -> Bed {
        assert!((1..=200).contains(&n), "1 to 200 hosts");
        sweep_leftovers();
        let pid = std::process::id();
        let bed = BEDS.fetch_add(1, Ordering::SeqCst);
        let tag = format!("svt{pid:x}n{bed}");
        let subnet = free_subnet(pid, bed);
        let bridge = format!("{tag}br");
        let mut made = Bed {
            hosts: Vec::new(),
            links,
            impairment: Arc::default(),
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
            match links {
                Links::Veth => must(&[
                    "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ]),
                Links::Tap => {
                    let inner = format!("{tag}a{i}");
                    let host_end = open_tap(&inner);
                    must(&["link", "set", &inner, "netns", &ns]);
                    must(&["-n", &ns, "link", "set", &inner, "name", "eth0"]);
                    let bridge_end = open_tap(&link);
                    forward(host_end, bridge_end, made.impairment.clone());
                }
            }
            must(&["link", "set", &link, "master", &bridge, "up"]);
            must(&["-n", &ns, "link", "set", "lo", "up"]);
            must(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ip_addr}/24"),
                "dev",
                "eth0",
            ]);
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

    /// Delays every frame a host sends by `delay` and drops `loss_percent`
    /// of them, so traffic between two hosts sees that delay each way and
    /// that loss in each direction: `tc qdisc add dev eth0 root netem delay
    /// D loss L%` in every host on veth links, the forwarders on TAP links.
    pub fn impair(&self, delay: Duration, loss_percent: f64) -> Result<(), String> {
        match self.links {
            Links::Tap => {
                *self.impairment.lock().unwrap() = Impairment {
                    delay,
                    loss: loss_percent / 100.0,
                };
                Ok(())
            }
            Links::Veth => {
                let delay = format!("{}ms", delay.as_millis());
                let loss = format!("{loss_percent}%");
                for h in &self.hosts {
                    netem(&h.ns, "eth0", &["delay", &delay, "loss", &loss])?;
                }
                Ok(())
            }
        }
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
            // A TAP end lives while this process holds it open: deleting
            // it ends its forwarder.
            if self.links == Links::Tap {
                let _ = ip(&["link", "del", &h.link]);
            }
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

/// `tc netem ARGS` on device `dev` of namespace `ns`.
fn netem(ns: &str, dev: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new("tc")
        .args(["-n", ns, "qdisc", "add", "dev", dev, "root", "netem"])
        .args(args)
        .output()
        .map_err(|e| format!("tc: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "tc qdisc add dev {dev} root netem {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether this kernel has `tc netem` (many VM kernels lack the module).
pub fn netem_available() -> bool {
    let probe = probe_name();
    if ip(&["netns", "add", &probe]).is_err() {
        return false;
    }
    let ok = netem(&probe, "lo", &["delay", "1ms"]).is_ok();
    delete_namespace(&probe);
    ok
}

/// What a TAP link does to the frames its host sends.
#[derive(Default, Clone, Copy)]
struct Impairment {
    delay: Duration,
    /// Fraction of frames dropped, 0 to 1.
    loss: f64,
}

/// A TAP device named `name` (in this namespace), open: frames without
/// packet information. It exists while the file is open.
fn open_tap(name: &str) -> std::fs::File {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap_or_else(|e| panic!("/dev/net/tun: {e}"));
    // struct ifreq: the name (16 bytes), then the flags.
    let mut ifr = [0u8; 40];
    assert!(name.len() < 16, "interface name {name} too long");
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as i16;
    ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `ifr` is
    // (zeroed, 40 bytes), and the fd is an open /dev/net/tun.
    #[allow(unsafe_code)] // the one ioctl of the test bed (no safe wrapper in libc)
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, ifr.as_mut_ptr()) };
    assert!(
        rc == 0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    file
}

/// Copies frames between a host's TAP (`host_end`) and its TAP on the
/// bridge, applying `impairment` to what the host sends. Threads; they end
/// when a device goes away (a read fails).
fn forward(host_end: std::fs::File, bridge_end: std::fs::File, impairment: Arc<Mutex<Impairment>>) {
    let host_end = Arc::new(host_end);
    let bridge_end = Arc::new(bridge_end);
    copy_frames(host_end.clone(), bridge_end.clone(), Some(impairment));
    copy_frames(bridge_end, host_end, None);
}

fn copy_frames(
    from: Arc<std::fs::File>,
    to: Arc<std::fs::File>,
    impairment: Option<Arc<Mutex<Impairment>>>,
) {
    use std::io::{Read, Write};
    // Frames wait for their time in a queue (in order: one delay for all)
    // served by a writer thread, so the reader never stops reading.
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        for (due, frame) in rx {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            // A device that is down refuses the frame: it is lost, as on a
            // cut cable.
            let _ = (&*to).write(&frame);
        }
    });
    std::thread::spawn(move || {
        let mut seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        let mut buf = vec![0u8; 65536];
        loop {
            let n = match (&*from).read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let Impairment { delay, loss } = impairment
                .as_ref()
                .map(|i| *i.lock().unwrap())
                .unwrap_or_default();
            // xorshift64: a uniform draw for the loss.
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            if loss > 0.0 && (seed >> 11) as f64 / (1u64 << 53) as f64 <= loss {
                continue;
            }
            if tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
            {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn bed_names_give_back_their_owner_pid() {
        // Hex digits include b: the bed number follows an n.
        assert_eq!(super::owner_pid("svt1b2cn0h1"), Some(0x1b2c));
        assert_eq!(super::owner_pid("svt1b2cn12br"), Some(0x1b2c));
        assert_eq!(super::owner_pid("svt3fn0probe"), Some(0x3f));
        assert_eq!(super::owner_pid("svmh1"), None);
        assert_eq!(super::owner_pid("eth0"), None);
    }
}
