//! The data plane's handshake: before a replica decodes a single frame,
//! the peer that connected proves it belongs to the cluster, and the
//! replica proves it holds the same key.
//!
//! A challenge-response over a key derived from the cluster token
//! ([`crate::auth`]), in three fixed-size messages:
//!
//! ```text
//! replica -> peer  hello  "SRVL" version nonce_r[32]                        37 bytes
//! peer -> replica  proof  "SRVL" version role nonce_p[32] mac_p[32]         70 bytes
//! replica -> peer  proof  mac_r[32]                                         32 bytes
//! mac_p = HMAC(key(role), "serval peer"    | version | role | nonce_r | nonce_p)
//! mac_r = HMAC(key(role), "serval replica" | version | role | nonce_r | nonce_p)
//! ```
//!
//! Fresh nonces on both sides, so neither proof can be replayed on another
//! connection. A peer that fails is closed with nothing decoded and nothing
//! allocated beyond these 107 bytes; a replica that fails (a socket file
//! squatted by another process, a port reused) is refused by the peer. The
//! `role` says which key the peer proves: [`Role::Router`] (the cluster's
//! data-plane key: proxies and handles send requests) or [`Role::Agent`]
//! (the replica's own agent key: its node agent, or an admin, may also
//! reconfigure it and read its log).
//!
//! Why not TLS alone: the handshake runs once per long-lived connection and
//! adds nothing per request; it needs no certificates on replicas, and it
//! proves cluster membership, which a server certificate does not. It does
//! not encrypt: with `--tls-cert/--tls-key` on a node its replicas' TCP
//! connections are TLS and this handshake runs inside (`crate::tls`).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::auth::{self, constant_time_eq};

const MAGIC: &[u8; 4] = b"SRVL";
const VERSION: u8 = 1;
const NONCE_LEN: usize = 32;
const MAC_LEN: usize = 32;
const HELLO_LEN: usize = 4 + 1 + NONCE_LEN;
const PROOF_LEN: usize = 4 + 1 + 1 + NONCE_LEN + MAC_LEN;

/// Environment variables a node agent gives each replica process: the
/// cluster's data-plane key (its frame server checks routers with it, and
/// handles in it route with it) and its own agent key, as hex.
pub const DATA_KEY_ENV: &str = "SERVAL_DATA_KEY";
pub const AGENT_KEY_ENV: &str = "SERVAL_AGENT_KEY";

/// Header a proxy adds to each gRPC call it forwards to a replica's grpcio
/// server (gRPC APIs), with [`grpc_forward_credential`]: the server refuses
/// calls without it before their message is decoded. It is the same on
/// every call, so unlike the handshake it can be replayed by whoever sees
/// the traffic: run the data plane on a private network (SECURITY.md).
pub const GRPC_AUTH_HEADER: &str = "x-serval-data-auth";

/// The value of [`GRPC_AUTH_HEADER`]: HMAC-SHA256 of a fixed label under
/// the data-plane key, as hex (`serval.cortex.grpc_api` computes the same).
pub fn grpc_forward_credential(data: &Key) -> String {
    auth::hex(&auth::mac(&data.0, b"serval grpc forward v1"))
}

/// How long either side waits for the other's next handshake message.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A 32-byte key derived from the cluster token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Key(pub [u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

impl Key {
    /// The cluster's data-plane key: what every router proves.
    pub fn data_plane(token: &str) -> Self {
        Key(auth::derive(token.as_bytes(), auth::PURPOSE_DATA_PLANE))
    }

    /// The node agents' key, from which each replica's agent key is derived.
    pub fn agents(token: &str) -> Self {
        Key(auth::derive(token.as_bytes(), auth::PURPOSE_AGENT))
    }

    /// The agent key of one replica: only its agent (and an admin) can
    /// compute it, and it tells nothing about another replica's.
    pub fn replica_agent(agents: &Key, replica_id: &str) -> Self {
        Key(auth::mac(&agents.0, replica_id.as_bytes()))
    }

    pub fn to_hex(self) -> String {
        auth::hex(&self.0)
    }

    pub fn from_hex(text: &str) -> Option<Self> {
        auth::unhex(text.trim())?.try_into().ok().map(Key)
    }
}

/// What a peer proves it may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sends requests (HTTP, handle calls, pings): proxies and handles.
    Router,
    /// Also reconfigures the replica and reads its log: its node agent.
    Agent,
}

impl Role {
    fn byte(self) -> u8 {
        match self {
            Role::Router => 1,
            Role::Agent => 2,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Role::Router),
            2 => Some(Role::Agent),
            _ => None,
        }
    }
}

