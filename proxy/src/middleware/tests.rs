//! Helpers the middlewares' tests share, and the tests of the stack as a whole.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue};

use super::*;

pub(super) fn stack(json: &str) -> Middlewares {
    Middlewares::parse(json).unwrap_or_else(|e| panic!("{e}"))
}

pub(super) fn request(method: &str, headers: &[(&str, &str)]) -> hyper::Request<()> {
    let mut b = hyper::Request::builder().method(method).uri("/app?x=1");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap()
}

fn app_response(body: Vec<u8>, headers: &[(&str, &str)]) -> HttpResponse {
    let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
    for (k, v) in headers {
        r.headers_mut().append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    r
}

/// Runs a request; the app answers `body` with `headers` and counts calls.
pub(super) async fn run(
    m: &Middlewares,
    req: hyper::Request<()>,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> (HttpResponse, bool, Bytes) {
    let mut called = false;
    let response = m
        .run(req, |_| {
            called = true;
            std::future::ready(app_response(body, headers))
        })
        .await;
    let (parts, b) = response.into_parts();
    let bytes = b.collect().await.unwrap().to_bytes();
    (
        hyper::Response::from_parts(parts, Full::new(bytes.clone())),
        called,
        bytes,
    )
}

pub(super) fn h<'a>(r: &'a HttpResponse, name: &str) -> Option<&'a str> {
    r.headers().get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn order_is_outermost_first() {
    // CORS outside TrustedHost: the 400 gets CORS headers.
    let m = stack(
        r#"[{"name": "CORSMiddleware", "options": {"allow_origins": ["*"]}}, {"name": "TrustedHostMiddleware", "options": {"allowed_hosts": ["ok.com"]}}]"#,
    );
    let (r, _, _) = run(
        &m,
        request("GET", &[("host", "bad.com"), ("origin", "https://a.com")]),
        vec![],
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(h(&r, "access-control-allow-origin"), Some("*"));
    // TrustedHost outside CORS: the 400 comes first, without them.
    let m = stack(
        r#"[{"name": "TrustedHostMiddleware", "options": {"allowed_hosts": ["ok.com"]}}, {"name": "CORSMiddleware", "options": {"allow_origins": ["*"]}}]"#,
    );
    let (r, _, _) = run(
        &m,
        request("GET", &[("host", "bad.com"), ("origin", "https://a.com")]),
        vec![],
        &[],
    )
    .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(h(&r, "access-control-allow-origin"), None);
    // GZip outside CORS: the app's Vary gets Origin, then Accept-Encoding.
    let m = stack(
        r#"[{"name": "GZipMiddleware"}, {"name": "CORSMiddleware", "options": {"allow_origins": ["*"]}}]"#,
    );
    let (r, _, _) = run(
        &m,
        request("GET", &[("accept-encoding", "gzip")]),
        vec![b'z'; 600],
        &[],
    )
    .await;
    assert_eq!(h(&r, "vary"), Some("Origin, Accept-Encoding"));
    assert_eq!(h(&r, "content-encoding"), Some("gzip"));
}
