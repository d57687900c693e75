//! The route grammar: Starlette-style routes (`/api/{id:int}/{rest:path}`)
//! and Ray Serve 2.x route prefixes, parsed and validated once.
//!
//! One grammar for every process: the controller refuses a bad route or a
//! second endpoint on a route that collides with another ([`parse_route`],
//! [`check_prefix`], [`collides`]) when the endpoint is created, so a bad
//! route is an error for the user, never a surprise in the proxy; the proxy
//! compiles the same [`ParsedRoute`]s into its matchit table
//! (`serval_proxy::route::RouteTable`).
//!
//! A parsed route's matchit pattern names its parameters by position
//! (`/api/{p0}/{*p1}`), so `/api/{id:int}` and `/api/{name}` have the same
//! *shape*; [`ParsedRoute::match_path`] is Starlette's matching of one
//! route, converters and all.

use crate::frame::PathValue;

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
    fn from_name(name: &str) -> Option<Self> {
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
enum Segment {
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
    route: String,
    segments: Vec<Segment>,
    params: Vec<(String, Converter)>,
    pattern: String,
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

    /// Starlette's matching of one route: the typed, named values of
    /// `path` (already percent-decoded), or `None` when it does not match.
    /// The proxy's table uses it for the routes matchit refused and for
    /// values the matchit candidates' converters refused.
    pub fn match_path(&self, path: &str) -> Option<Vec<(String, PathValue)>> {
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

/// The name of the `i`-th parameter in [`ParsedRoute::matchit_pattern`]. A small table avoids a
/// format! per lookup for the common cases.
pub fn position_name(i: usize) -> std::borrow::Cow<'static, str> {
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
