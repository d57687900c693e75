//! A small model built here as an ONNX protobuf (no Python needed):
//! `scores = x @ W + b` and `label = argmax(scores)`, with `x` float
//! `[N, 2]`. It is loaded by tract through `Model::from_proto` and checked
//! through the crate's public API: names, shapes, predictions and the
//! 400s for bad requests.

use serde_json::{json, Value};
use serval_onnx::{Model, PredictError};
use tract_onnx::pb::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};

fn dim(d: tensor_shape_proto::dimension::Value) -> tensor_shape_proto::Dimension {
    tensor_shape_proto::Dimension {
        value: Some(d),
        ..Default::default()
    }
}

fn value_info(
    name: &str,
    elem: DataType,
    dims: Vec<tensor_shape_proto::Dimension>,
) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem as i32,
                shape: Some(TensorShapeProto { dim: dims }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: output.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute,
        ..Default::default()
    }
}

fn floats(name: &str, dims: Vec<i64>, data: Vec<f32>) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims,
        data_type: DataType::Float as i32,
        float_data: data,
        ..Default::default()
    }
}

fn int_attr(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

/// `batch`: whether x's first dimension is left open (`N`) or fixed at 1.
fn linear_model(batch: bool) -> ModelProto {
    use tensor_shape_proto::dimension::Value::{DimParam, DimValue};
    let first = if batch {
        DimParam("N".into())
    } else {
        DimValue(1)
    };
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(GraphProto {
            name: "linear".into(),
            node: vec![
                node("MatMul", &["x", "w"], "xw", vec![]),
                node("Add", &["xw", "b"], "scores", vec![]),
                node(
                    "ArgMax",
                    &["scores"],
                    "label",
                    vec![int_attr("axis", 1), int_attr("keepdims", 0)],
                ),
            ],
            initializer: vec![
                // Column 0 sums the features, column 1 is their difference.
                floats("w", vec![2, 2], vec![1.0, 1.0, 1.0, -1.0]),
                floats("b", vec![2], vec![0.0, 0.5]),
            ],
            input: vec![value_info(
                "x",
                DataType::Float,
                vec![dim(first), dim(DimValue(2))],
            )],
            output: vec![
                value_info("scores", DataType::Float, vec![]),
                value_info("label", DataType::Int64, vec![]),
            ],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn predict(model: &Model, body: &Value) -> Result<Value, PredictError> {
    let bytes = model.predict(body.to_string().as_bytes())?;
    Ok(serde_json::from_slice(&bytes).expect("the response is JSON"))
}

fn input_error(model: &Model, body: &[u8]) -> String {
    match model.predict(body) {
        Err(PredictError::Input(message)) => message,
        other => panic!("expected a 400, got {other:?}"),
    }
}

#[test]
fn names_and_shapes_come_from_the_model() {
    let model = Model::from_proto(&linear_model(true)).unwrap();
    let input = &model.inputs()[0];
    assert_eq!(
        (input.name.as_str(), input.type_name().as_str()),
        ("x", "tensor(float)")
    );
    assert_eq!(input.shape, vec![None, Some(2)]);
    assert!(model.stackable());
    assert_eq!(model.outputs(), ["scores", "label"]);
}

#[test]
fn a_request_maps_inputs_to_values_and_gets_outputs_by_name() {
    let model = Model::from_proto(&linear_model(true)).unwrap();
    let got = predict(&model, &json!({"x": [[1, 2], [3, 1]]})).unwrap();
    assert_eq!(
        got,
        json!({"scores": [[3.0, -0.5], [4.0, 2.5]], "label": [0, 0]})
    );
    // One row without its batch axis gets one.
    let got = predict(&model, &json!({"x": [1.0, 5.0]})).unwrap();
    assert_eq!(got, json!({"scores": [[6.0, -3.5]], "label": [0]}));
    let got = predict(&model, &json!({"x": [[0, -2]]})).unwrap();
    assert_eq!(got["label"], json!([1]));
}

#[test]
fn a_fixed_first_dimension_of_one_takes_a_single_row() {
    let model = Model::from_proto(&linear_model(false)).unwrap();
    assert!(!model.stackable());
    assert_eq!(
        predict(&model, &json!({"x": [2, 2]})).unwrap()["label"],
        json!([0])
    );
    assert!(input_error(&model, br#"{"x": [[1, 2], [3, 4]]}"#)
        .contains("input 'x': the model takes shape [1, 2], got shape [2, 2]"));
}

#[test]
fn bad_requests_are_400s_that_name_the_input() {
    let model = Model::from_proto(&linear_model(true)).unwrap();
    let cases: &[(&[u8], &str)] = &[
        (b"{not json", "the body is not valid JSON"),
        (b"[1, 2]", "the request is a list; expected a JSON object mapping the model's inputs (x) to values"),
        (br#"{"y": [1, 2]}"#, "input 'y': the model has no such input (its inputs: x)"),
        (b"{}", "input 'x': missing"),
        (br#"{"x": [1, 2, 3]}"#, "input 'x': the model takes shape [None, 2], got shape [1, 3]"),
        (br#"{"x": [["a", 2]]}"#, "input 'x': cannot be converted to tensor(float): \"a\" is not a number"),
        (br#"{"x": [[1, 2], [3]]}"#, "input 'x': cannot be converted to tensor(float)"),
    ];
    for (body, want) in cases {
        let got = input_error(&model, body);
        assert!(got.contains(want), "{got:?} does not contain {want:?}");
    }
}

#[test]
fn a_file_that_is_not_a_model_is_refused_with_the_reason() {
    let dir = std::env::temp_dir().join(format!("serval-onnx-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("junk.onnx");
    std::fs::write(&path, b"\x01\x02 not protobuf").unwrap();
    let err = Model::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("native runtime (tract) cannot run this model"),
        "{err}"
    );
    let err = Model::load(&dir.join("missing.onnx"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot read") && err.contains("missing.onnx"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
