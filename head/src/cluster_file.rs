//! How CLI commands find a running cluster: the head writes
//! `<data-dir>/cluster.json` (addresses and pid) and `<data-dir>/token`.
//! `--address` and `--token-file` / `--token` (or SERVAL_ADDRESS,
//! SERVAL_TOKEN_FILE / SERVAL_TOKEN) override them. The data dir is its
//! owner's only (0700), each file in it 0600, written atomically.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::json;

pub const CLUSTER_FILE: &str = "cluster.json";
pub const TOKEN_FILE: &str = "token";

#[derive(Debug, Clone)]
pub struct ClusterInfo {
    pub control_address: String,
    pub http_address: String,
    pub pid: u32,
}

pub fn write(data_dir: &Path, info: &ClusterInfo) -> anyhow::Result<()> {
    let body = json!({
        "control_address": info.control_address,
        "http_address": info.http_address,
        "pid": info.pid,
    });
    let path = data_dir.join(CLUSTER_FILE);
    write_private(&path, body.to_string().as_bytes())
}

pub fn read(data_dir: &Path) -> Option<ClusterInfo> {
    let text = std::fs::read_to_string(data_dir.join(CLUSTER_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(ClusterInfo {
        control_address: v.get("control_address")?.as_str()?.to_string(),
        http_address: v
            .get("http_address")
            .and_then(|a| a.as_str())
            .unwrap_or_default()
            .to_string(),
        pid: v.get("pid").and_then(|p| p.as_u64()).unwrap_or(0) as u32,
    })
}

pub fn remove(data_dir: &Path) {
    let _ = std::fs::remove_file(data_dir.join(CLUSTER_FILE));
}

/// Creates the data dir only its owner may enter (0700), or tightens an
/// existing one.
pub fn create_data_dir(data_dir: &Path) -> anyhow::Result<()> {
    serval_protos::private_files::private_dir(data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))
}

/// `contents` as the 0600 file `path`, replaced atomically.
fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    serval_protos::private_files::write_private(path, contents)
        .with_context(|| format!("writing {}", path.display()))
}

/// The cluster token of a head's data dir, created on first start.
pub fn load_or_create_token(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join(TOKEN_FILE);
    if path.exists() {
        return read_token_file(&path);
    }
    let token = random_hex(16)?;
    write_private(&path, token.as_bytes())?;
    Ok(token)
}

/// Writes `token` to the data dir, readable by its owner only.
pub fn store_token(data_dir: &Path, token: &str) -> anyhow::Result<()> {
    write_private(&data_dir.join(TOKEN_FILE), token.as_bytes())
}

/// The token in the file `path` (surrounding whitespace dropped), checked;
/// a file other users may read is used, with a warning.
pub fn read_token_file(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the cluster token from {}", path.display()))?;
    if serval_protos::private_files::open_to_others(path).unwrap_or(false) {
        tracing::warn!(
            "the token file {} is readable by other users; restrict it: chmod 600 {}",
            path.display(),
            path.display()
        );
    }
    let token = text.trim().to_string();
    serval_protos::auth::validate_token(&token)
        .with_context(|| format!("the token file {}", path.display()))?;
    Ok(token)
}

pub const RAFT_ID_FILE: &str = "raft_id";

/// This head's raft member id, kept in the data dir across restarts. A data
/// dir from before ids were stored holds a single head with id 1.
pub fn load_or_create_raft_id(data_dir: &Path) -> anyhow::Result<u64> {
    let path = data_dir.join(RAFT_ID_FILE);
    if let Ok(text) = std::fs::read_to_string(&path) {
        return text
            .trim()
            .parse()
            .with_context(|| format!("{} is not a raft id", path.display()));
    }
    let id = if data_dir.join("raft").exists() {
        1
    } else {
        let hex = random_hex(8)?;
        u64::from_str_radix(&hex[..15], 16)
            .context("hex digits are a number")?
            .max(2)
    };
    write_private(&path, id.to_string().as_bytes())?;
    Ok(id)
}

/// `bytes` random bytes from the operating system, hex encoded. No
/// randomness is an error: a token or id made of zeros would be guessable.
fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf)
        .map_err(|e| anyhow::anyhow!("no randomness from the operating system: {e}"))?;
    Ok(serval_protos::auth::hex(&buf))
}

pub fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_file_and_token_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(dir.path()).is_none());
        let info = ClusterInfo {
            control_address: "127.0.0.1:1".into(),
            http_address: String::new(),
            pid: 42,
        };
        write(dir.path(), &info).unwrap();
        let back = read(dir.path()).unwrap();
        assert_eq!(
            (back.control_address.as_str(), back.pid),
            ("127.0.0.1:1", 42)
        );
        let token = load_or_create_token(dir.path()).unwrap();
        assert_eq!(token.len(), 32);
        assert_ne!(token, "0".repeat(32));
        assert_eq!(
            load_or_create_token(dir.path()).unwrap(),
            token,
            "the token is kept across starts"
        );
        remove(dir.path());
        assert!(read(dir.path()).is_none());
    }
}
