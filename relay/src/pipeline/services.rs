//! The relay's own answer to a device asking which published names it may reach (the
//! agent's split tunnel, PAC file and DNS stub).

use http::{Response, StatusCode};
use portcullis_shared::identity::Role;
use portcullis_shared::policy::{self, Subject};

use super::respond::{RequestError, json};
use crate::conn::{ConnInfo, RespBody};
use crate::identity::registry::Snapshot;
use crate::state::State;

/// The device's services, as JSON.
pub(super) fn list(
    state: &State,
    registry: &Snapshot,
    info: &ConnInfo,
) -> Result<Response<RespBody>, RequestError> {
    let device = info.device.as_ref().ok_or(RequestError::NoDevice)?;
    let record = registry.active(device).ok_or(RequestError::DeviceRevoked)?;
    let user = record.user.clone().unwrap_or_default();
    let subject = Subject {
        device: device.id(),
        user: &user,
        groups: &record.groups,
    };
    let rules = state.policy();
    let mut names: Vec<String> = registry
        .records()
        .filter(|r| r.identity.role() == Role::Connector && r.revoked_at.is_none())
        .flat_map(|r| r.hostnames.iter())
        .filter(|p| policy::allows_pattern(&rules, p, subject))
        .map(ToString::to_string)
        .collect();
    names.sort();
    names.dedup();
    let body = serde_json::json!({
        "device": device.id(),
        "user": user,
        "groups": record.groups,
        "not_after": record.not_after,
        "services": names,
    });
    Ok(json(StatusCode::OK, &body.to_string()))
}
