//! A backend's configuration (`control::BackendConfig`): its defaults and
//! its one validation, which the SDK runs before it sends a config and the
//! controller's state machine runs on every command that carries one.

use crate::control::{AutoscalingConfig, BackendConfig};

/// Ray Serve 1.x's `max_concurrent_queries` for a backend that sets none
/// (0): what the controller stores and what a router assumes of a config
/// without it.
pub const DEFAULT_MAX_CONCURRENT_QUERIES: u32 = 100;
/// Ray Serve's `experimental_graceful_shutdown_timeout_s` when unset.
pub const DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S: f64 = 20.0;

/// A field of a backend config that is not valid, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

fn invalid(field: &str, reason: &str) -> ConfigError {
    ConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

impl BackendConfig {
    /// Fills Ray's defaults (fields left at zero) and checks every field,
    /// naming the bad one. The controller's state machine applies only
    /// what this accepts; the SDK calls it before sending.
    pub fn validate(self) -> Result<BackendConfig, ConfigError> {
        let mut c = self;
        if let Some(a) = &c.autoscaling {
            a.validate()?;
            // The autoscaler owns num_replicas from here; start inside its range.
            c.num_replicas = c.num_replicas.clamp(a.min_replicas, a.max_replicas);
        } else if c.num_replicas == 0 {
            return Err(invalid("num_replicas", "must be at least 1"));
        }
        if c.max_concurrent_queries == 0 {
            c.max_concurrent_queries = DEFAULT_MAX_CONCURRENT_QUERIES;
        }
        if !(c.num_cpus >= 0.0 && c.num_cpus.is_finite()) {
            return Err(invalid("num_cpus", "must be a non-negative number"));
        }
        if !(c.num_gpus >= 0.0 && c.num_gpus.is_finite()) {
            return Err(invalid("num_gpus", "must be a non-negative number"));
        }
        if c.num_gpus > 1.0 && c.num_gpus.fract() != 0.0 {
            return Err(invalid(
                "num_gpus",
                "above 1 it must be a whole number of GPUs",
            ));
        }
        if !(c.batch_wait_timeout >= 0.0 && c.batch_wait_timeout.is_finite()) {
            return Err(invalid(
                "batch_wait_timeout",
                "must be a non-negative number of seconds",
            ));
        }
        for (field, text) in [
            ("max_surge", &c.max_surge),
            ("max_unavailable", &c.max_unavailable),
        ] {
            let ok = text.is_empty()
                || text.trim().parse::<u32>().is_ok()
                || text
                    .trim()
                    .strip_suffix('%')
                    .and_then(|p| p.trim().parse::<u32>().ok())
                    .is_some_and(|p| p <= 100);
            if !ok {
                return Err(invalid(
                    field,
                    &format!("must be a count or a percentage such as 25%, got {text:?}"),
                ));
            }
        }
        if !c.user_config_json.is_empty() {
            serde_json::from_str::<serde_json::Value>(&c.user_config_json)
                .map_err(|e| invalid("user_config", &format!("not JSON: {e}")))?;
        }
        Ok(c)
    }
}

impl AutoscalingConfig {
    /// Checks Cortex's autoscaling knobs, naming the bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let a = self;
        let field = |name: &str| format!("autoscaling.{name}");
        if a.max_replicas == 0 {
            return Err(invalid(&field("max_replicas"), "must be at least 1"));
        }
        if a.min_replicas > a.max_replicas {
            return Err(invalid(
                &field("min_replicas"),
                "must not exceed max_replicas",
            ));
        }
        let positive = [
            ("target_replica_concurrency", a.target_replica_concurrency),
            ("window", a.window),
        ];
        for (name, v) in positive {
            if !(v > 0.0 && v.is_finite()) {
                return Err(invalid(&field(name), "must be a positive number"));
            }
        }
        let non_negative = [
            (
                "upscale_stabilization_period",
                a.upscale_stabilization_period,
            ),
            (
                "downscale_stabilization_period",
                a.downscale_stabilization_period,
            ),
            ("upscale_tolerance", a.upscale_tolerance),
            ("downscale_tolerance", a.downscale_tolerance),
        ];
        for (name, v) in non_negative {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(invalid(&field(name), "must be a non-negative number"));
            }
        }
        if !(a.max_upscale_factor > 1.0 && a.max_upscale_factor.is_finite()) {
            return Err(invalid(&field("max_upscale_factor"), "must be above 1"));
        }
        if !(a.max_downscale_factor > 0.0 && a.max_downscale_factor < 1.0) {
            return Err(invalid(
                &field("max_downscale_factor"),
                "must be between 0 and 1",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_fills_the_defaults_and_names_the_bad_field() {
        let c = BackendConfig {
            num_replicas: 1,
            ..Default::default()
        }
        .validate()
        .unwrap();
        assert_eq!(c.max_concurrent_queries, DEFAULT_MAX_CONCURRENT_QUERIES);

        let e = BackendConfig::default().validate().unwrap_err();
        assert_eq!(e.to_string(), "invalid num_replicas: must be at least 1");
        let e = BackendConfig {
            num_replicas: 1,
            max_surge: "150%".into(),
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.field, "max_surge");

        // Autoscaling owns num_replicas: it starts inside the range.
        let autoscaling = AutoscalingConfig {
            min_replicas: 2,
            max_replicas: 4,
            target_replica_concurrency: 1.0,
            window: 60.0,
            max_upscale_factor: 1.5,
            max_downscale_factor: 0.75,
            ..Default::default()
        };
        let c = BackendConfig {
            num_replicas: 0,
            autoscaling: Some(autoscaling),
            ..Default::default()
        }
        .validate()
        .unwrap();
        assert_eq!(c.num_replicas, 2);
        let e = BackendConfig {
            autoscaling: Some(AutoscalingConfig {
                max_downscale_factor: 1.0,
                ..autoscaling
            }),
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.field, "autoscaling.max_downscale_factor");
    }
}
