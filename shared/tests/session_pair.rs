//! The relay's and the connector's control-stream sessions wired together in memory: frames
//! cross through the real codec, streams are counters, and time is simulated, so every
//! registration and drain scenario runs without a socket or a sleep.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use portcullis_shared::identity::HostPattern;
use portcullis_shared::proto::{
    CloseCode, ConnectorEvent, ConnectorSession, ConnectorSessionConfig, ControlFrame, DecodeError,
    FrameDecoder, OpenError, ProtocolError, Rejection, RelayEvent, RelaySession,
    RelaySessionConfig, encode_frame,
};
use proptest::prelude::*;

const GRACE: Duration = Duration::from_secs(30);

#[test]
fn registration_publishes_allowed_names_and_refuses_the_rest() {
    let mut pair = Pair::new(
        &["app.internal", "*.eng.internal"],
        &["app.internal", "ci.eng.internal", "db.internal", "bad name"],
    );

    pair.run();

    assert_eq!(
        pair.relay_events(),
        [RelayEvent::Registered {
            patterns: vec![pat("app.internal"), pat("ci.eng.internal")],
            accepted: vec!["app.internal".into(), "ci.eng.internal".into()],
            rejected: refused(),
            agent: "test-agent".into(),
        }]
    );
    assert_eq!(
        pair.connector_events(),
        [ConnectorEvent::Registered {
            accepted: vec!["app.internal".into(), "ci.eng.internal".into()],
            rejected: refused(),
        }]
    );
    assert!(pair.relay.may_open());
    assert_eq!(pair.relay.poll_timeout(), None);
    assert_eq!(pair.connector.poll_timeout(), None);

    fn refused() -> Vec<Rejection> {
        vec![
            Rejection {
                hostname: "db.internal".into(),
                reason: "connector c1 may not publish db.internal".into(),
            },
            Rejection {
                hostname: "bad name".into(),
                reason: "invalid hostname pattern \"bad name\": use an exact name or *.suffix"
                    .into(),
            },
        ]
    }
}

#[test]
fn publish_withdraws_and_restores_registered_names_and_refuses_others() {
    let mut pair = Pair::new(
        &["app.internal", "db.internal"],
        &["app.internal", "db.internal"],
    );
    pair.run();
    pair.relay_events();
    pair.connector_events();

    // Before registration nothing is queued; after it, Publish reaches the relay.
    assert!(pair.connector.publish(vec!["db.internal".into()]));
    pair.run();
    assert_eq!(
        pair.relay_events(),
        [RelayEvent::Published {
            patterns: vec![pat("db.internal")]
        }]
    );
    assert!(pair.connector.publish(vec![]));
    assert!(
        pair.connector
            .publish(vec!["app.internal".into(), "db.internal".into()])
    );
    pair.run();
    assert_eq!(
        pair.relay_events(),
        [
            RelayEvent::Published { patterns: vec![] },
            RelayEvent::Published {
                patterns: vec![pat("app.internal"), pat("db.internal")]
            }
        ]
    );
    // A name never registered is a protocol error.
    let err = pair
        .relay
        .handle_frame(
            Instant::now(),
            ControlFrame::Publish {
                hostnames: vec!["other.internal".into()],
            },
        )
        .unwrap_err();
    assert_eq!(err.close_code(), CloseCode::Protocol);
    assert!(err.to_string().contains("other.internal"), "{err}");
}

#[test]
fn a_connector_publishes_only_once_registered() {
    let mut connector = ConnectorSession::new(
        Instant::now(),
        vec!["app.internal".into()],
        "test-agent".into(),
        ConnectorSessionConfig::new(GRACE),
    );
    assert!(!connector.publish(vec![]));
}

#[test]
fn a_first_frame_other_than_register_closes_with_protocol() {
    let mut pair = Pair::new(&["app.internal"], &["app.internal"]);
    pair.to_relay.write(&ControlFrame::Drain);

    pair.run();

    assert_eq!(
        pair.relay_events(),
        [close_relay(ProtocolError::NotRegister { frame: "Drain" })]
    );
    assert_eq!(pair.relay.begin_open(), Err(OpenError::Closed));
}

