//! Cluster credentials: the cluster token and the keys derived from it.
//!
//! The cluster token is the admin credential: whoever holds it may do
//! anything. Every narrower credential is derived from it with
//! HMAC-SHA256 under a fixed purpose label ([`derive`]), so a holder of the
//! token can compute them all, and a holder of a derived key can compute
//! neither the token nor a key of another purpose. The purposes are the
//! constants below; a new one is a new label, never a reused one.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The shortest cluster token accepted: 16 characters. The tokens Serval
/// creates are 32 hex characters (128 random bits).
pub const MIN_TOKEN_LEN: usize = 16;

/// The data plane: routers (proxies, handles) prove with this key that they
/// belong to the cluster before a replica decodes a frame.
pub const PURPOSE_DATA_PLANE: &str = "serval data plane v1";
/// The node agent's credential towards its replicas (`Reconfigure`, `Logs`).
/// A replica is given only its own key, `derive(agent key, replica id)`,
/// so no replica can speak as the agent to another.
pub const PURPOSE_AGENT: &str = "serval node agent v1";
/// The salt of a project's `.env` blob (`serve deploy`): its digest then
/// changes with the values but lets no one without the token test a guess.
pub const PURPOSE_DOTENV: &str = "serval dotenv salt v1";
/// The scoped control credential every replica is given (its
/// `SERVAL_TOKEN`, see [`replica_token`]): the controller accepts it only
/// for the calls replicas make (reading the routing table, batch jobs, its
/// own backend's packages), never for deploying, deleting or shutting
/// down.
pub const PURPOSE_REPLICA: &str = "serval replica v1";
/// The credential heads present to each other's `RaftPeer` service (raft
/// messages, forwarded writes, joins). The `Control` service refuses it,
/// and `RaftPeer` refuses every other credential, the cluster token too.
pub const PURPOSE_PEER: &str = "serval raft peer v1";

type HmacSha256 = Hmac<Sha256>;

/// The 32-byte key for `purpose`, derived from `secret`.
pub fn derive(secret: &[u8], purpose: &str) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(purpose.as_bytes());
    mac.finalize().into_bytes().into()
}

/// [`derive`] as lowercase hex, for credentials that travel as text
/// (environment variables, gRPC metadata).
pub fn derive_hex(secret: &[u8], purpose: &str) -> String {
    hex(&derive(secret, purpose))
}

/// HMAC-SHA256 of `message` under `key`.
pub fn mac(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// What a replica token starts with.
const REPLICA_TOKEN_PREFIX: &str = "r1.";

/// The control credential of the replicas of `backend` (their
/// `SERVAL_TOKEN`): `r1.<mac>.<backend as hex>`, where the MAC is of the
/// backend's name under `derive(token, PURPOSE_REPLICA)`. It names its
/// backend, so the controller knows whose packages and jobs the caller may
/// reach, and a replica cannot claim another backend without the token.
/// Hex keeps any backend name valid in gRPC metadata.
pub fn replica_token(cluster_token: &str, backend: &str) -> String {
    let key = derive(cluster_token.as_bytes(), PURPOSE_REPLICA);
    format!(
        "{REPLICA_TOKEN_PREFIX}{}.{}",
        hex(&mac(&key, backend.as_bytes())),
        hex(backend.as_bytes())
    )
}

/// The backend a presented replica token proves, or `None` when it is not
/// a replica token of this cluster. The MAC is compared in constant time.
pub fn replica_token_backend(cluster_token: &str, presented: &[u8]) -> Option<String> {
    let rest = std::str::from_utf8(presented)
        .ok()?
        .strip_prefix(REPLICA_TOKEN_PREFIX)?;
    let (_mac, name) = rest.split_once('.')?;
    let backend = String::from_utf8(unhex(name)?).ok()?;
    let expected = replica_token(cluster_token, &backend);
    constant_time_eq(presented, expected.as_bytes()).then_some(backend)
}

/// Whether `a` and `b` are equal, in time that depends only on their
/// lengths (never on where they first differ).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

/// Parses lowercase or uppercase hex; `None` for anything else.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.as_bytes()
        .chunks(2)
        .map(|pair| {
            let digit = |c: u8| (c as char).to_digit(16);
            Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8)
        })
        .collect()
}

/// Why a token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the cluster token is empty")]
    Empty,
    #[error("the cluster token is {0} characters; at least {MIN_TOKEN_LEN} are needed")]
    TooShort(usize),
    #[error("the cluster token contains whitespace or control characters")]
    BadCharacters,
}

/// Checks that `token` may be a cluster token: long enough, and printable
/// without spaces (it travels in gRPC metadata and files).
pub fn validate_token(token: &str) -> Result<(), TokenError> {
    if token.is_empty() {
        return Err(TokenError::Empty);
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(TokenError::BadCharacters);
    }
    let len = token.chars().count();
    if len < MIN_TOKEN_LEN {
        return Err(TokenError::TooShort(len));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_token_proves_its_backend_and_nothing_else() {
        const TOKEN: &str = "0123456789abcdef";
        let token = replica_token(TOKEN, "api--job-1 ü");
        assert_eq!(
            replica_token_backend(TOKEN, token.as_bytes()).as_deref(),
            Some("api--job-1 ü")
        );
        assert!(token.is_ascii() && !token.contains(' '));
        // Another cluster's, a backend name swapped in, a cut MAC: refused.
        assert_eq!(
            replica_token_backend("0123456789abcdeg", token.as_bytes()),
            None
        );
        let other = replica_token(TOKEN, "other");
        let (mac, _) = token.rsplit_once('.').unwrap();
        let (_, other_name) = other.rsplit_once('.').unwrap();
        let swapped = format!("{mac}.{other_name}");
        assert_eq!(replica_token_backend(TOKEN, swapped.as_bytes()), None);
        assert_eq!(replica_token_backend(TOKEN, &token.as_bytes()[1..]), None);
        assert_eq!(replica_token_backend(TOKEN, TOKEN.as_bytes()), None);
    }

    #[test]
    fn derived_keys_differ_by_purpose_and_secret() {
        let a = derive(b"0123456789abcdef", PURPOSE_DATA_PLANE);
        assert_eq!(a, derive(b"0123456789abcdef", PURPOSE_DATA_PLANE));
        assert_ne!(a, derive(b"0123456789abcdef", PURPOSE_AGENT));
        assert_ne!(a, derive(b"0123456789abcdeg", PURPOSE_DATA_PLANE));
        // RFC 4231 test case 2: the HMAC is the standard one.
        assert_eq!(
            hex(&mac(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn hex_round_trips_and_rejects_junk() {
        assert_eq!(
            unhex(&hex(&[0, 1, 0xab, 0xff])),
            Some(vec![0, 1, 0xab, 0xff])
        );
        assert_eq!(unhex("ABff"), Some(vec![0xab, 0xff]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn tokens_are_checked() {
        assert_eq!(validate_token(""), Err(TokenError::Empty));
        assert_eq!(validate_token("short"), Err(TokenError::TooShort(5)));
        assert_eq!(
            validate_token("0123456789 abcdef"),
            Err(TokenError::BadCharacters)
        );
        assert!(validate_token("0123456789abcdef").is_ok());
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
