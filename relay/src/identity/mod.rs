//! Who is calling: TLS configuration and certificate verification, the registry of
//! identities and revocations, the identity JWT given to origins, and enrolment.

pub(crate) mod enroll;
pub(crate) mod jwt;
pub(crate) mod registry;
pub(crate) mod tls;
