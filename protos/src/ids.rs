//! Ids that more than one crate builds or reads.

use std::fmt;
use std::str::FromStr;

/// A replica's id, `<backend>#<seq>`: its backend's name and a sequence
/// number the controller never gives out twice. A backend name may itself
/// hold '#' (an application's `app#Deployment`): the number follows the
/// last one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReplicaId {
    backend: String,
    seq: u64,
}

/// A string that is not `<backend>#<number>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("replica id {0:?} is not <backend>#<number>")]
pub struct BadReplicaId(pub String);

impl ReplicaId {
    pub fn new(backend: impl Into<String>, seq: u64) -> Self {
        Self {
            backend: backend.into(),
            seq,
        }
    }

    pub fn backend(&self) -> &str {
        &self.backend
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.backend, self.seq)
    }
}

impl FromStr for ReplicaId {
    type Err = BadReplicaId;

    fn from_str(s: &str) -> Result<Self, BadReplicaId> {
        let bad = || BadReplicaId(s.to_owned());
        let (backend, seq) = s.rsplit_once('#').ok_or_else(bad)?;
        // Digits only: `u64::from_str` would also take a leading '+'.
        if backend.is_empty() || seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        Ok(Self::new(backend, seq.parse().map_err(|_| bad())?))
    }
}

impl From<ReplicaId> for String {
    fn from(id: ReplicaId) -> String {
        id.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_ids_round_trip_and_take_the_last_hash() {
        let id: ReplicaId = "shop#Model#12".parse().unwrap();
        assert_eq!((id.backend(), id.seq()), ("shop#Model", 12));
        assert_eq!(id.to_string(), "shop#Model#12");
        assert_eq!(ReplicaId::new("b", 0).to_string(), "b#0");
        for bad in [
            "b",
            "b#",
            "#3",
            "b#x",
            "b#+1",
            "b#-1",
            "b#99999999999999999999",
        ] {
            assert_eq!(
                bad.parse::<ReplicaId>(),
                Err(BadReplicaId(bad.into())),
                "{bad}"
            );
        }
    }
}
