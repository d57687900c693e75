//! Starlette-style routes, compiled to matchit.
//!
//! A route such as `/api/{id:int}/{rest:path}` is parsed once into a
//! [`ParsedRoute`]: its segments, its typed parameters and a matchit pattern
//! whose parameters are named by position (`/api/{p0}/{*p1}`). Naming by
//! position makes `/api/{id:int}` and `/api/{name}` the same matchit *shape*,
//! so they share one matchit entry and the [`RouteTable`] tries the routes of
//! a shape in registration order, converting values as it goes, as Starlette
//! tries its routes in order. A value that fits no converter is not a match.
//!
//! matchit refuses some overlaps that Starlette accepts (`/f/{name}` next to
//! `/f/{rest:path}`). Such routes stay in the table and are found by a linear
//! Starlette-style scan, which also runs when the matchit candidate's
//! converters all refuse the value, so matchit is a fast path, never a
//! different answer than "first registered route that fits".
//!
//! One difference remains on purpose: matchit prefers a static segment over a
//! parameter (`/api/special` beats `/api/{name}` whatever their order).

use std::collections::HashMap;
use std::fmt;

use serval_protos::frame::PathValue;

mod parse;
#[cfg(test)]
mod tests;

pub use parse::parse_route;

/// Starlette's path converters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Converter {
    /// One non-empty segment without '/' (the default).
    Str,
    /// ASCII digits, converted to `i64`.
    Int,
    /// Digits with an optional `.digits` fraction, converted to `f64`.
    Float,
    /// The rest of the path, '/' included; only as the last segment.
    Path,
    /// A canonical 8-4-4-4-12 hex UUID, either case; passed on lowercased.
    Uuid,
}

impl Converter {
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "str" => Self::Str,
            "int" => Self::Int,
            "float" => Self::Float,
            "path" => Self::Path,
            "uuid" => Self::Uuid,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Str => "str",
            Self::Int => "int",
            Self::Float => "float",
            Self::Path => "path",
            Self::Uuid => "uuid",
        }
    }

    /// Converts one raw (already percent-decoded) value, or `None` when the
    /// value does not fit this converter.
    pub fn convert(self, raw: &str) -> Option<PathValue> {
        match self {
            Self::Str => {
                (!raw.is_empty() && !raw.contains('/')).then(|| PathValue::Str(raw.to_owned()))
            }
            // The path converter is Starlette's `.*`: it may be empty.
            Self::Path => Some(PathValue::Str(raw.to_owned())),
            Self::Int => {
                if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                // More digits than an i64 holds fits no converter: not found.
                raw.parse().ok().map(PathValue::Int)
            }
            Self::Float => {
                let (whole, frac) = match raw.split_once('.') {
                    Some((w, f)) => (w, Some(f)),
                    None => (raw, None),
                };
                let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
                if !digits(whole) || !frac.is_none_or(digits) {
                    return None;
                }
                raw.parse().ok().map(PathValue::Float)
            }
            Self::Uuid => is_uuid(raw).then(|| PathValue::Uuid(raw.to_ascii_lowercase())),
        }
    }
}

fn is_uuid(raw: &str) -> bool {
    raw.len() == 36
        && raw.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// Errors found while parsing a route; each names the route and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("route {route:?} must start with '/'")]
    MissingLeadingSlash { route: String },
    #[error("route {route:?} has unbalanced braces in segment {segment:?}")]
    UnbalancedBraces { route: String, segment: String },
    #[error("route {route:?} has more than one parameter in segment {segment:?}")]
    TwoParamsInSegment { route: String, segment: String },
    #[error("route {route:?} has an invalid parameter name {name:?} (letters, digits and '_', not starting with a digit)")]
    InvalidName { route: String, name: String },
    #[error("route {route:?}: parameter {name:?} uses unknown converter {converter:?} (known: str, int, float, path, uuid)")]
    UnknownConverter {
        route: String,
        name: String,
        converter: String,
    },
    #[error(
        "route {route:?}: path parameter {name:?} must be a whole segment at the end of the route"
    )]
    PathNotLast { route: String, name: String },
    #[error("route {route:?} names parameter {name:?} twice")]
    DuplicateName { route: String, name: String },
    #[error("route prefix {route:?} must start with '/', not end with '/' (unless it is \"/\") and hold no '{{' or '}}'")]
    BadPrefix { route: String },
}

/// One segment of a parsed route (the text between two '/').
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    Static(String),
    /// One parameter with optional static text on either side (`img-{id}.png`).
    Param {
        prefix: String,
        index: usize,
        suffix: String,
    },
    /// `{name:path}`: everything from here to the end of the path.
    Rest {
        index: usize,
    },
}

/// A validated route.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedRoute {
    pub(crate) route: String,
    pub(crate) segments: Vec<Segment>,
    pub(crate) params: Vec<(String, Converter)>,
    pub(crate) pattern: String,
}

impl ParsedRoute {
    /// The route as written.
    pub fn route(&self) -> &str {
        &self.route
    }

