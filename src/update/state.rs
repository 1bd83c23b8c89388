//! The update's progress as people see it: the retained `<id>/update/state`, and the files the
//! device and the installer hand each other in the state directory.
//!
//! ```text
//! queue.dir/update/
//!   download.json   the manifest being fetched (a restart resumes it)
//!   download.part   what was fetched of it so far
//!   ready.deb       fetched and verified: for the installer
//!   ready.json      its manifest, written last: the installer's trigger (a systemd path unit)
//!   result.json     the installer's phase and outcome (root writes it, the device reports it)
//! ```
//!
//! Pure: the payload and the names.

use serde::{Deserialize, Serialize};

/// The directory below the state directory.
pub const DIR: &str = "update";
pub const DOWNLOAD_MANIFEST: &str = "download.json";
pub const DOWNLOAD_PART: &str = "download.part";
pub const READY_DEB: &str = "ready.deb";
pub const READY_MANIFEST: &str = "ready.json";
pub const RESULT: &str = "result.json";

/// Where an update stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Idle,
    Downloading,
    Verifying,
    Installing,
    Gating,
    Done,
    RolledBack,
    Failed,
}

impl Phase {
    /// Whether an update is under way (Home Assistant's `in_progress`).
    pub fn in_progress(self) -> bool {
        matches!(self, Phase::Downloading | Phase::Verifying | Phase::Installing | Phase::Gating)
    }
}

/// The retained `<id>/update/state` (and the installer's `result.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateState {
    pub state: Phase,
    /// The version running now.
    pub version: String,
    /// The version the update started from, and the one it goes to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// While downloading: how much, 0-100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u8>,
    /// Why it failed or was rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl UpdateState {
    pub fn idle(version: &str) -> Self {
        UpdateState { state: Phase::Idle, version: version.into(), from: None, to: None, percent: None, reason: None }
    }

    /// `phase` of the update from the running version to `to`.
    pub fn toward(phase: Phase, version: &str, to: &str) -> Self {
        UpdateState { state: phase, from: Some(version.into()), to: Some(to.into()), ..Self::idle(version) }
    }

    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an update state serializes")
    }
}

/// The Debian architecture this binary was built for.
pub fn architecture() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "arm64"
    } else if cfg!(target_arch = "arm") {
        "armhf"
    } else if cfg!(target_arch = "x86_64") {
        "amd64"
    } else if cfg!(target_arch = "x86") {
        "i386"
    } else {
        "unknown"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_carries_the_contracts_fields_and_nothing_empty() {
        let s = UpdateState::toward(Phase::RolledBack, "0.1.0", "0.2.0").with_reason("did not deliver within 60 s");
        let v: serde_json::Value = serde_json::from_slice(&s.to_json()).unwrap();
        assert_eq!(v["state"], "rolled_back");
        assert_eq!(v["version"], "0.1.0");
        assert_eq!(v["to"], "0.2.0");
        assert_eq!(v["reason"], "did not deliver within 60 s");
        let idle: serde_json::Value = serde_json::from_slice(&UpdateState::idle("0.1.0").to_json()).unwrap();
        assert_eq!(idle, serde_json::json!({"state": "idle", "version": "0.1.0"}));
    }
}
