//! Outcomes of a load the tests keep up while they restart something underneath it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Requests answered 200, and the others with what happened to each.
#[derive(Debug, Default)]
pub struct Tally {
    ok: AtomicUsize,
    failed: AtomicUsize,
    why: Mutex<Vec<String>>,
}

impl Tally {
    /// Records one request's outcome: its status, or why it got none.
    pub fn record(&self, outcome: Result<u16, String>) {
        match outcome {
            Ok(200) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            other => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                self.why
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(format!("{other:?}"));
            }
        }
    }

    /// Requests answered 200 so far.
    pub fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// Requests that failed so far.
    pub fn failed(&self) -> usize {
        self.failed.load(Ordering::Relaxed)
    }

    /// What happened to each failed request.
    pub fn why(&self) -> Vec<String> {
        self.why.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
