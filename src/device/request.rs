//! A reading on request (`<id>/read`): which requests make the device read the sensor at once,
//! and who is answered.
//!
//! Rules:
//! - A retained request is ignored: it would be "answered" at every new session, long after
//!   anyone asked. So is a payload over [`MAX_PAYLOAD`] bytes (no payload is needed; what there
//!   is, is not read).
//! - An MQTT 5 request's Response Topic is answered only where an answer cannot pass for the
//!   device's own messages or another's control topics: not under `$`, not under
//!   `homeassistant/`, no wildcard, at most [`MAX_TOPIC`] bytes, and under the device's own id
//!   only below `<id>/reply/` (`docs/mosquitto.acl` lets a device write there and nowhere
//!   else). A request with a Response Topic that breaks this is refused whole.
//! - At most one on-demand reading per `sensor.min_request_ms`: a request inside the window after
//!   the last one is not dropped but waits for the window's end, and a request while a reading
//!   is asked for joins it (its answer comes with that reading, up to [`MAX_WAITING`] answers;
//!   past that it is dropped). Both are counted as limited. A flood costs the broker one reading
//!   and a few answers per window, never one per request, and every asker within the bound gets
//!   a reading taken after it asked.
//! - The scheduled readings keep their pace: an on-demand reading never moves the next tick.
//!
//! Pure: time is passed in.

use std::time::{Duration, Instant};

use crate::link::Reply;

/// The largest request payload accepted (and ignored).
pub const MAX_PAYLOAD: usize = 256;
/// The longest Response Topic answered.
pub const MAX_TOPIC: usize = 256;
/// The most answers one on-demand reading carries.
pub const MAX_WAITING: usize = 8;

/// What became of a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Read the sensor now.
    Read,
    /// Inside the window after the last on-demand reading: read at this time.
    Later(Instant),
    /// A reading is already asked for: this request is answered with it.
    Joined,
    /// Too many wait for the reading asked for: dropped.
    Dropped,
    /// Retained, too large, or an answer that may not go where it asks: ignored.
    Refused(&'static str),
}

/// See the module doc.
#[derive(Debug)]
pub struct Requests {
    id: String,
    min: Duration,
    /// When the last on-demand reading was asked for.
    last: Option<Instant>,
    /// A reading is asked for and not yet taken.
    asked: bool,
    /// When the reading asked for inside a window is due (the window's end).
    due: Option<Instant>,
    /// Who waits for it.
    waiting: Vec<Reply>,
    limited: u64,
}

impl Requests {
    pub fn new(id: &str, min: Duration) -> Self {
        Requests { id: id.to_owned(), min, last: None, asked: false, due: None, waiting: Vec::new(), limited: 0 }
    }

    /// A message on `<id>/read` at `now`.
    pub fn request(&mut self, now: Instant, retain: bool, payload_len: usize, reply: Option<Reply>) -> Verdict {
        if retain {
            return Verdict::Refused("retained: a request is answered once, as sent; publish it without retain");
        }
        if payload_len > MAX_PAYLOAD {
            return Verdict::Refused("payload over 256 bytes (none is needed)");
        }
        if let Some(r) = &reply {
            if let Err(why) = self.answerable(&r.topic) {
                return Verdict::Refused(why);
            }
        }
        if self.asked {
            self.limited += 1;
            return match reply {
                Some(r) if self.waiting.len() < MAX_WAITING => {
                    self.waiting.push(r);
                    Verdict::Joined
                }
                None => Verdict::Joined, // the reading asked for goes to telemetry anyway
                Some(_) => Verdict::Dropped,
            };
        }
        self.asked = true;
        self.waiting.extend(reply);
        match self.last {
            Some(t) if now < t + self.min => {
                self.limited += 1;
                self.due = Some(t + self.min);
                Verdict::Later(t + self.min)
            }
            _ => {
                self.last = Some(now);
                Verdict::Read
            }
        }
    }

    /// When a reading held back to the window's end ([`Verdict::Later`]) is to be asked for.
    pub fn deadline(&self) -> Option<Instant> {
        self.due
    }

    /// The reading held back is asked for now.
    pub fn fire(&mut self, now: Instant) {
        self.last = Some(now);
        self.due = None;
    }

    /// The reading asked for was taken (or failed): who waits for its answer.
    pub fn taken(&mut self) -> Vec<Reply> {
        self.asked = false;
        std::mem::take(&mut self.waiting)
    }

    /// Requests the rate limit held back (answered by a reading asked for earlier, or later,
    /// or dropped) since start.
    pub fn limited(&self) -> u64 {
        self.limited
    }