    /// Parameter names and converters in the order they appear.
    pub fn params(&self) -> &[(String, Converter)] {
        &self.params
    }

    /// The matchit pattern, parameters named by position (`/api/{p0}`).
    pub fn matchit_pattern(&self) -> &str {
        &self.pattern
    }

    /// The shape with converters but without names: equal signatures mean
    /// two routes match exactly the same paths.
    fn signature(&self) -> String {
        let mut out = String::new();
        for seg in &self.segments {
            out.push('/');
            match seg {
                Segment::Static(s) => out.push_str(s),
                Segment::Param {
                    prefix,
                    index,
                    suffix,
                } => {
                    out.push_str(prefix);
                    out.push_str(&format!("{{:{}}}", self.params[*index].1.name()));
                    out.push_str(suffix);
                }
                Segment::Rest { .. } => out.push_str("{:path}"),
            }
        }
        out
    }

    /// Converts matchit's positional captures into typed, named values.
    fn convert_captures(
        &self,
        captures: &matchit::Params<'_, '_>,
    ) -> Option<Vec<(String, PathValue)>> {
        let mut out = Vec::with_capacity(self.params.len());
        for (i, (name, conv)) in self.params.iter().enumerate() {
            let raw = captures.get(position_name(i))?;
            out.push((name.clone(), conv.convert(raw)?));
        }
        Some(out)
    }

    /// Starlette's matching without matchit: used for the routes matchit
    /// refused and for values the matchit candidates' converters refused.
    fn match_path(&self, path: &str) -> Option<Vec<(String, PathValue)>> {
        let rest = path.strip_prefix('/')?;
        let mut values: Vec<Option<PathValue>> = vec![None; self.params.len()];
        let mut remaining = Some(rest);
        for seg in &self.segments {
            let current = remaining?;
            if let Segment::Rest { index } = seg {
                values[*index] = Some(self.params[*index].1.convert(current)?);
                remaining = None;
                continue;
            }
            let (piece, next) = match current.split_once('/') {
                Some((p, n)) => (p, Some(n)),
                None => (current, None),
            };
            match seg {
                Segment::Static(s) if s == piece => {}
                Segment::Param {
                    prefix,
                    index,
                    suffix,
                } => {
                    let inner = piece
                        .strip_prefix(prefix.as_str())?
                        .strip_suffix(suffix.as_str())?;
                    values[*index] = Some(self.params[*index].1.convert(inner)?);
                }
                _ => return None,
            }
            remaining = next;
        }
        // Every path segment must be consumed (a Rest consumes them all).
        if remaining.is_some() {
            return None;
        }
        self.params
            .iter()
            .zip(values)
            .map(|((name, _), v)| v.map(|v| (name.clone(), v)))
            .collect()
    }
}

/// matchit parameter name of the `i`-th parameter. A small table avoids a
/// format! per lookup for the common cases.
fn position_name(i: usize) -> std::borrow::Cow<'static, str> {
    const NAMES: [&str; 8] = ["p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7"];
    match NAMES.get(i) {
        Some(n) => std::borrow::Cow::Borrowed(n),
        None => std::borrow::Cow::Owned(format!("p{i}")),
    }
}

/// Whether two routes have the same shape and converters, so the same paths
/// reach both: the controller refuses a second endpoint on such a route.
/// Unparsable routes collide with nothing (they are refused elsewhere).
pub fn collides(a: &str, b: &str) -> bool {
    match (parse_route(a), parse_route(b)) {
        (Ok(a), Ok(b)) => a.signature() == b.signature(),
        _ => false,
    }
}

/// A successful lookup.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteMatch {
    pub endpoint: String,
    pub path_params: Vec<(String, PathValue)>,
    /// The route prefix that matched ("" for a route, or the prefix "/").
    pub root_path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("no route matches")]
    NotFound,
    #[error("method not allowed; allowed: {}", allow.join(", "))]
    MethodNotAllowed { allow: Vec<String> },
}

#[derive(Debug)]
struct Entry {
    endpoint: String,
    route: ParsedRoute,
    /// Uppercase; empty means every method.
    methods: Vec<String>,
}

impl Entry {
    fn allows(&self, method: &str) -> bool {
        self.methods.is_empty() || self.methods.iter().any(|m| m.eq_ignore_ascii_case(method))
    }
}

/// Checks a route prefix (Ray Serve 2.x `route_prefix`): "/" or
/// "/a/b", without parameters.
pub fn check_prefix(prefix: &str) -> Result<(), RouteError> {
    let ok = prefix.starts_with('/')
        && (prefix == "/" || !prefix.ends_with('/'))
        && !prefix.contains(['{', '}']);
    if ok {
        Ok(())
    } else {
        Err(RouteError::BadPrefix {
            route: prefix.to_owned(),
        })
    }
}

