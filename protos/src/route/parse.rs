//! Parsing and validation of Starlette route strings. Other crates (the
//! controller at `create_endpoint`) call [`parse_route`] so a bad route is an
//! error for the user, never a surprise in the proxy.

use super::{position_name, Converter, ParsedRoute, RouteError, Segment};

/// Parses and validates a Starlette-style route such as `/api/{id:int}`.
pub fn parse_route(route: &str) -> Result<ParsedRoute, RouteError> {
    let Some(body) = route.strip_prefix('/') else {
        return Err(RouteError::MissingLeadingSlash {
            route: route.to_owned(),
        });
    };
    let pieces: Vec<&str> = body.split('/').collect();
    let last = pieces.len() - 1;
    let mut segments = Vec::with_capacity(pieces.len());
    let mut params: Vec<(String, Converter)> = Vec::new();
    let mut pattern = String::with_capacity(route.len() + 8);

    for (n, piece) in pieces.iter().enumerate() {
        pattern.push('/');
        let unbalanced = || RouteError::UnbalancedBraces {
            route: route.to_owned(),
            segment: (*piece).to_owned(),
        };
        let Some(open) = piece.find('{') else {
            if piece.contains('}') {
                return Err(unbalanced());
            }
            segments.push(Segment::Static((*piece).to_owned()));
            pattern.push_str(piece);
            continue;
        };
        let prefix = &piece[..open];
        let after = &piece[open + 1..];
        let Some(close) = after.find('}') else {
            return Err(unbalanced());
        };
        let inner = &after[..close];
        let suffix = &after[close + 1..];
        if prefix.contains('}') || inner.contains('{') {
            return Err(unbalanced());
        }
        if suffix.contains('{') {
            return Err(RouteError::TwoParamsInSegment {
                route: route.to_owned(),
                segment: (*piece).to_owned(),
            });
        }
        if suffix.contains('}') {
            return Err(unbalanced());
        }

        let (name, converter) = match inner.split_once(':') {
            Some((name, conv)) => {
                let Some(c) = Converter::from_name(conv) else {
                    return Err(RouteError::UnknownConverter {
                        route: route.to_owned(),
                        name: name.to_owned(),
                        converter: conv.to_owned(),
                    });
                };
                (name, c)
            }
            None => (inner, Converter::Str),
        };
        if !valid_name(name) {
            return Err(RouteError::InvalidName {
                route: route.to_owned(),
                name: name.to_owned(),
            });
        }
        if params.iter().any(|(n, _)| n == name) {
            return Err(RouteError::DuplicateName {
                route: route.to_owned(),
                name: name.to_owned(),
            });
        }
        let index = params.len();
        params.push((name.to_owned(), converter));

        if converter == Converter::Path {
            // matchit's catch-all is a whole final segment; so is ours.
            if n != last || !prefix.is_empty() || !suffix.is_empty() {
                return Err(RouteError::PathNotLast {
                    route: route.to_owned(),
                    name: name.to_owned(),
                });
            }
            segments.push(Segment::Rest { index });
            pattern.push_str("{*");
            pattern.push_str(&position_name(index));
            pattern.push('}');
        } else {
            segments.push(Segment::Param {
                prefix: prefix.to_owned(),
                index,
                suffix: suffix.to_owned(),
            });
            pattern.push_str(prefix);
            pattern.push('{');
            pattern.push_str(&position_name(index));
            pattern.push('}');
            pattern.push_str(suffix);
        }
    }
    Ok(ParsedRoute {
        route: route.to_owned(),
        segments,
        params,
        pattern,
    })
}

/// Starlette's parameter names: `[a-zA-Z_][a-zA-Z0-9_]*`.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
