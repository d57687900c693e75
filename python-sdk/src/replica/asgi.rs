//! The ASGI side of a request: the scope handed to `on_http` is built here
//! (type, asgi, http_version, method, scheme, path, raw_path, root_path,
//! query_string, headers with lowercase names, client, server, path_params
//! with int/float/str/UUID values), so the Python side only wraps it in
//! `starlette.requests.Request`; a WebSocket session's scope is the same,
//! typed `websocket`.

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};
use serval_protos::frame::{HttpRequest, PathValue};

/// `(scope, body)` for `on_http`.
pub(super) fn http_args(
    py: Python<'_>,
    http: HttpRequest,
) -> PyResult<(Bound<'_, PyDict>, Bound<'_, PyBytes>)> {
    let scope = PyDict::new(py);
    scope.set_item(intern!(py, "type"), intern!(py, "http"))?;
    scope.set_item(intern!(py, "asgi"), asgi_version(py)?)?;
    scope.set_item(intern!(py, "http_version"), intern!(py, "1.1"))?;
    scope.set_item(intern!(py, "method"), method_str(py, &http.method))?;
    scope.set_item(intern!(py, "scheme"), intern!(py, "http"))?;
    scope.set_item(intern!(py, "path"), PyString::new(py, &http.path))?;
    // The decoded path the proxy routed on, and the bytes the client sent.
    scope.set_item(intern!(py, "raw_path"), PyBytes::new(py, &http.raw_path))?;
    scope.set_item(intern!(py, "root_path"), PyString::new(py, &http.root_path))?;
    scope.set_item(
        intern!(py, "query_string"),
        PyBytes::new(py, http.query.as_bytes()),
    )?;
    let headers = PyList::empty(py);
    for (name, value) in &http.headers {
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            PyBytes::new(py, name.to_ascii_lowercase().as_bytes())
        } else {
            PyBytes::new(py, name.as_bytes())
        };
        headers.append(PyTuple::new(
            py,
            [name, PyBytes::new(py, value.as_bytes())],
        )?)?;
    }
    scope.set_item(intern!(py, "headers"), headers)?;
    match split_host_port(&http.client) {
        Some((host, port)) => scope.set_item(intern!(py, "client"), (host, port))?,
        None => scope.set_item(intern!(py, "client"), py.None())?,
    }
    scope.set_item(intern!(py, "server"), py.None())?;
    let params = PyDict::new(py);
    for (name, value) in &http.path_params {
        match value {
            PathValue::Str(s) => params.set_item(name, s)?,
            PathValue::Int(i) => params.set_item(name, *i)?,
            PathValue::Float(f) => params.set_item(name, *f)?,
            PathValue::Uuid(s) => params.set_item(
                name,
                py.import(intern!(py, "uuid"))?
                    .getattr(intern!(py, "UUID"))?
                    .call1((s,))?,
            )?,
        }
    }
    scope.set_item(intern!(py, "path_params"), params)?;
    Ok((scope, PyBytes::new(py, &http.body)))
}

/// The ASGI scope of a WebSocket session: the HTTP scope of its upgrade
/// request, typed `websocket`, with the subprotocols the client offered and
/// the denial-response extension.
pub(super) fn websocket_scope(py: Python<'_>, http: HttpRequest) -> PyResult<Bound<'_, PyDict>> {
    let subprotocols: Vec<String> = http
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("sec-websocket-protocol"))
        .flat_map(|(_, v)| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    let (scope, _) = http_args(py, http)?;
    scope.set_item(intern!(py, "type"), intern!(py, "websocket"))?;
    scope.set_item(intern!(py, "scheme"), intern!(py, "ws"))?;
    scope.del_item(intern!(py, "method"))?;
    scope.set_item(intern!(py, "subprotocols"), subprotocols)?;
    let extensions = PyDict::new(py);
    extensions.set_item(intern!(py, "websocket.http.response"), PyDict::new(py))?;
    scope.set_item(intern!(py, "extensions"), extensions)?;
    Ok(scope)
}

pub(super) fn method_str<'py>(py: Python<'py>, method: &str) -> Bound<'py, PyString> {
    match method {
        "GET" => intern!(py, "GET").clone(),
        "POST" => intern!(py, "POST").clone(),
        "PUT" => intern!(py, "PUT").clone(),
        "DELETE" => intern!(py, "DELETE").clone(),
        other => PyString::new(py, other),
    }
}

fn asgi_version(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item(intern!(py, "version"), intern!(py, "3.0"))?;
    d.set_item(intern!(py, "spec_version"), intern!(py, "2.4"))?;
    Ok(d)
}

/// "host:port" or "[v6]:port" -> (host, port).
fn split_host_port(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some((host, port))
}
