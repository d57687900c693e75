//! A linearizability checker (Wing & Gong's search with Lowe's memo, as
//! Porcupine does it) over a [`Model`] of a state machine.
//!
//! A history is a list of [`Op`]s, each with its invoke and return times.
//! The checker looks for an order of the ops that respects real time (an
//! op that returned before another was invoked comes first) in which every
//! op's recorded output is what the model answers. An op whose outcome is
//! unknown (the call failed in a way that does not say whether it took
//! effect, or timed out) has no return time: it may take effect at any
//! point after its invoke, or never, with any output.
//!
//! The search is depth first over "which op takes effect next": only an op
//! invoked before the earliest return among the ops not yet placed can be
//! next. A (placed ops, model state) pair seen once is never searched
//! again, which keeps histories of a few concurrent clients cheap.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Debug;
use std::hash::Hash;

/// A state machine the history is checked against.
pub trait Model {
    type State: Clone + Eq + Hash + Debug;
    type Input: Debug;
    type Output: Debug;
    fn init(&self) -> Self::State;
    /// The state after `input` took effect answering `output` in `state`,
    /// or None when the model cannot answer `output` there. `output` None:
    /// the answer is unknown (any answer will do).
    fn step(
        &self,
        state: &Self::State,
        input: &Self::Input,
        output: Option<&Self::Output>,
    ) -> Option<Self::State>;
}

/// One call: invoked at `invoke`, answered `output` at `ret` (both in one
/// clock, e.g. nanoseconds since the test began). `ret` and `output` None:
/// the outcome is unknown.
#[derive(Debug, Clone)]
pub struct Op<I, O> {
    pub client: usize,
    pub input: I,
    pub output: Option<O>,
    pub invoke: u64,
    pub ret: Option<u64>,
}

/// An op of `M`'s inputs and outputs.
pub type ModelOp<M> = Op<<M as Model>::Input, <M as Model>::Output>;

/// What a successful check looked at.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    pub histories: usize,
    pub ops: usize,
    /// Ops of unknown outcome among them.
    pub unknown: usize,
}

/// Searches longer than this many steps give up (and fail the check).
const MAX_STEPS: u64 = 20_000_000;

/// Whether `history` is linearizable under `model`; on failure, why.
pub fn check<M: Model>(model: &M, history: &[Op<M::Input, M::Output>]) -> Result<Checked, String> {
    let mut ops: Vec<&Op<M::Input, M::Output>> = history.iter().collect();
    ops.sort_by_key(|o| o.invoke);
    let mut search = Search {
        model,
        ops: &ops,
        placed: vec![0u64; ops.len().div_ceil(64)],
        seen: HashSet::new(),
        steps: 0,
        deepest: 0,
        deepest_placed: vec![0u64; ops.len().div_ceil(64)],
    };
    let completed = ops.iter().filter(|o| o.ret.is_some()).count();
    if search.dfs(model.init(), completed, 0) {
        return Ok(Checked {
            histories: 1,
            ops: ops.len(),
            unknown: ops.len() - completed,
        });
    }
    if search.steps >= MAX_STEPS {
        return Err(format!(
            "gave up after {MAX_STEPS} search steps on {} ops",
            ops.len()
        ));
    }
    // The op that could not be placed after the longest placed prefix.
    let placed = &search.deepest_placed;
    let stuck = ops
        .iter()
        .enumerate()
        .filter(|(i, o)| placed[i / 64] & (1 << (i % 64)) == 0 && o.ret.is_some())
        .min_by_key(|(_, o)| o.ret)
        .map(|(_, o)| format!("{o:?}"))
        .unwrap_or_default();
    let listing: Vec<String> = ops.iter().map(|o| format!("  {o:?}")).collect();
    Err(format!(
        "not linearizable: at most {} of {} ops could be placed; stuck at {stuck}\nhistory:\n{}",
        search.deepest,
        ops.len(),
        listing.join("\n")
    ))
}

