//! A congestion controller for tunnels that cross lossy paths: it sizes the congestion
//! window from what the path delivers (the highest delivery rate of the last ten round
//! trips times the smallest round-trip time, doubled), in the manner of BBR, rather than
//! halving it at every loss as CUBIC and NewReno do.
//!
//! Why: on a path that drops a few per cent of packets at random (Wi-Fi, a congested
//! mobile link, a lossy long-haul route) a loss-based controller spends its time at a
//! few packets of window: 5 % loss each way and 50 ms of round trip hold quinn's CUBIC to
//! about 1 Mbit/s, so a 100 MiB transfer takes a quarter of an hour. quinn's own BBR
//! holds its window to packet conservation while any loss goes on (so, forever at 5 %),
//! and was measured stalling at 2 Mbit/s.
//!
//! Loss still counts when it is heavy: a round trip that loses more than
//! [`HEAVY_LOSS`] of what it sent cuts the estimate by 30 %, and persistent congestion
//! (everything lost for several round trips) starts again from the minimum window, so a
//! path that is really overloaded, or a policer, is not driven harder.
//!
//! The smallest round-trip time is measured from each acknowledged packet, and afresh
//! every ten seconds by holding the window to half the bandwidth-delay product for
//! 200 ms so the queue drains (BBR's ProbeRTT), so a path whose delay grows is followed.
//!
//! The state machine ([`RateCore`]) takes plain numbers and time, and is tested on a
//! simulated path without sockets; [`LossTolerant`] adapts it to quinn.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};

/// The window starts at this, as quinn's controllers do.
const INITIAL_WINDOW: u64 = 14_720;
/// The window never falls below this many datagrams.
const MIN_WINDOW_PACKETS: u64 = 4;
/// Round trips over which the highest delivery rate is kept.
const BW_WINDOW_ROUNDS: usize = 10;
/// The window is this many times the estimated bandwidth-delay product: room for the
/// acknowledgements' delay and for the estimate to grow when the path gets faster.
const WINDOW_GAIN: f64 = 2.0;
/// The window is sized as if the round trip were at least this long. Acknowledgements
/// come in bursts (batched by the receiver, by segmentation offload, by scheduling), and
/// on a path of a fraction of a millisecond (a LAN, loopback) a window of twice the
/// measured bandwidth-delay product stalls between bursts: on loopback it held a 1 GiB
/// transfer to a quarter of CUBIC's rate. On longer paths it changes nothing.
const RTT_FLOOR: Duration = Duration::from_millis(5);
/// A round trip losing more than this share of the bytes it resolved counts as congestion.
pub const HEAVY_LOSS: f64 = 0.2;
/// Startup ends once the delivery rate has grown less than 25 % over this many rounds.
const STARTUP_FLAT_ROUNDS: u32 = 3;
/// The smallest round-trip time is measured afresh this often: the path may have changed,
/// and a stale value (too small) would hold the window far below what the path takes.
const MIN_RTT_LIFETIME: Duration = Duration::from_secs(10);
/// To measure it, the window is held to half the bandwidth-delay product for this long
/// (or one round trip, if longer), so the queue the window keeps drains.
const PROBE_RTT_TIME: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Doubling the window each round trip until the delivery rate stops growing.
    Startup,
    /// The window follows the delivery rate.
    Steady,
}

/// The controller's state, fed with plain numbers: what was acknowledged or lost, when,
/// and the path's smallest round-trip time.
#[derive(Debug, Clone)]
pub struct RateCore {
    mtu: u64,
    window: u64,
    mode: Mode,
    /// Bytes acknowledged since the start.
    delivered: u64,
    /// Where the current round trip began: bytes delivered and the time then. A round
    /// ends with the first acknowledgement of a packet sent after it began.
    round_delivered: u64,
    round_started: Option<Instant>,
    /// Bytes lost in the current round trip.
    round_lost: u64,
    /// Whether the sender ran out of data during this round (its rate says little).
    round_app_limited: bool,
    /// Delivery rates (bytes/s) of the last rounds, newest last.
    rates: VecDeque<u64>,
    /// Startup: the best rate so far and the rounds without 25 % growth.
    startup_best: u64,
    flat_rounds: u32,
    /// The smallest round-trip time seen since `min_rtt_at`.
    min_rtt: Duration,
    min_rtt_at: Option<Instant>,
    /// Measuring the smallest round-trip time afresh: until when, and the smallest so far.
    probe_rtt: Option<(Instant, Duration)>,
}

