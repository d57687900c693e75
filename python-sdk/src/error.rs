//! The one bridge from Serval's errors to Python: the exception classes
//! `serval` exports and the mapping of the control plane's gRPC status
//! codes onto them. Python code tells errors apart by class, never by
//! message.
//!
//! ```text
//! ServeError                          any other code (Internal, PermissionDenied, ...)
//! ├── ControlUnavailable              Unavailable, DeadlineExceeded, Unknown, Cancelled;
//! │                                   a client that cannot reach any head
//! ├── BackPressureError               (a handle call refused at once)
//! ├── DeployFailedError, RuntimeError (an application's replicas failed to start)
//! └── ServeValueError, ValueError     FailedPrecondition, OutOfRange
//!     ├── NotFound, KeyError          NotFound
//!     ├── AlreadyExists               AlreadyExists
//!     └── InvalidArgument             InvalidArgument
//! ```
//!
//! The second bases keep what callers caught before the named classes:
//! Ray Serve 1.x raised ValueError for refused control calls and KeyError
//! for an unknown endpoint's handle, and Ray's `serve.run` RuntimeError.
//! `serval.BackendError` (user code raised in a replica) is a ServeError
//! made in `handle.py`, where the replica's exception is rebuilt.

use pyo3::create_exception;
use pyo3::exceptions::{PyBaseException, PyException, PyKeyError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};
use serval_protos::client::ConnectError;

create_exception!(
    serval._native,
    ServeError,
    PyException,
    "A Serval control-plane call was refused or failed."
);

create_exception!(
    serval._native,
    ControlUnavailable,
    ServeError,
    "No head answered a control-plane call (a head down, an election, a \
     timeout): the call may or may not have taken effect; retrying is safe \
     for calls made to be retried."
);

create_exception!(
    serval._native,
    BackPressureError,
    ServeError,
    "A handle call refused at once: every replica of the deployment is at \
     its max_ongoing_requests and max_queued_requests calls already wait \
     (Ray Serve 2.x's BackPressureError)."
);

/// An exception class whose bases are Python-made classes or more than one
/// (`create_exception!` takes one Rust-declared base), made once with
/// `type(name, bases, namespace)`.
pub(crate) struct ExceptionType {
    class: PyOnceLock<Py<PyType>>,
    name: &'static str,
    doc: &'static str,
    bases: for<'py> fn(Python<'py>) -> PyResult<Vec<Bound<'py, PyType>>>,
}

impl ExceptionType {
    pub(crate) fn get<'py>(&'static self, py: Python<'py>) -> PyResult<&'py Bound<'py, PyType>> {
        self.class
            .get_or_try_init(py, || {
                let namespace = PyDict::new(py);
                namespace.set_item("__module__", "serval._native")?;
                namespace.set_item("__doc__", self.doc)?;
                // KeyError quotes its message; these read as the others.
                namespace.set_item(
                    "__str__",
                    py.get_type::<PyBaseException>().getattr("__str__")?,
                )?;
                let bases = PyTuple::new(py, (self.bases)(py)?)?;
                let class = py
                    .get_type::<PyType>()
                    .call1((self.name, bases, namespace))?;
                Ok(class.cast_into::<PyType>()?.unbind())
            })
            .map(|class| class.bind(py))
    }

    /// An instance with `message`, or the error that making the class raised.
    pub(crate) fn new_err(&'static self, message: impl Into<String>) -> PyErr {
        let message = message.into();
        Python::attach(|py| match self.get(py) {
            Ok(class) => PyErr::from_type(class.clone(), message),
            Err(e) => e,
        })
    }
}

pub(crate) static SERVE_VALUE_ERROR: ExceptionType = ExceptionType {
    class: PyOnceLock::new(),
    name: "ServeValueError",
    doc: "A control-plane call refused for what it asked (a name taken, an unknown or \
          in-use backend or endpoint, an invalid value): a ServeError and a ValueError.",
    bases: |py| {
        Ok(vec![
            py.get_type::<ServeError>(),
            py.get_type::<PyValueError>(),
        ])
    },
};

pub(crate) static NOT_FOUND: ExceptionType = ExceptionType {
    class: PyOnceLock::new(),
    name: "NotFound",
    doc: "What the call names does not exist (a backend, endpoint, application, job, \
          blob): a ServeValueError and a KeyError.",
    bases: |py| {
        Ok(vec![
            SERVE_VALUE_ERROR.get(py)?.clone(),
            py.get_type::<PyKeyError>(),
        ])
    },
};

pub(crate) static ALREADY_EXISTS: ExceptionType = ExceptionType {
    class: PyOnceLock::new(),
    name: "AlreadyExists",
    doc: "What the call would create is taken (a backend or endpoint name, a route, a \
          gRPC service): a ServeValueError.",
    bases: |py| Ok(vec![SERVE_VALUE_ERROR.get(py)?.clone()]),
};

pub(crate) static INVALID_ARGUMENT: ExceptionType = ExceptionType {
    class: PyOnceLock::new(),
    name: "InvalidArgument",
    doc: "The call's arguments are refused (a config value, a route, a cap): a \
          ServeValueError.",
    bases: |py| Ok(vec![SERVE_VALUE_ERROR.get(py)?.clone()]),
};

pub(crate) static DEPLOY_FAILED_ERROR: ExceptionType = ExceptionType {
    class: PyOnceLock::new(),
    name: "DeployFailedError",
    doc: "An application could not be deployed (a deployment's replicas failed to \
          start); serve.status() shows it DEPLOY_FAILED with the reason. A RuntimeError, \
          as Ray's serve.run raises.",
    bases: |py| {
        Ok(vec![
            py.get_type::<ServeError>(),
            py.get_type::<PyRuntimeError>(),
        ])
    },
};

/// The exception a refused or failed control-plane call raises.
pub(crate) fn status_err(status: tonic::Status) -> PyErr {
    use tonic::Code;
    let message = status.message().to_string();
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled => {
            ControlUnavailable::new_err(message)
        }
        Code::NotFound => NOT_FOUND.new_err(message),
        Code::AlreadyExists => ALREADY_EXISTS.new_err(message),
        Code::InvalidArgument => INVALID_ARGUMENT.new_err(message),
        Code::FailedPrecondition | Code::OutOfRange => SERVE_VALUE_ERROR.new_err(message),
        _ => ServeError::new_err(message),
    }
}

/// The exception a control client that cannot be made raises: no head
/// answering is ControlUnavailable (as for a call), a bad address or token
/// InvalidArgument.
pub(crate) fn connect_err(e: ConnectError) -> PyErr {
    match e {
        ConnectError::Unreachable { .. } => ControlUnavailable::new_err(e.to_string()),
        ConnectError::BadAddress { .. } | ConnectError::BadToken => {
            INVALID_ARGUMENT.new_err(e.to_string())
        }
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("ServeError", py.get_type::<ServeError>())?;
    m.add("ControlUnavailable", py.get_type::<ControlUnavailable>())?;
    m.add("BackPressureError", py.get_type::<BackPressureError>())?;
    for class in [
        &SERVE_VALUE_ERROR,
        &NOT_FOUND,
        &ALREADY_EXISTS,
        &INVALID_ARGUMENT,
        &DEPLOY_FAILED_ERROR,
    ] {
        m.add(class.name, class.get(py)?)?;
    }
    Ok(())
}
