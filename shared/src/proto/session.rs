//! The control stream's session logic for both ends of a tunnel, without IO.
//!
//! [`RelaySession`] runs on the relay, one per connector connection; [`ConnectorSession`]
//! runs on the connector, one per tunnel. Both follow quinn-proto's shape: the driver tells
//! the session what happened (`handle_*`, each with the current time), then takes out what
//! to do (`poll_transmit`: frames to write; `poll_event`: things to act on; `poll_timeout`:
//! when to call `handle_timeout`). A session never reads the clock, draws randomness or
//! touches a socket, so two of them can be wired together in a test with a simulated clock.
//!
//! A session owns:
//! - registration: `Register` is the connector's first frame and comes within the register
//!   timeout ([`REGISTER_TIMEOUT`]); the relay accepts each hostname the connector may
//!   publish ([`may_publish`]) and answers `Registered` with the rest refused;
//! - the drain exchange: `Drain`, then `Drained { opened }`. The relay counts the streams
//!   it opens here ([`RelaySession::begin_open`], [`RelaySession::stream_opened`]), so that
//!   no open races the drain; the connector decides when every stream opened before the
//!   drain has arrived and finished ([`ConnectorEvent::DrainComplete`]), bounded by
//!   [`DRAIN_ACK_TIMEOUT`] for the answer and by its drain grace overall;
//! - every way the peer can break the protocol: a [`ProtocolError`], returned and also
//!   queued as a `Close` event, after which the session ignores further input.
//!
//! It leaves to the drivers: the QUIC connection and its streams, encoding
//! ([`encode_frame`](super::encode_frame)) and decoding ([`FrameDecoder`](super::FrameDecoder))
//! frames, timers, the routing table, the per-stream exchanges, logging, revocation (the
//! driver closes with [`CloseCode::Revoked`]) and relay shutdown ([`CloseCode::Shutdown`]).
//!
//! There is no heartbeat frame and no liveness timer here: the connector's QUIC keep-alives
//! (every second) and the idle timeout already detect a dead peer.
//!
//! # Driving a session
//!
//! After creating a session and after every `handle_*`, `start_drain` or stream-accounting
//! call, the driver:
//! 1. writes every frame from `poll_transmit` on the control stream, in order;
//! 2. (connector) finishes its control stream if `poll_finish_control` says so;
//! 3. acts on every event from `poll_event`; on a `Close` event it closes the connection
//!    with the event's code and the reason's text, and stops driving the session;
//! 4. arms its timer for `poll_timeout`, calling `handle_timeout` when it fires.
//!
//! Decoded frames go to `handle_frame`, a decode error to `handle_decode_error`, and the
//! peer finishing its control stream to `handle_control_closed`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{CloseCode, ControlFrame, DecodeError, ProtocolError, Rejection};
use crate::identity::HostPattern;
use crate::policy::may_publish;

/// How long a connector has, from its handshake, to register; and how long it waits for
/// the relay's answer.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a draining connector waits for `Drained` before finishing with the streams
/// that arrived.
pub const DRAIN_ACK_TIMEOUT: Duration = Duration::from_secs(2);

fn frame_name(frame: &ControlFrame) -> &'static str {
    match frame {
        ControlFrame::Register { .. } => "Register",
        ControlFrame::Registered { .. } => "Registered",
        ControlFrame::Drain => "Drain",
        ControlFrame::Drained { .. } => "Drained",
        ControlFrame::Publish { .. } => "Publish",
    }
}

/// Timeouts of a [`RelaySession`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelaySessionConfig {
    /// How long after the handshake the connector has to send `Register`.
    pub register_timeout: Duration,
}

impl Default for RelaySessionConfig {
    fn default() -> Self {
        Self {
            register_timeout: REGISTER_TIMEOUT,
        }
    }
}

