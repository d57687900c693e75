//! [`Command`]: every write to the controller's replicated store, as raft
//! logs it. The state machine (`super::state_machine`) applies each one:
//! most to the [`ClusterState`](crate::state::ClusterState), blobs and
//! batch jobs to their own tables (`super::blobs`, `super::jobs`).
//!
//! **Architecture Invariant:** the variants are numbered in logs and
//! snapshots already written (bincode): new ones go last, none is removed
//! or reordered.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serval_protos::control::{
    Api, Backend, BackendConfig, Endpoint, HttpOptions, Node, ReplicaReport,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    /// A node agent (re)joins: creates or revives the node.
    RegisterNode(Node),
    /// The reconciler saw no heartbeat for too long.
    MarkNodeDead {
        node_id: String,
    },
    /// A node agent reports a replica's state.
    ReportReplica(ReplicaReport),
    CreateBackend(Backend),
    UpdateBackendConfig {
        name: String,
        config: BackendConfig,
    },
    /// The autoscaler's decision for a backend with autoscaling on.
    Autoscale {
        name: String,
        num_replicas: u32,
    },
    /// New code or init args: the replicas are replaced by a rolling update.
    UpdateBackendCode {
        name: String,
        /// The stored blob holding the new code (see `Backend::code_digest`).
        code_digest: String,
        /// The blobs the new code reads (see `Backend::blobs`).
        blobs: Vec<String>,
    },
    /// `force` also takes it out of the endpoints that use it.
    DeleteBackend {
        name: String,
        force: bool,
    },
    CreateEndpoint(Endpoint),
    DeleteEndpoint {
        name: String,
    },
    SetTraffic {
        endpoint: String,
        traffic: BTreeMap<String, f64>,
    },
    /// Copies `proportion` of the endpoint's requests to `backend`; 0 removes it.
    SetShadow {
        endpoint: String,
        backend: String,
        proportion: f64,
    },
    SetHttpOptions(HttpOptions),
    SetShuttingDown(bool),
    /// A content-addressed blob: `digest` is the lowercase hex sha256 of
    /// `data`. Blobs live in the store's own table, not in this state (it is
    /// cloned per command and sent to every watcher): the state machine
    /// applies this itself (`store::blobs`). A blob larger than one raft
    /// entry should carry arrives as parts and then [`Command::PutBlobParts`].
    PutBlob {
        digest: String,
        #[serde(with = "raw_bytes")]
        data: Vec<u8>,
    },
    /// The blob `digest` is the concatenation of the stored blobs `parts`.
    PutBlobParts {
        digest: String,
        parts: Vec<String>,
    },
    /// A batch job's write: applied to the store's job tables by the state
    /// machine (`store::jobs`), like blobs, never to this state.
    Job(crate::store::jobs::JobCommand),
    /// Creates or replaces the record of a deployed API.
    PutApi(Api),
    DeleteApi {
        name: String,
    },
    /// The model ids a replica reports holding (model multiplexing).
    SetReplicaModels {
        replica_id: String,
        model_ids: Vec<String>,
    },
    /// `command`, applied at most once per `id`: every write a head
    /// proposes for a client carries a fresh id (`store::forward`), so when
    /// it retries a write whose answer was lost (the leader died after the
    /// entry was replicated) the state machine answers the retry with the
    /// first application's answer instead of applying it again.
    Once {
        id: u128,
        command: Box<Command>,
    },
    /// The leader's clock reading (Unix ms) for the collection of backend
    /// code blobs no backend names any more (`store::blobs::collect`):
    /// one first seen unnamed is stamped with it, one stamped at least
    /// `CODE_BLOB_GRACE` earlier is removed.
    CollectCodeBlobs {
        now_ms: u64,
    },
}

/// Serde for a byte field as one block (bincode writes a length and the
/// bytes) instead of serde's default sequence of `u8`: a call per byte is
/// too slow for a 1 MiB blob part, which must cross the raft transport
/// within one heartbeat interval.
pub(crate) mod raw_bytes {
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(BytesVisitor)
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        // Formats without a bytes type (JSON) write a sequence.
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::new();
            while let Some(b) = seq.next_element()? {
                out.push(b);
            }
            Ok(out)
        }
    }
}
