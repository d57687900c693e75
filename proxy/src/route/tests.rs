use super::*;
use serval_protos::frame::PathValue::{Float, Int, Str};

fn methods(list: &[&str]) -> Vec<String> {
    list.iter().map(|m| m.to_string()).collect()
}

fn table(routes: &[(&str, &str, &[&str])]) -> RouteTable {
    let mut t = RouteTable::new();
    for (ep, route, m) in routes {
        t.insert(ep, route, &methods(m)).unwrap();
    }
    t
}

/// Looks up a raw path as the proxy does: decoded first.
fn hit(t: &RouteTable, path: &str, method: &str) -> (String, Vec<(String, PathValue)>) {
    let decoded = decode_path(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let m = t
        .lookup(&decoded, method)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (m.endpoint, m.path_params)
}

fn p(name: &str, v: PathValue) -> (String, PathValue) {
    (name.to_string(), v)
}

#[test]
// 3.14 is the documented example value, not an approximation of PI.
#[allow(clippy::approx_constant)]
fn typed_params_are_converted() {
    let t = table(&[("calc", "/api/{a:int}/{b:float}", &[])]);
    assert_eq!(
        hit(&t, "/api/123/3.14", "GET"),
        ("calc".into(), vec![p("a", Int(123)), p("b", Float(3.14))])
    );
    // A float without fraction is still a float.
    assert_eq!(
        hit(&t, "/api/1/2", "GET").1,
        vec![p("a", Int(1)), p("b", Float(2.0))]
    );
    assert_eq!(t.lookup("/api/x/3.14", "GET"), Err(LookupError::NotFound));
    assert_eq!(t.lookup("/api/1/3.", "GET"), Err(LookupError::NotFound));
    assert_eq!(t.lookup("/api/-1/3", "GET"), Err(LookupError::NotFound));
    // Too many digits for an i64 fits no converter.
    assert_eq!(
        t.lookup("/api/99999999999999999999/1", "GET"),
        Err(LookupError::NotFound)
    );
}

#[test]
fn shared_shapes_are_tried_in_registration_order() {
    let t = table(&[
        ("by_id", "/api/{id:int}", &[]),
        ("by_name", "/api/{name}", &[]),
    ]);
    assert_eq!(
        hit(&t, "/api/42", "GET"),
        ("by_id".into(), vec![p("id", Int(42))])
    );
    assert_eq!(
        hit(&t, "/api/bob", "GET"),
        ("by_name".into(), vec![p("name", Str("bob".into()))])
    );

    // Reversed order: the str route takes everything, as in Starlette.
    let t = table(&[
        ("by_name", "/api/{name}", &[]),
        ("by_id", "/api/{id:int}", &[]),
    ]);
    assert_eq!(hit(&t, "/api/42", "GET").0, "by_name");
}

#[test]
fn bad_value_is_not_found() {
    let t = table(&[("a", "/items/{id:int}", &[]), ("u", "/u/{id:uuid}", &[])]);
    assert_eq!(t.lookup("/items/abc", "GET"), Err(LookupError::NotFound));
    assert_eq!(t.lookup("/u/not-a-uuid", "GET"), Err(LookupError::NotFound));
    assert_eq!(t.lookup("/nothing", "GET"), Err(LookupError::NotFound));
}

#[test]
fn wrong_method_gives_allow_list() {
    let t = table(&[
        ("a", "/x", &["get", "post"]),
        ("b", "/x", &["PUT"]),
        ("c", "/y/{id}", &["DELETE"]),
    ]);
    assert_eq!(hit(&t, "/x", "POST").0, "a");
    assert_eq!(hit(&t, "/x", "put").0, "b");
    assert_eq!(
        t.lookup("/x", "PATCH"),
        Err(LookupError::MethodNotAllowed {
            allow: methods(&["GET", "POST", "PUT"])
        })
    );
    assert_eq!(
        t.lookup("/y/1", "GET"),
        Err(LookupError::MethodNotAllowed {
            allow: methods(&["DELETE"])
        })
    );
}

#[test]
fn empty_methods_allow_everything() {
    let t = table(&[("a", "/any", &[])]);
    for m in ["GET", "POST", "DELETE", "PATCH"] {
        assert_eq!(hit(&t, "/any", m).0, "a");
    }
}

#[test]
fn later_full_match_beats_earlier_path_only_match() {
    let t = table(&[
        ("getter", "/f/{name}", &["GET"]),
        ("all", "/{rest:path}", &["POST"]),
    ]);
    assert_eq!(hit(&t, "/f/x", "POST").0, "all");
    assert_eq!(hit(&t, "/f/x", "GET").0, "getter");
}

#[test]
fn uuid_accepts_both_cases_and_lowercases() {
    let t = table(&[("u", "/u/{id:uuid}", &[])]);
    let upper = "123E4567-E89B-12D3-A456-426614174000";
    assert_eq!(
        hit(&t, &format!("/u/{upper}"), "GET").1,
        vec![p("id", PathValue::Uuid(upper.to_ascii_lowercase()))]
    );
    assert_eq!(
        t.lookup("/u/123e4567e89b12d3a456426614174000", "GET"),
        Err(LookupError::NotFound)
    );
    assert_eq!(
        t.lookup("/u/123e4567-e89b-12d3-a456-42661417400g", "GET"),
        Err(LookupError::NotFound)
    );
}

#[test]
fn path_converter_takes_the_rest() {
    let t = table(&[
        ("files", "/static/{file:path}", &[]),
        ("one", "/doc/{name}", &[]),
    ]);
    assert_eq!(
        hit(&t, "/static/css/site.css", "GET").1,
        vec![p("file", Str("css/site.css".into()))]
    );
    assert_eq!(
        hit(&t, "/static/a", "GET").1,
        vec![p("file", Str("a".into()))]
    );
    // Starlette's path converter is `.*`: it may be empty.
    assert_eq!(
        hit(&t, "/static/", "GET").1,
        vec![p("file", Str(String::new()))]
    );
    // A str parameter never spans segments.
    assert_eq!(t.lookup("/doc/a/b", "GET"), Err(LookupError::NotFound));
}

#[test]
fn str_next_to_path_on_one_prefix_both_work() {
    // matchit refuses this pair; the scan serves the second one.
    let t = table(&[("one", "/f/{name}", &[]), ("rest", "/f/{tail:path}", &[])]);
    assert_eq!(hit(&t, "/f/a", "GET").0, "one");
    assert_eq!(
        hit(&t, "/f/a/b", "GET"),
        ("rest".into(), vec![p("tail", Str("a/b".into()))])
    );
}

#[test]
fn several_params_prefixes_and_percent_decoding() {
    let t = table(&[
        ("img", "/u/{user}/img-{n:int}.png", &[]),
        ("root", "/", &[]),
    ]);
    assert_eq!(
        hit(&t, "/u/ann%20lee/img-7.png", "GET").1,
        vec![p("user", Str("ann lee".into())), p("n", Int(7))]
    );
    assert_eq!(hit(&t, "/", "GET").0, "root");
    assert_eq!(
        t.lookup("/u/ann/img-7.jpg", "GET"),
        Err(LookupError::NotFound)
    );
    assert_eq!(
        t.lookup("/u/ann/img-7.png/", "GET"),
        Err(LookupError::NotFound)
    );
}

#[test]
fn paths_are_decoded_as_starlette_reads_them_and_refused_when_unreadable() {
    assert_eq!(decode_path("/plain").unwrap(), "/plain");
    assert_eq!(decode_path("/%61dmin").unwrap(), "/admin");
    // %2F is a '/' like any escape (Starlette routes the decoded path).
    assert_eq!(decode_path("/a%2Fb%2f").unwrap(), "/a/b/");
    assert_eq!(decode_path("/caf%C3%A9").unwrap(), "/café");
    // Invalid escapes stay as written, as Python's unquote keeps them.
    assert_eq!(decode_path("/%zz/%4/%").unwrap(), "/%zz/%4/%");
    assert_eq!(decode_path("/a%00b"), Err(PathError::Nul));
    assert_eq!(decode_path("/%FF"), Err(PathError::NotUtf8));
    assert_eq!(decode_path("/%C3"), Err(PathError::NotUtf8));

    let t = table(&[
        ("ab", "/a/b", &[]),
        ("one", "/one/{name}", &[]),
        ("rest", "/f/{tail:path}", &[]),
    ]);
    assert_eq!(hit(&t, "/a%2Fb", "GET").0, "ab");
    // A '/' from %2F is a separator: no {name} segment holds it.
    assert_eq!(
        t.lookup(&decode_path("/one/x%2Fy").unwrap(), "GET"),
        Err(LookupError::NotFound)
    );
    assert_eq!(
        hit(&t, "/f/x%2Fy", "GET").1,
        vec![p("tail", Str("x/y".into()))]
    );
}

#[test]
fn a_bad_route_leaves_the_table_unchanged() {
    let mut t = RouteTable::new();
    assert!(t.insert("e", "/{x:nope}", &[]).is_err());
    assert!(t.is_empty());
}

#[test]
fn routes_listed_in_order() {
    let t = table(&[("a", "/a", &[]), ("b", "/b/{x}", &[])]);
    assert_eq!(
        t.routes().collect::<Vec<_>>(),
        vec![("/a", "a"), ("/b/{x}", "b")]
    );
}

#[test]
fn prefixes_hold_their_subtree_longest_first_after_routes() {
    let mut t = table(&[("exact", "/api/v1/special", &["GET"])]);
    t.insert_prefix("root", "/").unwrap();
    t.insert_prefix("api", "/api").unwrap();
    t.insert_prefix("v1", "/api/v1").unwrap();
    assert_eq!(hit(&t, "/api/v1/special", "GET").0, "exact");
    assert_eq!(hit(&t, "/api/v1/other", "POST").0, "v1");
    assert_eq!(hit(&t, "/api/v1", "GET").0, "v1");
    assert_eq!(hit(&t, "/api/v2", "DELETE").0, "api");
    assert_eq!(hit(&t, "/api", "GET").0, "api");
    // A prefix is whole segments: "/apix" is not under "/api".
    assert_eq!(hit(&t, "/apix", "GET").0, "root");
    assert_eq!(hit(&t, "/", "GET").0, "root");
    // An exact route's other methods fall through to the prefix that holds it.
    assert_eq!(hit(&t, "/api/v1/special", "POST").0, "v1");
    assert_eq!(
        t.routes().collect::<Vec<_>>(),
        vec![
            ("/api/v1/special", "exact"),
            ("/api/v1", "v1"),
            ("/api", "api"),
            ("/", "root")
        ]
    );

    let mut only = RouteTable::new();
    only.insert_prefix("app", "/app").unwrap();
    assert_eq!(only.lookup("/other", "GET"), Err(LookupError::NotFound));
    for bad in ["app", "/app/", "/a/{x}", ""] {
        assert!(
            matches!(
                only.insert_prefix("x", bad),
                Err(RouteError::BadPrefix { .. })
            ),
            "{bad}"
        );
    }
}

mod fuzz {
    //! Random route strings and paths never panic the parser, the decoder
    //! or a lookup; a route built from Starlette's grammar parses and
    //! matches the paths it describes, with the values it was given.

    use super::*;
    use proptest::prelude::*;
    use serval_protos::frame::PathValue::Uuid;

    /// One generated segment: its route text, and a path piece with the
    /// value the route should read from it (none for static text).
    #[derive(Debug, Clone)]
    struct Piece {
        route: String,
        path: String,
        value: Option<PathValue>,
    }

    /// `%XX` for every byte of `s`.
    fn escape(s: &str) -> String {
        s.bytes().map(|b| format!("%{b:02X}")).collect()
    }

    fn value() -> impl Strategy<Value = (&'static str, String, PathValue)> {
        prop_oneof![
            // str values: no '/', and letters the static text never uses.
            ("[A-Z0-9_~]{1,8}", any::<bool>()).prop_map(|(v, esc)| {
                let raw = if esc { escape(&v) } else { v.clone() };
                ("str", raw, Str(v))
            }),
            any::<u32>().prop_map(|n| ("int", n.to_string(), Int(n.into()))),
            (any::<u16>(), proptest::option::of("[0-9]{1,4}")).prop_map(|(w, f)| {
                let text = match f {
                    Some(f) => format!("{w}.{f}"),
                    None => w.to_string(),
                };
                let v = text.parse().unwrap();
                ("float", text, Float(v))
            }),
            (any::<u128>(), any::<bool>()).prop_map(|(n, upper)| {
                let h = format!("{n:032x}");
                let u = format!(
                    "{}-{}-{}-{}-{}",
                    &h[..8],
                    &h[8..12],
                    &h[12..16],
                    &h[16..20],
                    &h[20..]
                );
                let raw = if upper {
                    u.to_ascii_uppercase()
                } else {
                    u.clone()
                };
                ("uuid", raw, Uuid(u))
            }),
        ]
    }

    fn piece() -> impl Strategy<Value = Piece> {
        prop_oneof![
            "[a-z]{1,6}".prop_map(|s| Piece {
                route: s.clone(),
                path: s,
                value: None,
            }),
            ("[a-z]{0,2}", value(), "(|-[a-z]|\\.[a-z]{1,3})").prop_map(
                |(prefix, (conv, raw, v), suffix)| Piece {
                    route: format!("{prefix}{{NAME:{conv}}}{suffix}"),
                    path: format!("{prefix}{raw}{suffix}"),
                    value: Some(v),
                }
            ),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn random_routes_and_paths_never_panic(
            route in "(/|\\{|\\}|:|[a-z]|int|path|float|uuid|str){0,24}",
            path in "(/|%|[0-9A-Fa-f]|[a-z]|\\.){0,24}",
            method in "(GET|POST|[A-Z]{1,5})",
        ) {
            let _ = collides(&route, &path);
            let mut table = RouteTable::new();
            let _ = table.insert("e", &route, &[]);
            let _ = table.insert("f", "/x/{a:path}", &["POST".to_string()]);
            if let Ok(decoded) = decode_path(&path) {
                let _ = table.lookup(&decoded, &method);
            }
        }

        #[test]
        fn a_parsed_route_matches_the_paths_it_describes(
            pieces in proptest::collection::vec(piece(), 0..5),
            rest in proptest::option::of(proptest::collection::vec("[A-Za-z0-9._-]{1,5}", 0..3)),
        ) {
            let mut route = String::new();
            let mut path = String::new();
            let mut expected = Vec::new();
            for (i, p) in pieces.iter().enumerate() {
                route.push('/');
                route.push_str(&p.route.replace("NAME", &format!("n{i}")));
                path.push('/');
                path.push_str(&p.path);
                if let Some(v) = &p.value {
                    expected.push((format!("n{i}"), v.clone()));
                }
            }
            if let Some(rest) = &rest {
                route.push_str("/{tail:path}");
                let tail = rest.join("/");
                path.push('/');
                path.push_str(&tail);
                expected.push(("tail".to_string(), Str(tail)));
            }
            if route.is_empty() {
                route.push('/');
                path.push('/');
            }
            let parsed = parse_route(&route);
            prop_assert!(parsed.is_ok(), "{route}: {parsed:?}");
            let mut table = RouteTable::new();
            table.insert("e", &route, &[]).unwrap();
            let decoded = decode_path(&path).unwrap();
            let found = table.lookup(&decoded, "GET");
            prop_assert_eq!(
                found,
                Ok(RouteMatch { endpoint: "e".into(), path_params: expected, root_path: String::new() }),
                "route {} path {}", route, path
            );
        }
    }
}
