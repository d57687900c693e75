//! Blobs: content-addressed bytes (project packages) that the controller
//! keeps in its raft-replicated store. One definition of the digest and the
//! limits, shared by the controller and its clients.

use sha2::{Digest, Sha256};

/// The largest blob `PutBlob` accepts: a 32 MiB package plus room to spare.
pub const MAX_BLOB_BYTES: usize = 48 * 1024 * 1024;

/// `GetBlob` streams blobs in chunks of this size, and a large blob travels
/// through raft as parts of this size.
pub const BLOB_CHUNK_BYTES: usize = 1024 * 1024;

/// The digest naming `data`: its sha256 in lowercase hex.
pub fn digest(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// A streaming form of [`digest`], for data that arrives in pieces.
#[derive(Default)]
pub struct Hasher(Sha256);

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finish(self) -> String {
        hex(&self.0.finalize())
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_lowercase_hex_sha256() {
        assert_eq!(
            digest(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut h = Hasher::default();
        h.update(b"a");
        h.update(b"bc");
        assert_eq!(h.finish(), digest(b"abc"));
    }
}
