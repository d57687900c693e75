//! JSON values <-> tensors. The messages match the onnxruntime path's
//! (`serval.cortex.onnx`), so a client sees the same 400 whichever runtime
//! serves the model.

use serde_json::{Map, Number, Value};
use tract_onnx::prelude::*;

/// ONNX's name for a tensor element type, as onnxruntime prints it
/// (`tensor(float)`), for messages.
pub fn onnx_type_name(dt: DatumType) -> String {
    let name = match dt {
        DatumType::F16 => "float16",
        DatumType::F32 => "float",
        DatumType::F64 => "double",
        DatumType::I8 => "int8",
        DatumType::I16 => "int16",
        DatumType::I32 => "int32",
        DatumType::I64 | DatumType::TDim => "int64",
        DatumType::U8 => "uint8",
        DatumType::U16 => "uint16",
        DatumType::U32 => "uint32",
        DatumType::U64 => "uint64",
        DatumType::Bool => "bool",
        DatumType::String => "string",
        other => return format!("tensor({other:?})"),
    };
    format!("tensor({name})")
}

/// Python's name for a JSON value's type, as the onnxruntime path's
/// messages say it ("the request is a list").
pub fn python_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

/// Nesting deeper than this is refused before it is walked: no model takes
/// tensors of that rank, and the walk recurses once per level.
pub const MAX_RANK: usize = 32;

/// The shape of nested JSON lists (`[]` for a scalar); ragged lists are an
/// error, as numpy refuses them for a numeric dtype.
fn shape_of(value: &Value) -> Result<Vec<usize>, String> {
    shape_below(value, 0)
}

fn shape_below(value: &Value, depth: usize) -> Result<Vec<usize>, String> {
    let Value::Array(items) = value else {
        return Ok(Vec::new());
    };
    if depth >= MAX_RANK {
        return Err(format!("the lists are nested deeper than {MAX_RANK}"));
    }
    let Some(first) = items.first() else {
        return Ok(vec![0]);
    };
    let inner = shape_below(first, depth + 1)?;
    for item in &items[1..] {
        if shape_below(item, depth + 1)? != inner {
            return Err("the nested lists have different lengths".into());
        }
    }
    let mut shape = vec![items.len()];
    shape.extend(inner);
    Ok(shape)
}

fn leaves<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|v| leaves(v, out)),
        leaf => out.push(leaf),
    }
}

fn as_f64(leaf: &Value) -> Result<f64, String> {
    match leaf {
        Value::Number(n) => n.as_f64().ok_or_else(|| format!("{n} is not a number")),
        Value::Bool(b) => Ok(f64::from(u8::from(*b))),
        other => Err(format!("{} is not a number", short(other))),
    }
}

fn as_i64(leaf: &Value) -> Result<i64, String> {
    match leaf {
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Ok(i),
            // An integral float (3.0) is an integer; 3.5 is refused rather
            // than truncated behind the client's back.
            (None, Some(f)) if f.fract() == 0.0 && f.abs() < 9.2e18 => Ok(f as i64),
            _ => Err(format!("{n} is not an integer")),
        },
        Value::Bool(b) => Ok(i64::from(*b)),
        other => Err(format!("{} is not an integer", short(other))),
    }
}

fn short(value: &Value) -> String {
    let text = value.to_string();
    if text.len() > 40 {
        format!("{}...", &text[..text.floor_char_boundary(40)])
    } else {
        text
    }
}

fn collect<T>(
    leaves: &[&Value],
    f: impl Fn(&Value) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    leaves.iter().map(|v| f(v)).collect()
}

fn build<T: Datum>(shape: &[usize], data: Vec<T>) -> Result<Tensor, String> {
    tract_ndarray::ArrayD::from_shape_vec(tract_ndarray::IxDyn(shape), data)
        .map(IntoTensor::into_tensor)
        .map_err(|e| e.to_string())
}

/// A tensor of `dt` from a JSON value (a scalar or nested lists). The
/// error is the reason alone; the caller names the input.
pub fn to_tensor(value: &Value, dt: DatumType) -> Result<Tensor, String> {
    let shape = shape_of(value)?;
    let mut flat = Vec::new();
    leaves(value, &mut flat);
    let tensor = match dt {
        DatumType::F32 => build(&shape, collect(&flat, |v| as_f64(v).map(|f| f as f32))?)?,
        DatumType::F64 => build(&shape, collect(&flat, as_f64)?)?,
        DatumType::F16 => build(&shape, collect(&flat, |v| as_f64(v).map(|f| f as f32))?)?
            .cast_to_dt(DatumType::F16)
            .map_err(|e| e.to_string())?
            .into_owned(),
        DatumType::Bool => build(
            &shape,
            collect(&flat, |v| match v {
                Value::Bool(b) => Ok(*b),
                other => as_f64(other).map(|f| f != 0.0),
            })?,
        )?,
        DatumType::String => build(
            &shape,
            collect(&flat, |v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(format!("{} is not a string", short(other))),
            })?,
        )?,
        dt if dt.is_integer() => {
            let ints = collect(&flat, as_i64)?;
            let (min, max) = integer_range(dt);
            if let Some(i) = ints
                .iter()
                .find(|i| (**i as i128) < min || (**i as i128) > max)
            {
                return Err(format!("{i} is out of range"));
            }
            build(&shape, ints)?
                .cast_to_dt(dt)
                .map_err(|e| e.to_string())?
                .into_owned()
        }
        other => {
            return Err(format!(
                "tensors of {other:?} are not supported by the native runtime"
            ))
        }
    };
    Ok(tensor)
}