#[test]
fn a_connector_that_never_registers_is_closed_after_the_register_timeout() {
    let mut pair = Pair::new(&["app.internal"], &["app.internal"]);
    pair.to_relay.cut = true;

    pair.advance(Duration::from_secs(10) - Duration::from_millis(1));
    assert_eq!(pair.relay_events(), []);
    assert_eq!(pair.relay.begin_open(), Err(OpenError::NotRegistered));
    pair.advance(Duration::from_millis(1));

    assert_eq!(
        pair.relay_events(),
        [close_relay(ProtocolError::RegisterTimeout {
            timeout: Duration::from_secs(10)
        })]
    );
    assert_eq!(
        pair.connector_events(),
        [close_connector(ProtocolError::RegistrationNotAnswered {
            timeout: Duration::from_secs(10)
        })]
    );
}

#[test]
fn an_unanswered_registration_closes_the_connector_side() {
    let mut pair = Pair::new(&["app.internal"], &["app.internal"]);
    pair.to_connector.cut = true;
    pair.run();
    assert!(matches!(
        pair.relay_events()[..],
        [RelayEvent::Registered { .. }]
    ));

    pair.advance(Duration::from_secs(10));

    assert_eq!(
        pair.connector_events(),
        [close_connector(ProtocolError::RegistrationNotAnswered {
            timeout: Duration::from_secs(10)
        })]
    );
    assert_eq!(pair.connector.poll_timeout(), None);
}

#[test]
fn a_reply_other_than_registered_closes_the_connector_side() {
    let mut pair = Pair::new(&["app.internal"], &["app.internal"]);
    pair.to_connector
        .write(&ControlFrame::Drained { opened: 0 });

    pair.run();

    assert_eq!(
        pair.connector_events(),
        [close_connector(ProtocolError::UnexpectedReply {
            frame: "Drained"
        })]
    );
}

#[test]
fn a_second_register_closes_with_protocol() {
    let mut pair = Pair::registered();
    pair.to_relay.write(&ControlFrame::Register {
        hostnames: vec!["other.internal".into()],
        agent: "again".into(),
    });

    pair.run();

    assert_eq!(
        pair.relay_events(),
        [close_relay(ProtocolError::UnexpectedFrame {
            frame: "Register"
        })]
    );
    assert!(!pair.relay.may_open());
}

#[test]
fn undecodable_control_bytes_close_with_protocol() {
    let mut pair = Pair::registered();
    pair.to_relay.bytes.extend([9, 1, 0, 0, 0, 0]);

    pair.run();

    assert_eq!(
        pair.relay_events(),
        [close_relay(ProtocolError::Decode(DecodeError::Version(9)))]
    );
}

#[test]
fn drain_waits_for_every_stream_opened_before_it_even_those_still_on_the_wire() {
    let mut pair = Pair::registered();
    for _ in 0..3 {
        pair.open().unwrap();
    }
    pair.arrive();
    // The Drain is on the wire when the relay opens one more: it must be counted.
    pair.connector.start_drain(pair.now);
    pair.send();
    pair.open().unwrap();

    pair.run();

    assert_eq!(pair.relay_events(), [RelayEvent::Draining]);
    assert_eq!(pair.relay.begin_open(), Err(OpenError::Draining));
    assert_eq!(pair.drained_seen, Some(4));
    for _ in 0..3 {
        pair.arrive();
    }
    for _ in 0..3 {
        pair.finish();
    }
    assert_eq!(pair.connector_events(), []);
    pair.finish();
    assert_eq!(pair.connector_events(), [ConnectorEvent::DrainComplete]);
    // The relay read the end of the control stream after the Drain: normal.
    assert!(pair.to_relay.fin_delivered);
    assert_eq!(pair.relay_events(), []);
    assert_eq!(pair.connector.poll_timeout(), None);
}

#[test]
fn a_drain_with_nothing_in_flight_completes_on_the_answer() {
    let mut pair = Pair::registered();

    pair.connector.start_drain(pair.now);
    pair.run();

    assert_eq!(pair.drained_seen, Some(0));
    assert_eq!(pair.connector_events(), [ConnectorEvent::DrainComplete]);
}

#[test]
fn a_missing_drain_answer_finishes_what_arrived_after_the_ack_timeout() {
    let mut pair = Pair::registered();
    pair.open().unwrap();
    pair.open().unwrap();
    pair.arrive();
    pair.to_connector.cut = true;
    pair.connector.start_drain(pair.now);
    pair.run();

    pair.advance(Duration::from_secs(2) - Duration::from_millis(1));
    assert_eq!(pair.connector_events(), []);
    pair.advance(Duration::from_millis(1));
    assert_eq!(
        pair.connector_events(),
        [ConnectorEvent::DrainNotAcknowledged]
    );
    pair.finish();

    assert_eq!(pair.connector_events(), [ConnectorEvent::DrainComplete]);
}