/// Whether `path` is `prefix` or below it ("/a" holds "/a" and "/a/b",
/// not "/ab"; "/" holds every path).
fn under_prefix(path: &str, prefix: &str) -> bool {
    prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Routes of every endpoint, immutable once built; the proxy swaps in a new
/// table on each snapshot instead of editing one under readers.
#[derive(Default)]
pub struct RouteTable {
    /// matchit pattern -> index into `shapes`.
    matcher: matchit::Router<usize>,
    /// Entry indices per matchit shape, in registration order.
    shapes: Vec<Vec<usize>>,
    /// Our own shape map: matchit has no "get or insert", and keeping it here
    /// means a refused insert never loses a route.
    shape_of_pattern: HashMap<String, usize>,
    entries: Vec<Entry>,
    /// `(prefix, endpoint)`, longest prefix first: an application's route
    /// prefix serves every method, after the routes above found nothing.
    prefixes: Vec<(String, String)>,
}

impl fmt::Debug for RouteTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteTable")
            .field("entries", &self.entries)
            .finish_non_exhaustive()
    }
}

impl RouteTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a route of `endpoint` after every route added before it.
    pub fn insert(
        &mut self,
        endpoint: &str,
        route: &str,
        methods: &[String],
    ) -> Result<(), RouteError> {
        let parsed = parse_route(route)?;
        let index = self.entries.len();
        match self.shape_of_pattern.get(&parsed.pattern) {
            Some(&shape) => self.shapes[shape].push(index),
            None => {
                let shape = self.shapes.len();
                if let Err(e) = self.matcher.insert(parsed.pattern.clone(), shape) {
                    // Still served, by the linear scan in `lookup`.
                    tracing::debug!(route, error = %e, "matchit refused the route; it is matched by scan");
                } else {
                    self.shape_of_pattern.insert(parsed.pattern.clone(), shape);
                    self.shapes.push(vec![index]);
                }
            }
        }
        self.entries.push(Entry {
            endpoint: endpoint.to_owned(),
            route: parsed,
            methods: methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
        });
        Ok(())
    }

    /// Adds a route prefix of `endpoint`: the prefix and every path below
    /// it, any method. Among prefixes the longest holding a path wins.
    pub fn insert_prefix(&mut self, endpoint: &str, prefix: &str) -> Result<(), RouteError> {
        check_prefix(prefix)?;
        // Stable: equal lengths keep registration order.
        let at = self
            .prefixes
            .iter()
            .position(|(p, _)| p.len() < prefix.len())
            .unwrap_or(self.prefixes.len());
        self.prefixes
            .insert(at, (prefix.to_owned(), endpoint.to_owned()));
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.prefixes.is_empty()
    }

    /// `(route, endpoint)` pairs: routes in registration order, then
    /// prefixes, longest first.
    pub fn routes(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries
            .iter()
            .map(|e| (e.route.route.as_str(), e.endpoint.as_str()))
            .chain(self.prefixes.iter().map(|(p, e)| (p.as_str(), e.as_str())))
    }

    /// The endpoint of the longest prefix holding `decoded`.
    fn lookup_prefix(&self, decoded: &str) -> Option<RouteMatch> {
        self.prefixes
            .iter()
            .find(|(prefix, _)| under_prefix(decoded, prefix))
            .map(|(prefix, endpoint)| RouteMatch {
                endpoint: endpoint.clone(),
                path_params: Vec::new(),
                root_path: if prefix == "/" {
                    String::new()
                } else {
                    prefix.clone()
                },
            })
    }

    /// Finds the endpoint for a request. `decoded` is the request path
    /// after [`decode_path`]: Starlette matches the decoded path.
    pub fn lookup(&self, decoded: &str, method: &str) -> Result<RouteMatch, LookupError> {
        let mut allow: Vec<String> = Vec::new();
        let mut tried: &[usize] = &[];

        // Fast path: the one matchit shape for this path.
        if let Ok(hit) = self.matcher.at(decoded) {
            tried = &self.shapes[*hit.value];
            for &i in tried {
                let entry = &self.entries[i];
                if let Some(params) = entry.route.convert_captures(&hit.params) {
                    if entry.allows(method) {
                        return Ok(RouteMatch {
                            endpoint: entry.endpoint.clone(),
                            path_params: params,
                            root_path: String::new(),
                        });
                    }
                    add_allowed(&mut allow, entry);
                }
            }
        }

        // Starlette's order over the rest: a later full match beats an earlier
        // route that matched only the path.
        for (i, entry) in self.entries.iter().enumerate() {
            if tried.contains(&i) {
                continue;
            }
            if let Some(params) = entry.route.match_path(decoded) {
                if entry.allows(method) {
                    return Ok(RouteMatch {
                        endpoint: entry.endpoint.clone(),
                        path_params: params,
                        root_path: String::new(),
                    });
                }
                add_allowed(&mut allow, entry);
            }
        }
        if let Some(hit) = self.lookup_prefix(decoded) {
            return Ok(hit);
        }
        if allow.is_empty() {
            Err(LookupError::NotFound)
        } else {
            Err(LookupError::MethodNotAllowed { allow })
        }
    }
}

fn add_allowed(allow: &mut Vec<String>, entry: &Entry) {
    for m in &entry.methods {
        if !allow.contains(m) {
            allow.push(m.clone());
        }
    }
}

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
