//! The connector's identity: enrolment with a one-time token, and renewal of its
//! certificate before it expires.

pub(crate) mod enroll;
pub(crate) mod renew;