/// Something the relay's driver must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEvent {
    /// The connector registered: route `patterns` to it. The `Registered` answer is queued.
    Registered {
        /// The accepted hostnames, parsed, in the order of `accepted`.
        patterns: Vec<HostPattern>,
        /// The accepted hostnames as the connector sent them.
        accepted: Vec<String>,
        /// The refused hostnames, each with the reason sent to the connector.
        rejected: Vec<Rejection>,
        /// The connector's version string, for the logs.
        agent: String,
    },
    /// The connector is draining: stop routing to it. The session already refuses further
    /// opens; `Drained` is queued as soon as no open is in progress.
    Draining,
    /// The connector changed what it publishes (an origin turned unhealthy, or healthy
    /// again): route exactly `patterns` to it from now on.
    Published {
        /// The hostnames now routed to it, parsed; a subset of those registered.
        patterns: Vec<HostPattern>,
    },
    /// The connector broke the protocol: close the connection with `code`, and
    /// `reason`'s text as the close reason.
    Close {
        /// The QUIC application close code.
        code: CloseCode,
        /// What the connector did.
        reason: ProtocolError,
    },
}

/// Why the relay may not open a stream on a connector's tunnel now. Not an error of the
/// connector's: the request goes to another connector, or fails if there is none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The connector has not registered, so it publishes nothing yet.
    #[error("the connector has not registered")]
    NotRegistered,
    /// The connector asked to drain; it was told how many streams to expect, and no more
    /// may be opened.
    #[error("the connector is draining")]
    Draining,
    /// The session closed on a protocol error.
    #[error("the tunnel session is closed")]
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RelayState {
    AwaitingRegister {
        deadline: Instant,
    },
    Routing,
    /// `Drain` was read; a finished control stream is now normal.
    Draining,
    Closed,
}

/// The relay's side of one connector's control stream: registration, stream accounting
/// and the drain.
///
/// Create it at the handshake. Feed it decoded frames ([`RelaySession::handle_frame`]),
/// decode errors, the end of the control stream and timer expiries; after each call write
/// every frame from [`RelaySession::poll_transmit`], then act on every
/// [`RelaySession::poll_event`], then re-arm the timer at [`RelaySession::poll_timeout`].
/// Around each stream it opens, call [`RelaySession::begin_open`] and then
/// [`RelaySession::stream_opened`] or [`RelaySession::open_failed`].
#[derive(Debug)]
pub struct RelaySession {
    config: RelaySessionConfig,
    allowed: Vec<HostPattern>,
    connector_id: String,
    state: RelayState,
    /// Streams opened on this connection in all.
    opened: u64,
    /// Opens begun and neither completed nor failed.
    opening: u64,
    /// `Drain` was read and `Drained` waits for the opens in progress.
    drained_owed: bool,
    /// The hostnames accepted at registration, as sent and parsed.
    accepted: Vec<(String, HostPattern)>,
    transmit: VecDeque<ControlFrame>,
    events: VecDeque<RelayEvent>,
}

