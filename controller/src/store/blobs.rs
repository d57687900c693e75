//! Blobs (project packages, backends' pickled code) in the state machine's
//! redb file, beside the applied state and never inside it: the state is
//! cloned on every command and sent whole to every watcher.
//!
//! A blob is named by the sha256 of its bytes, so putting one twice is a
//! no-op and a snapshot may carry blobs applied after its log index.
//! A blob is an orphan from the moment it is stored until the state names
//! it (code, a backend's blobs, an API's package), so a blob put and never
//! named (a replica token may put code for a BatchAPI job's worker) does
//! not stay for good. A package stays while named, and once named is
//! never removed. A backend's code blob that no backend names any more
//! (after a delete or a code update) becomes an orphan again
//! ([`track_code`]). The leader's `CollectCodeBlobs` stamps an orphan, and
//! removes it [`CODE_BLOB_GRACE_MS`] later unless the state named it by
//! then or a client put it again (which unstamps it: the client is about
//! to name it, and `HasBlob` answers false for an orphan so that it does).
//! The parts a stored large blob lists go with that blob, never alone. A
//! blob larger than one raft entry should carry
//! ([`BLOB_CHUNK_BYTES`]) travels as parts, each a blob of its own, and then
//! a `PutBlobParts` that records the large blob as their concatenation:
//! openraft gives an AppendEntries one heartbeat interval (100 ms), which a
//! 32 MiB entry cannot make on a slow machine.

use std::collections::{BTreeSet, HashSet};

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
/// Blobs the state does not name: digest -> the `CollectCodeBlobs` clock
/// (Unix ms) that first saw them so, 0 until one has.
const ORPHANS: TableDefinition<&str, u64> = TableDefinition::new("code_blob_orphans");

/// How long an unnamed blob is kept: longer than a client takes from
/// uploading code or a package to naming it (`CreateBackend`,
/// `UpdateBackendCode`, `PutApi`; the head proposes a large blob's parts
/// and their record within one `PutBlob` call).
pub const CODE_BLOB_GRACE_MS: u64 = 60_000;

type Io<T> = Result<T, std::io::Error>;

fn io<E: std::fmt::Display>(e: E) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Creates the tables so readers never meet a missing one.
pub(crate) fn create_tables(txn: &WriteTransaction) -> Io<()> {
    txn.open_table(BLOBS).map_err(io)?;
    txn.open_table(PARTS).map_err(io)?;
    txn.open_table(ORPHANS).map_err(io)?;
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
    if present(txn, digest)? {
        unstamp(txn, digest)?;
    } else {
        let mut table = txn.open_table(BLOBS).map_err(io)?;
        table.insert(digest, data).map_err(io)?;
        unnamed(txn, digest)?;
    }
    Ok(Ok(()))
}

/// A blob just stored: an orphan until the state names it.
fn unnamed(txn: &WriteTransaction, digest: &str) -> Io<()> {
    let mut orphans = txn.open_table(ORPHANS).map_err(io)?;
    orphans.insert(digest, 0).map_err(io)?;
    Ok(())
}

/// A stored orphan put again: its grace starts over at the next collection.
fn unstamp(txn: &WriteTransaction, digest: &str) -> Io<()> {
    let mut orphans = txn.open_table(ORPHANS).map_err(io)?;
    if orphans.get(digest).map_err(io)?.is_some() {
        orphans.insert(digest, 0).map_err(io)?;
    }
    Ok(())
}

/// Refuses a backend command whose code blob is not stored.
pub(crate) fn check_code(
    txn: &WriteTransaction,
    backend: &str,
    digest: &str,
) -> Io<Result<(), StateError>> {
    Ok(if present(txn, digest)? {
        Ok(())
    } else {
        Err(StateError::MissingCodeBlob {
            backend: backend.to_string(),
            digest: digest.to_string(),
        })
    })
}

/// After a backend command: code blobs named `before` and not `after`
/// become orphans (unless the state still names them otherwise: [`named`]
/// runs next).
pub(crate) fn track_code(
    txn: &WriteTransaction,
    before: &BTreeSet<String>,
    after: &BTreeSet<String>,
) -> Io<()> {
    let mut orphans = txn.open_table(ORPHANS).map_err(io)?;
    for gone in before.difference(after) {
        if orphans.get(gone.as_str()).map_err(io)?.is_none() {
            orphans.insert(gone.as_str(), 0).map_err(io)?;
        }
    }
    Ok(())
}

