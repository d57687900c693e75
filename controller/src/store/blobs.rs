//! Blobs (project packages) in the state machine's redb file, beside the
//! applied state and never inside it: the state is cloned on every command
//! and sent whole to every watcher.
//!
//! A blob is named by the sha256 of its bytes and never removed, so putting
//! one twice is a no-op and a snapshot may carry blobs applied after its
//! log index. A blob larger than one raft entry should carry
//! ([`BLOB_CHUNK_BYTES`]) travels as parts, each a blob of its own, and then
//! a `PutBlobParts` that records the large blob as their concatenation:
//! openraft gives an AppendEntries one heartbeat interval (100 ms), which a
//! 32 MiB entry cannot make on a slow machine.

use std::collections::HashSet;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use serval_protos::blob::{self, BLOB_CHUNK_BYTES};

use super::command::raw_bytes;
use super::log_store::{decode, encode};
use super::Command;
use crate::error::StateError;

/// Blobs stored whole: digest -> bytes.
const BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("blobs");
/// Large blobs: digest -> the digests of the blobs they concatenate.
const PARTS: TableDefinition<&str, &[u8]> = TableDefinition::new("blob_parts");

type Io<T> = Result<T, std::io::Error>;

fn io<E: std::fmt::Display>(e: E) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Creates the tables so readers never meet a missing one.
pub(crate) fn create_tables(txn: &WriteTransaction) -> Io<()> {
    txn.open_table(BLOBS).map_err(io)?;
    txn.open_table(PARTS).map_err(io)?;
    Ok(())
}

fn present(txn: &WriteTransaction, digest: &str) -> Io<bool> {
    let whole = txn.open_table(BLOBS).map_err(io)?;
    let parts = txn.open_table(PARTS).map_err(io)?;
    Ok(whole.get(digest).map_err(io)?.is_some() || parts.get(digest).map_err(io)?.is_some())
}

fn check(claimed: &str, actual: String) -> Result<(), StateError> {
    if claimed == actual {
        Ok(())
    } else {
        Err(StateError::BlobDigestMismatch {
            claimed: claimed.to_string(),
            actual,
        })
    }
}

/// Applies `PutBlob` inside the state machine's write transaction. The
/// outer error is storage failing, the inner one a refusal.
pub(crate) fn put(txn: &WriteTransaction, digest: &str, data: &[u8]) -> Io<Result<(), StateError>> {
    if let Err(e) = check(digest, blob::digest(data)) {
        return Ok(Err(e));
    }
    if !present(txn, digest)? {
        let mut table = txn.open_table(BLOBS).map_err(io)?;
        table.insert(digest, data).map_err(io)?;
    }
    Ok(Ok(()))
}

/// Applies `PutBlobParts`: every part must be stored whole already, and
/// their concatenation must hash to `digest`.
pub(crate) fn put_parts(
    txn: &WriteTransaction,
    digest: &str,
    parts: &[String],
) -> Io<Result<(), StateError>> {
    if present(txn, digest)? {
        return Ok(Ok(()));
    }
    let mut hasher = blob::Hasher::default();
    {
        let whole = txn.open_table(BLOBS).map_err(io)?;
        for part in parts {
            let Some(bytes) = whole.get(part.as_str()).map_err(io)? else {
                return Ok(Err(StateError::MissingBlobPart {
                    blob: digest.to_string(),
                    part: part.clone(),
                }));
            };
            hasher.update(bytes.value());
        }
    }
    if let Err(e) = check(digest, hasher.finish()) {
        return Ok(Err(e));
    }
    let mut table = txn.open_table(PARTS).map_err(io)?;
    table
        .insert(digest, encode(&parts)?.as_slice())
        .map_err(io)?;
    Ok(Ok(()))
}

/// The blobs stored whole that make up `digest`, in order (itself, or its
/// parts); `None` when it is not stored.
pub(crate) fn layout(db: &Database, digest: &str) -> Io<Option<Vec<String>>> {
    let txn = db.begin_read().map_err(io)?;
    if txn
        .open_table(BLOBS)
        .map_err(io)?
        .get(digest)
        .map_err(io)?
        .is_some()
    {
        return Ok(Some(vec![digest.to_string()]));
    }
    match txn.open_table(PARTS).map_err(io)?.get(digest).map_err(io)? {
        Some(v) => Ok(Some(decode(v.value())?)),
        None => Ok(None),
    }
}

/// The bytes of a blob stored whole.
pub(crate) fn read_whole(db: &Database, digest: &str) -> Io<Option<Vec<u8>>> {
    let txn = db.begin_read().map_err(io)?;
    let table = txn.open_table(BLOBS).map_err(io)?;
    let got = table.get(digest).map_err(io)?;
    Ok(got.map(|v| v.value().to_vec()))
}

#[derive(Debug, Serialize, Deserialize)]
struct WholeBlob {
    digest: String,
    #[serde(with = "raw_bytes")]
    data: Vec<u8>,
}

/// Every stored blob, as a snapshot carries them.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct BlobSet {
    whole: Vec<WholeBlob>,
    parts: Vec<(String, Vec<String>)>,
}

pub(crate) fn export(db: &Database) -> Io<BlobSet> {
    let txn = db.begin_read().map_err(io)?;
    let mut set = BlobSet::default();
    for item in txn.open_table(BLOBS).map_err(io)?.iter().map_err(io)? {
        let (k, v) = item.map_err(io)?;
        set.whole.push(WholeBlob {
            digest: k.value().to_string(),
            data: v.value().to_vec(),
        });
    }
    for item in txn.open_table(PARTS).map_err(io)?.iter().map_err(io)? {
        let (k, v) = item.map_err(io)?;
        set.parts.push((k.value().to_string(), decode(v.value())?));
    }
    Ok(set)
}

/// Adds a snapshot's blobs. Nothing is removed: whatever this head holds
/// beyond the snapshot was committed too (blobs are never deleted).
pub(crate) fn import(txn: &WriteTransaction, set: BlobSet) -> Io<()> {
    let mut whole = txn.open_table(BLOBS).map_err(io)?;
    for b in set.whole {
        whole
            .insert(b.digest.as_str(), b.data.as_slice())
            .map_err(io)?;
    }
    let mut parts = txn.open_table(PARTS).map_err(io)?;
    for (digest, list) in set.parts {
        parts
            .insert(digest.as_str(), encode(&list)?.as_slice())
            .map_err(io)?;
    }
    Ok(())
}

/// The raft commands that store `data` as blob `digest`.
#[derive(Debug)]
pub struct Upload {
    /// `PutBlob`s, each small enough for one raft entry; any order.
    pub parts: Vec<Command>,
    /// The `PutBlobParts` to propose once every part is committed; `None`
    /// when the blob fits one entry.
    pub finish: Option<Command>,
}

pub fn upload(digest: String, data: Vec<u8>) -> Upload {
    if data.len() <= BLOB_CHUNK_BYTES {
        return Upload {
            parts: vec![Command::PutBlob { digest, data }],
            finish: None,
        };
    }
    let mut seen = HashSet::new();
    let mut parts = Vec::new();
    let mut order = Vec::new();
    for chunk in data.chunks(BLOB_CHUNK_BYTES) {
        let part = blob::digest(chunk);
        // Repeated content (zero-filled regions) is stored once.
        if seen.insert(part.clone()) {
            parts.push(Command::PutBlob {
                digest: part.clone(),
                data: chunk.to_vec(),
            });
        }
        order.push(part);
    }
    Upload {
        parts,
        finish: Some(Command::PutBlobParts {
            digest,
            parts: order,
        }),
    }
}
