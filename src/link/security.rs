//! Credentials and TLS for every client, loaded once when a command starts (and by
//! `nightlight check`), so a missing or unreadable file is a configuration error that names
//! its key and where the key was set.

use std::sync::Arc;

use rustls::ClientConfig;

use crate::config::MqttConfig;

/// What a client presents to the broker. `Debug` never shows the password.
#[derive(Clone, Default)]
pub struct Security {
    pub(crate) login: Option<(String, String)>,
    pub(crate) tls: Option<Arc<ClientConfig>>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("username", &self.login.as_ref().map(|(u, _)| u))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// A credential or TLS setting that cannot be used: its key and why.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct SecurityError {
    pub key: &'static str,
    pub reason: String,
}

impl Security {
    /// Reads the password file and the TLS files named in `[mqtt]`.
    ///
    /// # Errors
    /// A file is missing, unreadable or holds nothing usable.
    pub fn load(mqtt: &MqttConfig) -> Result<Security, SecurityError> {
        let mut out = Security::default();
        if !mqtt.username.is_empty() {
            let password = match (&mqtt.password, mqtt.password_file.as_str()) {
                (Some(p), _) => p.clone(),
                (None, "") => String::new(),
                (None, file) => {
                    std::fs::read_to_string(file).map(|t| t.trim_end_matches(['\r', '\n']).to_owned()).map_err(|e| {
                        SecurityError { key: "mqtt.password_file", reason: format!("cannot read {file}: {e}") }
                    })?
                }
            };
            out.login = Some((mqtt.username.clone(), password));
        }
        if mqtt.tls.enabled {
            let tls = crate::tls::client_config(&mqtt.tls)
                .map_err(|e| SecurityError { key: e.key, reason: e.to_string() })?;
            out.tls = Some(tls);
        }
        Ok(out)
    }
}
