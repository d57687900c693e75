//! Directories only this process's user may enter: replica sockets and
//! other files a peer must not swap or read live in one.
//!
//! Checked, not assumed: a directory that already exists (a predictable
//! path under /tmp, say) must belong to this user, and is made 0700 if it
//! is wider; one owned by another user is refused, since its owner could
//! replace a socket with their own.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// This process's effective user id: the owner of its own `/proc` entry.
fn own_uid() -> std::io::Result<u32> {
    Ok(std::fs::metadata("/proc/self")?.uid())
}

/// Creates `dir` (and missing parents) with mode 0700, or checks that the
/// existing one is a directory owned by this user and tightens it to 0700.
pub fn ensure(dir: &Path) -> std::io::Result<()> {
    let refuse = |why: String| {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{}: {why}", dir.display()),
        ))
    };
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            // The umask may have narrowed the mode; it can only be tighter.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        }
        Err(e) => Err(e),
        Ok(meta) if !meta.is_dir() => refuse("exists and is not a directory".into()),
        Ok(meta) => {
            let uid = own_uid()?;
            if meta.uid() != uid {
                return refuse(format!(
                    "owned by user {} instead of this process's user {uid}; \
                     another user could replace the sockets in it",
                    meta.uid()
                ));
            }
            if meta.mode() & 0o077 != 0 {
                tracing::warn!(dir = %dir.display(), mode = format!("{:o}", meta.mode() & 0o777), "tightening to 0700");
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_directory_is_private_and_a_wide_one_is_tightened() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        ensure(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        ensure(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
    }

    #[test]
    fn a_file_or_a_link_in_the_way_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        std::fs::write(&file, b"").unwrap();
        assert!(ensure(&file).is_err());
        let link = tmp.path().join("l");
        std::os::unix::fs::symlink(tmp.path(), &link).unwrap();
        assert!(ensure(&link).is_err(), "a link could point anywhere");
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
        let err = ensure(&dir).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("owned by user 65534"), "{err}");
    }
}