/// [`check`] on each key's ops of `history` apart: a model of independent
/// objects (one register per key) is linearizable when each object's
/// history is (linearizability is local).
pub fn check_by_key<M: Model, K: Ord + Debug>(
    model: &M,
    history: Vec<(K, ModelOp<M>)>,
) -> Result<Checked, String> {
    let mut parts: BTreeMap<K, Vec<ModelOp<M>>> = BTreeMap::new();
    for (key, op) in history {
        parts.entry(key).or_default().push(op);
    }
    let mut total = Checked::default();
    for (k, ops) in parts {
        let c = check(model, &ops).map_err(|e| format!("key {k:?}: {e}"))?;
        total.histories += c.histories;
        total.ops += c.ops;
        total.unknown += c.unknown;
    }
    Ok(total)
}

struct Search<'a, M: Model> {
    model: &'a M,
    ops: &'a [&'a Op<M::Input, M::Output>],
    placed: Vec<u64>,
    seen: HashSet<(Vec<u64>, M::State)>,
    steps: u64,
    deepest: usize,
    deepest_placed: Vec<u64>,
}

impl<M: Model> Search<'_, M> {
    fn is_placed(&self, i: usize) -> bool {
        self.placed[i / 64] & (1 << (i % 64)) != 0
    }

    fn flip(&mut self, i: usize) {
        self.placed[i / 64] ^= 1 << (i % 64);
    }

    /// Places the remaining ops after `state`; `completed`: how many ops
    /// with a known outcome are still unplaced; `depth`: how many are placed.
    fn dfs(&mut self, state: M::State, completed: usize, depth: usize) -> bool {
        if completed == 0 {
            return true;
        }
        self.steps += 1;
        if self.steps >= MAX_STEPS || !self.seen.insert((self.placed.clone(), state.clone())) {
            return false;
        }
        if depth > self.deepest {
            self.deepest = depth;
            self.deepest_placed = self.placed.clone();
        }
        // Whatever goes next was invoked before the earliest unplaced return.
        let first_return = (0..self.ops.len())
            .filter(|&i| !self.is_placed(i))
            .filter_map(|i| self.ops[i].ret)
            .min()
            .unwrap_or(u64::MAX);
        // Ops with a known outcome first: one of unknown outcome need only
        // be placed where a later answer shows it took effect.
        let candidates = (0..self.ops.len())
            .take_while(|&i| self.ops[i].invoke <= first_return)
            .filter(|&i| !self.is_placed(i));
        let (known, unknown): (Vec<usize>, Vec<usize>) =
            candidates.partition(|&i| self.ops[i].ret.is_some());
        for i in known.into_iter().chain(unknown) {
            let op = self.ops[i];
            let Some(next) = self.model.step(&state, &op.input, op.output.as_ref()) else {
                continue;
            };
            self.flip(i);
            let found = self.dfs(next, completed - usize::from(op.ret.is_some()), depth + 1);
            self.flip(i);
            if found {
                return true;
            }
        }
        false
    }
}

/// The control plane's backends as the linearizability tests see them: one
/// register per backend name holding its config's value (absent when the
/// backend does not exist).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendOp {
    Create(u32),
    Update(u32),
    Delete,
    /// A read that must see every write that completed before it began.
    Read,
    /// A read from a head's applied state, which may lag: it must return
    /// a value the register held at some point before the read returned
    /// (never a value not yet written, never one that was never written).
    StaleRead,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendAnswer {
    Ok,
    /// Refused: the backend exists (a create).
    Exists,
    /// Refused: no such backend (an update or a delete).
    Missing,
    Value(Option<u32>),
}

/// The registers' model: the current value and every value held so far
/// (for [`BackendOp::StaleRead`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct Backends;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct BackendState {
    pub value: Option<u32>,
    pub held: std::collections::BTreeSet<Option<u32>>,
}

impl Model for Backends {
    type State = BackendState;
    type Input = BackendOp;
    type Output = BackendAnswer;

    fn init(&self) -> BackendState {
        BackendState {
            value: None,
            held: [None].into(),
        }
    }

