//! Updates over MQTT: a signed manifest on `<id>/update` names a `.deb`; the device fetches and
//! verifies it ([`agent`]), a root-owned installer verifies it again, installs it and gates it
//! ([`install`]), and `<id>/update/state` says where it stands ([`state`]). The keys and the
//! manifest are in [`manifest`]; fetching is [`fetch`]. `nightlight release` makes keys and
//! signs manifests ([`release`]) and rolls one out in waves that halt themselves ([`rollout`]).

pub mod agent;
pub mod fetch;
pub mod install;
pub mod manifest;
pub mod release;
pub mod rollout;
pub mod state;
