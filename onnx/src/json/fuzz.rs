//! Property tests: random JSON against a few input signatures never
//! panics, never builds a tensor larger than the JSON it came from, and
//! refuses nesting deeper than [`MAX_RANK`].

use proptest::prelude::*;
use serde_json::{Map, Number, Value};
use tract_onnx::prelude::*;

use super::{to_tensor, MAX_RANK};
use crate::model::InputSpec;

const TYPES: [DatumType; 8] = [
    DatumType::F32,
    DatumType::F64,
    DatumType::F16,
    DatumType::I64,
    DatumType::I32,
    DatumType::U8,
    DatumType::Bool,
    DatumType::String,
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| Value::Number(i.into())),
        any::<u64>().prop_map(|i| Value::Number(i.into())),
        any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
        prop::collection::vec(any::<char>(), 0..6)
            .prop_map(|c| Value::String(c.into_iter().collect())),
    ]
}

/// Any JSON value: mostly lists (regular or ragged), some objects.
fn json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(6, 256, 8, |inner| {
        prop_oneof![
            4 => prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            // Regular lists: n copies of one value, so shapes often fit.
            4 => (inner.clone(), 0..5usize).prop_map(|(v, n)| Value::Array(vec![v; n])),
            1 => prop::collection::vec(inner, 0..3).prop_map(|v| {
                Value::Object(
                    v.into_iter()
                        .enumerate()
                        .map(|(i, v)| (format!("k{i}"), v))
                        .collect::<Map<_, _>>(),
                )
            }),
        ]
    })
}

/// A declared dimension: open, small, or absurdly large.
fn dim() -> impl Strategy<Value = Option<usize>> {
    prop_oneof![
        Just(None),
        (0..4usize).prop_map(Some),
        Just(Some(1usize << 40)),
        Just(Some(usize::MAX)),
    ]
}

fn nodes(v: &Value) -> usize {
    1 + match v {
        Value::Array(items) => items.iter().map(nodes).sum(),
        Value::Object(map) => map.values().map(nodes).sum(),
        _ => 0,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn json_to_tensor_never_panics_and_is_bounded_by_its_input(
        value in json(),
        dt in prop::sample::select(TYPES.to_vec()),
        shape in prop::collection::vec(dim(), 0..4),
    ) {
        if let Ok(t) = to_tensor(&value, dt) {
            prop_assert!(t.len() <= nodes(&value));
            prop_assert!(t.rank() <= MAX_RANK);
        }
        let spec = InputSpec { name: "x".into(), datum_type: dt, shape: shape.clone() };
        if let Ok(t) = spec.convert(&value) {
            // Accepted only in the declared shape: never a huge one.
            prop_assert_eq!(t.rank(), shape.len());
            for (want, got) in shape.iter().zip(t.shape()) {
                prop_assert!(want.is_none_or(|w| w == *got));
            }
            prop_assert!(t.len() <= nodes(&value));
        }
    }
}

#[test]
fn deep_nesting_is_refused_before_it_is_walked() {
    let mut value = Value::from(1);
    for _ in 0..100_000 {
        value = Value::Array(vec![value]);
    }
    let err = to_tensor(&value, DatumType::F32).unwrap_err();
    assert!(err.contains("nested deeper than 32"), "{err}");
    // serde_json's own Drop of such a value recurses: take it apart here.
    let mut stack = vec![value];
    while let Some(v) = stack.pop() {
        if let Value::Array(items) = v {
            stack.extend(items);
        }
    }
    // A request body cannot even carry it: the parser stops at depth 128.
    let body = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
    assert!(serde_json::from_str::<Value>(&body).is_err());
}