    fn step(
        &self,
        s: &BackendState,
        input: &BackendOp,
        output: Option<&BackendAnswer>,
    ) -> Option<BackendState> {
        let set = |value: Option<u32>| {
            let mut next = s.clone();
            next.value = value;
            next.held.insert(value);
            next
        };
        let (answer, next) = match (*input, s.value) {
            (BackendOp::Create(v), None) => (BackendAnswer::Ok, set(Some(v))),
            (BackendOp::Create(_), Some(_)) => (BackendAnswer::Exists, s.clone()),
            (BackendOp::Update(v), Some(_)) => (BackendAnswer::Ok, set(Some(v))),
            (BackendOp::Delete, Some(_)) => (BackendAnswer::Ok, set(None)),
            (BackendOp::Update(_) | BackendOp::Delete, None) => (BackendAnswer::Missing, s.clone()),
            (BackendOp::Read, v) => (BackendAnswer::Value(v), s.clone()),
            (BackendOp::StaleRead, _) => {
                return match output {
                    None => Some(s.clone()),
                    Some(BackendAnswer::Value(v)) if s.held.contains(v) => Some(s.clone()),
                    Some(_) => None,
                };
            }
        };
        match output {
            None => Some(next),
            Some(o) if *o == answer => Some(next),
            Some(_) => None,
        }
    }
}

/// How a control call ended, as the linearizability model reads it.
fn answer_of<T>(
    r: Result<Result<tonic::Response<T>, tonic::Status>, tokio::time::error::Elapsed>,
) -> Option<BackendAnswer> {
    match r {
        Ok(Ok(_)) => Some(BackendAnswer::Ok),
        // Refused by the state machine: a definite answer, nothing changed.
        Ok(Err(s)) if s.code() == tonic::Code::AlreadyExists => Some(BackendAnswer::Exists),
        Ok(Err(s)) if s.code() == tonic::Code::NotFound => Some(BackendAnswer::Missing),
        // Unavailable, a broken connection, a timeout: it may or may not
        // have taken effect.
        _ => None,
    }
}

/// An op, with the name of the backend it is on.
pub type Recorded = (String, Op<BackendOp, BackendAnswer>);

/// What the clients of one history share.
struct Shared {
    heads: Vec<String>,
    token: String,
    /// Times are nanoseconds since this.
    start: std::time::Instant,
    stop: std::sync::atomic::AtomicBool,
    /// Calls ended, by all clients.
    done: std::sync::atomic::AtomicUsize,
    /// The next value to write (each is written once).
    values: std::sync::atomic::AtomicU32,
}

/// Clients recording a history of the control plane's backends, from
/// [`BackendHistory::start`] until [`BackendHistory::check`].
pub struct BackendHistory {
    shared: std::sync::Arc<Shared>,
    clients: Vec<std::thread::JoinHandle<Vec<Recorded>>>,
}

impl BackendHistory {
    /// `clients` threads calling `heads` (see [`record_backend_ops`]).
    pub fn start(heads: &[String], token: &str, clients: usize) -> Self {
        let shared = std::sync::Arc::new(Shared {
            heads: heads.to_vec(),
            token: token.to_string(),
            start: std::time::Instant::now(),
            stop: Default::default(),
            done: Default::default(),
            values: std::sync::atomic::AtomicU32::new(1),
        });
        let clients = (0..clients)
            .map(|i| {
                let shared = shared.clone();
                std::thread::spawn(move || record_backend_ops(i, &shared))
            })
            .collect();
        Self { shared, clients }
    }

    /// Waits until the clients have ended `n` more calls (progress, not
    /// time, so a busy machine only makes it slower).
    pub fn progress(&self, what: &str, n: usize) {
        use std::sync::atomic::Ordering;
        let target = self.shared.done.load(Ordering::Relaxed) + n;
        crate::wait_for(what, std::time::Duration::from_secs(60), || {
            (self.shared.done.load(Ordering::Relaxed) >= target).then_some(())
        });
    }

    /// Stops the clients and checks their history by backend under
    /// [`Backends`]; panics with the history on a violation, or when fewer
    /// than `at_least` ops were recorded. Prints what it checked, as
    /// `FIGURES: linearizability (what): ...`.
    pub fn check(self, what: &str, at_least: usize) -> Checked {
        self.shared
            .stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let mut history = Vec::new();
        for c in self.clients {
            history.extend(c.join().expect("a history client panicked"));
        }
        let checked = check_by_key(&Backends, history).unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "FIGURES: linearizability ({what}): {} histories, {} operations ({} of unknown outcome), 0 violations",
            checked.histories, checked.ops, checked.unknown
        );
        assert!(checked.ops >= at_least, "{checked:?}");
        checked
    }
}

