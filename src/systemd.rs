//! What the service manager is told: READY, the watchdog, STOPPING and one line of status.
//!
//! The status line (`systemctl status nightlight`, `systemctl show -p StatusText nightlight`) says
//! where the readings go, so a person at the Pi, and `cross/deploy.sh`'s health gate, can tell a
//! device that delivers from one that only runs. It changes with the link, never per reading:
//!
//! | when | line |
//! |---|---|
//! | READY | `started; connecting to H:P` |
//! | CONNACK | `connected to H:P; N queued` |
//! | first reading the broker acknowledged on this connection | `delivering to H:P` |
//! | the connection failed or was lost | `broker H:P unreachable: REASON; readings queue on disk` |
//!
//! The `delivering to ` prefix is what the deploy gate waits for: keep it stable. Outside
//! systemd (no `NOTIFY_SOCKET`) every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;

/// The device's messages to systemd; holds what is needed to say each status line once.
#[derive(Debug)]
pub struct Notifier {
    broker: String,
    /// A reading was acknowledged on the current connection (the line already says so).
    delivering: bool,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// `broker` is `host:port`, as the status lines show it.
    pub fn new(broker: String) -> Self {
        Notifier { broker, delivering: false, watchdog: sd_notify::watchdog_enabled() }
    }

    /// The watchdog interval systemd expects (`WatchdogSec=`), if it set one.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Configuration, queue, sensor and LED are open.
    pub fn ready(&self) {
        send(&[NotifyState::Ready, NotifyState::Status(&format!("started; connecting to {}", self.broker))]);
    }

    pub fn feed_watchdog(&self) {
        send(&[NotifyState::Watchdog]);
    }

    pub fn stopping(&self) {
        send(&[NotifyState::Stopping]);
    }

    pub fn connected(&mut self, queued: u64) {
        send_status(self.connected_line(queued));
    }

    /// The broker acknowledged a reading; says so once per connection.
    pub fn delivered(&mut self) {
        if let Some(line) = self.delivered_line() {
            send_status(line);
        }
    }

    pub fn unreachable(&mut self, reason: &str) {
        send_status(self.unreachable_line(reason));
    }

    fn connected_line(&mut self, queued: u64) -> String {
        self.delivering = false;
        format!("connected to {}; {queued} queued", self.broker)
    }

    fn delivered_line(&mut self) -> Option<String> {
        if self.delivering {
            return None;
        }
        self.delivering = true;
        Some(format!("delivering to {}", self.broker))
    }

    fn unreachable_line(&mut self, reason: &str) -> String {
        self.delivering = false;
        format!("broker {} unreachable: {reason}; readings queue on disk", self.broker)
    }
}

fn send_status(line: String) {
    // One line, whatever went into it: a newline would start another assignment.
    send(&[NotifyState::Status(&crate::payload::printable(&line, 400))]);
}

fn send(states: &[NotifyState<'_>]) {
    // Not under systemd, or its socket is gone: nothing to tell, and nothing the device can do.
    let _ = sd_notify::notify(states);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notifier() -> Notifier {
        Notifier { broker: "pi.local:1883".into(), delivering: false, watchdog: None }
    }

    #[test]
    fn the_first_acknowledged_reading_of_a_connection_says_delivering_once() {
        let mut n = notifier();
        assert_eq!(n.connected_line(3), "connected to pi.local:1883; 3 queued");
        assert_eq!(n.delivered_line().as_deref(), Some("delivering to pi.local:1883"));
        assert_eq!(n.delivered_line(), None, "not once per reading");
    }

    #[test]
    fn a_lost_connection_takes_delivering_back_until_the_next_acknowledgement() {
        let mut n = notifier();
        n.connected_line(0);
        n.delivered_line();
        assert_eq!(
            n.unreachable_line("connection refused"),
            "broker pi.local:1883 unreachable: connection refused; readings queue on disk"
        );
        n.connected_line(12);
        assert_eq!(n.delivered_line().as_deref(), Some("delivering to pi.local:1883"));
    }
}
