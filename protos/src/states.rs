//! The states of replicas, backends and batch jobs.
//!
//! On the wire (`Replica.state`, `Backend.state`, `Job.status`) and in JSON
//! they stay the plain strings `serve status`, the dashboard and the Python
//! SDK read; these enums are the one list of them. A state compares with
//! the string field it travels in (`replica.state == ReplicaState::Running`)
//! and becomes one with `.into()`.

use std::fmt;
use std::str::FromStr;

/// A state string that names no state of its kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?}")]
pub struct UnknownState {
    pub kind: &'static str,
    pub value: String,
}

macro_rules! states {
    ($(#[$doc:meta])* $name:ident, $kind:literal {
        $($(#[$vdoc:meta])* $variant:ident = $text:literal,)+
    }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every state, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The state as it travels.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl FromStr for $name {
            type Err = UnknownState;

            fn from_str(s: &str) -> Result<Self, UnknownState> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownState {
                        kind: $kind,
                        value: s.to_owned(),
                    }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl From<$name> for String {
            fn from(state: $name) -> String {
                state.as_str().to_owned()
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, state: &$name) -> bool {
                self == state.as_str()
            }
        }

        impl PartialEq<$name> for str {
            fn eq(&self, state: &$name) -> bool {
                self == state.as_str()
            }
        }

        impl PartialEq<$name> for &str {
            fn eq(&self, state: &$name) -> bool {
                *self == state.as_str()
            }
        }
    };
}

states! {
    /// A replica's state (`Replica.state`, `ReplicaReport.state`).
    ReplicaState, "replica state" {
        /// No node has room for it yet.
        Pending = "pending",
        /// Placed on a node; its process is starting (user code loading).
        Starting = "starting",
        Running = "running",
        /// Its process failed; the supervisor starts it again after a backoff.
        Failed = "failed",
        /// Being stopped (shown by Ray Serve's statuses as STOPPING).
        Stopped = "stopped",
    }
}

states! {
    /// A backend's state, derived from its replicas (`Backend.state`).
    BackendState, "backend state" {
        /// No replica of its current version runs yet.
        Deploying = "deploying",
        Running = "running",
        /// Its replicas failed; `Backend.error` says why.
        Failed = "failed",
    }
}

states! {
    /// A batch job's status (`Job.status`).
    JobStatus, "job status" {
        /// Its batches are being submitted.
        Enqueuing = "enqueuing",
        Running = "running",
        Succeeded = "succeeded",
        FailedWhileEnqueuing = "failed while enqueuing",
        CompletedWithFailures = "completed with failures",
        WorkerError = "worker error",
        OutOfMemory = "out of memory",
        TimedOut = "timed out",
        Stopped = "stopped",
    }
}

impl JobStatus {
    /// Whether a job in this status has ended (every status but
    /// enqueuing and running).
    pub const fn is_ended(self) -> bool {
        !matches!(self, JobStatus::Enqueuing | JobStatus::Running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_round_trips_through_its_string() {
        for s in ReplicaState::ALL {
            assert_eq!(s.as_str().parse::<ReplicaState>(), Ok(*s));
        }
        for s in BackendState::ALL {
            assert_eq!(s.as_str().parse::<BackendState>(), Ok(*s));
        }
        for s in JobStatus::ALL {
            assert_eq!(s.as_str().parse::<JobStatus>(), Ok(*s));
        }
        let e = "bogus".parse::<ReplicaState>().unwrap_err();
        assert_eq!(e.to_string(), "unknown replica state \"bogus\"");
    }

    #[test]
    fn states_compare_with_the_strings_they_travel_in() {
        let field: String = ReplicaState::Running.into();
        assert_eq!(field, "running");
        assert!(field == ReplicaState::Running);
        assert!(field != ReplicaState::Failed);
        assert!("failed while enqueuing" == JobStatus::FailedWhileEnqueuing);
        assert_eq!(
            JobStatus::ALL
                .iter()
                .filter(|s| s.is_ended())
                .map(|s| s.as_str())
                .collect::<Vec<_>>(),
            [
                "succeeded",
                "failed while enqueuing",
                "completed with failures",
                "worker error",
                "out of memory",
                "timed out",
                "stopped",
            ]
        );
    }
}