impl RateCore {
    /// A controller for datagrams of `mtu` bytes.
    pub fn new(mtu: u16) -> Self {
        Self {
            mtu: u64::from(mtu),
            window: INITIAL_WINDOW,
            mode: Mode::Startup,
            delivered: 0,
            round_delivered: 0,
            round_started: None,
            round_lost: 0,
            round_app_limited: false,
            rates: VecDeque::with_capacity(BW_WINDOW_ROUNDS),
            startup_best: 0,
            flat_rounds: 0,
            min_rtt: Duration::ZERO,
            min_rtt_at: None,
            probe_rtt: None,
        }
    }

    fn min_window(&self) -> u64 {
        MIN_WINDOW_PACKETS * self.mtu
    }

    /// The highest delivery rate of the last rounds, bytes per second.
    pub fn bandwidth(&self) -> u64 {
        self.rates.iter().copied().max().unwrap_or(0)
    }

    /// The congestion window, bytes.
    pub fn window(&self) -> u64 {
        if self.probe_rtt.is_some() {
            let half_bdp = (self.bdp() / 2.0) as u64;
            return half_bdp.max(self.min_window());
        }
        self.window.max(self.min_window())
    }

    /// The bandwidth-delay product the window is sized from, bytes.
    fn bdp(&self) -> f64 {
        self.bandwidth() as f64 * self.min_rtt.max(RTT_FLOOR).as_secs_f64()
    }

    /// The smallest round-trip time in use.
    pub fn min_rtt(&self) -> Duration {
        self.min_rtt
    }

    /// `bytes` sent at `sent` were acknowledged at `now` (so `now - sent` is a round-trip
    /// time sample).
    pub fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool) {
        self.sample_rtt(now, now.saturating_duration_since(sent));
        self.delivered += bytes;
        self.round_app_limited |= app_limited;
        if self.mode == Mode::Startup {
            self.window = self.window.saturating_add(bytes);
        }
        let started = *self.round_started.get_or_insert(now);
        if sent >= started && now > started {
            self.end_round(now, started);
        }
    }

    /// Keeps the smallest round-trip time, measured afresh every [`MIN_RTT_LIFETIME`].
    fn sample_rtt(&mut self, now: Instant, rtt: Duration) {
        if rtt.is_zero() {
            return;
        }
        if let Some((until, best)) = &mut self.probe_rtt {
            *best = (*best).min(rtt);
            if now >= *until {
                self.min_rtt = *best;
                self.min_rtt_at = Some(now);
                self.probe_rtt = None;
            }
            return;
        }
        let expired = self
            .min_rtt_at
            .is_none_or(|at| now.saturating_duration_since(at) > MIN_RTT_LIFETIME);
        if self.min_rtt.is_zero() || rtt <= self.min_rtt {
            self.min_rtt = rtt;
            self.min_rtt_at = Some(now);
        } else if expired {
            let hold = PROBE_RTT_TIME.max(self.min_rtt);
            self.probe_rtt = Some((now + hold, rtt));
        }
    }

    fn end_round(&mut self, now: Instant, started: Instant) {
        let bytes = self.delivered - self.round_delivered;
        let rate = (bytes as f64 / (now - started).as_secs_f64()) as u64;
        let lost = self.round_lost;
        let resolved = bytes + lost;
        // A rate from a round short of data is taken only if it is higher than the estimate.
        if !self.round_app_limited || rate > self.bandwidth() {
            if self.rates.len() == BW_WINDOW_ROUNDS {
                self.rates.pop_front();
            }
            self.rates.push_back(rate);
        }
        if resolved > 0 && lost as f64 > HEAVY_LOSS * resolved as f64 {
            // Heavy loss: congestion, or a policer. Back off from what was delivered.
            let cut = (self.bandwidth() as f64 * 0.7) as u64;
            self.rates.clear();
            self.rates.push_back(cut);
            self.mode = Mode::Steady;
        } else if self.mode == Mode::Startup {
            let best = self.bandwidth();
            if best as f64 >= self.startup_best as f64 * 1.25 {
                self.startup_best = best;
                self.flat_rounds = 0;
            } else if !self.round_app_limited {
                self.flat_rounds += 1;
                if self.flat_rounds >= STARTUP_FLAT_ROUNDS {
                    self.mode = Mode::Steady;
                }
            }
        }
        if self.mode == Mode::Steady {
            self.window = ((self.bdp() * WINDOW_GAIN) as u64).max(self.min_window());
        }
        tracing::trace!(
            mode = ?self.mode,
            rate,
            bandwidth = self.bandwidth(),
            window = self.window,
            lost,
            resolved,
            min_rtt = ?self.min_rtt,
            "round"
        );
        self.round_delivered = self.delivered;
        self.round_started = Some(now);
        self.round_lost = 0;
        self.round_app_limited = false;
    }

    /// `lost_bytes` were declared lost; `persistent`: everything sent over several round
    /// trips was.
    pub fn on_loss(&mut self, lost_bytes: u64, persistent: bool) {
        self.round_lost += lost_bytes;
        if persistent {
            self.window = self.min_window();
            self.rates.clear();
            self.mode = Mode::Startup;
            self.startup_best = 0;
            self.flat_rounds = 0;
            self.round_started = None;
            self.round_delivered = self.delivered;
            self.round_lost = 0;
        }
    }

    /// The path's datagram size changed.
    pub fn on_mtu(&mut self, mtu: u16) {
        self.mtu = u64::from(mtu);
    }
}

