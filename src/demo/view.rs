//! What the demo shows, learned like any other client would: the view subscribes to the
//! device's topics on the embedded broker and keeps a [`Board`], which the terminal line and the
//! web page both draw. Two things no broker can tell come from the process itself: the device's
//! queue depth (the simulated device reports it through its control handle) and the network
//! switch.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Duration;

use crate::config::MqttConfig;
use crate::link::{self, Event, Poller, Security, Spec};
use serde::Serialize;
use tokio::sync::watch;

use super::relay::Network;
use crate::payload::SimulatedLight;
use crate::sensor::SimulatedControl;

/// Readings the board keeps for the chart: 3 minutes at the demo's 200 ms.
pub const HISTORY: usize = 900;
/// Commands the board keeps for the page's list.
const RECENT_COMMANDS: usize = 8;
/// How often the queue depth, the switch and the slider's override are looked at.
const TICK: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct SentCommand {
    /// When the view saw it (Unix ms).
    pub ts: u64,
    pub led_on: bool,
}

/// Everything the demo shows.
#[derive(Debug, Default)]
pub struct Seen {
    pub light: Option<u16>,
    pub led: Option<bool>,
    /// The device's retained status (`online`, or `offline` from its Last Will).
    pub status: String,
    pub queue: u64,
    pub commands: u64,
    pub recent: VecDeque<SentCommand>,
    /// `(ts, light)` of the readings that reached the broker, oldest first.
    pub readings: VecDeque<(u64, u16)>,
    /// Readings ever added: a client that saw `n` of them wants those after `n`.
    pub readings_total: u64,
    pub network: bool,
    /// The slider's level while it overrides the simulated day.
    pub light_override: Option<u16>,
}

impl Seen {
    fn add_reading(&mut self, ts: u64, light: u16) {
        if self.readings.len() == HISTORY {
            self.readings.pop_front();
        }
        self.readings.push_back((ts, light));
        self.readings_total += 1;
    }

    /// The readings added after the first `seen` (at most the history kept).
    pub fn readings_after(&self, seen: u64) -> impl Iterator<Item = &(u64, u16)> {
        let new = (self.readings_total - seen.min(self.readings_total)) as usize;
        self.readings.iter().skip(self.readings.len().saturating_sub(new))
    }
}

/// The shared board and its change counter.
#[derive(Debug)]
pub struct Board {
    seen: Mutex<Seen>,
    changed: watch::Sender<u64>,
}

impl Default for Board {
    fn default() -> Self {
        Board {
            seen: Mutex::new(Seen { status: "connecting".into(), network: true, ..Seen::default() }),
            changed: watch::channel(0).0,
        }
    }
}

impl Board {
    /// Reads the board.
    pub fn read<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        // A poisoned lock means a panic elsewhere, and panics abort this program.
        f(&self.seen.lock().expect("lock"))
    }

    /// Changes the board; watchers are told when `f` says something changed.
    fn update(&self, f: impl FnOnce(&mut Seen) -> bool) {
        if f(&mut self.seen.lock().expect("lock")) {
            self.changed.send_modify(|n| *n += 1);
        }
    }

    /// Resolves at the next change.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// The demo device's parts that the view reads from the process, not the broker.
pub struct Local {
    pub control: SimulatedControl,
    pub network: Network,
}

/// Watches the broker and keeps `board`; on a terminal it also draws a live line, otherwise
/// prints plain lines.
pub async fn run(
    mqtt: &MqttConfig,
    id: &str,
    threshold: u16,
    board: &Board,
    local: Local,
    shutdown: impl Future<Output = ()>,
) {
    let spec = Spec::observer("demo-view");
    let (client, eventloop) = link::build(mqtt, &Security::default(), &spec);
    let mut poller = Poller::new(eventloop);
    poller.start();
    let tty = std::io::stdout().is_terminal();
    let mut out = std::io::stdout();
    let mut tick = tokio::time::interval(TICK);
    tokio::pin!(shutdown);
    loop {
        let lines = tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {
                board.update(|s| {
                    let (queue, network) = (local.control.queued(), local.network.is_up());
                    let level = match local.control.get() {
                        Some(SimulatedLight::Level(v)) => Some(v),
                        _ => None,
                    };
                    let changed = (s.queue, s.network, s.light_override) != (queue, network, level);
                    (s.queue, s.network, s.light_override) = (queue, network, level);
                    changed
                });
                Vec::new()
            }
            events = poller.next() => {
                let mut lines = Vec::new();
                for ev in events {
                    match ev {
                        Ok(Event::Connected { .. }) => {
                            let _ = client.subscribe(&[format!("{id}/#")]);
                        }
                        Ok(Event::Message(m)) => {
                            let topic = m.topic.rsplit('/').next().unwrap_or_default().to_owned();
                            board.update(|s| {
                                let l = learn(s, &topic, &m.payload);
                                let changed = l.is_some();
                                lines.extend(l);
                                changed
                            });
                        }
                        Ok(_) => {}
                        Err(_) => poller.start_after(Duration::from_millis(200)),
                    }
                }
                poller.start(); // unless a retry is scheduled
                lines
            }
        };
        if tty {
            let _ = write!(out, "\r{}\x1b[K", board.read(|s| live_line(s, threshold)));
        } else {
            for l in lines {
                let _ = writeln!(out, "{l}");
            }
        }
        let _ = out.flush();
    }
    if tty {
        let _ = writeln!(out);
    }
}

