//! Starlette's `GZipMiddleware` (`starlette/middleware/gzip.py`).

use std::io::Write;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{
    HeaderMap, HeaderValue, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE,
};
use hyper::StatusCode;

use super::{add_vary, header_str, GZipConfig, MiddlewareError};
use crate::errors::HttpResponse;

#[derive(Debug)]
pub(super) struct GZip {
    minimum_size: i64,
    level: flate2::Compression,
    exclude_content_types: Vec<String>,
}

/// `content_type.partition(";")[0].strip().lower()`.
fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_lowercase()
}

impl GZip {
    pub(super) fn new(c: GZipConfig) -> Result<Self, MiddlewareError> {
        let level = c
            .level()?
            .map_or_else(flate2::Compression::default, flate2::Compression::new);
        Ok(Self {
            minimum_size: c.minimum_size,
            level,
            exclude_content_types: c
                .exclude_content_types
                .iter()
                .map(|t| media_type(t))
                .collect(),
        })
    }

    pub(super) fn accepts_gzip(&self, headers: &HeaderMap) -> bool {
        header_str(headers, &ACCEPT_ENCODING).is_some_and(|v| v.contains("gzip"))
    }

    fn passes_unchanged(&self, response: &HttpResponse) -> bool {
        let headers = response.headers();
        // A streamed reply's body is not here to compress (it goes out
        // chunk by chunk as the replica yields it): it passes as it is.
        if headers.contains_key(CONTENT_ENCODING)
            || response.status() == StatusCode::PARTIAL_CONTENT
            || crate::http::is_streamed(response)
        {
            return true;
        }
        let media_type = media_type(&header_str(headers, &CONTENT_TYPE).unwrap_or_default());
        let major = format!("{}/*", media_type.split('/').next().unwrap_or(""));
        let grpc = media_type.starts_with("application/grpc+");
        self.exclude_content_types
            .iter()
            .any(|t| *t == media_type || *t == major || (grpc && t == "application/grpc"))
    }

    pub(super) async fn on_response(
        &self,
        accepts_gzip: bool,
        response: HttpResponse,
    ) -> HttpResponse {
        if self.passes_unchanged(&response) {
            return response;
        }
        let (mut parts, body) = response.into_parts();
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(never) => match never {},
        };
        if (body.len() as i64) < self.minimum_size {
            return hyper::Response::from_parts(parts, Full::new(body));
        }
        add_vary(&mut parts.headers, "Accept-Encoding");
        if !accepts_gzip {
            return hyper::Response::from_parts(parts, Full::new(body));
        }
        let mut encoder =
            flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 2), self.level);
        let compressed = match encoder.write_all(&body).and_then(|()| encoder.finish()) {
            Ok(c) => c,
            Err(error) => {
                tracing::warn!(%error, "gzip failed; response sent uncompressed");
                return hyper::Response::from_parts(parts, Full::new(body));
            }
        };
        parts
            .headers
            .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        // hyper frames the new body and sets its Content-Length.
        parts.headers.remove(CONTENT_LENGTH);
        hyper::Response::from_parts(parts, Full::new(Bytes::from(compressed)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{h, request, run, stack};

    #[tokio::test]
    async fn gzip() {
        let m = stack(
            r#"[{"name": "GZipMiddleware", "options": {"minimum_size": 100, "compresslevel": 1}}]"#,
        );
        let big = vec![b'a'; 1000];
        let (r, _, body) = run(
            &m,
            request("GET", &[("accept-encoding", "br, gzip")]),
            big.clone(),
            &[("content-type", "text/plain")],
        )
        .await;
        assert_eq!(h(&r, "content-encoding"), Some("gzip"));
        assert_eq!(h(&r, "vary"), Some("Accept-Encoding"));
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut out).unwrap();
        assert_eq!(out, big);
        // Below the minimum: untouched, no Vary.
        let (r, _, body) = run(
            &m,
            request("GET", &[("accept-encoding", "gzip")]),
            vec![b'a'; 99],
            &[],
        )
        .await;
        assert_eq!(
            (h(&r, "content-encoding"), h(&r, "vary"), body.len()),
            (None, None, 99)
        );
        // Not accepted: untouched but Vary (Starlette's IdentityResponder).
        let (r, _, body) = run(&m, request("GET", &[]), big.clone(), &[]).await;
        assert_eq!(
            (h(&r, "content-encoding"), h(&r, "vary"), body.len()),
            (None, Some("Accept-Encoding"), 1000)
        );
        // Already encoded, or an excluded type: untouched.
        let (r, _, body) = run(
            &m,
            request("GET", &[("accept-encoding", "gzip")]),
            big.clone(),
            &[("content-encoding", "br")],
        )
        .await;
        assert_eq!((h(&r, "content-encoding"), body.len()), (Some("br"), 1000));
        let (r, _, body) = run(
            &m,
            request("GET", &[("accept-encoding", "gzip")]),
            big.clone(),
            &[("content-type", "image/png")],
        )
        .await;
        assert_eq!((h(&r, "content-encoding"), body.len()), (None, 1000));
        let (r, _, _) = run(
            &m,
            request("GET", &[("accept-encoding", "gzip")]),
            big,
            &[("content-type", "video/mp4; x=1")],
        )
        .await;
        assert_eq!(h(&r, "content-encoding"), None);
    }
}
