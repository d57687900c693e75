//! Backends' pickled code on this node, by digest: the state names a
//! backend's code only by its blob digest (`Backend.code_digest`), and the
//! first replica on this node that needs it fetches it (`GetBlob`), checks
//! it against the digest and keeps it as `<dir>/<digest>.pkl`; replicas of
//! the same code share that one fetch and that one file. The agent drops
//! the files no backend on this node names ([`CodeCache::retain`]), so the
//! cache holds at most the code of the backends placed here.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serval_protos::blob::{self, MAX_BLOB_BYTES};
use serval_protos::client::Client;
use serval_protos::control::GetBlobRequest;

/// How long fetching one backend's code may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    #[error("code_digest '{0}' is not a lowercase hex sha256")]
    BadDigest(String),
    #[error("fetching code blob {digest}: {message}")]
    Fetch { digest: String, message: String },
    #[error("code blob {digest} is over {MAX_BLOB_BYTES} bytes")]
    TooLarge { digest: String },
    #[error("code blob {claimed} arrived with sha256 {actual}")]
    Mismatch { claimed: String, actual: String },
    #[error("i/o on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

pub struct CodeCache {
    dir: PathBuf,
    /// One lock per digest being fetched, so concurrent replicas wait for
    /// one fetch; an entry lives only while its fetch runs.
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

impl CodeCache {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            fetching: Mutex::default(),
        }
    }

    fn path(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{digest}.pkl"))
    }

    /// The file holding code blob `digest`, fetched through `client` unless
    /// this node has it already.
    pub async fn get(&self, client: &Client, digest: &str) -> Result<PathBuf, CodeError> {
        // The digest becomes a file name: nothing but hex gets that far.
        if !is_digest(digest) {
            return Err(CodeError::BadDigest(digest.to_string()));
        }
        let path = self.path(digest);
        let lock = {
            let mut fetching = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
            fetching.entry(digest.to_string()).or_default().clone()
        };
        let result = {
            let _held = lock.lock().await;
            if path.exists() {
                Ok(path)
            } else {
                self.fetch(client, digest, &path).await.map(|()| path)
            }
        };
        let mut fetching = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
        // The last waiter out removes the entry (the map holds one clone).
        if Arc::strong_count(&lock) <= 2 {
            fetching.remove(digest);
        }
        result
    }

    async fn fetch(&self, client: &Client, digest: &str, path: &Path) -> Result<(), CodeError> {
        let failed = |message: String| CodeError::Fetch {
            digest: digest.to_string(),
            message,
        };
        let mut client = client.clone();
        let data = tokio::time::timeout(FETCH_TIMEOUT, async {
            let request = GetBlobRequest {
                digest: digest.to_string(),
            };
            let mut stream = client
                .get_blob(request)
                .await
                .map_err(|s| failed(s.message().to_string()))?
                .into_inner();
            let mut data = Vec::new();
            while let Some(chunk) = stream
                .message()
                .await
                .map_err(|s| failed(s.message().to_string()))?
            {
                if data.len() + chunk.data.len() > MAX_BLOB_BYTES {
                    return Err(CodeError::TooLarge {
                        digest: digest.to_string(),
                    });
                }
                data.extend_from_slice(&chunk.data);
            }
            Ok(data)
        })
        .await
        .map_err(|_| failed(format!("no answer within {FETCH_TIMEOUT:?}")))??;
        let actual = blob::digest(&data);
        if actual != digest {
            return Err(CodeError::Mismatch {
                claimed: digest.to_string(),
                actual,
            });
        }
        let io = |source| CodeError::Io {
            path: path.display().to_string(),
            source,
        };
        serval_protos::private_files::private_dir(&self.dir).map_err(io)?;
        serval_protos::private_files::write_private(path, &data).map_err(io)?;
        tracing::info!(digest, bytes = data.len(), "fetched backend code");
        Ok(())
    }

    /// Removes the code files of digests not in `wanted`.
    pub fn retain(&self, wanted: &HashSet<&str>) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(digest) = name.to_str().and_then(|n| n.strip_suffix(".pkl")) else {
                continue;
            };
            if is_digest(digest) && !wanted.contains(digest) {
                if let Err(e) = std::fs::remove_file(entry.path()) {
                    tracing::warn!(digest, error = %e, "cannot remove unused code file");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_code_no_backend_wants_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CodeCache::new(dir.path().to_path_buf());
        let (a, b) = (blob::digest(b"a"), blob::digest(b"b"));
        for d in [&a, &b] {
            std::fs::write(cache.path(d), b"x").unwrap();
        }
        std::fs::write(dir.path().join("other"), b"x").unwrap();
        cache.retain(&HashSet::from([a.as_str()]));
        assert!(cache.path(&a).exists());
        assert!(!cache.path(&b).exists());
        assert!(dir.path().join("other").exists());
    }

    #[tokio::test]
    async fn a_digest_that_is_no_file_name_is_refused_before_any_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CodeCache::new(dir.path().to_path_buf());
        let client = serval_protos::client::connect_lazy("127.0.0.1:1", "t").unwrap();
        let err = cache.get(&client, "../../etc/passwd").await.unwrap_err();
        assert!(matches!(err, CodeError::BadDigest(_)), "{err}");
    }
}