/// [`RateCore`] as a quinn congestion controller.
#[derive(Debug, Clone)]
pub struct LossTolerant {
    core: RateCore,
}

impl Controller for LossTolerant {
    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        _rtt: &quinn_proto::RttEstimator,
    ) {
        // The core takes its own round-trip samples (`now - sent`): quinn's minimum
        // never forgets, and a path whose delay grew would keep a window far too small.
        self.core.on_ack(now, sent, bytes, app_limited);
    }

    fn on_congestion_event(
        &mut self,
        _now: Instant,
        _sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.core.on_loss(lost_bytes, is_persistent_congestion);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.core.on_mtu(new_mtu);
    }

    fn window(&self) -> u64 {
        self.core.window()
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = ControllerMetrics::default();
        m.congestion_window = self.core.window();
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        INITIAL_WINDOW
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// The controller factory for `choice`.
pub fn factory(choice: crate::config::QuicCongestion) -> Arc<dyn ControllerFactory + Send + Sync> {
    match choice {
        crate::config::QuicCongestion::LossTolerant => Arc::new(LossTolerantConfig),
        crate::config::QuicCongestion::Cubic => Arc::new(quinn::congestion::CubicConfig::default()),
    }
}

/// Builds a [`LossTolerant`] controller for each connection.
#[derive(Debug, Default, Clone, Copy)]
pub struct LossTolerantConfig;

impl ControllerFactory for LossTolerantConfig {
    fn build(self: Arc<Self>, _now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(LossTolerant {
            core: RateCore::new(current_mtu),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A path in simulated time: a bottleneck of `rate` bytes/s with a drop-tail queue of
    /// `queue` bytes, `rtt` of propagation, and `loss` of the packets dropped at random.
    /// The sender keeps `window` bytes in flight, paced over the smoothed RTT; a loss is
    /// declared one RTT after the packet would have arrived. Returns the goodput over
    /// `duration`, bytes/s, and the share of packets the queue dropped.
    fn simulate(rate: f64, queue: u64, rtt: Duration, loss: f64, duration: Duration) -> (f64, f64) {
        simulate_with(rate, queue, &|_| rtt, loss, duration, Duration::ZERO)
    }

    /// [`simulate`] with the propagation delay `rtt_at(elapsed)` changing over time, and
    /// the goodput counted from `count_from` on.
    fn simulate_with(
        rate: f64,
        queue: u64,
        rtt_at: &dyn Fn(Duration) -> Duration,
        loss: f64,
        duration: Duration,
        count_from: Duration,
    ) -> (f64, f64) {
        const MTU: u64 = 1200;
        let mut rng = fastrand_like(7);
        let start = Instant::now();
        let mut core = RateCore::new(MTU as u16);
        let mut now = start;
        let tick = Duration::from_micros(100);
        // (arrival of the ack or of the loss verdict, send time, bytes, lost)
        let mut flight: VecDeque<(Instant, Instant, u64, bool)> = VecDeque::new();
        let mut in_flight = 0u64;
        let mut link_free = start;
        let mut delivered = 0u64;
        let (mut sent, mut dropped_by_queue) = (0u64, 0u64);
        let mut budget = 0f64;
        while now - start < duration {
            now += tick;
            let rtt = rtt_at(now - start);
            // Acks and loss verdicts due.
            while flight.front().is_some_and(|f| f.0 <= now) {
                let Some((_, at, bytes, lost)) = flight.pop_front() else {
                    break;
                };
                in_flight -= bytes;
                if lost {
                    core.on_loss(bytes, false);
                } else {
                    if now - start >= count_from {
                        delivered += bytes;
                    }
                    core.on_ack(now, at, bytes, false);
                }
            }
            // Paced sending: the window over the RTT, a quarter more.
            budget += core.window() as f64 / rtt.as_secs_f64() * 1.25 * tick.as_secs_f64();
            budget = budget.min(4.0 * MTU as f64);
            while budget >= MTU as f64 && in_flight + MTU <= core.window() {
                budget -= MTU as f64;
                sent += 1;
                in_flight += MTU;
                let backlog = link_free.saturating_duration_since(now).as_secs_f64() * rate;
                let random_loss = rng() < loss;
                if backlog > queue as f64 {
                    dropped_by_queue += 1;
                    flight.push_back((now + rtt * 2, now, MTU, true));
                    continue;
                }
                link_free = link_free.max(now) + Duration::from_secs_f64(MTU as f64 / rate);
                let arrival = link_free + rtt;
                flight.push_back((
                    if random_loss { arrival + rtt } else { arrival },
                    now,
                    MTU,
                    random_loss,
                ));
            }
            flight.make_contiguous().sort_by_key(|f| f.0);
        }
        (
            delivered as f64 / (duration - count_from).as_secs_f64(),
            dropped_by_queue as f64 / sent.max(1) as f64,
        )
    }

    /// A small deterministic generator of numbers in [0, 1).
    fn fastrand_like(seed: u64) -> impl FnMut() -> f64 {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    const MBIT: f64 = 1e6 / 8.0;

    #[test]
    fn random_loss_of_five_per_cent_keeps_most_of_the_path() {
        // 50 Mbit/s, 50 ms, 5 % random loss.
        let rate = 50.0 * MBIT;
        let (goodput, _) = simulate(
            rate,
            1 << 20,
            Duration::from_millis(50),
            0.05,
            Duration::from_secs(20),
        );
        assert!(
            goodput > 0.6 * rate,
            "goodput {:.1} Mbit/s of 50",
            goodput / MBIT
        );
    }

    #[test]
    fn a_clean_path_is_filled_without_flooding_its_queue() {
        // 20 Mbit/s, 20 ms, a queue of one bandwidth-delay product.
        let rate = 20.0 * MBIT;
        let bdp = (rate * 0.02) as u64;
        let (goodput, queue_drops) = simulate(
            rate,
            bdp,
            Duration::from_millis(20),
            0.0,
            Duration::from_secs(20),
        );
        assert!(
            goodput > 0.85 * rate,
            "goodput {:.1} Mbit/s of 20",
            goodput / MBIT
        );
        assert!(
            queue_drops < 0.02,
            "the queue dropped {:.1} %",
            queue_drops * 100.0
        );
    }

    #[test]
    fn a_path_whose_delay_grows_is_followed() {
        // 20 Mbit/s; the round trip goes from 1 ms to 100 ms after 5 s (a route change,
        // or an impairment switched on), with 5 % loss: the smallest round trip is
        // measured afresh and the window grows to the new bandwidth-delay product.
        let rate = 20.0 * MBIT;
        let rtt = |t: Duration| {
            if t < Duration::from_secs(5) {
                Duration::from_millis(1)
            } else {
                Duration::from_millis(100)
            }
        };
        let (goodput, _) = simulate_with(
            rate,
            1 << 20,
            &rtt,
            0.05,
            Duration::from_secs(40),
            Duration::from_secs(20),
        );
        assert!(
            goodput > 0.6 * rate,
            "goodput {:.1} Mbit/s of 20",
            goodput / MBIT
        );
    }

    /// A controller after ten rounds of 1 MB each, 10 ms apart (100 MB/s); the time then,
    /// and the round trip.
    fn warmed_up() -> (RateCore, Instant, Duration) {
        let mut core = RateCore::new(1200);
        let rtt = Duration::from_millis(10);
        let mut now = Instant::now();
        for _ in 0..10 {
            let sent = now;
            now += rtt;
            core.on_ack(now, sent, 1_000_000, false);
        }
        (core, now, rtt)
    }

    #[test]
    fn heavy_loss_backs_off_and_persistent_congestion_starts_again() {
        let (mut core, mut now, rtt) = warmed_up();
        let before = core.bandwidth();
        assert!(before > 50_000_000, "{before}");
        // A round that loses 40 % of what it resolved.
        core.on_loss(400_000, false);
        let sent = now;
        now += rtt;
        core.on_ack(now, sent, 600_000, false);
        assert!(
            core.bandwidth() <= before * 7 / 10 + 1,
            "{} vs {before}",
            core.bandwidth()
        );
        core.on_loss(1_000_000, true);
        assert_eq!(core.window(), 4 * 1200);
        assert_eq!(core.bandwidth(), 0);
    }

    #[test]
    fn an_idle_sender_keeps_its_estimate() {
        let (mut core, mut now, rtt) = warmed_up();
        let window = core.window();
        // Rounds short of data: a trickle that says nothing about the path.
        for _ in 0..20 {
            let sent = now;
            now += rtt;
            core.on_ack(now, sent, 1200, true);
        }
        assert_eq!(core.window(), window);
    }
}