/// Orphans that `named` (every digest the state names) holds are orphans
/// no more, nor are the parts of a named large blob (they go only with
/// it), so [`orphan_usage`] counts only what nothing names.
pub(crate) fn named(txn: &WriteTransaction, named: &BTreeSet<String>) -> Io<()> {
    let mut orphans = txn.open_table(ORPHANS).map_err(io)?;
    let parts = txn.open_table(PARTS).map_err(io)?;
    let mut found = Vec::new();
    for item in orphans.iter().map_err(io)? {
        let (k, _) = item.map_err(io)?;
        if named.contains(k.value()) {
            found.push(k.value().to_string());
        }
    }
    for digest in found {
        orphans.remove(digest.as_str()).map_err(io)?;
        if let Some(list) = parts.get(digest.as_str()).map_err(io)? {
            for part in decode::<Vec<String>>(list.value())? {
                orphans.remove(part.as_str()).map_err(io)?;
            }
        }
    }
    Ok(())
}

/// Applies `CollectCodeBlobs`: stamps new orphans with `now_ms` and removes
/// those stamped a grace ago. `keep` is every digest the state names
/// (code, packages, backends' blobs), never removed; a part is removed
/// only when no large blob left lists it.
pub(crate) fn collect(txn: &WriteTransaction, now_ms: u64, keep: &BTreeSet<String>) -> Io<()> {
    let mut due = Vec::new();
    // The parts of stored large blobs go with their blob, never alone.
    let listed = listed_parts(&txn.open_table(PARTS).map_err(io)?)?;
    {
        let mut orphans = txn.open_table(ORPHANS).map_err(io)?;
        let mut stamp = Vec::new();
        for item in orphans.iter().map_err(io)? {
            let (k, v) = item.map_err(io)?;
            let digest = k.value().to_string();
            match v.value() {
                _ if keep.contains(&digest) || listed.contains(&digest) => {
                    due.push((digest, false))
                }
                0 => stamp.push(digest),
                since if now_ms.saturating_sub(since) >= CODE_BLOB_GRACE_MS => {
                    due.push((digest, true))
                }
                _ => {}
            }
        }
        for digest in stamp {
            orphans.insert(digest.as_str(), now_ms).map_err(io)?;
        }
        for (digest, _) in &due {
            orphans.remove(digest.as_str()).map_err(io)?;
        }
    }
    let mut whole = txn.open_table(BLOBS).map_err(io)?;
    let mut parts = txn.open_table(PARTS).map_err(io)?;
    // The parts of the large blobs removed, once the others are known.
    let mut freed = Vec::new();
    for (digest, _) in due.iter().filter(|(_, remove)| *remove) {
        whole.remove(digest.as_str()).map_err(io)?;
        if let Some(list) = parts.remove(digest.as_str()).map_err(io)? {
            freed.extend(decode::<Vec<String>>(list.value())?);
        }
    }
    if !freed.is_empty() {
        let still_listed = listed_parts(&parts)?;
        for part in freed
            .iter()
            .filter(|p| !keep.contains(*p) && !still_listed.contains(*p))
        {
            whole.remove(part.as_str()).map_err(io)?;
        }
    }
    Ok(())
}

/// Every part that a large blob of `parts` (the table) lists.
fn listed_parts(parts: &impl ReadableTable<&'static str, &'static [u8]>) -> Io<HashSet<String>> {
    let mut listed = HashSet::new();
    for item in parts.iter().map_err(io)? {
        let (_, v) = item.map_err(io)?;
        listed.extend(decode::<Vec<String>>(v.value())?);
    }
    Ok(listed)
}

/// Whether some blob waits to be stamped or collected.
pub(crate) fn has_orphans(db: &Database) -> Io<bool> {
    let txn = db.begin_read().map_err(io)?;
    let orphans = txn.open_table(ORPHANS).map_err(io)?;
    let any = orphans.first().map_err(io)?.is_some();
    Ok(any)
}

/// What the blobs nothing names hold: how many there are, and the bytes
/// of those stored whole (a large blob's bytes are its parts').
pub(crate) fn orphan_usage(db: &Database) -> Io<(u64, u64)> {
    let txn = db.begin_read().map_err(io)?;
    let orphans = txn.open_table(ORPHANS).map_err(io)?;
    let whole = txn.open_table(BLOBS).map_err(io)?;
    let (mut count, mut bytes) = (0u64, 0u64);
    for item in orphans.iter().map_err(io)? {
        let (k, _) = item.map_err(io)?;
        count += 1;
        if let Some(v) = whole.get(k.value()).map_err(io)? {
            bytes += v.value().len() as u64;
        }
    }
    Ok((count, bytes))
}

