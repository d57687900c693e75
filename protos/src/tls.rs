//! TLS on the control plane (tonic over rustls with the `ring` provider)
//! and, optionally, on the data plane's TCP connections.
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
//!
//! The data plane: a node (head or not) given `--tls-cert/--tls-key` hands
//! the paths to its replicas ([`DataPlaneIdentity::env`]), whose TCP frame
//! listener then serves TLS only ([`DataPlaneIdentity::acceptor`]); the
//! replica's record says so (`Replica.tls`), and a router connecting to it
//! over TCP verifies it with the same process-wide CA setting
//! ([`connect_replica`]). The data-plane handshake
//! (`crate::handshake`) then runs inside the TLS stream. Unix sockets stay
//! plaintext: they never leave the machine and live in a 0700 directory.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, pki_types};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

pub use tokio_rustls::{client::TlsStream as ClientTlsStream, TlsAcceptor};

/// Environment variables the SDK (and replicas) read; the `serve` binary
/// reads the same through its flags.
pub const ENV_TLS_CA: &str = "SERVAL_TLS_CA";
pub const ENV_TLS_DOMAIN: &str = "SERVAL_TLS_DOMAIN";
/// A node's certificate and key (`--tls-cert/--tls-key`), as its replicas
/// get them: their TCP frame listener (and a gRPC API's server) serve TLS.
pub const ENV_TLS_CERT: &str = "SERVAL_TLS_CERT";
pub const ENV_TLS_KEY: &str = "SERVAL_TLS_KEY";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {}: {reason}", path.display())]
    File {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
}

impl TlsError {
    /// The same error naming `flag` instead (an environment variable).
    fn named(self, flag: &'static str) -> Self {
        let TlsError::File { path, reason, .. } = self;
        TlsError::File { flag, path, reason }
    }
}

/// How this process's control clients use TLS.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    ca_path: PathBuf,
    ca_pem: Vec<u8>,
    domain: Option<String>,
    /// The data plane's client config, built on first use.
    data_config: OnceLock<Result<Arc<rustls::ClientConfig>, String>>,
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
            data_config: OnceLock::new(),
        })
    }

    /// From `SERVAL_TLS_CA` / `SERVAL_TLS_DOMAIN`; `None` when no CA is set.
    pub fn from_env() -> Result<Option<Self>, TlsError> {
        match std::env::var_os(ENV_TLS_CA).filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(ca) => Self::load(Path::new(&ca), std::env::var(ENV_TLS_DOMAIN).ok())
                .map(Some)
                .map_err(|e| e.named(ENV_TLS_CA)),
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

    /// The rustls client config of the data plane: the CA's certificates
    /// as the only roots.
    fn data_client_config(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        self.data_config
            .get_or_init(|| {
                let mut roots = rustls::RootCertStore::empty();
                for cert in certificates(&self.ca_pem)? {
                    roots.add(cert).map_err(|e| e.to_string())?;
                }
                let config = rustls::ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| e.to_string())?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Ok(Arc::new(config))
            })
            .clone()
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

/// A node's identity on the data plane: the certificate chain and key its
/// replicas serve TLS with.
#[derive(Clone)]
pub struct DataPlaneIdentity {
    cert: PathBuf,
    key: PathBuf,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for DataPlaneIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlaneIdentity")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl DataPlaneIdentity {
    /// Reads and checks the files now (`--tls-cert`, `--tls-key`), so that
    /// a wrong one fails the node's start, not each replica's.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let cert_pem = read_pem(cert, "--tls-cert", "CERTIFICATE")?;
        let key_pem = read_pem(key, "--tls-key", "PRIVATE KEY")?;
        let file_err = |flag, path: &Path, reason: String| TlsError::File {
            flag,
            path: path.to_path_buf(),
            reason,
        };
        let chain = certificates(&cert_pem).map_err(|r| file_err("--tls-cert", cert, r))?;
        let private =
            <pki_types::PrivateKeyDer as pki_types::pem::PemObject>::from_pem_slice(&key_pem)
                .map_err(|e| file_err("--tls-key", key, format!("no usable private key: {e}")))?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(chain, private))
            .map_err(|e| file_err("--tls-key", key, format!("does not fit --tls-cert: {e}")))?;
        let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        Ok(DataPlaneIdentity {
            cert: absolute(cert),
            key: absolute(key),
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// From `SERVAL_TLS_CERT` / `SERVAL_TLS_KEY` (a replica's environment);
    /// `None` when no certificate is set.
    pub fn from_env() -> Result<Option<Self>, TlsError> {
        let Some(cert) = std::env::var_os(ENV_TLS_CERT).filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        let key = std::env::var_os(ENV_TLS_KEY).unwrap_or_default();
        Self::load(Path::new(&cert), Path::new(&key))
            .map(Some)
            .map_err(|e| match e {
                TlsError::File {
                    flag: "--tls-cert", ..
                } => e.named(ENV_TLS_CERT),
                e => e.named(ENV_TLS_KEY),
            })
    }

    /// Accepts the TLS side of a connection.
    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// The environment a replica needs to serve with this identity.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            (ENV_TLS_CERT, self.cert.display().to_string()),
            (ENV_TLS_KEY, self.key.display().to_string()),
        ]
    }
}

