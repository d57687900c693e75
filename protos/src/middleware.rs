//! The configuration of the HTTP middlewares the proxy runs (Starlette's
//! `CORSMiddleware`, `GZipMiddleware` and `TrustedHostMiddleware`, with
//! Starlette's option names and defaults) and its one validation.
//!
//! The configuration travels as JSON in `HttpOptions.middlewares_json`:
//! `[{"name": "CORSMiddleware", "options": {...}}, ...]`, outermost first.
//! Unknown middlewares and unknown options are refused, never ignored.
//! [`validate`] is what `serve start`, the Python SDK and the controller
//! check; the proxy builds its stack (`serval_proxy::middleware`) through
//! the same [`parse_config`] and `compile`/`level`/`hosts` steps, so a
//! configuration validates exactly when every proxy can build it.

use http::HeaderValue;
use regex::Regex;
use serde::Deserialize;

/// The middlewares Serval runs, by Starlette class name.
pub const SUPPORTED_MIDDLEWARES: [&str; 3] =
    ["CORSMiddleware", "GZipMiddleware", "TrustedHostMiddleware"];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MiddlewareError {
    #[error("middlewares must be a JSON list of {{\"name\": ..., \"options\": {{...}}}}: {0}")]
    Json(String),
    #[error(
        "unsupported middleware '{0}': Serval's proxy runs CORSMiddleware, GZipMiddleware and \
         TrustedHostMiddleware"
    )]
    Unsupported(String),
    #[error("middleware {middleware}: {message}")]
    Invalid {
        middleware: &'static str,
        message: String,
    },
}

fn invalid(middleware: &'static str, message: impl Into<String>) -> MiddlewareError {
    MiddlewareError::Invalid {
        middleware,
        message: message.into(),
    }
}

/// `CORSMiddleware(...)` options, with Starlette's defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    pub allow_origins: Vec<String>,
    pub allow_methods: Vec<String>,
    pub allow_headers: Vec<String>,
    pub allow_credentials: bool,
    pub allow_origin_regex: Option<String>,
    pub allow_private_network: bool,
    pub expose_headers: Vec<String>,
    pub max_age: i64,
}

impl Default for CorsConfig {
    fn default() -> Self {
        Self {
            allow_origins: Vec::new(),
            allow_methods: vec!["GET".into()],
            allow_headers: Vec::new(),
            allow_credentials: false,
            allow_origin_regex: None,
            allow_private_network: false,
            expose_headers: Vec::new(),
            max_age: 600,
        }
    }
}

/// Starlette's `DEFAULT_EXCLUDED_CONTENT_TYPES`.
pub const DEFAULT_EXCLUDED_CONTENT_TYPES: [&str; 14] = [
    "application/grpc",
    "application/gzip",
    "application/x-gzip",
    "application/zip",
    "audio/*",
    "font/woff",
    "font/woff2",
    "image/avif",
    "image/gif",
    "image/jpeg",
    "image/png",
    "image/webp",
    "text/event-stream",
    "video/*",
];

/// `GZipMiddleware(...)` options, with Starlette's defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GZipConfig {
    pub minimum_size: i64,
    /// zlib's level: -1 (zlib's default, 6) or 0..=9.
    pub compresslevel: i32,
    /// Accepted for Starlette compatibility: there it only decides when
    /// compression moves to a worker thread, which changes nothing visible.
    pub thread_minimum_size: i64,
    pub exclude_content_types: Vec<String>,
}