#[test]
fn the_drain_grace_bounds_streams_in_flight_and_on_the_wire() {
    let mut pair = Pair::registered();
    for _ in 0..3 {
        pair.open().unwrap();
    }
    pair.arrive();
    pair.arrive();
    pair.finish();
    pair.connector.start_drain(pair.now);
    pair.run();

    pair.advance(GRACE - Duration::from_millis(1));
    assert_eq!(pair.connector_events(), []);
    pair.advance(Duration::from_millis(1));

    assert_eq!(
        pair.connector_events(),
        [ConnectorEvent::DrainTimedOut {
            in_flight: 1,
            not_arrived: 1
        }]
    );
    assert_eq!(pair.connector.poll_timeout(), None);
}

#[test]
fn closing_the_control_stream_without_a_drain_is_a_protocol_error() {
    let mut pair = Pair::registered();
    pair.to_relay.fin = true;

    pair.run();

    assert_eq!(
        pair.relay_events(),
        [close_relay(ProtocolError::ControlStreamClosed)]
    );
}

#[test]
fn closing_the_control_stream_after_a_drain_is_normal() {
    let mut pair = Pair::registered();
    pair.open().unwrap();
    pair.arrive();

    pair.connector.start_drain(pair.now);
    pair.run();

    assert!(pair.to_relay.fin_delivered);
    assert_eq!(pair.relay_events(), [RelayEvent::Draining]);
    assert_eq!(pair.connector_events(), []);
    assert_eq!(pair.relay.poll_timeout(), None);
}

#[test]
fn a_frame_after_the_drain_is_a_protocol_error() {
    let mut pair = Pair::registered();
    pair.to_relay.write(&ControlFrame::Drain);
    pair.to_relay.write(&ControlFrame::Drain);

    pair.run();

    assert_eq!(
        pair.relay_events(),
        [
            RelayEvent::Draining,
            close_relay(ProtocolError::UnexpectedFrame { frame: "Drain" })
        ]
    );
    // The close dropped the queued answer.
    assert_eq!(pair.drained_seen, None);
}

#[test]
fn an_answer_to_no_drain_closes_the_connector_side() {
    let mut pair = Pair::registered();
    pair.to_connector
        .write(&ControlFrame::Drained { opened: 0 });

    pair.run();

    assert_eq!(
        pair.connector_events(),
        [close_connector(ProtocolError::UnexpectedFrame {
            frame: "Drained"
        })]
    );
}

#[test]
fn a_drain_during_registration_is_answered_after_it() {
    let mut pair = Pair::new(&["app.internal"], &["app.internal"]);

    pair.connector.start_drain(pair.now);
    pair.run();

    assert!(matches!(
        pair.relay_events()[..],
        [RelayEvent::Registered { .. }, RelayEvent::Draining]
    ));
    assert!(matches!(
        pair.connector_events()[..],
        [
            ConnectorEvent::Registered { .. },
            ConnectorEvent::DrainComplete
        ]
    ));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Whatever the interleaving of opens, arrivals, finishes, the drain and the control
    /// frames' travel, the connector completes its drain exactly when it has the relay's
    /// answer, has accepted every stream the relay opened, and has none in flight; and the
    /// relay opens nothing once it has read the Drain.
    #[test]
    fn drain_completes_exactly_when_every_opened_stream_arrived_and_finished(
        steps in prop::collection::vec(step(), 0..60),
    ) {
        let mut pair = Pair::registered();
        let mut completed = false;
        for s in steps {
            match s {
                Step::Open => {
                    let result = pair.open();
                    prop_assert_eq!(result.is_err(), pair.relay_drained);
                }
                Step::Arrive if pair.streams_on_wire > 0 => pair.arrive(),
                Step::Finish if pair.accepted > pair.finished => pair.finish(),
                Step::Arrive | Step::Finish => {}
                Step::Drain => pair.connector.start_drain(pair.now),
                Step::Send => pair.send(),
                Step::DeliverToRelay => pair.deliver_to_relay(),
                Step::DeliverToConnector => pair.deliver_to_connector(),
            }
            pair.collect();
            let relay_closed = pair.relay_events.iter().any(|e| matches!(e, RelayEvent::Close { .. }));
            prop_assert!(!relay_closed);
            let events = pair.connector_events();
            let connector_closed = events.iter().any(|e| matches!(e, ConnectorEvent::Close { .. }));
            prop_assert!(!connector_closed);
            let fired = events.contains(&ConnectorEvent::DrainComplete);
            prop_assert!(!(fired && completed), "DrainComplete fired twice");
            let due = pair.drained_seen.is_some()
                && pair.accepted == pair.relay.opened()
                && pair.accepted == pair.finished;
            prop_assert_eq!(fired || completed, due, "{:?}", pair);
            completed |= fired;
        }
        // Let everything on the wire land and every stream finish.
        pair.run();
        while pair.streams_on_wire > 0 {
            pair.arrive();
        }
        while pair.accepted > pair.finished {
            pair.finish();
        }
        completed |= pair.connector_events().contains(&ConnectorEvent::DrainComplete);
        prop_assert_eq!(completed, pair.drained_seen.is_some());
    }
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Open,
    Arrive,
    Finish,
    Drain,
    Send,
    DeliverToRelay,
    DeliverToConnector,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => Just(Step::Open),
        3 => Just(Step::Arrive),
        3 => Just(Step::Finish),
        1 => Just(Step::Drain),
        2 => Just(Step::Send),
        2 => Just(Step::DeliverToRelay),
        2 => Just(Step::DeliverToConnector),
    ]
}