impl RelaySession {
    /// Starts the session when the connector's QUIC handshake completes, at `now`.
    /// `allowed` are the patterns recorded for the connector `connector_id` at issuance;
    /// the register timeout runs from `now`.
    pub fn new(
        now: Instant,
        allowed: Vec<HostPattern>,
        connector_id: String,
        config: RelaySessionConfig,
    ) -> Self {
        Self {
            config,
            allowed,
            connector_id,
            state: RelayState::AwaitingRegister {
                deadline: now + config.register_timeout,
            },
            opened: 0,
            opening: 0,
            drained_owed: false,
            accepted: Vec::new(),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Handles a frame decoded from the control stream. The error says how the connector
    /// broke the protocol (`Register` not first, a second `Register`, anything but `Drain`
    /// after it, anything after `Drain`); it is also queued as [`RelayEvent::Close`].
    /// Frames after the session closed are ignored.
    pub fn handle_frame(
        &mut self,
        _now: Instant,
        frame: ControlFrame,
    ) -> Result<(), ProtocolError> {
        match (self.state, frame) {
            (RelayState::Closed, _) => Ok(()),
            (RelayState::AwaitingRegister { .. }, ControlFrame::Register { hostnames, agent }) => {
                self.register(hostnames, agent);
                Ok(())
            }
            (RelayState::AwaitingRegister { .. }, other) => {
                Err(self.close(ProtocolError::NotRegister {
                    frame: frame_name(&other),
                }))
            }
            (RelayState::Routing, ControlFrame::Drain) => {
                self.state = RelayState::Draining;
                self.drained_owed = true;
                self.events.push_back(RelayEvent::Draining);
                self.answer_drain();
                Ok(())
            }
            (RelayState::Routing, ControlFrame::Publish { hostnames }) => {
                let mut patterns = Vec::with_capacity(hostnames.len());
                for name in hostnames {
                    match self.accepted.iter().find(|(n, _)| *n == name) {
                        Some((_, p)) => patterns.push(p.clone()),
                        None => {
                            return Err(self.close(ProtocolError::NotRegistered { hostname: name }));
                        }
                    }
                }
                self.events.push_back(RelayEvent::Published { patterns });
                Ok(())
            }
            // A change of what is published while draining changes nothing: nothing new
            // is routed here anyway.
            (RelayState::Draining, ControlFrame::Publish { .. }) => Ok(()),
            (RelayState::Routing | RelayState::Draining, other) => {
                Err(self.close(ProtocolError::UnexpectedFrame {
                    frame: frame_name(&other),
                }))
            }
        }
    }

    /// Handles the connector finishing its control stream: normal after `Drain` (the relay
    /// then waits for the connection to close), a protocol error before it.
    pub fn handle_control_closed(&mut self, _now: Instant) {
        if matches!(
            self.state,
            RelayState::AwaitingRegister { .. } | RelayState::Routing
        ) {
            self.close(ProtocolError::ControlStreamClosed);
        }
    }

    /// Handles control-stream bytes that did not decode: the session closes.
    pub fn handle_decode_error(&mut self, _now: Instant, error: DecodeError) {
        if self.state != RelayState::Closed {
            self.close(ProtocolError::Decode(error));
        }
    }

    /// Call when the timer armed for [`RelaySession::poll_timeout`] fires: a connector that
    /// has not registered by then is closed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let RelayState::AwaitingRegister { deadline } = self.state
            && now >= deadline
        {
            self.close(ProtocolError::RegisterTimeout {
                timeout: self.config.register_timeout,
            });
        }
    }

    /// When [`RelaySession::handle_timeout`] should next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            RelayState::AwaitingRegister { deadline } => Some(deadline),
            RelayState::Routing | RelayState::Draining | RelayState::Closed => None,
        }
    }

    /// The next frame to write on the control stream.
    pub fn poll_transmit(&mut self) -> Option<ControlFrame> {
        self.transmit.pop_front()
    }

    /// The next event to act on.
    pub fn poll_event(&mut self) -> Option<RelayEvent> {
        self.events.pop_front()
    }

    /// Whether a stream may be opened on this tunnel now: registered, and neither draining
    /// nor closed. For picking a connector; [`RelaySession::begin_open`] decides.
    pub fn may_open(&self) -> bool {
        self.state == RelayState::Routing
    }

    /// Call before opening a stream, then [`RelaySession::stream_opened`] or
    /// [`RelaySession::open_failed`] once the open settles. Opens under way are
    /// counted, so a `Drain` read meanwhile is answered only after they settle; the lock
    /// around the session need not be held across the open. The error says why no stream may be opened here now.
    pub fn begin_open(&mut self) -> Result<(), OpenError> {
        match self.state {
            RelayState::Routing => {
                self.opening += 1;
                Ok(())
            }
            RelayState::AwaitingRegister { .. } => Err(OpenError::NotRegistered),
            RelayState::Draining => Err(OpenError::Draining),
            RelayState::Closed => Err(OpenError::Closed),
        }
    }

    /// Call when a stream begun with [`RelaySession::begin_open`] is open: it counts
    /// towards `Drained { opened }`.
    pub fn stream_opened(&mut self) {
        debug_assert!(self.opening > 0, "stream_opened without begin_open");
        self.opening = self.opening.saturating_sub(1);
        self.opened += 1;
        self.answer_drain();
    }

    /// Call when an open begun with [`RelaySession::begin_open`] failed: it is not counted.
    pub fn open_failed(&mut self) {
        debug_assert!(self.opening > 0, "open_failed without begin_open");
        self.opening = self.opening.saturating_sub(1);
        self.answer_drain();
    }

    /// Streams opened on this connection so far.
    pub fn opened(&self) -> u64 {
        self.opened
    }

    fn register(&mut self, hostnames: Vec<String>, agent: String) {
        let mut patterns = Vec::new();
        let mut accepted = Vec::new();
        let mut rejected = Vec::new();
        for name in hostnames {
            match HostPattern::parse(&name) {
                Ok(p) if may_publish(&self.allowed, &p) => {
                    self.accepted.push((name.clone(), p.clone()));
                    patterns.push(p);
                    accepted.push(name);
                }
                Ok(_) => rejected.push(Rejection {
                    reason: format!("connector {} may not publish {name}", self.connector_id),
                    hostname: name,
                }),
                Err(e) => rejected.push(Rejection {
                    hostname: name,
                    reason: e.to_string(),
                }),
            }
        }
        self.state = RelayState::Routing;
        self.transmit.push_back(ControlFrame::Registered {
            accepted: accepted.clone(),
            rejected: rejected.clone(),
        });
        self.events.push_back(RelayEvent::Registered {
            patterns,
            accepted,
            rejected,
            agent,
        });
    }

    fn answer_drain(&mut self) {
        if self.drained_owed && self.opening == 0 {
            self.drained_owed = false;
            self.transmit.push_back(ControlFrame::Drained {
                opened: self.opened,
            });
        }
    }

    fn close(&mut self, reason: ProtocolError) -> ProtocolError {
        self.state = RelayState::Closed;
        self.drained_owed = false;
        self.transmit.clear();
        self.events.push_back(RelayEvent::Close {
            code: reason.close_code(),
            reason: reason.clone(),
        });
        reason
    }
}

