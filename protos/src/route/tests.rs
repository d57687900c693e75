use super::*;

#[test]
fn parse_errors_name_the_problem() {
    use RouteError::*;
    assert!(matches!(
        parse_route("api"),
        Err(MissingLeadingSlash { .. })
    ));
    assert!(matches!(
        parse_route("/a/{id"),
        Err(UnbalancedBraces { .. })
    ));
    assert!(matches!(
        parse_route("/a/id}"),
        Err(UnbalancedBraces { .. })
    ));
    assert!(matches!(
        parse_route("/a/{{id}}"),
        Err(UnbalancedBraces { .. })
    ));
    assert!(matches!(
        parse_route("/a/{x}-{y}"),
        Err(TwoParamsInSegment { .. })
    ));
    assert!(matches!(parse_route("/a/{1x}"), Err(InvalidName { .. })));
    assert!(matches!(parse_route("/a/{}"), Err(InvalidName { .. })));
    assert!(matches!(
        parse_route("/a/{id:bool}"),
        Err(UnknownConverter { .. })
    ));
    assert!(matches!(
        parse_route("/a/{p:path}/more"),
        Err(PathNotLast { .. })
    ));
    assert!(matches!(
        parse_route("/a/x{p:path}"),
        Err(PathNotLast { .. })
    ));
    assert!(matches!(
        parse_route("/{id}/{id:int}"),
        Err(DuplicateName { .. })
    ));
    let msg = parse_route("/a/{id:bool}").unwrap_err().to_string();
    assert!(
        msg.contains("/a/{id:bool}") && msg.contains("bool"),
        "{msg}"
    );
}

#[test]
fn parsed_route_exposes_shape() {
    let r = parse_route("/api/{id:int}/{rest:path}").unwrap();
    assert_eq!(r.matchit_pattern(), "/api/{p0}/{*p1}");
    assert_eq!(
        r.params(),
        &[
            ("id".to_string(), Converter::Int),
            ("rest".to_string(), Converter::Path)
        ]
    );
}

#[test]
fn collides_compares_shape_and_converters() {
    assert!(collides("/api/{id}", "/api/{name:str}"));
    assert!(collides("/api/{id:int}", "/api/{n:int}"));
    assert!(collides("/a", "/a"));
    assert!(!collides("/api/{id:int}", "/api/{name}"));
    assert!(!collides("/api/{id}", "/api/{id}/x"));
    assert!(!collides("/a", "/a/"));
    assert!(!collides("/a/{p:path}", "/a/{p}"));
    assert!(!collides("bad", "bad"));
}