fn pat(s: &str) -> HostPattern {
    HostPattern::parse(s).unwrap()
}

fn close_relay(reason: ProtocolError) -> RelayEvent {
    RelayEvent::Close {
        code: CloseCode::Protocol,
        reason,
    }
}

fn close_connector(reason: ProtocolError) -> ConnectorEvent {
    ConnectorEvent::Close {
        code: CloseCode::Protocol,
        reason,
    }
}

/// One direction of the control stream: encoded bytes not yet read, and the FIN.
#[derive(Debug, Default)]
struct Wire {
    bytes: Vec<u8>,
    decoder: FrameDecoder,
    /// The writer finished the stream.
    fin: bool,
    /// The reader saw the end of the stream.
    fin_delivered: bool,
    /// Everything written is lost (a peer that never answers).
    cut: bool,
}

impl Wire {
    fn write(&mut self, frame: &ControlFrame) {
        if !self.cut {
            self.bytes.extend(encode_frame(frame).unwrap());
        }
    }

    /// Frames that completed, then a decode error if any, then whether the stream ended.
    fn read(&mut self) -> (Vec<ControlFrame>, Option<DecodeError>, bool) {
        self.decoder.push(&std::mem::take(&mut self.bytes));
        let mut frames = Vec::new();
        loop {
            match self.decoder.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => return (frames, Some(e), false),
            }
        }
        let ended = self.fin && !self.fin_delivered;
        self.fin_delivered |= ended;
        (frames, None, ended)
    }

    fn idle(&self) -> bool {
        self.bytes.is_empty() && self.fin == self.fin_delivered
    }
}

/// A relay session and a connector session joined by two [`Wire`]s, a count of streams
/// travelling from the relay to the connector, and a simulated clock.
#[derive(Debug)]
struct Pair {
    now: Instant,
    relay: RelaySession,
    connector: ConnectorSession,
    to_relay: Wire,
    to_connector: Wire,
    /// Streams the relay opened that have not reached the connector.
    streams_on_wire: u64,
    /// Streams the connector accepted, and finished.
    accepted: u64,
    finished: u64,
    /// The relay has read `Drain`.
    relay_drained: bool,
    /// The `opened` of the `Drained` the connector read.
    drained_seen: Option<u64>,
    relay_events: Vec<RelayEvent>,
    connector_events: Vec<ConnectorEvent>,
}

impl Pair {
    /// Connector `c1`, allowed `allowed`, asks to publish `hostnames`; nothing has moved yet.
    fn new(allowed: &[&str], hostnames: &[&str]) -> Self {
        let now = Instant::now();
        Self {
            now,
            relay: RelaySession::new(
                now,
                allowed.iter().map(|a| pat(a)).collect(),
                "c1".into(),
                RelaySessionConfig::default(),
            ),
            connector: ConnectorSession::new(
                now,
                hostnames.iter().map(|h| (*h).to_owned()).collect(),
                "test-agent".into(),
                ConnectorSessionConfig::new(GRACE),
            ),
            to_relay: Wire::default(),
            to_connector: Wire::default(),
            streams_on_wire: 0,
            accepted: 0,
            finished: 0,
            relay_drained: false,
            drained_seen: None,
            relay_events: Vec::new(),
            connector_events: Vec::new(),
        }
    }

