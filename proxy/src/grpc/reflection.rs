//! gRPC server reflection (v1 and v1alpha) for the deployed services, by
//! tonic-reflection over their FileDescriptorSets: `grpcurl list`,
//! `grpcurl describe` and grpcio's reflection client work against the
//! proxy. Rebuilt when the set of deployed services changes.

use std::convert::Infallible;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use tonic::body::Body as TonicBody;
use tower::util::BoxCloneSyncService;
use tower::ServiceExt;

use super::{status_response, BoxError, Code, GrpcResponse};

pub(super) const SERVICES: [&str; 2] = [
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// The reflection services' one method (a metric label).
pub(super) const METHOD: &str = "ServerReflectionInfo";

type Service =
    BoxCloneSyncService<hyper::Request<TonicBody>, hyper::Response<TonicBody>, Infallible>;

pub(crate) struct Reflection {
    /// The descriptor sets it was built from, to know when to rebuild.
    source: Vec<Vec<u8>>,
    v1: Option<Service>,
    v1alpha: Option<Service>,
}

impl Reflection {
    pub(crate) fn build(descriptors: &[Vec<u8>]) -> Self {
        let builder = || {
            descriptors
                .iter()
                .fold(tonic_reflection::server::Builder::configure(), |b, set| {
                    b.register_encoded_file_descriptor_set(set)
                })
        };
        let v1 = builder()
            .build_v1()
            .map(Service::new)
            .inspect_err(|e| tracing::warn!(error = %e, "gRPC reflection (v1) unavailable"))
            .ok();
        let v1alpha = builder()
            .build_v1alpha()
            .map(Service::new)
            .inspect_err(|e| tracing::warn!(error = %e, "gRPC reflection (v1alpha) unavailable"))
            .ok();
        Self {
            source: descriptors.to_vec(),
            v1,
            v1alpha,
        }
    }

    pub(crate) fn built_from(&self, descriptors: &[Vec<u8>]) -> bool {
        self.source == descriptors
    }

    pub(super) async fn handle(&self, req: hyper::Request<Incoming>) -> GrpcResponse {
        let service = if req.uri().path().starts_with("/grpc.reflection.v1alpha.") {
            &self.v1alpha
        } else {
            &self.v1
        };
        let Some(service) = service.clone() else {
            return status_response(
                Code::Unavailable,
                "server reflection is unavailable: the deployed descriptors could not be loaded (see the proxy log)",
            );
        };
        match service.oneshot(req.map(TonicBody::new)).await {
            Ok(response) => {
                response.map(|b| b.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync())
            }
            Err(never) => match never {},
        }
    }
}
