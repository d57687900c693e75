//! The cluster state machine: what the controller decided, replicated by
//! raft. Every change is a [`Command`]; [`ClusterState::apply`] validates it
//! and either changes the state or refuses it with a [`StateError`] and
//! changes nothing. `apply` is deterministic (ids come from counters in the
//! state, never from clocks or randomness) so every head computes the same
//! state from the same log.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serval_protos::control::{Api, Backend, BackendConfig, Endpoint, HttpOptions, Node, Replica};
use serval_protos::ids::ReplicaId;
use serval_protos::route;
pub use serval_protos::states::{BackendState, ReplicaState};

use crate::error::StateError;
use crate::limits;
use crate::scheduler;
use crate::store::Command;

/// Ray Serve 1.x defaults for fields left at zero by a caller (a backend
/// config's are `serval_protos::backend_config`'s).
pub const DEFAULT_METHODS: &[&str] = &["GET"];

/// What the controller holds. Endpoints keep registration order because
/// routes sharing a shape are tried in that order, as Starlette does.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterState {
    /// Bumped on every applied change; watchers compare versions.
    pub version: u64,
    pub nodes: BTreeMap<String, Node>,
    pub backends: BTreeMap<String, Backend>,
    pub endpoints: Vec<Endpoint>,
    pub replicas: BTreeMap<String, Replica>,
    pub http_options: Option<HttpOptions>,
    pub shutting_down: bool,
    /// Source of replica ids (`backend#N`): never reused.
    pub next_replica_seq: u64,
    /// Deployed APIs (`serve deploy FOLDER`) by name.
    pub apis: BTreeMap<String, Api>,
}