/// The keys a replica accepts: the cluster's data-plane key and its own
/// agent key.
#[derive(Debug, Clone, Copy)]
pub struct ReplicaKeys {
    pub data: Key,
    pub agent: Key,
}

impl ReplicaKeys {
    fn key(&self, role: Role) -> &Key {
        match role {
            Role::Router => &self.data,
            Role::Agent => &self.agent,
        }
    }
}

/// What a peer presents: a role and the key of that role.
#[derive(Debug, Clone, Copy)]
pub struct Credential {
    pub role: Role,
    pub key: Key,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("handshake i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("no handshake message within {HANDSHAKE_TIMEOUT:?}")]
    Timeout,
    #[error("the peer does not speak Serval's data-plane protocol (version {VERSION})")]
    NotServal,
    #[error("the peer asked for an unknown role")]
    UnknownRole,
    #[error("the peer's proof is wrong: it does not hold the cluster's key")]
    BadProof,
    #[error("the replica refused this connection's credential (a wrong cluster token?)")]
    Refused,
    #[error("the replica's proof is wrong: it is not a replica of this cluster")]
    NotOurReplica,
}

fn random_nonce() -> [u8; NONCE_LEN] {
    rand::random()
}

fn proof(key: &Key, label: &[u8], role: Role, nonce_r: &[u8], nonce_p: &[u8]) -> [u8; MAC_LEN] {
    let mut message = Vec::with_capacity(label.len() + 2 + 2 * NONCE_LEN);
    message.extend_from_slice(label);
    message.push(VERSION);
    message.push(role.byte());
    message.extend_from_slice(nonce_r);
    message.extend_from_slice(nonce_p);
    auth::mac(&key.0, &message)
}

async fn read_exact_timeout<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut [u8],
) -> Result<(), HandshakeError> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.read_exact(buf)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(HandshakeError::Timeout),
    }
}

async fn write_timeout<S: AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
) -> Result<(), HandshakeError> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(HandshakeError::Timeout),
    }
}

/// The replica's side: challenges the peer that connected and returns the
/// role it proved. On `Err` the caller closes the connection; nothing the
/// peer sent has been interpreted beyond the fixed-size proof.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    keys: &ReplicaKeys,
) -> Result<Role, HandshakeError> {
    let nonce_r = random_nonce();
    let mut hello = [0u8; HELLO_LEN];
    hello[..4].copy_from_slice(MAGIC);
    hello[4] = VERSION;
    hello[5..].copy_from_slice(&nonce_r);
    write_timeout(stream, &hello).await?;

    let mut answer = [0u8; PROOF_LEN];
    read_exact_timeout(stream, &mut answer).await?;
    if &answer[..4] != MAGIC || answer[4] != VERSION {
        return Err(HandshakeError::NotServal);
    }
    let role = Role::from_byte(answer[5]).ok_or(HandshakeError::UnknownRole)?;
    let nonce_p = &answer[6..6 + NONCE_LEN];
    let mac_p = &answer[6 + NONCE_LEN..];
    let key = keys.key(role);
    if !constant_time_eq(mac_p, &proof(key, b"serval peer", role, &nonce_r, nonce_p)) {
        return Err(HandshakeError::BadProof);
    }
    write_timeout(
        stream,
        &proof(key, b"serval replica", role, &nonce_r, nonce_p),
    )
    .await?;
    Ok(role)
}

