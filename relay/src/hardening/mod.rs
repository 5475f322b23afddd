//! Defences that sit under the request path and know nothing of routing: HTTP/1.1 framing
//! checks, the HTTP/3 frame guard, idle tracking, the reset-flood counter, the enrolment
//! rate limiter and its refusal log, connection caps and the overload manager's decisions.

pub(crate) mod conn_limit;
pub(crate) mod h1_framing;
pub(crate) mod h3_guard;
pub(crate) mod idle;
pub(crate) mod overload;
pub(crate) mod rate_limit;
pub(crate) mod refusal_log;
pub(crate) mod reset_flood;