/// Takes one message from the device's topics into `s`; the plain line for it, if it matters.
fn learn(s: &mut Seen, topic: &str, payload: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
    match topic {
        "telemetry" => {
            let light = v["light"].as_u64().map(|l| l.min(1000) as u16)?;
            s.light = Some(light);
            s.add_reading(v["ts"].as_u64().unwrap_or_else(crate::clock::unix_ms), light);
            Some(format!("telemetry light={light} seq={}", v["seq"]))
        }
        "state" => {
            s.led = v["led_on"].as_bool();
            Some(format!("state led_on={}", v["led_on"]))
        }
        "commands" => {
            let led_on = v["led_on"].as_bool()?;
            s.commands += 1;
            if s.recent.len() == RECENT_COMMANDS {
                s.recent.pop_front();
            }
            s.recent.push_back(SentCommand { ts: crate::clock::unix_ms(), led_on });
            Some(format!("command led_on={led_on}"))
        }
        "status" => {
            s.status = String::from_utf8_lossy(payload).into_owned();
            Some(format!("status {}", s.status))
        }
        _ => None,
    }
}

/// One terminal line: the light as a bar with the threshold marked, the LED as a lamp.
pub fn live_line(s: &Seen, threshold: u16) -> String {
    const WIDTH: usize = 30;
    let light = s.light.unwrap_or(0);
    let filled = usize::from(light.min(1000)) * WIDTH / 1000;
    let mark = usize::from(threshold.min(1000)) * WIDTH / 1000;
    let bar: String = (0..WIDTH)
        .map(|i| {
            if i == mark {
                '|'
            } else if i < filled {
                '#'
            } else {
                '.'
            }
        })
        .collect();
    let lamp = match s.led {
        Some(true) => "\x1b[1;33m(*) ON \x1b[0m",
        Some(false) => "( ) off",
        None => "( ) ?  ",
    };
    format!(
        "light [{bar}] {light:>4} (threshold {threshold})  LED {lamp}  {}  queue {}  commands {}",
        s.status, s.queue, s.commands
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_line_marks_the_threshold_and_lights_the_lamp() {
        let s = Seen { light: Some(500), led: Some(true), status: "online".into(), commands: 2, ..Seen::default() };
        let l = live_line(&s, 300);
        assert!(l.contains("[#########|#####..............."), "{l}");
        assert!(l.contains("ON") && l.contains("commands 2"), "{l}");
    }

    #[test]
    fn a_client_gets_only_the_readings_it_has_not_seen_and_the_history_is_bounded() {
        let mut s = Seen::default();
        for i in 0..(HISTORY as u64 + 10) {
            learn(&mut s, "telemetry", format!(r#"{{"light": 7, "ts": {i}, "seq": {i}}}"#).as_bytes());
        }
        assert_eq!(s.readings.len(), HISTORY);
        assert_eq!(s.readings_after(0).count(), HISTORY, "a new client gets the whole history");
        let last: Vec<u64> = s.readings_after(s.readings_total - 2).map(|r| r.0).collect();
        assert_eq!(last, [HISTORY as u64 + 8, HISTORY as u64 + 9]);
        assert_eq!(s.readings_after(s.readings_total).count(), 0);
    }

    #[test]
    fn commands_are_counted_and_the_recent_ones_kept() {
        let mut s = Seen::default();
        for on in [true, false].iter().cycle().take(RECENT_COMMANDS + 3) {
            learn(&mut s, "commands", format!(r#"{{"led_on": {on}}}"#).as_bytes());
        }
        assert_eq!(s.commands, RECENT_COMMANDS as u64 + 3);
        assert_eq!(s.recent.len(), RECENT_COMMANDS);
        assert!(learn(&mut s, "commands", b"not json").is_none(), "a hostile command is not shown");
    }
}