impl Default for GZipConfig {
    fn default() -> Self {
        Self {
            minimum_size: 500,
            compresslevel: 9,
            thread_minimum_size: 128 * 1024,
            exclude_content_types: DEFAULT_EXCLUDED_CONTENT_TYPES
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

/// `TrustedHostMiddleware(...)` options, with Starlette's defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrustedHostConfig {
    /// `None`: every host (`["*"]`).
    pub allowed_hosts: Option<Vec<String>>,
    pub www_redirect: bool,
}

impl Default for TrustedHostConfig {
    fn default() -> Self {
        Self {
            allowed_hosts: None,
            www_redirect: true,
        }
    }
}

/// One configured middleware.
#[derive(Debug, Clone, PartialEq)]
pub enum MiddlewareConfig {
    Cors(CorsConfig),
    GZip(GZipConfig),
    TrustedHost(TrustedHostConfig),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: String,
    #[serde(default)]
    options: serde_json::Value,
}

fn options<T: serde::de::DeserializeOwned>(
    middleware: &'static str,
    value: serde_json::Value,
) -> Result<T, MiddlewareError> {
    let value = match value {
        serde_json::Value::Null => serde_json::Value::Object(Default::default()),
        v => v,
    };
    serde_json::from_value(value.clone()).map_err(|e| {
        // serde names unknown fields but not mistyped ones: find the option
        // that fails on its own (every field has a default).
        let culprit = value.as_object().and_then(|map| {
            map.iter().find_map(|(k, v)| {
                let one = serde_json::Value::Object([(k.clone(), v.clone())].into_iter().collect());
                serde_json::from_value::<T>(one)
                    .err()
                    .map(|e| format!("option {k}: {e}"))
            })
        });
        invalid(
            middleware,
            culprit.unwrap_or_else(|| format!("options: {e}")),
        )
    })
}

/// Parses the JSON form (empty string: no middlewares) into typed configs.
pub fn parse_config(json: &str) -> Result<Vec<MiddlewareConfig>, MiddlewareError> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    let specs: Vec<RawSpec> =
        serde_json::from_str(json).map_err(|e| MiddlewareError::Json(e.to_string()))?;
    specs
        .into_iter()
        .map(|spec| {
            Ok(match spec.name.as_str() {
                "CORSMiddleware" => {
                    MiddlewareConfig::Cors(options("CORSMiddleware", spec.options)?)
                }
                "GZipMiddleware" => {
                    MiddlewareConfig::GZip(options("GZipMiddleware", spec.options)?)
                }
                "TrustedHostMiddleware" => {
                    MiddlewareConfig::TrustedHost(options("TrustedHostMiddleware", spec.options)?)
                }
                _ => return Err(MiddlewareError::Unsupported(spec.name)),
            })
        })
        .collect()
}

/// Checks a middleware configuration exactly as the proxies will build it.
pub fn validate(json: &str) -> Result<(), MiddlewareError> {
    for config in parse_config(json)? {
        match config {
            MiddlewareConfig::Cors(c) => c.compile().map(|_| ())?,
            MiddlewareConfig::GZip(c) => c.level().map(|_| ())?,
            MiddlewareConfig::TrustedHost(c) => c.hosts().map(|_| ())?,
        }
    }
    Ok(())
}

/// A header value the proxy will send, or the option that cannot be one.
pub fn header_value(
    middleware: &'static str,
    option: &str,
    value: &str,
) -> Result<HeaderValue, MiddlewareError> {
    HeaderValue::from_str(value).map_err(|_| {
        invalid(
            middleware,
            format!("option {option}: {value:?} is not a valid header value"),
        )
    })
}

/// Starlette's `ALL_METHODS`, what `allow_methods=["*"]` means.
pub const ALL_METHODS: [&str; 8] = [
    "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY",
];
/// Request headers a CORS preflight always allows.
pub const SAFELISTED_HEADERS: [&str; 4] = [
    "Accept",
    "Accept-Language",
    "Content-Language",
    "Content-Type",
];

/// A CORS configuration checked and turned into what the proxy compares
/// and sends.
#[derive(Debug)]
pub struct CompiledCors {
    /// `allow_origin_regex` as Python's `fullmatch`.
    pub allow_origin_regex: Option<Regex>,
    /// `allow_methods`, with `*` spelled out.
    pub allow_methods: Vec<String>,
    /// `allow_headers` and the safelisted headers, sorted and deduplicated.
    pub allow_headers: Vec<String>,
    /// `Access-Control-Expose-Headers`, when there are any.
    pub expose_headers: Option<HeaderValue>,
    /// `Access-Control-Allow-Methods` of a preflight answer.
    pub allow_methods_value: HeaderValue,
    /// `Access-Control-Allow-Headers` of a preflight answer, unless every
    /// header is allowed (`*`).
    pub allow_headers_value: Option<HeaderValue>,
}

impl CorsConfig {
    pub const NAME: &'static str = "CORSMiddleware";

    pub fn allows_all_origins(&self) -> bool {
        self.allow_origins.iter().any(|o| o == "*")
    }

    pub fn allows_all_headers(&self) -> bool {
        self.allow_headers.iter().any(|h| h == "*")
    }

