//! What a snapshot carries to another head (the encoded state, the job
//! tables, every blob), in a file rather than in memory. The store may hold
//! gigabytes of packages and code: built in memory, each snapshot (one
//! every 500 log entries) held every blob twice over, and a head's memory
//! grew by twice the blobs it stored.
//!
//! The file is unnamed (`O_TMPFILE`-like, gone when closed) in the store's
//! own folder, written and read one record at a time: a record is its
//! length (8 bytes, little-endian) then its bincode, a [`Record::Head`]
//! first, the blobs, the orphan table ([`Record::Orphans`]) and a
//! [`Record::End`] last, so a file cut short is refused instead of
//! installed in part.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use redb::{Database, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::blobs::{self, SnapshotBlob};
use super::command::raw_bytes;
use super::jobs::JobSet;
use super::log_store::encode;

/// The largest record a snapshot file may hold. A blob record is at most
/// one raft entry's worth ([`serval_protos::blob::BLOB_CHUNK_BYTES`]); the
/// head record holds the whole cluster state and the job tables, which the
/// controller's limits keep far below this. The bound is there for a
/// snapshot received from a peer: it never makes this head allocate more.
const MAX_RECORD_BYTES: u64 = 512 << 20;

#[derive(Debug, Serialize, Deserialize)]
enum Record {
    Head {
        #[serde(with = "raw_bytes")]
        state: Vec<u8>,
        jobs: JobSet,
    },
    Blob(SnapshotBlob),
    /// The blobs nothing names, with their collection stamps: the heads
    /// that install it collect and count them as the leader does.
    Orphans(Vec<(String, u64)>),
    End,
}

type Io<T> = Result<T, std::io::Error>;

fn write_record(out: &mut impl Write, record: &Record) -> Io<()> {
    let bytes = encode(record)?;
    out.write_all(&(bytes.len() as u64).to_le_bytes())?;
    out.write_all(&bytes)
}

fn read_record(input: &mut impl Read) -> Io<Record> {
    let mut len = [0u8; 8];
    input.read_exact(&mut len).map_err(cut_short)?;
    let len = u64::from_le_bytes(len);
    if len > MAX_RECORD_BYTES {
        return Err(std::io::Error::other(format!(
            "snapshot record of {len} bytes, over the bound of {MAX_RECORD_BYTES}"
        )));
    }
    // Read as it comes rather than allocated at the length it claims.
    let mut bytes = Vec::new();
    input.by_ref().take(len).read_to_end(&mut bytes)?;
    if bytes.len() as u64 != len {
        return Err(cut_short(std::io::ErrorKind::UnexpectedEof.into()));
    }
    // Exactly its length: a record followed by stray bytes is not one.
    let (record, used) = bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
        .map_err(std::io::Error::other)?;
    if used != bytes.len() {
        return Err(std::io::Error::other(
            "a snapshot record longer than its contents",
        ));
    }
    Ok(record)
}

fn cut_short(e: std::io::Error) -> std::io::Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        std::io::Error::other("the snapshot ends before its last record")
    } else {
        e
    }
}

#[cfg(test)]
mod tests;

/// Writes a snapshot of `state` (encoded) and `jobs` with every blob of
/// `db` to a new unnamed file in `dir`, read back from its start.
pub(crate) fn write(dir: &Path, db: &Database, state: Vec<u8>, jobs: JobSet) -> Io<File> {
    let mut out = BufWriter::new(tempfile::tempfile_in(dir)?);
    write_record(&mut out, &Record::Head { state, jobs })?;
    blobs::export(db, |blob| write_record(&mut out, &Record::Blob(blob)))?;
    write_record(&mut out, &Record::Orphans(blobs::export_orphans(db)?))?;
    write_record(&mut out, &Record::End)?;
    let mut file = out.into_inner().map_err(|e| e.into_error())?;
    file.seek(SeekFrom::Start(0))?;
    Ok(file)
}

/// Reads a snapshot file from its start: its blobs go into `txn` as they
/// come; returns the encoded state and the job tables.
pub(crate) fn read(file: &mut File, txn: &WriteTransaction) -> Io<(Vec<u8>, JobSet)> {
    file.seek(SeekFrom::Start(0))?;
    let mut input = BufReader::new(file);
    let Record::Head { state, jobs } = read_record(&mut input)? else {
        return Err(std::io::Error::other(
            "a snapshot must start with its state",
        ));
    };
    loop {
        match read_record(&mut input)? {
            Record::Blob(blob) => blobs::import(txn, blob)?,
            Record::Orphans(list) => blobs::import_orphans(txn, list)?,
            Record::End => return Ok((state, jobs)),
            Record::Head { .. } => {
                return Err(std::io::Error::other("a snapshot holds one state"));
            }
        }
    }
}