/// Whether `digest` is a blob waiting to be collected.
pub(crate) fn is_orphan(db: &Database, digest: &str) -> Io<bool> {
    let txn = db.begin_read().map_err(io)?;
    let orphans = txn.open_table(ORPHANS).map_err(io)?;
    Ok(orphans.get(digest).map_err(io)?.is_some())
}

/// Applies `PutBlobParts`: every part must be stored whole already, and
/// their concatenation must hash to `digest`.
pub(crate) fn put_parts(
    txn: &WriteTransaction,
    digest: &str,
    parts: &[String],
) -> Io<Result<(), StateError>> {
    if present(txn, digest)? {
        unstamp(txn, digest)?;
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
    unnamed(txn, digest)?;
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

/// One stored blob as a snapshot carries it: its bytes, or (a large one)
/// the digests of the parts it concatenates.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum SnapshotBlob {
    Whole {
        digest: String,
        #[serde(with = "raw_bytes")]
        data: Vec<u8>,
    },
    Parts {
        digest: String,
        parts: Vec<String>,
    },
}

/// Hands every stored blob to `each`, one at a time: a snapshot writes
/// them out as they are read, and never holds them all (the store may hold
/// gigabytes of packages and code).
pub(crate) fn export(db: &Database, mut each: impl FnMut(SnapshotBlob) -> Io<()>) -> Io<()> {
    let txn = db.begin_read().map_err(io)?;
    for item in txn.open_table(BLOBS).map_err(io)?.iter().map_err(io)? {
        let (k, v) = item.map_err(io)?;
        each(SnapshotBlob::Whole {
            digest: k.value().to_string(),
            data: v.value().to_vec(),
        })?;
    }
    for item in txn.open_table(PARTS).map_err(io)?.iter().map_err(io)? {
        let (k, v) = item.map_err(io)?;
        each(SnapshotBlob::Parts {
            digest: k.value().to_string(),
            parts: decode(v.value())?,
        })?;
    }
    Ok(())
}

/// The orphan table as a snapshot carries it: digest and stamp.
pub(crate) fn export_orphans(db: &Database) -> Io<Vec<(String, u64)>> {
    let txn = db.begin_read().map_err(io)?;
    let orphans = txn.open_table(ORPHANS).map_err(io)?;
    let mut out = Vec::new();
    for item in orphans.iter().map_err(io)? {
        let (k, v) = item.map_err(io)?;
        out.push((k.value().to_string(), v.value()));
    }
    Ok(out)
}

/// Adds a snapshot's orphans (with their stamps) inside `txn`, so a head
/// that installed a snapshot collects (and counts, [`orphan_usage`]) what
/// the leader does. Its own orphans stay: one the snapshot's state names
/// is dropped by the next collection, never removed by it; one the leader
/// already removed is removed here too. An entry for a blob this head does
/// not hold is skipped.
pub(crate) fn import_orphans(txn: &WriteTransaction, list: Vec<(String, u64)>) -> Io<()> {
    let whole = txn.open_table(BLOBS).map_err(io)?;
    let parts = txn.open_table(PARTS).map_err(io)?;
    let mut orphans = txn.open_table(ORPHANS).map_err(io)?;
    for (digest, stamp) in list {
        let held = whole.get(digest.as_str()).map_err(io)?.is_some()
            || parts.get(digest.as_str()).map_err(io)?.is_some();
        if held {
            orphans.insert(digest.as_str(), stamp).map_err(io)?;
        }
    }
    Ok(())
}

/// Adds a snapshot's blobs, one at a time, inside `txn`. Nothing is
/// removed: whatever this head holds beyond the snapshot was committed
/// too.
pub(crate) fn import(txn: &WriteTransaction, blob: SnapshotBlob) -> Io<()> {
    match blob {
        SnapshotBlob::Whole { digest, data } => {
            let mut whole = txn.open_table(BLOBS).map_err(io)?;
            whole.insert(digest.as_str(), data.as_slice()).map_err(io)?;
        }
        SnapshotBlob::Parts { digest, parts } => {
            let mut table = txn.open_table(PARTS).map_err(io)?;
            table
                .insert(digest.as_str(), encode(&parts)?.as_slice())
                .map_err(io)?;
        }
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