/// The connecting side: answers the replica's challenge with `credential`
/// and checks the replica's own proof.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    credential: &Credential,
) -> Result<(), HandshakeError> {
    let mut hello = [0u8; HELLO_LEN];
    read_exact_timeout(stream, &mut hello).await?;
    if &hello[..4] != MAGIC || hello[4] != VERSION {
        return Err(HandshakeError::NotServal);
    }
    let nonce_r = &hello[5..];
    let nonce_p = random_nonce();
    let role = credential.role;
    let mut answer = [0u8; PROOF_LEN];
    answer[..4].copy_from_slice(MAGIC);
    answer[4] = VERSION;
    answer[5] = role.byte();
    answer[6..6 + NONCE_LEN].copy_from_slice(&nonce_p);
    answer[6 + NONCE_LEN..].copy_from_slice(&proof(
        &credential.key,
        b"serval peer",
        role,
        nonce_r,
        &nonce_p,
    ));
    write_timeout(stream, &answer).await?;
    let mut mac_r = [0u8; MAC_LEN];
    match read_exact_timeout(stream, &mut mac_r).await {
        Ok(()) => {}
        // The replica closes without a word when the proof is wrong.
        Err(HandshakeError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(HandshakeError::Refused)
        }
        Err(e) => return Err(e),
    }
    let expected = proof(&credential.key, b"serval replica", role, nonce_r, &nonce_p);
    if !constant_time_eq(&mac_r, &expected) {
        return Err(HandshakeError::NotOurReplica);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> ReplicaKeys {
        let token = "0123456789abcdef0123";
        ReplicaKeys {
            data: Key::data_plane(token),
            agent: Key::replica_agent(&Key::agents(token), "r1"),
        }
    }

    async fn pair(
        credential: Credential,
        server_keys: ReplicaKeys,
    ) -> (Result<Role, HandshakeError>, Result<(), HandshakeError>) {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let server = tokio::spawn(async move {
            let r = accept(&mut a, &server_keys).await;
            drop(a);
            r
        });
        let client = connect(&mut b, &credential).await;
        (server.await.unwrap(), client)
    }

    #[tokio::test]
    async fn the_right_keys_pass_with_their_role() {
        let k = keys();
        for (role, key) in [(Role::Router, k.data), (Role::Agent, k.agent)] {
            let (server, client) = pair(Credential { role, key }, k).await;
            assert_eq!(server.unwrap(), role);
            client.unwrap();
        }
    }

    #[tokio::test]
    async fn a_wrong_key_is_refused_on_both_sides() {
        let k = keys();
        let other = Key::data_plane("another-cluster-token");
        let (server, client) = pair(
            Credential {
                role: Role::Router,
                key: other,
            },
            k,
        )
        .await;
        assert!(
            matches!(server, Err(HandshakeError::BadProof)),
            "{server:?}"
        );
        assert!(matches!(client, Err(HandshakeError::Refused)), "{client:?}");
        // The data-plane key does not pass as the agent's.
        let (server, _) = pair(
            Credential {
                role: Role::Agent,
                key: k.data,
            },
            k,
        )
        .await;
        assert!(matches!(server, Err(HandshakeError::BadProof)));
        // Another replica's agent key is not this replica's.
        let (server, _) = pair(
            Credential {
                role: Role::Agent,
                key: Key::replica_agent(&Key::agents("0123456789abcdef0123"), "r2"),
            },
            k,
        )
        .await;
        assert!(matches!(server, Err(HandshakeError::BadProof)));
    }

    #[tokio::test]
    async fn a_replica_without_the_key_is_not_trusted() {
        let k = keys();
        let impostor = ReplicaKeys {
            data: Key::data_plane("another-cluster-token"),
            agent: k.agent,
        };
        let (mut a, mut b) = tokio::io::duplex(1024);
        // The impostor accepts anything: it skips the check and answers
        // with a proof made with its own key.
        let server = tokio::spawn(async move {
            let mut hello = [0u8; HELLO_LEN];
            hello[..4].copy_from_slice(MAGIC);
            hello[4] = VERSION;
            a.write_all(&hello).await.unwrap();
            let mut answer = [0u8; PROOF_LEN];
            a.read_exact(&mut answer).await.unwrap();
            let mac = proof(
                &impostor.data,
                b"serval replica",
                Role::Router,
                &hello[5..],
                &answer[6..6 + NONCE_LEN],
            );
            a.write_all(&mac).await.unwrap();
        });
        let client = connect(
            &mut b,
            &Credential {
                role: Role::Router,
                key: k.data,
            },
        )
        .await;
        assert!(
            matches!(client, Err(HandshakeError::NotOurReplica)),
            "{client:?}"
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn frames_sent_instead_of_a_proof_are_not_read_as_frames() {
        let k = keys();
        let (mut a, mut b) = tokio::io::duplex(1024);
        let server = tokio::spawn(async move { accept(&mut a, &k).await });
        let mut hello = [0u8; HELLO_LEN];
        b.read_exact(&mut hello).await.unwrap();
        // A request frame, as a peer that skips the handshake would send it.
        let frame = crate::frame::encode(
            1,
            &crate::frame::Request {
                method_name: None,
                payload: crate::frame::Payload::Ping,
            },
        )
        .unwrap();
        let mut padded = frame.to_vec();
        padded.resize(PROOF_LEN, 0);
        b.write_all(&padded).await.unwrap();
        assert!(matches!(
            server.await.unwrap(),
            Err(HandshakeError::NotServal)
        ));
    }

    #[test]
    fn keys_round_trip_as_hex_and_are_redacted_in_debug() {
        let k = Key::data_plane("0123456789abcdef0123");
        assert_eq!(Key::from_hex(&k.to_hex()), Some(k));
        assert_eq!(Key::from_hex("abcd"), None);
        assert_eq!(format!("{k:?}"), "Key(<redacted>)");
    }
}
