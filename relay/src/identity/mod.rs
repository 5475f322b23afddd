//! Who is calling: TLS configuration and certificate verification, the registry of
//! identities and revocations, and the identity JWT given to origins.
//! Everything here sits below the relay's shared state, which holds these types.

pub(crate) mod jwt;
pub(crate) mod registry;
pub(crate) mod state_dir;
pub(crate) mod store;
pub(crate) mod tls;
