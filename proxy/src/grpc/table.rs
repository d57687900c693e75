//! Which endpoint serves which gRPC service, from the snapshot.

use std::collections::BTreeMap;

use prost::Message;

use serval_protos::control::ClusterSnapshot;

/// `package.Service` -> endpoint, and the services' descriptor sets.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct GrpcServices {
    endpoints: BTreeMap<String, String>,
    /// Serialized FileDescriptorSets, in service order (for reflection).
    descriptors: Vec<Vec<u8>>,
    /// `package.Service` -> `Method` -> shape, of every method the
    /// descriptors declare (the only method names used as metric labels).
    methods: BTreeMap<String, BTreeMap<String, Shape>>,
}

impl GrpcServices {
    pub(crate) fn from_snapshot(snapshot: &ClusterSnapshot) -> Self {
        let mut out = Self::default();
        let mut sorted: Vec<_> = snapshot
            .endpoints
            .iter()
            .filter(|e| !e.grpc_service.is_empty())
            .collect();
        sorted.sort_by(|a, b| a.grpc_service.cmp(&b.grpc_service));
        for e in sorted {
            // The controller refuses a second endpoint for a service.
            if out.endpoints.contains_key(&e.grpc_service) {
                continue;
            }
            out.endpoints.insert(e.grpc_service.clone(), e.name.clone());
            if !e.grpc_descriptor.is_empty() {
                for (service, method, shape) in declared_methods(&e.grpc_descriptor) {
                    out.methods
                        .entry(service)
                        .or_default()
                        .insert(method, shape);
                }
                out.descriptors.push(e.grpc_descriptor.clone());
            }
        }
        out
    }

    pub(crate) fn endpoint(&self, service: &str) -> Option<&str> {
        self.endpoints.get(service).map(String::as_str)
    }

    /// Service -> endpoint, for `/-/grpc-services`.
    pub(crate) fn services(&self) -> impl Iterator<Item = (&str, &str)> {
        self.endpoints.iter().map(|(s, e)| (s.as_str(), e.as_str()))
    }

    pub(crate) fn descriptors(&self) -> &[Vec<u8>] {
        &self.descriptors
    }

    /// Whether a deployed service's descriptors declare `method`.
    pub(crate) fn declares(&self, service: &str, method: &str) -> bool {
        self.shape(service, method).is_some()
    }

    /// Which way `method` of a deployed service streams, when declared.
    pub(crate) fn shape(&self, service: &str, method: &str) -> Option<Shape> {
        self.methods.get(service)?.get(method).copied()
    }
}

/// Which way a method streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shape {
    pub(crate) client_streaming: bool,
    pub(crate) server_streaming: bool,
}

/// (`package.Service`, `Method`, shape) of each method in a serialized
/// FileDescriptorSet; none when it does not decode (reflection logs that).
fn declared_methods(set: &[u8]) -> Vec<(String, String, Shape)> {
    let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for file in &set.file {
        let package = file.package();
        for service in &file.service {
            let service_name = if package.is_empty() {
                service.name().to_owned()
            } else {
                format!("{package}.{}", service.name())
            };
            for method in &service.method {
                let shape = Shape {
                    client_streaming: method.client_streaming(),
                    server_streaming: method.server_streaming(),
                };
                out.push((service_name.clone(), method.name().to_owned(), shape));
            }
        }
    }
    out
}