/// Why a TLS connection to a replica could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DataTlsError {
    #[error(
        "the replica at {addr} serves TLS but this process has no CA to verify it with: \
         pass the cluster's CA certificate with --tls-ca or {ENV_TLS_CA}"
    )]
    NoCa { addr: String },
    #[error("--tls-ca {}: {reason}", ca.display())]
    Ca { ca: PathBuf, reason: String },
    #[error("'{name}' is not a valid TLS server name (set --tls-domain or {ENV_TLS_DOMAIN})")]
    BadName { name: String },
    #[error(
        "TLS with the replica at {addr}: {reason} (its certificate was checked against \
         --tls-ca {} for the name '{name}')", ca.display()
    )]
    Handshake {
        addr: String,
        name: String,
        ca: PathBuf,
        reason: String,
    },
}

/// Opens TLS on `stream`, connected to the replica at `addr`, verifying
/// the replica against `settings` (the process's [`tls`] setting, unless a
/// caller has another) for the host of `addr` or the configured domain.
/// The caller bounds the time it may take.
pub async fn connect_replica(
    settings: Option<&TlsSettings>,
    stream: TcpStream,
    addr: &str,
) -> Result<ClientTlsStream<TcpStream>, DataTlsError> {
    connect(settings, stream, addr, None).await
}

/// [`connect_replica`] to a replica's gRPC server: HTTP/2 offered by ALPN,
/// as gRPC over TLS requires.
pub async fn connect_replica_h2(
    settings: Option<&TlsSettings>,
    stream: TcpStream,
    addr: &str,
) -> Result<ClientTlsStream<TcpStream>, DataTlsError> {
    connect(settings, stream, addr, Some(b"h2")).await
}

async fn connect(
    settings: Option<&TlsSettings>,
    stream: TcpStream,
    addr: &str,
    alpn: Option<&[u8]>,
) -> Result<ClientTlsStream<TcpStream>, DataTlsError> {
    let settings = settings.ok_or_else(|| DataTlsError::NoCa {
        addr: addr.to_owned(),
    })?;
    let config = settings
        .data_client_config()
        .map_err(|reason| DataTlsError::Ca {
            ca: settings.ca_path.clone(),
            reason,
        })?;
    let connector = match alpn {
        None => tokio_rustls::TlsConnector::from(config),
        Some(protocol) => {
            let mut config = (*config).clone();
            config.alpn_protocols = vec![protocol.to_vec()];
            tokio_rustls::TlsConnector::from(Arc::new(config))
        }
    };
    let name = settings.server_name(host_of(addr)).to_owned();
    let server_name = pki_types::ServerName::try_from(name.clone())
        .map_err(|_| DataTlsError::BadName { name: name.clone() })?;
    connector
        .connect(server_name, stream)
        .await
        .map_err(|e| DataTlsError::Handshake {
            addr: addr.to_owned(),
            name,
            ca: settings.ca_path.clone(),
            reason: e.to_string(),
        })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The DER certificates of a PEM text; at least one.
fn certificates(pem: &[u8]) -> Result<Vec<pki_types::CertificateDer<'static>>, String> {
    use pki_types::pem::PemObject;
    let certs = pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("unreadable PEM certificate: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM CERTIFICATE in it".into());
    }
    Ok(certs)
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