    /// Checks the options that must become a regex or header values.
    pub fn compile(&self) -> Result<CompiledCors, MiddlewareError> {
        let allow_methods: Vec<String> = if self.allow_methods.iter().any(|m| m == "*") {
            ALL_METHODS.iter().map(|m| m.to_string()).collect()
        } else {
            self.allow_methods.clone()
        };
        let allow_origin_regex = match &self.allow_origin_regex {
            None => None,
            // Python's `fullmatch`.
            Some(pattern) => Some(Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
                invalid(
                    Self::NAME,
                    format!("option allow_origin_regex {pattern:?} is not a supported regex: {e}"),
                )
            })?),
        };
        let expose_headers = if self.expose_headers.is_empty() {
            None
        } else {
            Some(header_value(
                Self::NAME,
                "expose_headers",
                &self.expose_headers.join(", "),
            )?)
        };
        let allow_methods_value =
            header_value(Self::NAME, "allow_methods", &allow_methods.join(", "))?;
        // sorted(SAFELISTED_HEADERS | set(allow_headers)): Python sorts by code point.
        let mut allow_headers: Vec<String> = SAFELISTED_HEADERS
            .iter()
            .map(|h| h.to_string())
            .chain(self.allow_headers.iter().cloned())
            .collect();
        allow_headers.sort();
        allow_headers.dedup();
        let allow_headers_value = if self.allows_all_headers() {
            None
        } else {
            Some(header_value(
                Self::NAME,
                "allow_headers",
                &allow_headers.join(", "),
            )?)
        };
        Ok(CompiledCors {
            allow_origin_regex,
            allow_methods,
            allow_headers,
            expose_headers,
            allow_methods_value,
            allow_headers_value,
        })
    }
}

impl GZipConfig {
    pub const NAME: &'static str = "GZipMiddleware";

    /// zlib's level, `None` for zlib's default (-1).
    pub fn level(&self) -> Result<Option<u32>, MiddlewareError> {
        match self.compresslevel {
            -1 => Ok(None),
            l @ 0..=9 => Ok(Some(l as u32)),
            l => Err(invalid(
                Self::NAME,
                format!("option compresslevel must be -1 or 0..9, not {l}"),
            )),
        }
    }
}

impl TrustedHostConfig {
    pub const NAME: &'static str = "TrustedHostMiddleware";
    const WILDCARD: &'static str = "Domain wildcard patterns must be like '*.example.com'.";

    /// The allowed host patterns (`["*"]` when unset), checked.
    pub fn hosts(&self) -> Result<Vec<String>, MiddlewareError> {
        let hosts = self
            .allowed_hosts
            .clone()
            .unwrap_or_else(|| vec!["*".into()]);
        for pattern in &hosts {
            let wildcard_inside = pattern.chars().skip(1).any(|ch| ch == '*');
            let bad_prefix =
                pattern.starts_with('*') && pattern != "*" && !pattern.starts_with("*.");
            if wildcard_inside || bad_prefix {
                return Err(invalid(
                    Self::NAME,
                    format!("option allowed_hosts: {pattern:?}: {}", Self::WILDCARD),
                ));
            }
        }
        Ok(hosts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_unknown_middlewares_and_options_by_name() {
        let e = validate(r#"[{"name": "HTTPSRedirectMiddleware", "options": {}}]"#).unwrap_err();
        assert!(e.to_string().contains("HTTPSRedirectMiddleware"), "{e}");
        let e = validate(r#"[{"name": "CORSMiddleware", "options": {"allow_originz": ["*"]}}]"#)
            .unwrap_err();
        assert!(
            e.to_string().contains("CORSMiddleware") && e.to_string().contains("allow_originz"),
            "{e}"
        );
        let e = validate(r#"[{"name": "GZipMiddleware", "options": {"compresslevel": 12}}]"#)
            .unwrap_err();
        assert!(e.to_string().contains("compresslevel"), "{e}");
        let e = validate(
            r#"[{"name": "TrustedHostMiddleware", "options": {"allowed_hosts": ["a.*.com"]}}]"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("*.example.com"), "{e}");
        let e = validate(
            r#"[{"name": "CORSMiddleware", "options": {"allow_origin_regex": "(?<=a)b"}}]"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("allow_origin_regex"), "{e}");
        let e = validate(
            r#"[{"name": "CORSMiddleware", "options": {"allow_origins": ["*"], "max_age": "x"}}]"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("option max_age"), "{e}");
        assert!(matches!(validate("{"), Err(MiddlewareError::Json(_))));
        assert!(matches!(
            validate(r#"[{"nam": "x"}]"#),
            Err(MiddlewareError::Json(_))
        ));
        validate("").unwrap();
        validate("[]").unwrap();
        assert_eq!(
            parse_config(r#"[{"name": "GZipMiddleware"}]"#).unwrap(),
            vec![MiddlewareConfig::GZip(GZipConfig::default())]
        );
    }
}
