//! The proxy's configuration: filled by the binary from flags and
//! environment, `validate()`d once, then handed down (no deep env reads).

use std::time::Duration;

use crate::metrics::MetricsHandle;

use crate::limits::Limits;
use crate::routing::RouterConfig;

/// Ray Serve's request body limit is generous; ours is too, but bounded so
/// one client cannot make the proxy buffer gigabytes.
pub const DEFAULT_MAX_BODY_BYTES: usize = 100 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("invalid proxy config: {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
}

#[derive(Clone)]
pub struct ProxyConfig {
    /// "host:port" the binary binds (the listener is passed to `run`).
    pub listen_addr: String,
    /// The controller's gRPC address, "host:port".
    pub control_addr: String,
    /// Cluster token sent on control RPCs, and from which the data-plane
    /// key proved to replicas is derived; empty means none (no replica can
    /// then be reached).
    pub token: String,
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
    /// Deadline of one request through the router, queueing included.
    pub request_timeout: Duration,
    /// Requests that may wait per backend when every replica is full.
    pub queue_capacity: usize,
    /// How long a request waits for an endpoint with no running replica.
    pub no_replica_timeout: Duration,
    /// How long shutdown waits for open connections to finish.
    pub shutdown_grace: Duration,
    /// Renders `/-/metrics`; `None` makes that path 404.
    pub metrics: Option<MetricsHandle>,
    /// Bounds on what clients may hold: connections, time, buffered bytes.
    pub limits: Limits,
    /// Error bodies carry internal detail (replica ids, addresses): the
    /// binary sets it from `SERVAL_DEBUG`. Off, the detail goes to the log.
    pub debug_errors: bool,
    /// Set to this proxy by `run`, so the process's `--metrics-port`
    /// listener serves the same dashboard.
    pub dashboard: Option<crate::dashboard::DashboardSlot>,
    /// What `/-/readyz` asks besides this proxy's own readiness (a head's
    /// raft: can it commit writes).
    pub readiness: crate::readiness::ReadinessSlot,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        let router = RouterConfig::default();
        Self {
            listen_addr: format!("127.0.0.1:{}", serval_protos::DEFAULT_HTTP_PORT),
            control_addr: format!("127.0.0.1:{}", serval_protos::DEFAULT_CONTROL_PORT),
            token: String::new(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            request_timeout: router.request_timeout,
            queue_capacity: router.queue_capacity,
            no_replica_timeout: router.no_replica_timeout,
            shutdown_grace: Duration::from_secs(10),
            metrics: None,
            limits: Limits::default(),
            debug_errors: false,
            dashboard: None,
            readiness: Default::default(),
        }
    }
}

impl std::fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a secret: never in logs.
        f.debug_struct("ProxyConfig")
            .field("listen_addr", &self.listen_addr)
            .field("control_addr", &self.control_addr)
            .field(
                "token",
                &if self.token.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .field("max_body_bytes", &self.max_body_bytes)
            .field("request_timeout", &self.request_timeout)
            .field("queue_capacity", &self.queue_capacity)
            .field("no_replica_timeout", &self.no_replica_timeout)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("metrics", &self.metrics.is_some())
            .field("limits", &self.limits)
            .field("debug_errors", &self.debug_errors)
            .field("dashboard", &self.dashboard)
            .finish()
    }
}

impl ProxyConfig {
    /// Checks every field once, naming the first bad one.
    pub fn validate(&self) -> Result<(), ProxyError> {
        check_host_port("listen_addr", &self.listen_addr)?;
        // Several heads may be given, comma-separated.
        for addr in self.control_addr.split(',') {
            check_host_port("control_addr", addr.trim())?;
        }
        let invalid = |field, reason: &str| {
            Err(ProxyError::InvalidConfig {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.max_body_bytes == 0 {
            return invalid("max_body_bytes", "must be greater than 0");
        }
        if self.request_timeout.is_zero() {
            return invalid("request_timeout", "must be greater than 0");
        }
        if self.no_replica_timeout.is_zero() {
            return invalid("no_replica_timeout", "must be greater than 0");
        }
        if let Some(field) = self.limits.zero_field() {
            return invalid(field, "must be greater than 0");
        }
        if self.limits.max_buffered_body_bytes < self.max_body_bytes {
            return invalid(
                "max_buffered_body_bytes",
                "must be at least max_body_bytes, or the largest allowed bodies could never be read",
            );
        }
        Ok(())
    }

    pub fn router_config(&self) -> RouterConfig {
        RouterConfig {
            request_timeout: self.request_timeout,
            queue_capacity: self.queue_capacity,
            no_replica_timeout: self.no_replica_timeout,
            data_key: (!self.token.is_empty())
                .then(|| serval_protos::handshake::Key::data_plane(&self.token)),
        }
    }
}

fn check_host_port(field: &'static str, value: &str) -> Result<(), ProxyError> {
    let bad = |reason: String| Err(ProxyError::InvalidConfig { field, reason });
    let Some((host, port)) = value.rsplit_once(':') else {
        return bad(format!("{value:?} is not \"host:port\""));
    };
    if host.is_empty() {
        return bad(format!("{value:?} has no host"));
    }
    if port.parse::<u16>().is_err() {
        return bad(format!("{value:?} has no valid port"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_names_the_field() {
        assert!(ProxyConfig::default().validate().is_ok());
        let cases: Vec<(ProxyConfig, &str)> = vec![
            (
                ProxyConfig {
                    listen_addr: "nohost".into(),
                    ..Default::default()
                },
                "listen_addr",
            ),
            (
                ProxyConfig {
                    control_addr: "h:notaport".into(),
                    ..Default::default()
                },
                "control_addr",
            ),
            (
                ProxyConfig {
                    max_body_bytes: 0,
                    ..Default::default()
                },
                "max_body_bytes",
            ),
            (
                ProxyConfig {
                    request_timeout: Duration::ZERO,
                    ..Default::default()
                },
                "request_timeout",
            ),
            (
                ProxyConfig {
                    limits: Limits {
                        header_read_timeout: Duration::ZERO,
                        ..Default::default()
                    },
                    ..Default::default()
                },
                "header_read_timeout",
            ),
            (
                ProxyConfig {
                    max_body_bytes: 10,
                    limits: Limits {
                        max_buffered_body_bytes: 5,
                        ..Default::default()
                    },
                    ..Default::default()
                },
                "max_buffered_body_bytes",
            ),
        ];
        for (config, field) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }

    #[test]
    fn debug_hides_the_token() {
        let c = ProxyConfig {
            token: "s3cret".into(),
            ..Default::default()
        };
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
