//! Argument parsing of `serve`: the same code runs as the `serve` binary
//! and as the `serve` console script of the Python package. The commands
//! the Python SDK implements (`deploy`, `run`, `build`, `get`, `delete`,
//! `logs`, `jobs`) are listed here too, and the binary runs them with the SDK's
//! interpreter, so either `serve` knows every command.

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
    /// Deploy a Ray Serve config file's applications (`applications:`),
    /// or the APIs of a project folder's serve.yaml or cortex.yaml.
    #[command(disable_help_flag = true)]
    Deploy(PythonArgs),
    /// Run a Ray Serve application (`module:app`) or config file in the
    /// foreground; Ctrl-C removes it.
    #[command(disable_help_flag = true)]
    Run(PythonArgs),
    /// Write the Ray Serve config file of applications (`module:app ...`).
    #[command(disable_help_flag = true)]
    Build(PythonArgs),
    /// Status of every deployed API, or of one.
    #[command(disable_help_flag = true)]
    Get(PythonArgs),
    /// Remove a deployed API.
    #[command(disable_help_flag = true)]
    Delete(PythonArgs),
    /// Print the log lines of an API's replicas as they come.
    #[command(disable_help_flag = true)]
    Logs(PythonArgs),
    /// Batch jobs of a BatchAPI: submit, get, list, stop, logs.
    #[command(disable_help_flag = true)]
    Jobs(PythonArgs),
}

/// The arguments of a command the Python SDK implements
/// (`serval.cortex.cli`), passed on as given (`--help` included).
#[derive(Args)]
struct PythonArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    _args: Vec<String>,
}

/// Set in the environment of `python -m serval.cli` run for a Python
/// command, so that a Python side that hands the command back (a version
/// that lacks it) is an error instead of a loop.
const HANDED_TO_PYTHON_ENV: &str = "SERVAL_CLI_HANDED_TO_PYTHON";

/// Runs a command of the Python SDK (`argv` as this program got it) with
/// the SDK's interpreter: SERVAL_PYTHON, as for replicas, else `python3`.
/// Replaces this process, so its exit status and signals are the command's.
fn run_python_command(argv: &[String]) -> anyhow::Result<()> {
    let command = argv
        .iter()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map_or("this command", String::as_str);
    if std::env::var_os(HANDED_TO_PYTHON_ENV).is_some() {
        anyhow::bail!(
            "`serve {command}` was handed to the Python SDK, which handed it back: \
             its serval package does not know it (reinstall the SDK)"
        );
    }
    let python = std::env::var_os("SERVAL_PYTHON").unwrap_or_else(|| "python3".into());
    let shown = Path::new(&python).display().to_string();
    let hint = format!(
        "`serve {command}` is a command of the Python SDK, run with SERVAL_PYTHON \
         ({shown}); set SERVAL_PYTHON to the Python where the serval package is \
         installed (e.g. .venv/bin/python), or run that environment's `serve`"
    );
    // Checked first, so a missing package is this message, not a traceback.
    let probe = std::process::Command::new(&python)
        .args(["-c", "import serval.cortex.cli"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .with_context(|| format!("{hint}: cannot run it"))?;
    if !probe.status.success() {
        let stderr = String::from_utf8_lossy(&probe.stderr);
        let last = stderr.lines().last().unwrap_or("it exited with an error");
        anyhow::bail!("{hint}: {last}");
    }
    use std::os::unix::process::CommandExt;
    let error = std::process::Command::new(&python)
        .args(["-m", "serval.cli"])
        .args(&argv[1..])
        .env(HANDED_TO_PYTHON_ENV, "1")
        .exec();
    Err(error).with_context(|| format!("{hint}: cannot run it"))
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
        Cmd::Deploy(_)
        | Cmd::Run(_)
        | Cmd::Build(_)
        | Cmd::Get(_)
        | Cmd::Delete(_)
        | Cmd::Logs(_)
        | Cmd::Jobs(_) => run_python_command(&argv),
    }
}