    /// A pair whose registration of `app.internal` has completed, events taken.
    fn registered() -> Self {
        let mut pair = Self::new(&["app.internal"], &["app.internal"]);
        pair.run();
        assert!(matches!(
            pair.relay_events()[..],
            [RelayEvent::Registered { .. }]
        ));
        assert!(matches!(
            pair.connector_events()[..],
            [ConnectorEvent::Registered { .. }]
        ));
        pair
    }

    /// Moves what each session wants to send onto its wire.
    fn send(&mut self) {
        while let Some(f) = self.connector.poll_transmit() {
            self.to_relay.write(&f);
        }
        if self.connector.poll_finish_control() {
            self.to_relay.fin = true;
        }
        while let Some(f) = self.relay.poll_transmit() {
            self.to_connector.write(&f);
        }
    }

    fn deliver_to_relay(&mut self) {
        let (frames, error, ended) = self.to_relay.read();
        for f in frames {
            self.relay_drained |= f == ControlFrame::Drain;
            if let Err(e) = self.relay.handle_frame(self.now, f) {
                self.collect();
                assert_eq!(
                    self.relay_events.last(),
                    Some(&RelayEvent::Close {
                        code: e.close_code(),
                        reason: e
                    })
                );
            }
        }
        if let Some(e) = error {
            self.relay.handle_decode_error(self.now, e);
        }
        if ended {
            self.relay.handle_control_closed(self.now);
        }
    }

    fn deliver_to_connector(&mut self) {
        let (frames, error, ended) = self.to_connector.read();
        for f in frames {
            if let ControlFrame::Drained { opened } = f {
                self.drained_seen = Some(opened);
            }
            if let Err(e) = self.connector.handle_frame(self.now, f) {
                self.collect();
                assert_eq!(
                    self.connector_events.last(),
                    Some(&ConnectorEvent::Close {
                        code: e.close_code(),
                        reason: e
                    })
                );
            }
        }
        if let Some(e) = error {
            self.connector.handle_decode_error(self.now, e);
        }
        if ended {
            self.connector.handle_control_closed(self.now);
        }
    }

    /// Exchanges frames until both wires are idle.
    fn run(&mut self) {
        loop {
            self.send();
            if self.to_relay.idle() && self.to_connector.idle() {
                break;
            }
            self.deliver_to_relay();
            self.deliver_to_connector();
        }
        self.collect();
    }

    /// Moves the clock forward by `by`, firing each timer at its deadline and letting the
    /// sessions exchange frames after each.
    fn advance(&mut self, by: Duration) {
        let until = self.now + by;
        loop {
            self.run();
            let next = [self.relay.poll_timeout(), self.connector.poll_timeout()]
                .into_iter()
                .flatten()
                .filter(|t| *t <= until)
                .min();
            let Some(t) = next else { break };
            self.now = self.now.max(t);
            self.relay.handle_timeout(self.now);
            self.connector.handle_timeout(self.now);
        }
        self.now = until;
    }

    /// The relay opens a stream; it travels until [`Pair::arrive`].
    fn open(&mut self) -> Result<(), OpenError> {
        self.relay.begin_open()?;
        self.relay.stream_opened();
        self.streams_on_wire += 1;
        Ok(())
    }

    /// The oldest stream on the wire reaches the connector.
    fn arrive(&mut self) {
        self.streams_on_wire -= 1;
        self.accepted += 1;
        self.connector.handle_stream_accepted(self.now);
        self.collect();
    }

    /// The connector's task for one accepted stream ends.
    fn finish(&mut self) {
        self.finished += 1;
        self.connector.handle_stream_finished(self.now);
        self.collect();
    }

    fn collect(&mut self) {
        self.relay_events
            .extend(std::iter::from_fn(|| self.relay.poll_event()));
        self.connector_events
            .extend(std::iter::from_fn(|| self.connector.poll_event()));
    }

    fn relay_events(&mut self) -> Vec<RelayEvent> {
        self.collect();
        std::mem::take(&mut self.relay_events)
    }

    fn connector_events(&mut self) -> Vec<ConnectorEvent> {
        self.collect();
        std::mem::take(&mut self.connector_events)
    }
}
