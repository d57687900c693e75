//! The machine, shared by the tests of the one test binary.
//!
//! Every cluster test runs in one process, two at a time on a 2-core
//! machine (libtest's threads). Most tests share the machine; a few need it
//! to themselves because they time raft elections (the partitioned heads,
//! the multi-host bed), where a second cluster beside them slows elections
//! past their deadlines. Each child a [`crate::ProcessGuard`] spawns holds a
//! [`Share`], so no test has to ask for one; [`alone`] waits until no other
//! test has a child running and holds new ones off until it is dropped.
//! Children spawned on the thread that holds it do not wait.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::Duration;

/// How long a test waits for its turn: every other test, one after
/// another, on a slow machine.
const TURN_TIMEOUT: Duration = Duration::from_secs(30 * 60);

#[derive(Default)]
struct State {
    /// Children of tests that share the machine, running now.
    shares: usize,
    /// Threads waiting for a share: `alone` lets them in first, so a
    /// test between two of its children is not held off by a run of
    /// tests that want the machine alone.
    waiting: usize,
    /// The test thread that has the machine alone.
    alone: Option<ThreadId>,
}

static STATE: Mutex<State> = Mutex::new(State {
    shares: 0,
    waiting: 0,
    alone: None,
});
static CHANGED: Condvar = Condvar::new();

fn state() -> MutexGuard<'static, State> {
    // A test that panicked while holding the lock left the counts whole:
    // every change to them is a single statement.
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// A child process's share of the machine; released when dropped.
pub struct Share {
    counted: bool,
}

/// Waits while another test has the machine alone, then counts one more
/// child running.
pub fn share() -> Share {
    let me = std::thread::current().id();
    let mut s = state();
    if s.alone == Some(me) {
        return Share { counted: false };
    }
    s.waiting += 1;
    let (mut s, timeout) = CHANGED
        .wait_timeout_while(s, TURN_TIMEOUT, |s| s.alone.is_some())
        .unwrap_or_else(|p| p.into_inner());
    s.waiting -= 1;
    assert!(
        !timeout.timed_out(),
        "waited {TURN_TIMEOUT:?} for a test that has the machine alone"
    );
    s.shares += 1;
    Share { counted: true }
}

impl Drop for Share {
    fn drop(&mut self) {
        if self.counted {
            state().shares -= 1;
            CHANGED.notify_all();
        }
    }
}

/// The machine to this test alone, until dropped.
pub struct Alone(());

/// Waits until no other test has a child running (or waits to start one),
/// then keeps the machine for the calling test.
pub fn alone() -> Alone {
    let me = std::thread::current().id();
    let s = state();
    let (mut s, timeout) = CHANGED
        .wait_timeout_while(s, TURN_TIMEOUT, |s| {
            s.shares > 0 || s.waiting > 0 || s.alone.is_some()
        })
        .unwrap_or_else(|p| p.into_inner());
    assert!(
        !timeout.timed_out(),
        "waited {TURN_TIMEOUT:?} for the other tests' processes to end"
    );
    s.alone = Some(me);
    Alone(())
}

impl Drop for Alone {
    fn drop(&mut self) {
        state().alone = None;
        CHANGED.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Long enough for a thread that is not held off to get through.
    const MOMENT: Duration = Duration::from_millis(300);
    /// Long enough for anything that is let through.
    const PATIENCE: Duration = Duration::from_secs(60);

    #[test]
    fn alone_waits_for_the_shares_and_holds_new_ones_off() {
        let share_here = share();
        let (got_alone, alone_rx) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let alone = alone();
            // Its own children do not wait for it.
            let own = share();
            got_alone.send(()).unwrap();
            release_rx.recv_timeout(PATIENCE).unwrap();
            drop(own);
            drop(alone);
        });
        assert!(
            alone_rx.recv_timeout(MOMENT).is_err(),
            "alone while another test's child runs"
        );
        drop(share_here);
        alone_rx
            .recv_timeout(PATIENCE)
            .expect("alone once the other children ended");

        let (got_share, share_rx) = mpsc::channel();
        let other = std::thread::spawn(move || {
            let s = share();
            got_share.send(()).unwrap();
            drop(s);
        });
        assert!(
            share_rx.recv_timeout(MOMENT).is_err(),
            "a share while a test has the machine alone"
        );
        release.send(()).unwrap();
        share_rx
            .recv_timeout(PATIENCE)
            .expect("a share once the machine is free");
        holder.join().unwrap();
        other.join().unwrap();
    }
}