/// Timeouts of a [`ConnectorSession`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectorSessionConfig {
    /// How long to wait for `Registered` after sending `Register`.
    pub register_timeout: Duration,
    /// How long a drain waits for `Drained` before finishing with the streams that arrived.
    pub drain_ack_timeout: Duration,
    /// How long a drain may take in all, from [`ConnectorSession::start_drain`]: waiting
    /// for the answer, for the streams still on the wire, and for in-flight streams to
    /// finish.
    pub drain_grace: Duration,
}

impl ConnectorSessionConfig {
    /// The default timeouts, with the operator's drain grace.
    pub fn new(drain_grace: Duration) -> Self {
        Self {
            register_timeout: REGISTER_TIMEOUT,
            drain_ack_timeout: DRAIN_ACK_TIMEOUT,
            drain_grace,
        }
    }
}

/// Something the connector's driver must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectorEvent {
    /// The relay answered the registration: `accepted` hostnames are routed here,
    /// `rejected` ones are not (log them for the operator).
    Registered {
        /// Hostnames the relay routes here.
        accepted: Vec<String>,
        /// Hostnames refused, each with the relay's reason.
        rejected: Vec<Rejection>,
    },
    /// The relay did not answer `Drain` within the ack timeout (or finished its control
    /// stream without answering): the drain goes on with the streams that arrived. Worth a
    /// warning.
    DrainNotAcknowledged,
    /// Every stream the relay opened here has arrived and finished (or, without an
    /// answer, every stream that arrived has finished): close the connection with
    /// [`CloseCode::Normal`]. The session is finished.
    DrainComplete,
    /// The drain grace passed first: close the connection with [`CloseCode::Normal`],
    /// cutting off what remains. The session is finished.
    DrainTimedOut {
        /// Streams accepted and not yet finished.
        in_flight: u64,
        /// Streams the relay said it opened that never arrived (0 without its answer).
        not_arrived: u64,
    },
    /// The relay broke the protocol: close the connection with `code`, and `reason`'s text
    /// as the close reason.
    Close {
        /// The QUIC application close code.
        code: CloseCode,
        /// What the relay did.
        reason: ProtocolError,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DrainAck {
    Awaiting { deadline: Instant },
    Received { opened: u64 },
    Missing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnectorPhase {
    Running,
    Draining {
        ack: DrainAck,
        deadline: Instant,
    },
    /// Drained, timed out or closed: input is ignored.
    Finished,
}

/// The connector's side of one tunnel's control stream: registration and the drain.
///
/// Create it once the control stream is open. Feed it decoded frames
/// ([`ConnectorSession::handle_frame`]), decode errors, the end of the control stream,
/// timer expiries and every relay stream's arrival and end; call
/// [`ConnectorSession::start_drain`] at shutdown. After each call write every frame from
/// [`ConnectorSession::poll_transmit`], finish the control stream if
/// [`ConnectorSession::poll_finish_control`] says so, act on every
/// [`ConnectorSession::poll_event`], then re-arm the timer at
/// [`ConnectorSession::poll_timeout`].
#[derive(Debug)]
pub struct ConnectorSession {
    config: ConnectorSessionConfig,
    /// Until `Registered` arrives.
    register_deadline: Option<Instant>,
    phase: ConnectorPhase,
    /// Relay streams accepted in all.
    accepted: u64,
    /// Of those, finished.
    finished: u64,
    /// The control stream is to be finished once `Drain` has been written.
    finish_control: bool,
    transmit: VecDeque<ControlFrame>,
    events: VecDeque<ConnectorEvent>,
}

impl ConnectorSession {
    /// Starts the session once the control stream is open, at `now`, and queues
    /// `Register` for `hostnames` (exact names or `*.suffix` patterns from the ingress
    /// rules) with the connector's version string `agent`.
    pub fn new(
        now: Instant,
        hostnames: Vec<String>,
        agent: String,
        config: ConnectorSessionConfig,
    ) -> Self {
        Self {
            config,
            register_deadline: Some(now + config.register_timeout),
            phase: ConnectorPhase::Running,
            accepted: 0,
            finished: 0,
            finish_control: false,
            transmit: VecDeque::from([ControlFrame::Register { hostnames, agent }]),
            events: VecDeque::new(),
        }
    }

    /// Handles a frame decoded from the control stream. The error says how the relay broke
    /// the protocol (a first frame other than `Registered`, a second `Registered`,
    /// `Drained` without a `Drain`, a connector-bound frame); it is also queued as
    /// [`ConnectorEvent::Close`]. Frames after the session finished are ignored.
    pub fn handle_frame(
        &mut self,
        _now: Instant,
        frame: ControlFrame,
    ) -> Result<(), ProtocolError> {
        if self.phase == ConnectorPhase::Finished {
            return Ok(());
        }
        if self.register_deadline.is_some() {
            return match frame {
                ControlFrame::Registered { accepted, rejected } => {
                    self.register_deadline = None;
                    self.events
                        .push_back(ConnectorEvent::Registered { accepted, rejected });
                    Ok(())
                }
                other => Err(self.close(ProtocolError::UnexpectedReply {
                    frame: frame_name(&other),
                })),
            };
        }
        match (&mut self.phase, frame) {
            (
                ConnectorPhase::Draining {
                    ack: ack @ (DrainAck::Awaiting { .. } | DrainAck::Missing),
                    ..
                },
                ControlFrame::Drained { opened },
            ) => {
                // A late answer (after the ack timeout) still tells which streams to wait for.
                *ack = DrainAck::Received { opened };
                self.check_drain();
                Ok(())
            }
            (_, other) => Err(self.close(ProtocolError::UnexpectedFrame {
                frame: frame_name(&other),
            })),
        }
    }

    /// Handles the relay finishing its control stream. The relay never does so while the
    /// tunnel is up, so that is a protocol error; while a drain awaits `Drained`, it means
    /// the answer is not coming ([`ConnectorEvent::DrainNotAcknowledged`]).
    pub fn handle_control_closed(&mut self, _now: Instant) {
        match self.phase {
            ConnectorPhase::Finished => {}
            ConnectorPhase::Draining {
                ack: DrainAck::Awaiting { .. },
                deadline,
            } if self.register_deadline.is_none() => {
                self.phase = ConnectorPhase::Draining {
                    ack: DrainAck::Missing,
                    deadline,
                };
                self.events.push_back(ConnectorEvent::DrainNotAcknowledged);
                self.check_drain();
            }
            ConnectorPhase::Draining { .. } if self.register_deadline.is_none() => {}
            ConnectorPhase::Running | ConnectorPhase::Draining { .. } => {
                self.close(ProtocolError::ControlStreamClosed);
            }
        }
    }

    /// Handles control-stream bytes that did not decode: the session closes.
    pub fn handle_decode_error(&mut self, _now: Instant, error: DecodeError) {
        if self.phase != ConnectorPhase::Finished {
            self.close(ProtocolError::Decode(error));
        }
    }

    /// Call when the relay opens a stream (the driver accepted it), whether or not a drain
    /// is under way.
    pub fn handle_stream_accepted(&mut self, _now: Instant) {
        self.accepted += 1;
        self.check_drain();
    }

    /// Call when the task serving an accepted stream ends.
    pub fn handle_stream_finished(&mut self, _now: Instant) {
        debug_assert!(
            self.finished < self.accepted,
            "more streams finished than accepted"
        );
        self.finished = (self.finished + 1).min(self.accepted);
        self.check_drain();
    }

    /// Queues `Publish`: the relay routes exactly `hostnames` (a subset of those it
    /// accepted) here from now on. Only once registered and before draining; returns
    /// whether it was queued.
    pub fn publish(&mut self, hostnames: Vec<String>) -> bool {
        if self.register_deadline.is_some() || self.phase != ConnectorPhase::Running {
            return false;
        }
        self.transmit.push_back(ControlFrame::Publish { hostnames });
        true
    }

    /// Starts draining at `now` (shutdown): queues `Drain`, after which
    /// [`ConnectorSession::poll_finish_control`] asks for the control stream to be
    /// finished; the driver keeps accepting and serving streams until
    /// [`ConnectorEvent::DrainComplete`] or [`ConnectorEvent::DrainTimedOut`]. Calling it
    /// again, or after the session finished, does nothing.
    pub fn start_drain(&mut self, now: Instant) {
        if self.phase != ConnectorPhase::Running {
            return;
        }
        self.transmit.push_back(ControlFrame::Drain);
        self.finish_control = true;
        self.phase = ConnectorPhase::Draining {
            ack: DrainAck::Awaiting {
                deadline: now + self.config.drain_ack_timeout,
            },
            deadline: now + self.config.drain_grace,
        };
    }

    /// Call when the timer armed for [`ConnectorSession::poll_timeout`] fires: an
    /// unanswered registration closes the session, an unanswered drain goes on without the
    /// answer, and a drain past its grace ends with [`ConnectorEvent::DrainTimedOut`].
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.phase == ConnectorPhase::Finished {
            return;
        }
        if let Some(deadline) = self.register_deadline
            && now >= deadline
        {
            self.close(ProtocolError::RegistrationNotAnswered {
                timeout: self.config.register_timeout,
            });
            return;
        }
        if let ConnectorPhase::Draining { ack, .. } = &mut self.phase
            && let DrainAck::Awaiting { deadline } = *ack
            && now >= deadline
        {
            *ack = DrainAck::Missing;
            self.events.push_back(ConnectorEvent::DrainNotAcknowledged);
            self.check_drain();
        }
        if let ConnectorPhase::Draining { ack, deadline } = self.phase
            && now >= deadline
        {
            let not_arrived = match ack {
                DrainAck::Received { opened } => opened.saturating_sub(self.accepted),
                DrainAck::Awaiting { .. } | DrainAck::Missing => 0,
            };
            self.phase = ConnectorPhase::Finished;
            self.events.push_back(ConnectorEvent::DrainTimedOut {
                in_flight: self.in_flight(),
                not_arrived,
            });
        }
    }

    /// When [`ConnectorSession::handle_timeout`] should next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            ConnectorPhase::Finished => None,
            ConnectorPhase::Running => self.register_deadline,
            ConnectorPhase::Draining { ack, deadline } => {
                let ack_by = match ack {
                    DrainAck::Awaiting { deadline } => Some(deadline),
                    DrainAck::Received { .. } | DrainAck::Missing => None,
                };
                [self.register_deadline, ack_by, Some(deadline)]
                    .into_iter()
                    .flatten()
                    .min()
            }
        }
    }

    /// The next frame to write on the control stream.
    pub fn poll_transmit(&mut self) -> Option<ControlFrame> {
        self.transmit.pop_front()
    }

    /// Whether to finish (send FIN on) the control stream now: true once, after the
    /// `Drain` frame has been taken from [`ConnectorSession::poll_transmit`].
    pub fn poll_finish_control(&mut self) -> bool {
        let finish = self.finish_control && self.transmit.is_empty();
        if finish {
            self.finish_control = false;
        }
        finish
    }

    /// The next event to act on.
    pub fn poll_event(&mut self) -> Option<ConnectorEvent> {
        self.events.pop_front()
    }

    /// Streams accepted and not yet finished.
    pub fn in_flight(&self) -> u64 {
        self.accepted - self.finished
    }

    /// Completes the drain if every stream the relay opened has arrived and none is in
    /// flight. Called on every change, so completion needs no polling.
    fn check_drain(&mut self) {
        let ConnectorPhase::Draining { ack, .. } = self.phase else {
            return;
        };
        let all_arrived = match ack {
            DrainAck::Awaiting { .. } => false,
            DrainAck::Received { opened } => self.accepted >= opened,
            DrainAck::Missing => true,
        };
        if all_arrived && self.in_flight() == 0 {
            self.phase = ConnectorPhase::Finished;
            self.events.push_back(ConnectorEvent::DrainComplete);
        }
    }

    fn close(&mut self, reason: ProtocolError) -> ProtocolError {
        self.phase = ConnectorPhase::Finished;
        self.finish_control = false;
        self.transmit.clear();
        self.events.push_back(ConnectorEvent::Close {
            code: reason.close_code(),
            reason: reason.clone(),
        });
        reason
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The simulated clock's origin: any instant will do, the sessions only compare.
    fn origin() -> Instant {
        Instant::now()
    }

    fn relay(now: Instant) -> RelaySession {
        let mut relay = RelaySession::new(
            now,
            vec![HostPattern::parse("app.internal").unwrap()],
            "c1".into(),
            RelaySessionConfig::default(),
        );
        let register = ControlFrame::Register {
            hostnames: vec!["app.internal".into()],
            agent: "test".into(),
        };
        relay.handle_frame(now, register).unwrap();
        assert!(matches!(
            relay.poll_transmit(),
            Some(ControlFrame::Registered { .. })
        ));
        assert!(matches!(
            relay.poll_event(),
            Some(RelayEvent::Registered { .. })
        ));
        relay
    }

    fn connector(now: Instant) -> ConnectorSession {
        let mut connector = ConnectorSession::new(
            now,
            vec!["app.internal".into()],
            "test".into(),
            ConnectorSessionConfig::new(Duration::from_secs(30)),
        );
        assert!(matches!(
            connector.poll_transmit(),
            Some(ControlFrame::Register { .. })
        ));
        let registered = ControlFrame::Registered {
            accepted: vec!["app.internal".into()],
            rejected: vec![],
        };
        connector.handle_frame(now, registered).unwrap();
        assert!(matches!(
            connector.poll_event(),
            Some(ConnectorEvent::Registered { .. })
        ));
        connector
    }

    #[test]
    fn drained_waits_for_an_open_in_progress_and_counts_it() {
        let now = origin();
        let mut relay = relay(now);
        relay.begin_open().unwrap();

        relay.handle_frame(now, ControlFrame::Drain).unwrap();
        assert_eq!(relay.poll_event(), Some(RelayEvent::Draining));
        assert_eq!(relay.poll_transmit(), None);
        assert_eq!(relay.begin_open(), Err(OpenError::Draining));
        relay.stream_opened();

        assert_eq!(
            relay.poll_transmit(),
            Some(ControlFrame::Drained { opened: 1 })
        );
        assert_eq!(relay.poll_transmit(), None);
    }

    #[test]
    fn a_failed_open_is_not_counted() {
        let now = origin();
        let mut relay = relay(now);
        relay.begin_open().unwrap();
        relay.handle_frame(now, ControlFrame::Drain).unwrap();

        relay.open_failed();

        assert_eq!(
            relay.poll_transmit(),
            Some(ControlFrame::Drained { opened: 0 })
        );
    }

    #[test]
    fn the_relay_ignores_input_once_closed() {
        let now = origin();
        let mut relay = relay(now);
        relay.handle_control_closed(now);
        assert!(matches!(relay.poll_event(), Some(RelayEvent::Close { .. })));

        relay.handle_frame(now, ControlFrame::Drain).unwrap();
        relay.handle_decode_error(now, DecodeError::UnknownType(9));
        relay.handle_timeout(now + Duration::from_secs(60));

        assert_eq!(relay.poll_event(), None);
        assert_eq!(relay.poll_transmit(), None);
        assert_eq!(relay.poll_timeout(), None);
    }

    #[test]
    fn the_control_stream_is_finished_only_after_the_drain_is_written() {
        let now = origin();
        let mut connector = connector(now);
        assert!(!connector.poll_finish_control());

        connector.start_drain(now);
        assert!(!connector.poll_finish_control());
        assert_eq!(connector.poll_transmit(), Some(ControlFrame::Drain));

        assert!(connector.poll_finish_control());
        assert!(!connector.poll_finish_control());
    }

    #[test]
    fn the_relay_ending_its_control_stream_during_a_drain_means_no_answer() {
        let now = origin();
        let mut connector = connector(now);
        connector.handle_stream_accepted(now);
        connector.start_drain(now);

        connector.handle_control_closed(now);
        assert_eq!(
            connector.poll_event(),
            Some(ConnectorEvent::DrainNotAcknowledged)
        );
        connector.handle_stream_finished(now);

        assert_eq!(connector.poll_event(), Some(ConnectorEvent::DrainComplete));
        assert_eq!(connector.poll_timeout(), None);
    }

    #[test]
    fn the_relay_ending_its_control_stream_while_up_is_a_protocol_error() {
        let now = origin();
        let mut connector = connector(now);

        connector.handle_control_closed(now);

        assert_eq!(
            connector.poll_event(),
            Some(ConnectorEvent::Close {
                code: CloseCode::Protocol,
                reason: ProtocolError::ControlStreamClosed
            })
        );
    }

    #[test]
    fn a_late_drain_answer_still_names_the_streams_to_wait_for() {
        let now = origin();
        let mut connector = connector(now);
        connector.handle_stream_accepted(now);
        connector.start_drain(now);
        connector.handle_timeout(now + DRAIN_ACK_TIMEOUT);
        assert_eq!(
            connector.poll_event(),
            Some(ConnectorEvent::DrainNotAcknowledged)
        );

        connector
            .handle_frame(now, ControlFrame::Drained { opened: 2 })
            .unwrap();
        connector.handle_stream_finished(now);
        assert_eq!(connector.poll_event(), None);
        connector.handle_stream_accepted(now);
        connector.handle_stream_finished(now);

        assert_eq!(connector.poll_event(), Some(ConnectorEvent::DrainComplete));
    }
}
