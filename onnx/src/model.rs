//! One ONNX model, loaded and optimised by tract, and one prediction:
//! JSON body -> input tensors -> model -> JSON body.

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::{Factoid, GenericFactoid};
use tract_onnx::tract_hir::internal::DimLike;

use crate::json;

/// A model that could not be loaded. The message says what tract refused
/// (an operator it lacks, such as skl2onnx's ZipMap, is named).
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the native runtime (tract) cannot run this model: {0}")]
    Load(String),
}

/// A request that got no prediction: the client's fault (400) or the
/// model's (500).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PredictError {
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Run(String),
}

impl PredictError {
    pub fn status(&self) -> u16 {
        match self {
            PredictError::Input(_) => 400,
            PredictError::Run(_) => 500,
        }
    }
}

/// One model input: its name, element type and shape (`None` for a
/// dimension the model leaves open; an open first dimension is the batch
/// axis).
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    pub name: String,
    pub datum_type: DatumType,
    pub shape: Vec<Option<usize>>,
}

impl InputSpec {
    pub fn batched(&self) -> bool {
        matches!(self.shape.first(), Some(None))
    }

    /// `tensor(float)`, as onnxruntime names it.
    pub fn type_name(&self) -> String {
        json::onnx_type_name(self.datum_type)
    }

    fn shape_text(&self) -> String {
        let dims: Vec<String> = self
            .shape
            .iter()
            .map(|d| d.map_or_else(|| "None".to_string(), |n| n.to_string()))
            .collect();
        format!("[{}]", dims.join(", "))
    }

    /// The tensor for this input from its JSON value. As with onnxruntime,
    /// a value one axis short gets a batch axis of 1 when the model batches
    /// (or declares a first dimension of 1).
    pub(crate) fn convert(&self, value: &Value) -> Result<Tensor, String> {
        let mut tensor = json::to_tensor(value, self.datum_type).map_err(|e| {
            format!(
                "input '{}': cannot be converted to {}: {e}",
                self.name,
                self.type_name()
            )
        })?;
        let rank = self.shape.len();
        if tensor.rank() + 1 == rank && (self.batched() || self.shape[0] == Some(1)) {
            tensor.insert_axis(0).map_err(|e| e.to_string())?;
        }
        let fits = tensor.rank() == rank
            && self
                .shape
                .iter()
                .zip(tensor.shape())
                .all(|(want, got)| want.is_none_or(|w| w == *got));
        if !fits {
            return Err(format!(
                "input '{}': the model takes shape {}, got shape {:?}",
                self.name,
                self.shape_text(),
                tensor.shape()
            ));
        }
        Ok(tensor)
    }
}

/// A loaded model. `run` takes `&self`: several threads may run it at once.
pub struct Model {
    plan: Arc<TypedRunnableModel>,
    inputs: Vec<InputSpec>,
    outputs: Vec<String>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish()
    }
}

impl Model {
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|source| ModelError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let proto = tract_onnx::onnx()
            .proto_model_for_read(&mut bytes.as_slice())
            .map_err(|e| ModelError::Load(format!("not an ONNX model: {e}")))?;
        Self::from_proto(&proto)
    }

    /// Loads, types and optimises the model. Open dimensions become
    /// symbols (the first one `N`, the batch), so one optimised plan runs
    /// any batch size.
    pub fn from_proto(proto: &ModelProto) -> Result<Self, ModelError> {
        let load = |e: TractError| ModelError::Load(format!("{e:#}"));
        let mut model = tract_onnx::onnx()
            .model_for_proto_model(proto)
            .map_err(load)?;
        let input_names: Vec<String> = model
            .input_outlets()
            .map_err(load)?
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect();
        let output_names: Vec<String> = model
            .output_outlets()
            .map_err(load)?
            .iter()
            .map(|o| {
                model
                    .outlet_label(*o)
                    .map_or_else(|| model.node(o.node).name.clone(), str::to_string)
            })
            .collect();
        for (i, name) in input_names.iter().enumerate() {
            let fact = model.input_fact(i).map_err(load)?.clone();
            let datum_type = fact.datum_type.concretize().ok_or_else(|| {
                ModelError::Load(format!("input '{name}' has no declared element type"))
            })?;
            if fact.shape.is_open() {
                return Err(ModelError::Load(format!(
                    "input '{name}' has no declared rank"
                )));
            }
            let shape: TVec<TDim> = fact
                .shape
                .dims()
                .enumerate()
                .map(|(axis, dim)| match dim {
                    GenericFactoid::Only(d) => d.clone(),
                    GenericFactoid::Any if axis == 0 => model.symbols.sym("N").into(),
                    GenericFactoid::Any => model.symbols.sym(&format!("{name}_{axis}")).into(),
                })
                .collect();
            model
                .set_input_fact(i, InferenceFact::dt_shape(datum_type, shape))
                .map_err(load)?;
        }
        let typed = model.into_optimized().map_err(load)?;
        let inputs = input_names
            .into_iter()
            .enumerate()
            .map(|(i, name)| {
                let fact = typed.input_fact(i).map_err(load)?;
                Ok(InputSpec {
                    name,
                    datum_type: fact.datum_type,
                    shape: fact.shape.iter().map(|d| d.to_usize().ok()).collect(),
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let plan = typed.into_runnable().map_err(load)?;
        Ok(Self {
            plan,
            inputs,
            outputs: output_names,
        })
    }

    pub fn inputs(&self) -> &[InputSpec] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[String] {
        &self.outputs
    }

    /// Whether requests can be stacked into one run: every input batches.
    pub fn stackable(&self) -> bool {
        !self.inputs.is_empty() && self.inputs.iter().all(InputSpec::batched)
    }

    /// The input tensors, in the model's order, from a JSON body mapping
    /// input names to values.
    pub fn parse(&self, body: &[u8]) -> Result<Vec<Tensor>, PredictError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| PredictError::Input(format!("the body is not valid JSON: {e}")))?;
        let names = || {
            self.inputs
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let Value::Object(map) = value else {
            return Err(PredictError::Input(format!(
                "the request is a {}; expected a JSON object mapping the model's inputs ({}) to values",
                json::python_type_name(&value),
                names()
            )));
        };
        if let Some(unknown) = map
            .keys()
            .find(|k| !self.inputs.iter().any(|i| &i.name == *k))
        {
            return Err(PredictError::Input(format!(
                "input '{unknown}': the model has no such input (its inputs: {})",
                names()
            )));
        }
        self.inputs
            .iter()
            .map(|input| match map.get(&input.name) {
                Some(value) => input.convert(value).map_err(PredictError::Input),
                None => Err(PredictError::Input(format!(
                    "input '{}': missing (the request is an object without it)",
                    input.name
                ))),
            })
            .collect()
    }

    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, PredictError> {
        let outputs = self
            .plan
            .run(inputs.into_iter().map(IntoTValue::into_tvalue).collect())
            .map_err(|e| PredictError::Run(format!("the model failed: {e:#}")))?;
        Ok(outputs.into_iter().map(TValue::into_tensor).collect())
    }

    /// The response body: output name -> values.
    pub fn respond(&self, outputs: &[Tensor]) -> Result<Vec<u8>, PredictError> {
        let object = json::outputs_object(&self.outputs, outputs).map_err(PredictError::Run)?;
        Ok(object.to_string().into_bytes())
    }

    /// One request, start to end.
    pub fn predict(&self, body: &[u8]) -> Result<Vec<u8>, PredictError> {
        let outputs = self.run(self.parse(body)?)?;
        self.respond(&outputs)
    }
}