    fn answerable(&self, topic: &str) -> Result<(), &'static str> {
        let own = format!("{}/", self.id);
        if topic.is_empty() || topic.len() > MAX_TOPIC || topic.contains(['+', '#', '\0']) {
            Err("the response topic is empty, longer than 256 bytes or has a wildcard")
        } else if topic.starts_with('$') || topic.starts_with("homeassistant/") {
            Err("the response topic is the broker's or Home Assistant's")
        } else if topic.starts_with(&own) && !topic.starts_with(&crate::topics::reply_prefix(&self.id)) {
            Err("the response topic is one of the device's own (answers go below <id>/reply/)")
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_millis(200);

    fn reply(topic: &str) -> Option<Reply> {
        Some(Reply { topic: topic.into(), correlation: Some(bytes::Bytes::from_static(b"42")) })
    }

    #[test]
    fn a_request_reads_at_once_and_its_answer_goes_where_it_asked() {
        let mut r = Requests::new("porch", MIN);
        assert_eq!(r.request(Instant::now(), false, 0, reply("laptop/answers")), Verdict::Read);
        let waiting = r.taken();
        assert_eq!(waiting, vec![reply("laptop/answers").unwrap()]);
        assert!(r.taken().is_empty(), "answered once");
    }

    #[test]
    fn a_flood_gives_one_reading_per_window_and_counts_the_rest() {
        let t0 = Instant::now();
        let mut r = Requests::new("porch", MIN);
        let (mut reads, mut alarm) = (Vec::new(), None);
        for i in 0..100u64 {
            let now = t0 + Duration::from_millis(10 * i); // 100 requests in a second
            if alarm.is_some_and(|at| now >= at) {
                r.fire(now);
                reads.push(now - t0);
                r.taken();
                alarm = None;
            }
            match r.request(now, false, 0, reply("laptop/a")) {
                Verdict::Read => {
                    reads.push(now - t0);
                    r.taken();
                }
                Verdict::Later(at) => {
                    assert_eq!(r.deadline(), Some(at));
                    alarm = Some(at);
                }
                Verdict::Joined | Verdict::Dropped => {} // 8 answers wait at most
                other => panic!("{other:?}"),
            }
        }
        let ms: Vec<u128> = reads.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [0, 200, 400, 600, 800], "one per window, the rest waited for it");
        assert_eq!(alarm, Some(t0 + Duration::from_millis(1000)), "the last askers are answered too");
        assert_eq!(r.limited(), 99, "every request but the first was held back");
    }

    #[test]
    fn a_request_inside_the_window_waits_for_its_end() {
        let t0 = Instant::now();
        let mut r = Requests::new("porch", MIN);
        assert_eq!(r.request(t0, false, 0, reply("a/1")), Verdict::Read);
        r.taken();
        let later = t0 + Duration::from_millis(50);
        assert_eq!(r.request(later, false, 0, reply("a/2")), Verdict::Later(t0 + MIN));
        assert_eq!(r.deadline(), Some(t0 + MIN));
        r.fire(t0 + MIN);
        assert_eq!(r.deadline(), None, "asked for");
        assert_eq!(r.taken(), vec![reply("a/2").unwrap()], "answered, with a reading taken after it asked");
    }

    #[test]
    fn requests_while_a_reading_is_asked_for_share_its_answer_up_to_a_bound() {
        let t0 = Instant::now();
        let mut r = Requests::new("porch", MIN);
        assert_eq!(r.request(t0, false, 0, reply("a/1")), Verdict::Read);
        for i in 0..20 {
            let v = r.request(t0, false, 0, reply(&format!("a/{i}")));
            assert_eq!(v, if i < MAX_WAITING - 1 { Verdict::Joined } else { Verdict::Dropped }, "request {i}");
        }
        assert_eq!(r.taken().len(), MAX_WAITING);
    }

    #[test]
    fn retained_or_large_requests_and_answers_aimed_at_control_topics_are_refused() {
        let t0 = Instant::now();
        let mut r = Requests::new("porch", MIN);
        assert!(matches!(r.request(t0, true, 0, None), Verdict::Refused(_)));
        assert!(matches!(r.request(t0, false, 257, None), Verdict::Refused(_)));
        for topic in ["porch/commands", "porch/state", "garage/+", "$SYS/x", "homeassistant/status", ""] {
            assert!(matches!(r.request(t0, false, 0, reply(topic)), Verdict::Refused(_)), "{topic}");
        }
        assert!(matches!(r.request(t0, false, 0, reply(&"x".repeat(300))), Verdict::Refused(_)));
        assert_eq!(r.request(t0, false, 0, reply("porch/reply/laptop")), Verdict::Read, "nothing refused counts");
    }

    #[test]
    fn the_window_starts_when_a_reading_is_asked_for() {
        let t0 = Instant::now();
        let mut r = Requests::new("porch", MIN);
        assert_eq!(r.request(t0, false, 0, None), Verdict::Read);
        r.taken();
        assert_eq!(r.request(t0 + MIN, false, 0, None), Verdict::Read);
    }
}