impl ClusterState {
    pub fn endpoint(&self, name: &str) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.name == name)
    }

    /// Applies `cmd`, or refuses it leaving `self` unchanged.
    pub fn apply(&mut self, cmd: Command) -> Result<(), StateError> {
        // The caps first, before anything is copied or built: an entry
        // that breaks one costs every head next to nothing to refuse.
        limits::check(&cmd)?;
        // Work on a copy so a refusal half-way through leaves nothing behind.
        let mut next = self.clone();
        next.apply_in_place(cmd)?;
        next.version = self.version + 1;
        *self = next;
        Ok(())
    }

    fn apply_in_place(&mut self, cmd: Command) -> Result<(), StateError> {
        match cmd {
            // The state machine applies the command inside once per id
            // (`store::state_machine`); a state applies it as it comes.
            Command::Once { command, .. } => return self.apply_in_place(*command),
            Command::RegisterNode(node) => {
                let node = Node {
                    alive: true,
                    ..node
                };
                // A new agent process has none of the replicas the old one ran:
                // they are starting again, not running at their old addresses.
                if !self.nodes.contains_key(&node.id) {
                    self.make_room_for_a_node()?;
                }
                let restarted = self
                    .nodes
                    .get(&node.id)
                    .is_some_and(|old| old.pid != node.pid);
                if restarted {
                    for r in self.replicas.values_mut().filter(|r| r.node_id == node.id) {
                        r.state = ReplicaState::Starting.into();
                        r.unix_path.clear();
                        r.tcp_addr.clear();
                        r.grpc_addr.clear();
                        r.tls = false;
                        r.pid = 0;
                    }
                }
                self.nodes.insert(node.id.clone(), node);
                self.place_pending();
                let backends: Vec<String> = self.backends.keys().cloned().collect();
                for b in backends {
                    self.refresh_backend_state(&b);
                }
            }
            Command::MarkNodeDead { node_id } => {
                let node = self
                    .nodes
                    .get_mut(&node_id)
                    .ok_or_else(|| StateError::UnknownNode(node_id.clone()))?;
                node.alive = false;
                node.http_address.clear();
                // Its replicas are gone with it: place them again elsewhere.
                for replica in self.replicas.values_mut().filter(|r| r.node_id == node_id) {
                    replica.node_id.clear();
                    replica.gpu_ids.clear();
                    replica.state = ReplicaState::Pending.into();
                    replica.unix_path.clear();
                    replica.tcp_addr.clear();
                    replica.grpc_addr.clear();
                    replica.tls = false;
                    replica.pid = 0;
                }
                self.place_pending();
            }
            Command::ReportReplica(report) => {
                let replica = self
                    .replicas
                    .get_mut(&report.replica_id)
                    .ok_or_else(|| StateError::UnknownReplica(report.replica_id.clone()))?;
                if replica.pid != report.pid {
                    // Another process: it holds no model yet.
                    replica.model_ids.clear();
                }
                replica.state = report.state;
                replica.error = report.error;
                replica.unix_path = report.unix_path;
                replica.tcp_addr = report.tcp_addr;
                replica.grpc_addr = report.grpc_addr;
                replica.tls = report.tls;
                replica.pid = report.pid;
                replica.restarts = report.restarts;
                replica.config_version = report.config_version;
                let backend = replica.backend.clone();
                // A replica that now runs may let a rolling update advance.
                self.scale(&backend);
            }
            Command::CreateBackend(backend) => {
                if backend.name.is_empty() {
                    return Err(invalid("backend name", "must not be empty"));
                }
                if self.backends.contains_key(&backend.name) {
                    return Err(StateError::BackendExists(backend.name));
                }
                if self.backends.len() >= limits::MAX_BACKENDS {
                    return Err(over_cap("backends", limits::MAX_BACKENDS));
                }
                check_code_digest(&backend.code_digest)?;
                let config = backend.config.unwrap_or_default().validate()?;
                self.check_replicas_total(&backend.name, config.num_replicas)?;
                let name = backend.name.clone();
                self.backends.insert(
                    name.clone(),
                    Backend {
                        config: Some(config),
                        version: 1,
                        config_version: 0,
                        state: BackendState::Deploying.into(),
                        error: String::new(),
                        ..backend
                    },
                );
                self.scale(&name);
            }
            Command::UpdateBackendConfig { name, config } => {
                let config = config.validate()?;
                self.check_replicas_total(&name, config.num_replicas)?;
                let backend = self
                    .backends
                    .get_mut(&name)
                    .ok_or_else(|| StateError::UnknownBackend(name.clone()))?;
                backend.config = Some(config);
                backend.config_version += 1;
                self.scale(&name);
            }
            Command::Autoscale { name, num_replicas } => {
                let backend = self
                    .backends
                    .get_mut(&name)
                    .ok_or_else(|| StateError::UnknownBackend(name.clone()))?;
                let config = backend.config.get_or_insert_with(Default::default);
                let Some(a) = &config.autoscaling else {
                    return Err(invalid(
                        "autoscaling",
                        &format!("backend '{name}' does not autoscale"),
                    ));
                };
                let num_replicas = num_replicas.clamp(a.min_replicas, a.max_replicas);
                config.num_replicas = num_replicas;
                self.check_replicas_total(&name, num_replicas)?;
                self.scale(&name);
            }
            Command::UpdateBackendCode {
                name,
                code_digest,
                blobs,
            } => {
                check_code_digest(&code_digest)?;
                let backend = self
                    .backends
                    .get_mut(&name)
                    .ok_or_else(|| StateError::UnknownBackend(name.clone()))?;
                backend.code_digest = code_digest;
                backend.blobs = blobs;
                backend.version += 1;
                self.scale(&name);
            }
            Command::DeleteBackend { name, force } => {
                if !self.backends.contains_key(&name) {
                    return Err(StateError::UnknownBackend(name));
                }
                let users: Vec<String> = self
                    .endpoints
                    .iter()
                    .filter(|e| e.traffic.contains_key(&name) || e.shadow.contains_key(&name))
                    .map(|e| e.name.clone())
                    .collect();
                if !users.is_empty() && !force {
                    return Err(StateError::BackendInUse {
                        backend: name,
                        endpoints: users,
                    });
                }
                for e in self.endpoints.iter_mut() {
                    e.shadow.remove(&name);
                    if e.traffic.remove(&name).is_some() {
                        // Keep the weights a distribution over what is left.
                        let sum: f64 = e.traffic.values().sum();
                        if sum > 0.0 {
                            e.traffic.values_mut().for_each(|w| *w /= sum);
                        }
                    }
                }
                self.backends.remove(&name);
                self.replicas.retain(|_, r| r.backend != name);
                // What it held may fit a pending replica now.
                self.place_pending();
            }
            Command::CreateEndpoint(endpoint) => {
                if self.endpoints.len() >= limits::MAX_ENDPOINTS {
                    return Err(over_cap("endpoints", limits::MAX_ENDPOINTS));
                }
                let endpoint = self.validate_endpoint(endpoint)?;
                self.endpoints.push(endpoint);
            }
            Command::DeleteEndpoint { name } => {
                let before = self.endpoints.len();
                self.endpoints.retain(|e| e.name != name);
                if self.endpoints.len() == before {
                    return Err(StateError::UnknownEndpoint(name));
                }
            }
            Command::SetTraffic { endpoint, traffic } => {
                self.validate_traffic(&endpoint, &traffic)?;
                let ep = self
                    .endpoints
                    .iter_mut()
                    .find(|e| e.name == endpoint)
                    .ok_or_else(|| StateError::UnknownEndpoint(endpoint.clone()))?;
                ep.traffic = traffic.into_iter().collect();
            }
            Command::SetShadow {
                endpoint,
                backend,
                proportion,
            } => {
                if !self.backends.contains_key(&backend) {
                    return Err(StateError::UnknownBackend(backend));
                }
                if !(0.0..=1.0).contains(&proportion) {
                    return Err(invalid(
                        "proportion",
                        &format!("{proportion} is not in [0, 1]"),
                    ));
                }
                let ep = self
                    .endpoints
                    .iter_mut()
                    .find(|e| e.name == endpoint)
                    .ok_or_else(|| StateError::UnknownEndpoint(endpoint.clone()))?;
                if proportion == 0.0 {
                    ep.shadow.remove(&backend);
                } else {
                    ep.shadow.insert(backend, proportion);
                }
            }
            Command::SetHttpOptions(options) => self.http_options = Some(options),
            Command::SetShuttingDown(flag) => self.shutting_down = flag,
            Command::PutBlob { .. }
            | Command::PutBlobParts { .. }
            | Command::Job(_)
            | Command::CollectCodeBlobs { .. } => {
                // Refused the same way on every head should one ever get here.
                return Err(invalid(
                    "command",
                    "blobs and jobs are stored by the raft store, not in the cluster state",
                ));
            }
            Command::PutApi(api) => {
                if api.name.is_empty() {
                    return Err(invalid("api name", "must not be empty"));
                }
                if !self.apis.contains_key(&api.name) && self.apis.len() >= limits::MAX_APIS {
                    return Err(over_cap("apis", limits::MAX_APIS));
                }
                self.apis.insert(api.name.clone(), api);
            }
            Command::DeleteApi { name } => {
                if self.apis.remove(&name).is_none() {
                    return Err(StateError::UnknownApi(name));
                }
            }
            Command::SetReplicaModels {
                replica_id,
                model_ids,
            } => {
                let replica = self
                    .replicas
                    .get_mut(&replica_id)
                    .ok_or(StateError::UnknownReplica(replica_id))?;
                replica.model_ids = model_ids;
            }
        }
        Ok(())
    }

    /// At [`limits::MAX_NODES`], a new node takes the place of a dead one
    /// (the first by id; a dead node holds no replicas); with none dead it
    /// is refused.
    fn make_room_for_a_node(&mut self) -> Result<(), StateError> {
        if self.nodes.len() < limits::MAX_NODES {
            return Ok(());
        }
        let dead = self
            .nodes
            .values()
            .find(|n| !n.alive)
            .map(|n| n.id.clone())
            .ok_or_else(|| over_cap("nodes (all alive)", limits::MAX_NODES))?;
        self.nodes.remove(&dead);
        Ok(())
    }

    /// Refuses `want` replicas for `backend` when the replicas every
    /// backend wants would then exceed [`limits::MAX_REPLICAS_TOTAL`].
    fn check_replicas_total(&self, backend: &str, want: u32) -> Result<(), StateError> {
        let others: u64 = self
            .backends
            .values()
            .filter(|b| b.name != backend)
            .map(|b| b.config.as_ref().map_or(1, |c| u64::from(c.num_replicas)))
            .sum();
        let total = others + u64::from(want);
        if total > limits::MAX_REPLICAS_TOTAL {
            return Err(invalid(
                "num_replicas",
                &format!(
                    "{want} for backend '{backend}' makes {total} replicas in the cluster; \
                     the cap is {}",
                    limits::MAX_REPLICAS_TOTAL
                ),
            ));
        }
        Ok(())
    }

    /// The code blobs the backends name (`store::blobs` collects the
    /// others).
    pub fn code_digests(&self) -> std::collections::BTreeSet<String> {
        self.backends
            .values()
            .map(|b| b.code_digest.clone())
            .collect()
    }

    /// Every blob the state names: code, backends' blobs, API packages.
    pub fn named_blobs(&self) -> std::collections::BTreeSet<String> {
        let mut all = self.code_digests();
        for b in self.backends.values() {
            all.extend(b.blobs.iter().cloned());
        }
        all.extend(self.apis.values().map(|a| a.package_digest.clone()));
        all
    }

    fn validate_endpoint(&self, endpoint: Endpoint) -> Result<Endpoint, StateError> {
        if endpoint.name.is_empty() {
            return Err(invalid("endpoint name", "must not be empty"));
        }
        if self.endpoint(&endpoint.name).is_some() {
            return Err(StateError::EndpointExists(endpoint.name));
        }
        let traffic: BTreeMap<String, f64> = endpoint.traffic.clone().into_iter().collect();
        self.validate_traffic(&endpoint.name, &traffic)?;
        if endpoint.route_is_prefix {
            // An application's route prefix: one endpoint per prefix.
            route::check_prefix(&endpoint.route).map_err(|e| StateError::InvalidRoute {
                route: endpoint.route.clone(),
                reason: e.to_string(),
            })?;
            if let Some(existing) = self
                .endpoints
                .iter()
                .find(|e| e.route_is_prefix && e.route == endpoint.route)
            {
                return Err(StateError::RouteTaken {
                    route: endpoint.route.clone(),
                    endpoint: endpoint.name.clone(),
                    existing_route: existing.route.clone(),
                    existing: existing.name.clone(),
                });
            }
        } else if !endpoint.route.is_empty() {
            route::parse_route(&endpoint.route).map_err(|e| StateError::InvalidRoute {
                route: endpoint.route.clone(),
                reason: e.to_string(),
            })?;
            if let Some(existing) = self.endpoints.iter().find(|e| {
                !e.route.is_empty()
                    && !e.route_is_prefix
                    && route::collides(&e.route, &endpoint.route)
            }) {
                return Err(StateError::RouteTaken {
                    route: endpoint.route.clone(),
                    endpoint: endpoint.name.clone(),
                    existing_route: existing.route.clone(),
                    existing: existing.name.clone(),
                });
            }
        }
        if !endpoint.grpc_service.is_empty() {
            if let Some(existing) = self
                .endpoints
                .iter()
                .find(|e| e.grpc_service == endpoint.grpc_service)
            {
                return Err(StateError::GrpcServiceTaken {
                    service: endpoint.grpc_service.clone(),
                    endpoint: endpoint.name.clone(),
                    existing: existing.name.clone(),
                });
            }
        }
        let mut methods = Vec::new();
        for m in &endpoint.methods {
            let m = m.trim().to_ascii_uppercase();
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                return Err(invalid("methods", &format!("'{m}' is not an HTTP method")));
            }
            if !methods.contains(&m) {
                methods.push(m);
            }
        }
        // A route prefix serves every method (its methods stay empty).
        if methods.is_empty() && !endpoint.route_is_prefix {
            methods = DEFAULT_METHODS.iter().map(|m| m.to_string()).collect();
        }
        Ok(Endpoint {
            methods,
            ..endpoint
        })
    }

    fn validate_traffic(
        &self,
        endpoint: &str,
        traffic: &BTreeMap<String, f64>,
    ) -> Result<(), StateError> {
        if traffic.is_empty() {
            return Err(invalid(
                "traffic",
                &format!("endpoint '{endpoint}' needs at least one backend"),
            ));
        }
        for (backend, weight) in traffic {
            if !self.backends.contains_key(backend) {
                return Err(StateError::UnknownBackend(backend.clone()));
            }
            if !(0.0..=1.0).contains(weight) {
                return Err(invalid(
                    "traffic",
                    &format!("weight {weight} of backend '{backend}' is not in [0, 1]"),
                ));
            }
        }
        let sum: f64 = traffic.values().sum();
        if (sum - 1.0).abs() > 1e-6 {
            return Err(invalid(
                "traffic",
                &format!("weights of endpoint '{endpoint}' sum to {sum}, not 1"),
            ));
        }
        Ok(())
    }

    /// Moves the backend's replicas towards `num_replicas` of its current
    /// version. Scaling adds or removes at once; a new version rolls within
    /// the backend's bounds (`rollout_bounds`, Kubernetes' rules): at most
    /// `surge` replicas above `num_replicas` exist, and a running old
    /// replica leaves only while at least `num_replicas - unavailable`
    /// others run. With the defaults (surge 1, unavailable 0) capacity never
    /// drops during an update. Runs after every change that can advance it
    /// (config, code, reports).
    fn scale(&mut self, backend: &str) {
        let Some(b) = self.backends.get(backend) else {
            return;
        };
        let want = b.config.as_ref().map(|c| c.num_replicas).unwrap_or(1) as usize;
        let (surge, unavailable) = rollout_bounds(b.config.as_ref(), want);
        let version = b.version;
        let ids = |s: &Self, current: bool| -> Vec<String> {
            s.replicas
                .values()
                .filter(|r| r.backend == backend && (r.backend_version == version) == current)
                .map(|r| r.id.clone())
                .collect()
        };
        let running = |s: &Self, id: &String| s.replicas[id].state == ReplicaState::Running;
        // Removal order: pending first, then not running, then the newest.
        let removal_key = |s: &Self, id: &String| {
            let r = &s.replicas[id];
            (
                r.state != ReplicaState::Pending,
                r.state == ReplicaState::Running,
                std::cmp::Reverse(id_seq(id)),
            )
        };
        let mut new = ids(self, true);
        new.sort_by_key(|id| removal_key(self, id));
        while new.len() > want {
            let id = new.remove(0);
            self.replicas.remove(&id);
        }
        let running_new = new.iter().filter(|id| running(self, id)).count();
        let mut old = ids(self, false);
        old.sort_by_key(|id| removal_key(self, id));
        let mut running_old = old.iter().filter(|id| running(self, id)).count();
        let min_available = want.saturating_sub(unavailable);
        // An old replica that does not serve goes at once; a serving one
        // only while the others that serve stay at or above min_available.
        while let Some(id) = old.first().cloned() {
            let serving = running(self, &id);
            if serving && running_new + running_old <= min_available {
                break;
            }
            old.remove(0);
            self.replicas.remove(&id);
            if serving {
                running_old -= 1;
            }
        }
        let total = old.len() + new.len();
        let add = if old.is_empty() {
            want - new.len()
        } else {
            (want - new.len()).min((want + surge).saturating_sub(total))
        };
        for _ in 0..add {
            let id = ReplicaId::new(backend, self.next_replica_seq).to_string();
            self.next_replica_seq += 1;
            self.replicas.insert(
                id.clone(),
                Replica {
                    id,
                    backend: backend.to_string(),
                    backend_version: version,
                    state: ReplicaState::Pending.into(),
                    ..Default::default()
                },
            );
        }
        self.place_pending();
        self.refresh_backend_state(backend);
    }

    /// Gives every pending replica a node with room for it, if one exists.
    /// The nodes' loads are computed once for all of them.
    fn place_pending(&mut self) {
        let pending: Vec<String> = self
            .replicas
            .values()
            .filter(|r| r.state == ReplicaState::Pending)
            .map(|r| r.id.clone())
            .collect();
        if pending.is_empty() {
            return;
        }
        let mut loads = scheduler::Loads::new(self);
        let mut touched = std::collections::BTreeSet::new();
        for id in pending {
            let backend = self.replicas[&id].backend.clone();
            let (num_cpus, num_gpus) = self
                .backends
                .get(&backend)
                .and_then(|b| b.config.as_ref())
                .map_or((0.0, 0.0), |c| (c.num_cpus, c.num_gpus));
            let placement = loads.choose(num_cpus, num_gpus);
            if let Some(r) = self.replicas.get_mut(&id) {
                match placement {
                    Some(placement) => {
                        loads.place(&placement, num_cpus, num_gpus);
                        r.node_id = placement.node_id;
                        r.gpu_ids = placement.gpu_ids;
                        r.state = ReplicaState::Starting.into();
                        r.error.clear();
                    }
                    None => {
                        r.error =
                            format!("no live node has {num_cpus} CPU and {num_gpus} GPU free");
                    }
                }
            }
            touched.insert(backend);
        }
        for backend in touched {
            self.refresh_backend_state(&backend);
        }
    }

    /// A backend runs when any replica runs; it failed when none runs and
    /// one failed (with that replica's reason).
    fn refresh_backend_state(&mut self, backend: &str) {
        let replicas: Vec<&Replica> = self
            .replicas
            .values()
            .filter(|r| r.backend == backend)
            .collect();
        let scaled_to_zero = replicas.is_empty()
            && self
                .backends
                .get(backend)
                .and_then(|b| b.config.as_ref())
                .is_some_and(|c| c.num_replicas == 0);
        let (state, error) =
            if scaled_to_zero || replicas.iter().any(|r| r.state == ReplicaState::Running) {
                (BackendState::Running, String::new())
            } else if let Some(failed) = replicas.iter().find(|r| r.state == ReplicaState::Failed) {
                (BackendState::Failed, failed.error.clone())
            } else {
                (
                    BackendState::Deploying,
                    replicas
                        .iter()
                        .map(|r| r.error.clone())
                        .find(|e| !e.is_empty())
                        .unwrap_or_default(),
                )
            };
        if let Some(b) = self.backends.get_mut(backend) {
            b.state = state.into();
            b.error = error;
        }
    }
}

