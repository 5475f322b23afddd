//! Defences that sit under the request path and know nothing of routing: HTTP/1.1 framing
//! checks, the HTTP/3 frame guard, idle tracking, the reset-flood counter and the
//! enrolment rate limiter.

pub(crate) mod h1_framing;
pub(crate) mod h3_guard;
pub(crate) mod idle;
pub(crate) mod rate_limit;
pub(crate) mod reset_flood;
