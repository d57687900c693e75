//! Replies on their way back to the router: while a `drain` runs, the
//! replies it produces are gathered per router connection in this thread's
//! outbox and written `reply_batch` at a time; outside a drain (a reply sent
//! later, from any thread) each goes at once.

use std::cell::RefCell;

use bytes::BytesMut;
use serval_node::replica_server::Reply;
use serval_protos::frame::Response;
use serval_protos::frame_socket::FrameSender;

/// The replies a `drain` gathered for one router connection.
struct Pending {
    tx: FrameSender,
    frames: BytesMut,
    count: usize,
}

impl Pending {
    /// Writes the gathered replies, if any, and starts a new group.
    fn send(&mut self) {
        if !self.frames.is_empty() {
            let _ = self.tx.send(&self.frames);
            self.frames.clear();
            self.count = 0;
        }
    }
}

/// While a `drain` runs on the Python thread: the replies it produced,
/// gathered per router connection and sent `reply_batch` at a time (and the
/// rest when the drain ends), so a drain of N requests costs N / reply_batch
/// writes instead of N.
struct OutboxState {
    reply_batch: usize,
    pending: Vec<Pending>,
}

thread_local! {
    static OUTBOX: RefCell<Option<OutboxState>> = const { RefCell::new(None) };
}

/// Sends a reply now, or into the drain's outbox when one is open on this thread.
pub(super) fn deliver(reply: Reply, response: &Response) {
    let (tx, bytes) = reply.into_frame(response);
    let direct = OUTBOX.with(|outbox| {
        let mut outbox = outbox.borrow_mut();
        let Some(state) = outbox.as_mut().filter(|s| s.reply_batch > 1) else {
            return Some((tx, bytes));
        };
        let i = match state.pending.iter().position(|p| p.tx.same_connection(&tx)) {
            Some(i) => i,
            None => {
                state.pending.push(Pending {
                    tx,
                    frames: BytesMut::new(),
                    count: 0,
                });
                state.pending.len() - 1
            }
        };
        let pending = &mut state.pending[i];
        pending.frames.extend_from_slice(&bytes);
        pending.count += 1;
        if pending.count >= state.reply_batch {
            pending.send();
        }
        None
    });
    if let Some((tx, bytes)) = direct {
        let _ = tx.send(&bytes);
    }
}

/// Opens the thread's outbox; dropping it (also on an error path) sends
/// what was gathered.
pub(super) struct Outbox;

impl Outbox {
    pub(super) fn open(reply_batch: usize) -> Self {
        OUTBOX.with(|outbox| {
            *outbox.borrow_mut() = Some(OutboxState {
                reply_batch,
                pending: Vec::new(),
            })
        });
        Outbox
    }

    /// Sends every partial group now (before the thread waits for more work).
    pub(super) fn flush(&self) {
        OUTBOX.with(|outbox| {
            for pending in outbox.borrow_mut().iter_mut().flat_map(|s| &mut s.pending) {
                pending.send();
            }
        });
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.flush();
        OUTBOX.with(|outbox| outbox.borrow_mut().take());
    }
}
