//! Argument parsing of `serve`: the same code runs as the `serve` binary
//! and as the `serve` console script of the Python package.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::{shutdown, start, status};

use clap::{Args, Parser, Subcommand};

/// How every command finds its cluster.
#[derive(Args, Clone, Debug)]
pub struct ClusterArgs {
    /// Data directory of the head (raft store, token, logs, replica sockets).
    #[arg(
        long,
        env = "SERVAL_DATA_DIR",
        default_value = ".serval",
        global = true
    )]
    pub data_dir: PathBuf,
    /// Controller address HOST:PORT. Default: the one recorded in the data dir.
    #[arg(long, env = "SERVAL_ADDRESS", global = true)]
    pub address: Option<String>,
    /// File holding the cluster token (at least 16 characters), e.g. a
    /// copy of the first head's `<data-dir>/token`; keep it `chmod 600`
    /// (a file other users may read is used with a warning). Default: the
    /// token in the data dir.
    #[arg(
        long,
        env = "SERVAL_TOKEN_FILE",
        global = true,
        conflicts_with = "token"
    )]
    pub token_file: Option<PathBuf>,
    /// The cluster token itself (at least 16 characters). Prefer
    /// --token-file: a command line is visible to every user of the machine.
    #[arg(long, env = "SERVAL_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) to verify the heads' TLS certificates with:
    /// every control connection of this process (CLI, node agent, proxy,
    /// a head's connections to other heads) then uses TLS. Default: plaintext.
    #[arg(long, env = "SERVAL_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// Name the heads' certificates are issued to, when not the host part
    /// of the address they are reached at.
    #[arg(long, env = "SERVAL_TLS_DOMAIN", global = true, requires = "tls_ca")]
    pub tls_domain: Option<String>,
}

impl ClusterArgs {
    /// The token given with --token or --token-file (or their environment
    /// variables), checked; `None` when neither is given.
    pub fn given_token(&self) -> anyhow::Result<Option<String>> {
        if let Some(path) = &self.token_file {
            return crate::cluster_file::read_token_file(path)
                .map(Some)
                .context("--token-file (SERVAL_TOKEN_FILE)");
        }
        match &self.token {
            Some(token) => {
                serval_protos::auth::validate_token(token).context("--token (SERVAL_TOKEN)")?;
                Ok(Some(token.clone()))
            }
            None => Ok(None),
        }
    }

    /// The given token, else the one in `data_dir`.
    pub fn token(&self, data_dir: &Path) -> anyhow::Result<String> {
        if let Some(token) = self.given_token()? {
            return Ok(token);
        }
        let path = data_dir.join(crate::cluster_file::TOKEN_FILE);
        if !path.exists() {
            anyhow::bail!(
                "no cluster token: pass --token-file PATH (or SERVAL_TOKEN_FILE) with a copy \
                 of the head's <data-dir>/token, or run where the head's data dir ({}) is",
                data_dir.display()
            );
        }
        crate::cluster_file::read_token_file(&path)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a head (`--head`) or join a node to a head (`--address`).
    Start(Box<start::StartArgs>),
    /// Print heads, nodes, endpoints, backends and replicas.
    Status {
        /// Print the raw snapshot as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop every process of the cluster, replicas included.
    Shutdown {
        /// How long to wait for the head to exit, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
}

#[derive(Parser)]
#[command(
    name = "serve",
    version,
    about = "Serval: serve Python and Rust models on a cluster"
)]
struct Root {
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(subcommand)]
    command: Cmd,
}

/// Runs `serve` with `argv` (program name first). `relaunch` is the command
/// that starts this program again (for `--detach`): the binary itself, or
/// the Python interpreter with `-m serval.cli`.
pub fn main_with(argv: Vec<String>, relaunch: Vec<String>) -> anyhow::Result<()> {
    let root = match Root::try_parse_from(&argv) {
        Ok(root) => root,
        Err(e) => {
            let _ = e.print();
            std::process::exit(e.exit_code());
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SERVAL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    // Every control client of this process is built by
    // `serval_protos::client`, which reads this one setting.
    let tls = match &root.cluster.tls_ca {
        Some(ca) => Some(serval_protos::tls::TlsSettings::load(
            ca,
            root.cluster.tls_domain.clone(),
        )?),
        None => None,
    };
    serval_protos::tls::set_tls(tls);
    match root.command {
        Cmd::Start(args) => start::run(root.cluster, *args, &argv, &relaunch),
        Cmd::Status { json } => status::run(root.cluster, json),
        Cmd::Shutdown { timeout } => shutdown::run(root.cluster, timeout),
    }
}
