//! Polling briefly before parking. On a virtual machine a thread that
//! sleeps and is woken pays a context switch each way, more than a no-op
//! request; when the awaited event is usually microseconds away, a short
//! poll that yields its core between looks is cheaper.

use std::time::{Duration, Instant};

/// Calls `done` until it returns true or `budget` has passed, yielding the
/// core between calls; whether `done` returned true.
pub(crate) fn poll_until(budget: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + budget;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::yield_now();
    }
}
