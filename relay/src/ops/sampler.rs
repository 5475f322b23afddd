//! The overload sampler: every [`INTERVAL`] it reads the process's resident memory and
//! the listeners' open connections, moves the overload level (decided in
//! `hardening::overload`) and publishes the level and memory as gauges. A level change is logged
//! at WARN (entering) or INFO (leaving).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::hardening::conn_limit::ConnLimit;
use crate::hardening::overload::{Overload, Sample, resident_bytes};
use crate::ops::metrics::Metrics;

/// How often the sampler looks.
pub(crate) const INTERVAL: Duration = Duration::from_millis(250);

/// What the sampler reads and writes.
pub(crate) struct Sampled {
    pub(crate) overload: Arc<Overload>,
    pub(crate) quic: Arc<ConnLimit>,
    pub(crate) https: Arc<ConnLimit>,
    pub(crate) metrics: Arc<Metrics>,
}

/// Samples until `stop` resolves.
pub(crate) async fn run(s: Sampled, stop: impl Future<Output = ()>) {
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => sample_once(&s),
            () = &mut stop => return,
        }
    }
}

fn sample_once(s: &Sampled) {
    let (quic, https) = (s.quic.open(), s.https.open());
    let resident = resident_bytes();
    let (before, after) = s.overload.update(Sample {
        resident,
        connections: quic + https,
    });
    let m = &s.metrics;
    m.overload_level.store(after as i64, Ordering::Relaxed);
    if after > before {
        tracing::warn!(level = ?after, resident, connections = quic + https, "relay overloaded: shedding new work");
    } else if after < before {
        tracing::info!(level = ?after, resident, connections = quic + https, "overload easing");
    }
}
