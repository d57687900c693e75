//! How CLI commands find a running cluster: the head writes
//! `<data-dir>/cluster.json` (addresses and pid) and `<data-dir>/token`.
//! `--address` and `--token` (or SERVAL_ADDRESS / SERVAL_TOKEN) override them.

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
    let tmp = data_dir.join(format!("{CLUSTER_FILE}.tmp"));
    std::fs::write(&tmp, body.to_string()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
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

/// The cluster token of a head's data dir, created on first start.
pub fn load_or_create_token(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join(TOKEN_FILE);
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_string();
        if !t.is_empty() {
            return Ok(t);
        }
    }
    store_token(data_dir, &uuid_like())
}

/// Writes `token` to the data dir, readable by its owner only.
pub fn store_token(data_dir: &Path, token: &str) -> anyhow::Result<String> {
    let path = data_dir.join(TOKEN_FILE);
    std::fs::write(&path, token).with_context(|| format!("writing {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(token.to_string())
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
        let hex = uuid_like();
        u64::from_str_radix(&hex[..15], 16).unwrap_or(1).max(2)
    };
    std::fs::write(&path, id.to_string()).with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

pub fn read_token(data_dir: &Path) -> Option<String> {
    std::fs::read_to_string(data_dir.join(TOKEN_FILE))
        .ok()
        .map(|t| t.trim().to_string())
}

fn uuid_like() -> String {
    // 128 random bits from the kernel, hex encoded.
    let mut bytes = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut bytes);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
        assert_eq!(
            load_or_create_token(dir.path()).unwrap(),
            token,
            "the token is kept across starts"
        );
        remove(dir.path());
        assert!(read(dir.path()).is_none());
    }
}
