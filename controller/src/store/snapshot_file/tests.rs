//! Snapshot files on real redb files: blobs cross whole and in parts, and
//! a file cut short, reordered or made of noise installs nothing.

use std::io::Write;
use std::path::Path;

use proptest::prelude::*;
use redb::Database;

use super::*;

/// A store holding one small blob whole and one large blob as parts.
fn source(dir: &Path) -> Database {
    let db = Database::create(dir.join("source.redb")).expect("redb file");
    let txn = db.begin_write().expect("txn");
    blobs::create_tables(&txn).expect("tables");
    for blob in [
        SnapshotBlob::Whole {
            digest: "small".into(),
            data: b"code".to_vec(),
        },
        SnapshotBlob::Parts {
            digest: "large".into(),
            parts: vec!["p1".into(), "p2".into()],
        },
    ] {
        blobs::import(&txn, blob).expect("import");
    }
    blobs::import_orphans(&txn, vec![("small".into(), 7)]).expect("orphans");
    txn.commit().expect("commit");
    db
}

fn snapshot_bytes(dir: &Path) -> Vec<u8> {
    let mut file = write(dir, &source(dir), b"state".to_vec(), JobSet::default()).expect("write");
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).expect("read");
    bytes
}

/// Blobs by digest, a large one as its parts' names joined.
type Stored = Vec<(String, Vec<u8>)>;

/// Reads `bytes` as a snapshot file into a fresh store: the state and
/// the blobs it got.
fn install(dir: &Path, bytes: &[u8]) -> Result<(Vec<u8>, Stored), std::io::Error> {
    let mut file = tempfile::tempfile_in(dir)?;
    file.write_all(bytes)?;
    let db = Database::create(dir.join(format!("fresh-{}.redb", rand_name()))).expect("redb file");
    let txn = db.begin_write().expect("txn");
    blobs::create_tables(&txn).expect("tables");
    let got = read(&mut file, &txn);
    // Committed even when reading failed, to show what it left behind.
    txn.commit().expect("commit");
    let mut stored = Vec::new();
    blobs::export(&db, |blob| {
        stored.push(match blob {
            SnapshotBlob::Whole { digest, data } => (digest, data),
            SnapshotBlob::Parts { digest, parts } => (digest, parts.concat().into_bytes()),
        });
        Ok(())
    })
    .expect("export");
    got.map(|(state, _)| (state, stored))
}

fn rand_name() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[test]
fn a_snapshot_file_carries_the_state_and_every_blob() {
    let dir = tempfile::tempdir().expect("dir");
    let bytes = snapshot_bytes(dir.path());
    let (state, stored) = install(dir.path(), &bytes).expect("installs");
    assert_eq!(state, b"state");
    assert_eq!(
        stored,
        vec![
            ("small".to_string(), b"code".to_vec()),
            ("large".to_string(), b"p1p2".to_vec())
        ]
    );
}

#[test]
fn a_snapshot_file_carries_the_orphans_with_their_stamps() {
    let dir = tempfile::tempdir().expect("dir");
    let bytes = snapshot_bytes(dir.path());
    let mut file = tempfile::tempfile_in(dir.path()).expect("file");
    file.write_all(&bytes).expect("write");
    let db = Database::create(dir.path().join("installer.redb")).expect("redb file");
    let txn = db.begin_write().expect("txn");
    blobs::create_tables(&txn).expect("tables");
    // The installing head's own orphan stays.
    blobs::import(
        &txn,
        SnapshotBlob::Whole {
            digest: "mine".into(),
            data: b"x".to_vec(),
        },
    )
    .expect("import");
    blobs::import_orphans(&txn, vec![("mine".into(), 0)]).expect("orphans");
    read(&mut file, &txn).expect("installs");
    txn.commit().expect("commit");
    assert_eq!(
        blobs::export_orphans(&db).expect("orphans"),
        vec![("mine".to_string(), 0), ("small".to_string(), 7)]
    );
    assert_eq!(blobs::orphan_usage(&db).expect("usage"), (2, 5));
}

#[test]
fn a_snapshot_file_cut_short_is_refused_at_every_length() {
    let dir = tempfile::tempdir().expect("dir");
    let bytes = snapshot_bytes(dir.path());
    for len in 0..bytes.len() {
        let err = install(dir.path(), &bytes[..len]).expect_err("a prefix is refused");
        assert!(
            err.to_string().contains("ends before its last record"),
            "{len}: {err}"
        );
    }
}

#[test]
fn a_record_longer_than_the_bound_is_refused_without_reading_it() {
    let dir = tempfile::tempdir().expect("dir");
    let claim = (MAX_RECORD_BYTES + 1).to_le_bytes();
    let err = install(dir.path(), &claim).expect_err("refused");
    assert!(err.to_string().contains("over the bound"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Noise, or a real snapshot with bytes changed, never panics and
    /// never installs a snapshot that lacks its end.
    #[test]
    fn changed_or_random_snapshot_files_fail_cleanly(
        noise in proptest::collection::vec(any::<u8>(), 0..256),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
    ) {
        let dir = tempfile::tempdir().expect("dir");
        let _ = install(dir.path(), &noise);
        let mut bytes = snapshot_bytes(dir.path());
        for (at, value) in flips {
            let i = at % bytes.len();
            bytes[i] = value;
        }
        if let Ok((state, _)) = install(dir.path(), &bytes) {
            // A change inside a blob's bytes or the state still decodes:
            // the digests are checked where blobs are used.
            prop_assert_eq!(state.len(), b"state".len());
        }
    }
}