/// One client of a history of the control plane: random creates, updates,
/// deletes and reads (GetSnapshot, what `serve status` shows) of `KEYS`
/// backends, each call through the next head in turn, until told to stop.
fn record_backend_ops(client: usize, shared: &Shared) -> Vec<Recorded> {
    use serval_protos::control::*;
    use std::sync::atomic::Ordering;
    let Shared {
        heads,
        token,
        start,
        stop,
        done,
        values,
    } = shared;
    const KEYS: u64 = 3;
    const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(4);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _in_runtime = rt.enter();
    let mut clients: Vec<_> = heads
        .iter()
        .map(|a| serval_protos::client::connect_lazy(a, token).unwrap())
        .collect();
    // Backends name stored code; stored before any fault (a refused put
    // shows as refused creates in the history).
    for c in clients.iter_mut() {
        let put = rt.block_on(tokio::time::timeout(
            CALL_TIMEOUT,
            crate::put_placeholder_code(c),
        ));
        if matches!(put, Ok(Ok(()))) {
            break;
        }
    }
    let now = || start.elapsed().as_nanos() as u64;
    let mut rng =
        0x9e37_79b9_7f4a_7c15u64 ^ (client as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut history = Vec::new();
    let mut turn = client;
    while !stop.load(Ordering::Relaxed) {
        turn += 1;
        let c = &mut clients[turn % heads.len()];
        let key = format!("lin{}", next() % KEYS);
        let config = |v: u32| BackendConfig {
            num_replicas: 1,
            num_cpus: 1.0,
            user_config_json: v.to_string(),
            ..Default::default()
        };
        let invoke = now();
        let (input, output) = match next() % 8 {
            0..=2 => {
                let snapshot = rt.block_on(tokio::time::timeout(
                    CALL_TIMEOUT,
                    c.get_snapshot(WatchRequest::default()),
                ));
                let Ok(Ok(s)) = snapshot else {
                    continue; // a read that failed tells nothing
                };
                let ret = now();
                // One snapshot reads every key.
                for k in 0..KEYS {
                    let name = format!("lin{k}");
                    let value = s
                        .get_ref()
                        .backends
                        .iter()
                        .find(|b| b.name == name)
                        .map(|b| {
                            b.config
                                .as_ref()
                                .map_or(0, |c| c.user_config_json.parse().unwrap_or(0))
                        });
                    history.push((
                        name,
                        Op {
                            client,
                            input: BackendOp::StaleRead,
                            output: Some(BackendAnswer::Value(value)),
                            invoke,
                            ret: Some(ret),
                        },
                    ));
                }
                done.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            3 | 4 => {
                let v = values.fetch_add(1, Ordering::Relaxed);
                let backend = Backend {
                    name: key.clone(),
                    code_digest: crate::placeholder_code_digest(),
                    config: Some(config(v)),
                    ..Default::default()
                };
                let r = rt.block_on(tokio::time::timeout(
                    CALL_TIMEOUT,
                    c.create_backend(backend),
                ));
                (BackendOp::Create(v), answer_of(r))
            }
            5 | 6 => {
                let v = values.fetch_add(1, Ordering::Relaxed);
                let request = UpdateBackendConfigRequest {
                    name: key.clone(),
                    config: Some(config(v)),
                };
                let r = rt.block_on(tokio::time::timeout(
                    CALL_TIMEOUT,
                    c.update_backend_config(request),
                ));
                (BackendOp::Update(v), answer_of(r))
            }
            _ => {
                let request = DeleteBackendRequest {
                    name: key.clone(),
                    force: true,
                };
                let r = rt.block_on(tokio::time::timeout(
                    CALL_TIMEOUT,
                    c.delete_backend(request),
                ));
                (BackendOp::Delete, answer_of(r))
            }
        };
        let ret = output.is_some().then(now);
        history.push((
            key,
            Op {
                client,
                input,
                output,
                invoke,
                ret,
            },
        ));
        done.fetch_add(1, Ordering::Relaxed);
    }
    history
}

#[cfg(test)]
mod tests {
    use super::*;
    use BackendAnswer::*;
    use BackendOp::*;

    fn op(
        client: usize,
        input: BackendOp,
        output: Option<BackendAnswer>,
        invoke: u64,
        ret: Option<u64>,
    ) -> Op<BackendOp, BackendAnswer> {
        Op {
            client,
            input,
            output,
            invoke,
            ret,
        }
    }

    #[test]
    fn concurrent_writes_and_reads_in_some_order_are_accepted() {
        // c0 creates 1 while c1 reads: the read may come before or after.
        let h = vec![
            op(0, Create(1), Some(Ok), 0, Some(10)),
            op(1, Read, Some(Value(None)), 1, Some(3)),
            op(1, Read, Some(Value(Some(1))), 4, Some(12)),
            op(2, Update(2), Some(Ok), 5, Some(20)),
            op(1, Read, Some(Value(Some(2))), 13, Some(14)),
            op(0, Delete, Some(Ok), 21, Some(22)),
            op(0, Update(3), Some(Missing), 23, Some(24)),
        ];
        assert_eq!(check(&Backends, &h).unwrap().ops, 7);
    }

    #[test]
    fn a_read_missing_a_completed_write_is_a_violation() {
        let h = vec![
            op(0, Create(1), Some(Ok), 0, Some(10)),
            op(0, Update(2), Some(Ok), 11, Some(20)),
            // Begins after the update returned, yet sees the old value.
            op(1, Read, Some(Value(Some(1))), 21, Some(22)),
        ];
        let e = check(&Backends, &h).unwrap_err();
        assert!(e.contains("not linearizable"), "{e}");
        // ... which a possibly-stale read is allowed to see.
        let mut stale = h.clone();
        stale[2].input = StaleRead;
        check(&Backends, &stale).unwrap();
    }

    #[test]
    fn a_write_refused_as_if_it_had_not_happened_is_a_violation() {
        // Two creates in sequence both answered Ok: the second must have
        // found the backend.
        let h = vec![
            op(0, Create(1), Some(Ok), 0, Some(1)),
            op(1, Create(2), Some(Ok), 2, Some(3)),
        ];
        assert!(check(&Backends, &h).is_err());
    }

    #[test]
    fn an_unknown_outcome_may_take_effect_late_or_never() {
        // The update timed out; one reader saw it take effect, and every
        // later read must too.
        let mut h = vec![
            op(0, Create(1), Some(Ok), 0, Some(1)),
            op(0, Update(2), None, 2, None),
            op(1, Read, Some(Value(Some(1))), 3, Some(4)),
            op(1, Read, Some(Value(Some(2))), 100, Some(101)),
        ];
        check(&Backends, &h).unwrap();
        // Never taking effect is fine too.
        h[3].output = Some(Value(Some(1)));
        check(&Backends, &h).unwrap();
        // But not effect, then no effect.
        h[3].output = Some(Value(Some(2)));
        h.push(op(1, Read, Some(Value(Some(1))), 102, Some(103)));
        assert!(check(&Backends, &h).is_err());
        // Nor before it was invoked.
        let early = vec![
            op(1, Read, Some(Value(Some(7))), 0, Some(1)),
            op(0, Create(7), None, 2, None),
        ];
        assert!(check(&Backends, &early).is_err());
    }

    #[test]
    fn a_stale_read_never_sees_a_value_from_the_future_or_nowhere() {
        let h = vec![
            op(1, StaleRead, Some(Value(Some(5))), 0, Some(1)),
            op(0, Create(5), Some(Ok), 2, Some(3)),
        ];
        assert!(check(&Backends, &h).is_err());
        let nowhere = vec![
            op(0, Create(5), Some(Ok), 0, Some(1)),
            op(1, StaleRead, Some(Value(Some(6))), 2, Some(3)),
        ];
        assert!(check(&Backends, &nowhere).is_err());
    }

    #[test]
    fn keys_are_checked_apart_and_counted() {
        // Two creates of one key would be a violation; of two keys, not.
        let h = vec![
            ("a", op(0, Create(1), Some(Ok), 0, Some(1))),
            ("b", op(0, Create(1), Some(Ok), 2, Some(3))),
            ("b", op(1, Read, Some(Value(Some(1))), 4, Some(5))),
            ("b", op(1, Update(2), None, 6, None)),
        ];
        let c = check_by_key(&Backends, h.clone()).unwrap();
        assert_eq!((c.histories, c.ops, c.unknown), (2, 4, 1));
        let one_key: Vec<_> = h.into_iter().map(|(_, o)| ("a", o)).collect();
        let e = check_by_key(&Backends, one_key).unwrap_err();
        assert!(e.starts_with("key \"a\""), "{e}");
    }
}
