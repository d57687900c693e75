//! Model affinity: which models each replica holds, as the replicas tell
//! it, so a request for a model goes to a replica that has it loaded.
//!
//! A request names its model with the `serve_multiplexed_model_id` header
//! (Ray Serve 2.x, over HTTP and in `handle.options(multiplexed_model_id=)`
//! calls) or, without it, an HTTP `model` query parameter (Cortex's
//! `?model=NAME`). A replica whose code keeps a model cache (Ray's
//! `@serve.multiplexed`, Cortex's `multi_model_reloading`) answers such a
//! request with [`MODELS_HEADER`]: the ids it holds after serving it, as a
//! JSON list. The router takes that header off the response (the client
//! never sees it) and keeps the list with the replica; the replica also
//! reports its list to the controller (at most once a second), which every
//! router reads from the snapshot's `Replica.model_ids`, so a router finds
//! a model's replica before sending it anything. Bounded: model ids
//! are client input, so at most [`MAX_MODELS`] of at most
//! [`MAX_MODEL_ID_BYTES`] each, and never a metric label.

use std::sync::Mutex;

use serval_protos::frame::{Payload, Request, Response};

/// Ray Serve's request header naming the model of a multiplexed call.
pub const MODEL_ID_HEADER: &str = "serve_multiplexed_model_id";
/// Cortex's query parameter naming the model (`?model=NAME`).
const MODEL_QUERY_PARAM: &str = "model";
/// Replica -> router: the model ids the replica holds, as a JSON list.
pub const MODELS_HEADER: &str = "x-serval-models";
/// The most model ids kept per replica (a replica's cache is usually a
/// handful; more than this is a misreport, cut off).
pub const MAX_MODELS: usize = 64;
/// Longer model ids never take part in affinity.
pub const MAX_MODEL_ID_BYTES: usize = 256;

/// The model `request` asks for, when it names one within the bounds.
pub(crate) fn model_id_of(request: &Request) -> Option<String> {
    let found = match &request.payload {
        Payload::Http(http) => header(&http.headers)
            .map(str::to_owned)
            .or_else(|| query_param(&http.query, MODEL_QUERY_PARAM)),
        Payload::Call(call) => header(&call.http_headers).map(str::to_owned),
        _ => None,
    };
    found.filter(|id| !id.is_empty() && id.len() <= MAX_MODEL_ID_BYTES)
}

fn header(headers: &[(String, String)]) -> Option<&str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(MODEL_ID_HEADER))
        .map(|(_, v)| v.as_str())
}

/// The first value of `name` in a raw query string, percent-decoded.
fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k != name || v.len() > 3 * MAX_MODEL_ID_BYTES {
            return None;
        }
        let v = v.replace('+', " ");
        crate::percent::decode_path(&v).ok().map(|s| s.into_owned())
    })
}

/// The ids one replica last reported holding, on a reply to this router
/// or through the controller (`Replica.model_ids` in the snapshot), the
/// later of the two.
#[derive(Default)]
pub(crate) struct ReplicaModels(Mutex<Held>);

#[derive(Default)]
struct Held {
    ids: Vec<String>,
    /// The snapshot's list when it last changed: an unchanged snapshot
    /// does not undo what a newer reply said.
    from_snapshot: Vec<String>,
}

impl ReplicaModels {
    pub(crate) fn holds(&self, id: &str) -> bool {
        self.lock().ids.iter().any(|m| m == id)
    }

    /// Takes the snapshot's list when it changed; whether it names any.
    pub(crate) fn update_from_snapshot(&self, ids: &[String]) -> bool {
        let mut held = self.lock();
        if held.from_snapshot != ids {
            held.from_snapshot = ids.to_vec();
            held.ids = bounded(ids.iter().cloned());
        }
        !ids.is_empty()
    }

    /// Takes [`MODELS_HEADER`] off `response` and keeps what it lists;
    /// whether the response carried one.
    pub(crate) fn take_report(&self, response: &mut Response) -> bool {
        // Most responses carry none: look before touching the vector.
        let Some(i) = response
            .headers
            .iter()
            .position(|(k, _)| k.eq_ignore_ascii_case(MODELS_HEADER))
        else {
            return false;
        };
        let (_, value) = response.headers.remove(i);
        response
            .headers
            .retain(|(k, _)| !k.eq_ignore_ascii_case(MODELS_HEADER));
        // A malformed report is ignored: the replica is one of ours, but
        // affinity is only a preference, never worth failing a request.
        let Ok(ids) = serde_json::from_str::<Vec<String>>(&value) else {
            tracing::debug!("malformed model report ignored");
            return true;
        };
        self.lock().ids = bounded(ids.into_iter());
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn bounded(ids: impl Iterator<Item = String>) -> Vec<String> {
    ids.filter(|id| !id.is_empty() && id.len() <= MAX_MODEL_ID_BYTES)
        .take(MAX_MODELS)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serval_protos::frame::{CallRequest, HttpRequest};

    fn http(headers: Vec<(&str, &str)>, query: &str) -> Request {
        Request {
            method_name: None,
            payload: Payload::Http(HttpRequest {
                headers: headers
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
                query: query.to_owned(),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn the_header_wins_over_the_query_and_long_ids_are_ignored() {
        let r = http(vec![("Serve_Multiplexed_Model_Id", "a")], "model=b");
        assert_eq!(model_id_of(&r).as_deref(), Some("a"));
        assert_eq!(
            model_id_of(&http(vec![], "x=1&model=iris%20v&y")).as_deref(),
            Some("iris v")
        );
        let long = "m".repeat(MAX_MODEL_ID_BYTES + 1);
        assert_eq!(model_id_of(&http(vec![(MODEL_ID_HEADER, &long)], "")), None);
        let call = Request {
            method_name: None,
            payload: Payload::Call(CallRequest {
                http_headers: vec![(MODEL_ID_HEADER.to_owned(), "c".to_owned())],
                ..Default::default()
            }),
        };
        assert_eq!(model_id_of(&call).as_deref(), Some("c"));
    }

    #[test]
    fn a_report_is_taken_off_the_response_and_bounded() {
        let models = ReplicaModels::default();
        let many: Vec<String> = (0..MAX_MODELS + 10).map(|i| format!("m{i}")).collect();
        let mut response = Response {
            status: 200,
            headers: vec![
                ("content-type".into(), "text/plain".into()),
                (MODELS_HEADER.into(), serde_json::to_string(&many).unwrap()),
            ],
            body: vec![],
        };
        models.take_report(&mut response);
        assert_eq!(response.headers.len(), 1);
        assert!(models.holds("m0"));
        assert!(!models.holds(&format!("m{}", MAX_MODELS)));
        let mut bad = Response {
            status: 200,
            headers: vec![(MODELS_HEADER.into(), "not json".into())],
            body: vec![],
        };
        models.take_report(&mut bad);
        assert!(bad.headers.is_empty());
        assert!(models.holds("m0"), "a malformed report changes nothing");
    }
}
