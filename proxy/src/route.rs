//! Starlette-style routes, compiled to matchit.
//!
//! A route such as `/api/{id:int}/{rest:path}` is parsed once
//! (`serval_protos::route`, the grammar the controller checks too) into a
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
pub use serval_protos::route::{
    check_prefix, collides, parse_route, position_name, Converter, ParsedRoute, RouteError,
};

// Routes match the decoded path; the decoder is shared with the routing core.
pub use crate::percent::{decode_path, PathError};

#[cfg(test)]
mod tests;

/// Converts matchit's positional captures into typed, named values.
fn convert_captures(
    route: &ParsedRoute,
    captures: &matchit::Params<'_, '_>,
) -> Option<Vec<(String, PathValue)>> {
    let mut out = Vec::with_capacity(route.params().len());
    for (i, (name, conv)) in route.params().iter().enumerate() {
        let raw = captures.get(position_name(i))?;
        out.push((name.clone(), conv.convert(raw)?));
    }
    Some(out)
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
        match self.shape_of_pattern.get(parsed.matchit_pattern()) {
            Some(&shape) => self.shapes[shape].push(index),
            None => {
                let shape = self.shapes.len();
                if let Err(e) = self.matcher.insert(parsed.matchit_pattern(), shape) {
                    // Still served, by the linear scan in `lookup`.
                    tracing::debug!(route, error = %e, "matchit refused the route; it is matched by scan");
                } else {
                    self.shape_of_pattern
                        .insert(parsed.matchit_pattern().to_owned(), shape);
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
            .map(|e| (e.route.route(), e.endpoint.as_str()))
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
                if let Some(params) = convert_captures(&entry.route, &hit.params) {
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
