//! Percent-decoding of request paths and query values, as Starlette and
//! uvicorn read them. A leaf: the routing core (model ids in a query) and
//! the HTTP ingress (routes, the dashboard's queries) both use it.

/// Why a request path cannot be routed (the proxy answers 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the request path is not valid UTF-8 once percent-decoded")]
    NotUtf8,
    #[error("the request path contains a NUL character (%00)")]
    Nul,
}

/// The path as Starlette's router and the app see it (ASGI `path`): `%XX`
/// escapes decoded, invalid escapes kept as written (as Python's
/// `urllib.parse.unquote`, which uvicorn uses). Where uvicorn would replace
/// bytes that are not UTF-8, this refuses the path, and a NUL too: no
/// backend can mean them, and a path the app reads differently from the
/// one that was routed is how a route check gets bypassed.
///
/// `%2F` decodes to '/' like every other escape, as in Starlette: routes
/// match the decoded path, so `/a%2Fb` reaches the route `/a/b`, a `{name}`
/// segment never holds a '/', and `{rest:path}` gets `a/b`.
pub fn decode_path(raw: &str) -> Result<std::borrow::Cow<'_, str>, PathError> {
    if !raw.contains('%') {
        // hyper's URI parser admits no NUL, so only escapes can make one.
        return Ok(std::borrow::Cow::Borrowed(raw));
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    if out.contains(&0) {
        return Err(PathError::Nul);
    }
    String::from_utf8(out)
        .map(std::borrow::Cow::Owned)
        .map_err(|_| PathError::NotUtf8)
}