fn integer_range(dt: DatumType) -> (i128, i128) {
    match dt {
        DatumType::I8 => (i8::MIN.into(), i8::MAX.into()),
        DatumType::I16 => (i16::MIN.into(), i16::MAX.into()),
        DatumType::I32 => (i32::MIN.into(), i32::MAX.into()),
        DatumType::U8 => (0, u8::MAX.into()),
        DatumType::U16 => (0, u16::MAX.into()),
        DatumType::U32 => (0, u32::MAX.into()),
        DatumType::U64 => (0, i64::MAX.into()),
        _ => (i64::MIN.into(), i64::MAX.into()),
    }
}

/// A tensor as nested JSON lists (a scalar for rank 0). NaN and infinities
/// have no JSON form and become null.
pub fn from_tensor(tensor: &Tensor) -> Result<Value, String> {
    let dt = tensor.datum_type();
    let flat: Vec<Value> = if dt.is_float() {
        values::<f64>(tensor, DatumType::F64)?
            .into_iter()
            .map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number))
            .collect()
    } else if dt.is_unsigned() {
        values::<u64>(tensor, DatumType::U64)?
            .into_iter()
            .map(Value::from)
            .collect()
    } else if dt.is_integer() || dt == DatumType::TDim {
        values::<i64>(tensor, DatumType::I64)?
            .into_iter()
            .map(Value::from)
            .collect()
    } else if dt == DatumType::Bool {
        values::<bool>(tensor, DatumType::Bool)?
            .into_iter()
            .map(Value::from)
            .collect()
    } else if dt == DatumType::String {
        values::<String>(tensor, DatumType::String)?
            .into_iter()
            .map(Value::from)
            .collect()
    } else {
        return Err(format!(
            "outputs of {dt:?} are not supported by the native runtime"
        ));
    };
    Ok(nest(tensor.shape(), &mut flat.into_iter()))
}

fn values<T: Datum + Clone>(tensor: &Tensor, dt: DatumType) -> Result<Vec<T>, String> {
    let cast = tensor.cast_to_dt(dt).map_err(|e| e.to_string())?;
    let view = cast.to_plain_array_view::<T>().map_err(|e| e.to_string())?;
    Ok(view.iter().cloned().collect())
}

fn nest(shape: &[usize], flat: &mut impl Iterator<Item = Value>) -> Value {
    match shape.split_first() {
        None => flat.next().unwrap_or(Value::Null),
        Some((n, rest)) => Value::Array((0..*n).map(|_| nest(rest, flat)).collect()),
    }
}

/// The response body: output name -> values, in the model's order.
pub fn outputs_object(names: &[String], outputs: &[Tensor]) -> Result<Value, String> {
    let mut object = Map::new();
    for (name, tensor) in names.iter().zip(outputs) {
        let value = from_tensor(tensor).map_err(|e| format!("output '{name}': {e}"))?;
        object.insert(name.clone(), value);
    }
    Ok(Value::Object(object))
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_lists_become_tensors_of_the_declared_type() {
        let t = to_tensor(&json!([[1, 2.5], [3, 4]]), DatumType::F32).unwrap();
        assert_eq!(t.shape(), &[2, 2]);
        assert_eq!(from_tensor(&t).unwrap(), json!([[1.0, 2.5], [3.0, 4.0]]));
        let t = to_tensor(&json!([1, 2.0, true]), DatumType::I64).unwrap();
        assert_eq!(from_tensor(&t).unwrap(), json!([1, 2, 1]));
        let t = to_tensor(&json!(["a", "b"]), DatumType::String).unwrap();
        assert_eq!(from_tensor(&t).unwrap(), json!(["a", "b"]));
        assert_eq!(
            from_tensor(&to_tensor(&json!(7), DatumType::I32).unwrap()).unwrap(),
            json!(7)
        );
    }

    #[test]
    fn values_that_do_not_fit_say_why() {
        assert!(to_tensor(&json!([[1, 2], [3]]), DatumType::F32)
            .unwrap_err()
            .contains("different lengths"));
        assert!(to_tensor(&json!(["x"]), DatumType::F32)
            .unwrap_err()
            .contains("\"x\" is not a number"));
        assert!(to_tensor(&json!([1.5]), DatumType::I64)
            .unwrap_err()
            .contains("1.5 is not an integer"));
        assert!(to_tensor(&json!([300]), DatumType::U8)
            .unwrap_err()
            .contains("300 is out of range"));
        assert!(to_tensor(&json!([1]), DatumType::String)
            .unwrap_err()
            .contains("not a string"));
    }

    #[test]
    fn nan_has_no_json_form_and_becomes_null() {
        let t = build(&[2], vec![f32::NAN, 1.0]).unwrap();
        assert_eq!(from_tensor(&t).unwrap(), json!([null, 1.0]));
    }
}
