//! The gRPC health checking protocol (`grpc.health.v1.Health/Check`),
//! answered by the proxy: the overall status ("" service) is the proxy's
//! readiness; a deployed service is SERVING while its endpoint has a
//! running replica; an unknown service is NOT_FOUND, as the protocol says.

use bytes::{Buf, Bytes};
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::HeaderMap;
use prost::Message;

use super::{frame, status_response, BoxError, Code, GrpcResponse};
use crate::proxy::Proxy;

pub(super) const SERVICE: &str = "grpc.health.v1.Health";
/// The Health service's methods (metric labels).
pub(super) const METHODS: [&str; 2] = ["Check", "Watch"];
/// A health request is a service name: anything larger is not one.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

pub(super) async fn handle(
    proxy: &Proxy,
    method: &str,
    req: hyper::Request<Incoming>,
) -> GrpcResponse {
    if method != "Check" {
        return status_response(
            Code::Unimplemented,
            &format!("{SERVICE}/{method} is not supported (Check is)"),
        );
    }
    let body = match Limited::new(req.into_body(), MAX_REQUEST_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return status_response(Code::Internal, &format!("cannot read the request: {e}")),
    };
    let request = match decode_unary(body) {
        Some(r) => r,
        None => {
            return status_response(
                Code::Internal,
                "the request is not one HealthCheckRequest message",
            )
        }
    };
    let status = if request.service.is_empty() {
        if proxy.ready_for_traffic().0 {
            SERVING
        } else {
            NOT_SERVING
        }
    } else {
        match proxy.grpc_services().endpoint(&request.service) {
            None => {
                return status_response(
                    Code::NotFound,
                    &format!("unknown service {}", request.service),
                )
            }
            Some(endpoint) if proxy.router().has_running_replica(endpoint) => SERVING,
            Some(_) => NOT_SERVING,
        }
    };
    ok_response(&HealthCheckResponse { status }.encode_to_vec())
}

fn decode_unary(mut body: Bytes) -> Option<HealthCheckRequest> {
    if body.len() < 5 || body[0] != 0 {
        return None;
    }
    body.advance(1);
    let len = body.get_u32() as usize;
    (body.len() == len)
        .then(|| HealthCheckRequest::decode(body).ok())
        .flatten()
}

/// One message then `grpc-status: 0` trailers.
fn ok_response(message: &[u8]) -> GrpcResponse {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let frames = vec![
        Ok::<_, BoxError>(Frame::data(frame(message))),
        Ok(Frame::trailers(trailers)),
    ];
    let mut response =
        hyper::Response::new(StreamBody::new(futures::stream::iter(frames)).boxed_unsync());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}