fn id_seq(replica_id: &str) -> u64 {
    replica_id.parse::<ReplicaId>().map_or(0, |id| id.seq())
}

fn over_cap(what: &str, cap: usize) -> StateError {
    invalid(what, &format!("the cluster holds its cap of {cap}"))
}

/// A backend's `code_digest` names a blob: lowercase hex sha256. Whether
/// that blob is stored is checked by the store, which holds the blobs.
fn check_code_digest(digest: &str) -> Result<(), StateError> {
    if digest.len() == 64
        && digest
            .bytes()
            .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
    {
        Ok(())
    } else if digest.is_empty() {
        Err(invalid(
            "code_digest",
            "no code was sent (upload the pickled code with PutBlob and name its digest)",
        ))
    } else {
        Err(invalid(
            "code_digest",
            &format!("'{digest}' is not a lowercase hex sha256"),
        ))
    }
}

fn invalid(field: &str, reason: &str) -> StateError {
    StateError::InvalidConfig {
        field: field.into(),
        reason: reason.into(),
    }
}

/// `(max surge, max unavailable)` of a rolling update to `want` replicas:
/// counts, or percentages of `want` (surge rounded up, unavailable down, as
/// Kubernetes does). Both 0 would stall an update: surge 1 then.
fn rollout_bounds(config: Option<&BackendConfig>, want: usize) -> (usize, usize) {
    let (surge, unavailable) = config
        .map(|c| (c.max_surge.as_str(), c.max_unavailable.as_str()))
        .unwrap_or(("", ""));
    let surge = rollout_count(surge, want, true).unwrap_or(1);
    let unavailable = rollout_count(unavailable, want, false).unwrap_or(0);
    if surge == 0 && unavailable == 0 {
        (1, 0)
    } else {
        (surge, unavailable)
    }
}

/// "3" or "25%" of `want`; None when empty or malformed (validated on write).
fn rollout_count(text: &str, want: usize, round_up: bool) -> Option<usize> {
    let text = text.trim();
    if let Some(pct) = text.strip_suffix('%') {
        let x = want as f64 * pct.trim().parse::<f64>().ok()? / 100.0;
        Some(if round_up { x.ceil() } else { x.floor() } as usize)
    } else {
        text.parse().ok()
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod fuzz;
