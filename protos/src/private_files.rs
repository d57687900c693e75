//! Files that hold secrets or cluster state (the token, raft ids, the raft
//! store, replicas' code and logs): a data dir only its owner may enter
//! (0700) and files only its owner may read (0600). A file is created with
//! its mode in one step, never written first and restricted after (a
//! reader could open it in between), and replaced atomically: a new file
//! in the same directory, fsync, rename, so a crash leaves the old content
//! or the new one, never a torn one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// A data directory: its owner only.
pub const DIR_MODE: u32 = 0o700;
/// A file in it: its owner may read and write it.
pub const FILE_MODE: u32 = 0o600;

/// Whether group or others have any permission on `path`.
pub fn open_to_others(path: &Path) -> io::Result<bool> {
    Ok(fs::metadata(path)?.permissions().mode() & 0o077 != 0)
}

/// This process's effective user id: the owner of its own `/proc` entry.
fn own_uid() -> io::Result<u32> {
    Ok(fs::metadata("/proc/self")?.uid())
}

/// Creates `dir` (and missing parents) with mode 0700. An existing `dir`
/// is checked, not assumed: it must be a directory (not a link) owned by
/// this user (a predictable path under /tmp could have been made by
/// another user, who could then swap the sockets or files in it), and one
/// that group or others may use is tightened to 0700, with a log line.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    let refuse = |why: String| {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{}: {why}", dir.display()),
        ))
    };
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(dir)?;
            tighten(dir, &fs::metadata(dir)?, DIR_MODE)
        }
        Err(e) => Err(e),
        Ok(meta) if !meta.is_dir() => refuse("exists and is not a directory".into()),
        Ok(meta) => {
            let uid = own_uid()?;
            if meta.uid() != uid {
                return refuse(format!(
                    "owned by user {} instead of this process's user {uid}; \
                     another user could replace the files in it",
                    meta.uid()
                ));
            }
            tighten(dir, &meta, DIR_MODE)
        }
    }
}

fn tighten(path: &Path, meta: &fs::Metadata, mode: u32) -> io::Result<()> {
    let was = meta.permissions().mode() & 0o777;
    if was & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
        tracing::warn!(
            path = %path.display(),
            "{} was open to other users (mode {was:o}); now {mode:o}",
            path.display()
        );
    }
    Ok(())
}

/// Opens `path` for appending, created 0600 when missing; an existing file
/// open to other users is tightened to 0600.
pub fn append_private(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(path)?;
    tighten(path, &file.metadata()?, FILE_MODE)?;
    Ok(file)
}

/// Makes sure `path` exists with mode 0600 before another library opens
/// it with its own (wider) default: created empty when missing, tightened
/// when open to other users. Its content is left as it is.
pub fn ensure_private_file(path: &Path) -> io::Result<()> {
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(path)?;
    tighten(path, &file.metadata()?, FILE_MODE)
}

/// Replaces `path` with `contents`, atomically, as a 0600 file: written to
/// a new file (O_EXCL, mode 0600) in the same directory, fsynced, renamed
/// over `path`, and the directory fsynced so the rename lasts.
pub fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "a file path is needed"))?;
    let tmp = dir.join(format!(
        ".{}.{}-{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn files_and_dirs_are_private() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b");
        private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700, "a wider existing dir is tightened");

        let file = dir.join("f");
        write_private(&file, b"one").unwrap();
        assert_eq!(
            (fs::read(&file).unwrap(), mode(&file)),
            (b"one".to_vec(), 0o600)
        );
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&file, b"two").unwrap();
        assert_eq!(
            (fs::read(&file).unwrap(), mode(&file)),
            (b"two".to_vec(), 0o600)
        );
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            1,
            "no temp file is left"
        );

        let log = dir.join("log");
        fs::write(&log, b"x").unwrap();
        fs::set_permissions(&log, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(open_to_others(&log).unwrap());
        drop(append_private(&log).unwrap());
        assert_eq!(mode(&log), 0o600);
        let db = dir.join("db");
        ensure_private_file(&db).unwrap();
        assert_eq!((fs::read(&db).unwrap().len(), mode(&db)), (0, 0o600));
    }

    #[test]
    fn a_file_or_a_link_in_the_way_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        std::fs::write(&file, b"").unwrap();
        assert!(private_dir(&file).is_err());
        let link = tmp.path().join("l");
        std::os::unix::fs::symlink(tmp.path(), &link).unwrap();
        assert!(private_dir(&link).is_err(), "a link could point anywhere");
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("theirs");
        std::fs::create_dir(&dir).unwrap();
        // Only root can give a directory away; elsewhere the case cannot be
        // made, and the check is the same comparison as above.
        if own_uid().unwrap() != 0 {
            eprintln!("skipped: changing a directory's owner needs root");
            return;
        }
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        let err = private_dir(&dir).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("owned by user 65534"), "{err}");
    }
}
