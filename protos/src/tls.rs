//! TLS on the control plane (tonic over rustls with the `ring` provider).
//!
//! A head given `--tls-cert/--tls-key` serves its control listener (the
//! `Control` and `RaftPeer` services) over TLS only; every client given
//! `--tls-ca` verifies the server against that CA, for the host part of the
//! address or `--tls-domain`.
//!
//! The client side is a process-wide setting ([`set_tls`]) rather than a
//! parameter: every control client of a process is built in
//! `crate::client`, reached from a dozen call sites in five crates (CLI,
//! node agent, supervisor, proxy watch and load reports, controller
//! forwarding and raft network, the Python SDK) that already carry
//! `(address, token)` pairs around. A process talks to one cluster with one
//! trust setting, so the binary (from its flags) or the SDK (from the
//! environment) sets it once at start and no signature changes. Replicas
//! get it through the environment (`SERVAL_TLS_CA`, `SERVAL_TLS_DOMAIN`),
//! set by their supervisor from this same setting.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Environment variables the SDK (and replicas) read; the `serve` binary
/// reads the same through its flags.
pub const ENV_TLS_CA: &str = "SERVAL_TLS_CA";
pub const ENV_TLS_DOMAIN: &str = "SERVAL_TLS_DOMAIN";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {}: {reason}", path.display())]
    File {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
}

/// How this process's control clients use TLS.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    ca_path: PathBuf,
    ca_pem: Vec<u8>,
    domain: Option<String>,
}

impl TlsSettings {
    /// Reads the CA certificate(s) (PEM) now, so that a wrong path is an
    /// error at start naming `--tls-ca`, not a failure on first connect.
    pub fn load(ca: &Path, domain: Option<String>) -> Result<Self, TlsError> {
        let ca_pem = read_pem(ca, "--tls-ca", "CERTIFICATE")?;
        Ok(TlsSettings {
            // Absolute: replicas get it in their environment and run
            // elsewhere.
            ca_path: std::path::absolute(ca).unwrap_or_else(|_| ca.to_path_buf()),
            ca_pem,
            domain: domain.filter(|d| !d.is_empty()),
        })
    }

    /// From `SERVAL_TLS_CA` / `SERVAL_TLS_DOMAIN`; `None` when no CA is set.
    pub fn from_env() -> Result<Option<Self>, TlsError> {
        match std::env::var_os(ENV_TLS_CA).filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(ca) => Self::load(Path::new(&ca), std::env::var(ENV_TLS_DOMAIN).ok())
                .map(Some)
                .map_err(|TlsError::File { path, reason, .. }| TlsError::File {
                    flag: ENV_TLS_CA,
                    path,
                    reason,
                }),
        }
    }

    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    pub fn domain(&self) -> Option<&str> {
        self.domain.as_deref()
    }

    /// The name the server's certificate must be issued to when connecting
    /// to `host` (the host part of the address unless overridden).
    pub fn server_name<'a>(&'a self, host: &'a str) -> &'a str {
        self.domain.as_deref().unwrap_or(host)
    }

    pub(crate) fn client_config(&self) -> ClientTlsConfig {
        let config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        match &self.domain {
            Some(d) => config.domain_name(d.clone()),
            None => config,
        }
    }

    /// The environment a child process (a replica) needs to connect the
    /// same way.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![(ENV_TLS_CA, self.ca_path.display().to_string())];
        if let Some(d) = &self.domain {
            env.push((ENV_TLS_DOMAIN, d.clone()));
        }
        env
    }
}

static CLIENT_TLS: RwLock<Option<Arc<TlsSettings>>> = RwLock::new(None);

/// Sets how every control client this process builds from now on connects:
/// `Some` for TLS verified against the CA, `None` for plaintext. Called once
/// at start by the `serve` binary (flags) and by the SDK's `connect` (env).
pub fn set_tls(settings: Option<TlsSettings>) {
    *CLIENT_TLS.write().unwrap_or_else(|e| e.into_inner()) = settings.map(Arc::new);
}

/// The current process-wide client TLS setting.
pub fn tls() -> Option<Arc<TlsSettings>> {
    CLIENT_TLS.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The server side of a head: its certificate chain and private key (PEM),
/// read now so that a wrong path is an error at start naming the flag.
pub fn server_config(cert: &Path, key: &Path) -> Result<ServerTlsConfig, TlsError> {
    let cert_pem = read_pem(cert, "--tls-cert", "CERTIFICATE")?;
    let key_pem = read_pem(key, "--tls-key", "PRIVATE KEY")?;
    Ok(ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem)))
}

