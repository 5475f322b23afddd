//! The tunnels to the relays: one supervised session per relay address (dialled with
//! [`crate::dial`]), the frames of a session, and the set of sessions kept to every
//! address the relay's name resolves to.

pub(crate) mod context;
mod driver;
pub(crate) mod relays;
pub(crate) mod session;
