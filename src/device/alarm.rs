//! A timer for a deadline that moves: the device loop's waits for the queue's next deadline,
//! for retrying refused readings and for answering Home Assistant.
//!
//! The loop used to make a new `sleep_until` for each at every turn, which registers a timer with
//! tokio's driver and removes it again each time (a lock and a wheel insert and remove per
//! turn, two or three turns per reading while readings are in flight). An [`Alarm`] keeps one
//! timer and re-arms it only when the deadline changes.

use std::pin::Pin;

use tokio::time::{Instant, Sleep};

/// One timer, armed at the deadline last set, if any.
pub struct Alarm {
    sleep: Pin<Box<Sleep>>,
    at: Option<Instant>,
}

impl Default for Alarm {
    fn default() -> Self {
        Alarm { sleep: Box::pin(tokio::time::sleep_until(far_future())), at: None }
    }
}

impl Alarm {
    /// Rings at `at`; `None`: never. Re-arms the timer only when `at` moved.
    pub fn set(&mut self, at: Option<Instant>) {
        if at != self.at {
            self.sleep.as_mut().reset(at.unwrap_or_else(far_future));
            self.at = at;
        }
    }

    /// Whether a deadline is set.
    pub fn is_set(&self) -> bool {
        self.at.is_some()
    }

    /// Waits until the deadline (at once when it has passed). Cancel-safe.
    pub async fn ring(&mut self) {
        self.sleep.as_mut().await;
    }
}

/// Far enough never to come, near enough not to overflow tokio's clock.
fn far_future() -> Instant {
    Instant::now() + std::time::Duration::from_secs(86_400 * 365)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn it_rings_at_the_deadline_last_set_and_again_while_that_deadline_stands() {
        let t0 = Instant::now();
        let mut a = Alarm::default();
        a.set(Some(t0 + Duration::from_secs(5)));
        a.set(Some(t0 + Duration::from_secs(2))); // moved earlier
        a.ring().await;
        assert_eq!(Instant::now(), t0 + Duration::from_secs(2));
        a.ring().await; // still due: the owner has not moved it
        assert_eq!(Instant::now(), t0 + Duration::from_secs(2));
        a.set(Some(t0 + Duration::from_secs(3)));
        a.ring().await;
        assert_eq!(Instant::now(), t0 + Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn an_alarm_without_a_deadline_never_rings() {
        let mut a = Alarm::default();
        a.set(Some(Instant::now() + Duration::from_secs(1)));
        a.set(None);
        assert!(!a.is_set());
        assert!(tokio::time::timeout(Duration::from_secs(3600), a.ring()).await.is_err());
    }
}