fn read_pem(path: &Path, flag: &'static str, kind: &str) -> Result<Vec<u8>, TlsError> {
    let err = |reason: String| TlsError::File {
        flag,
        path: path.to_path_buf(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| err(format!("cannot read it: {e}")))?;
    let text = String::from_utf8_lossy(&pem);
    if !text.contains("-----BEGIN ") || !text.contains(kind) {
        return Err(err(format!("no PEM {kind} in it")));
    }
    Ok(pem)
}

/// An error and its sources, joined by ": " (tonic's transport errors say
/// only "transport error" at the top).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// A sentence about TLS for a transport error talking to `addr`, when the
/// error looks like a TLS mismatch; `None` otherwise. `serves_tls` is what
/// [`probe_serves_tls`] found, when it was asked.
///
/// The symptoms, as rustls and h2 report them: a plaintext client reads the
/// TLS head's alert record as an HTTP/2 frame of absurd length ("frame with
/// invalid size"), or finds the connection closed under it (a broken pipe:
/// hence the probe); a TLS client reads the plaintext head's HTTP/2 frames
/// as a record of an unknown type ("InvalidContentType"); a refused
/// certificate is an "invalid peer certificate".
pub fn tls_hint(addr: &str, chain: &str, serves_tls: bool) -> Option<String> {
    match tls() {
        None if serves_tls
            || chain.contains("frame with invalid size")
            || chain.contains("connection error detected") =>
        {
            Some(format!(
                "the head at {addr} seems to serve TLS but this client connects in plaintext: \
                 pass the cluster's CA certificate with --tls-ca or {ENV_TLS_CA}"
            ))
        }
        None => None,
        Some(_) if chain.contains("InvalidContentType") || chain.contains("corrupt message") => {
            Some(format!(
                "this client connects with TLS (--tls-ca) but the head at {addr} does not \
                 seem to serve TLS: start it with --tls-cert/--tls-key, or drop --tls-ca"
            ))
        }
        Some(tls)
            if chain.contains("certificate") || chain.contains("TLS") || chain.contains("tls") =>
        {
            let host = host_of(addr);
            Some(format!(
                "TLS: the head's certificate was checked against --tls-ca {} for the name '{}' \
                 (set --tls-domain or {ENV_TLS_DOMAIN} when it is issued to another name)",
                tls.ca_path.display(),
                tls.server_name(host),
            ))
        }
        Some(_) => None,
    }
}

/// Whether the server at `addr` (the first of a list) answers a plaintext
/// HTTP/2 preface with a TLS record: asked after a plaintext call failed
/// on a connection that was established, so costs nothing on success.
pub async fn probe_serves_tls(addr: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let bare = addr.split_once("://").map_or(addr, |(_, rest)| rest);
    let Some(first) = bare.split(',').map(str::trim).find(|a| !a.is_empty()) else {
        return false;
    };
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(first).await.ok()?;
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .ok()?;
        let mut head = [0u8; 2];
        stream.read_exact(&mut head).await.ok()?;
        // A TLS record: content type alert (21) or handshake (22), then
        // the major version 3.
        Some(matches!(head, [21 | 22, 3]))
    };
    tokio::time::timeout(std::time::Duration::from_millis(500), probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// The host part of "host:port", "[v6]:port" or "scheme://host:port".
fn host_of(addr: &str) -> &str {
    let bare = addr.split_once("://").map_or(addr, |(_, rest)| rest);
    let bare = bare.split(',').next().unwrap_or(bare);
    if let Some(v6) = bare.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    bare.rsplit_once(':').map_or(bare, |(host, _)| host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_addresses() {
        assert_eq!(host_of("127.0.0.1:6390"), "127.0.0.1");
        assert_eq!(host_of("https://head.example:6390"), "head.example");
        assert_eq!(host_of("[::1]:6390"), "::1");
        assert_eq!(host_of("a:1,b:2"), "a");
    }

    #[test]
    fn missing_files_name_the_flag_and_path() {
        let e = TlsSettings::load(Path::new("/nonexistent/ca.pem"), None).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("--tls-ca") && text.contains("/nonexistent/ca.pem"),
            "{text}"
        );
        let e = server_config(Path::new("/nonexistent/cert.pem"), Path::new("/x")).unwrap_err();
        assert!(
            e.to_string().contains("--tls-cert /nonexistent/cert.pem"),
            "{e}"
        );
    }

    #[test]
    fn a_file_without_pem_is_refused() {
        let dir = std::env::temp_dir().join(format!("serval-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ca.pem");
        std::fs::write(&path, "not a certificate").unwrap();
        let e = TlsSettings::load(&path, None).unwrap_err();
        assert!(e.to_string().contains("no PEM CERTIFICATE"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
