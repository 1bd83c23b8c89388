//! The CPU floor for `bench/compare.sh`: what publishing QoS 1 telemetry costs on this machine
//! with nothing else in the way. A blocking loop with hand-built MQTT 3.1.1 packets: no async
//! runtime, no MQTT library, no queue, no commands. Each turn publishes one reading at QoS 1,
//! waits for its PUBACK and sleeps for the interval.
//!
//! It takes the harness's environment (`NIGHTLIGHT_ID`, `NIGHTLIGHT_BROKER_HOST`,
//! `NIGHTLIGHT_BROKER_PORT`, `NIGHTLIGHT_INTERVAL_MS`) and is only measured in the harness's
//! `fast` phase. No real device should look like this: it is the yardstick for the device's
//! CPU per reading.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn env(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_string())
}

/// An MQTT packet: fixed header byte, remaining length (variable-length encoded), body.
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

fn string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

fn main() -> std::io::Result<()> {
    let id = env("NIGHTLIGHT_ID", "floor");
    let addr = format!("{}:{}", env("NIGHTLIGHT_BROKER_HOST", "127.0.0.1"), env("NIGHTLIGHT_BROKER_PORT", "1883"));
    let interval = Duration::from_millis(env("NIGHTLIGHT_INTERVAL_MS", "5000").parse().unwrap_or(5000));
    let mut stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    // CONNECT: protocol "MQTT" level 4, clean session, keep-alive 60 s.
    let mut connect = string("MQTT");
    connect.extend_from_slice(&[4, 0x02, 0, 60]);
    connect.extend_from_slice(&string(&format!("floor-{id}")));
    stream.write_all(&packet(0x10, &connect))?;
    let mut ack = [0u8; 4];
    stream.read_exact(&mut ack)?; // CONNACK
    let topic = string(&format!("{id}/telemetry"));
    let mut seq: u64 = 0;
    loop {
        seq += 1;
        let pkid = (seq % 65_535 + 1) as u16;
        let mut body = topic.clone();
        body.extend_from_slice(&pkid.to_be_bytes());
        body.extend_from_slice(format!(r#"{{"light":{},"seq":{seq}}}"#, seq % 1000).as_bytes());
        stream.write_all(&packet(0x32, &body))?; // PUBLISH, QoS 1
        stream.read_exact(&mut ack)?; // PUBACK
        std::thread::sleep(interval);
    }
}
