//! One reading as bytes on disk: a checksummed frame. (Reading on past damage is the segment
//! store's scan, which tries each byte offset until a frame decodes.)
//!
//! A frame is `[len: u8][crc32(body): u32 LE][body]`. The body, little-endian:
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..8 | `seq` u64 |
//! | 8..16 | `ts` u64, Unix ms |
//! | 16..18 | `light` u16 |
//! | 18 | flags: bit 0 `lux` follows, bit 1 `ts` from a clock not known to be synchronized, bit 7 set in this format (version 2) |
//! | 19..27 | `run` u64 |
//! | 27..31 | `lux` f32, only with flag bit 0 |
//!
//! 32 bytes a reading, 36 with lux. Version 1 frames (before `run`: no bit 7, no `run`, bodies of
//! 19 or 23 bytes) still decode, with `run` 0, so an upgraded device sends what the old one queued.

use crate::payload::Telemetry;

pub const HEAD: usize = 5;
const FLAG_LUX: u8 = 1;
const FLAG_TS_UNSYNCED: u8 = 2;
const FLAG_V2: u8 = 0x80;
const V1_BODY: usize = 19;
const V1_BODY_LUX: usize = 23;
const V2_BODY: usize = 27;
const V2_BODY_LUX: usize = 31;
/// The longest frame: a scan needs this many bytes to judge a frame.
pub const MAX_LEN: usize = HEAD + V2_BODY_LUX;
/// The shortest frame (version 1 without lux): bounds how many frames damage can have covered.
pub const MIN_LEN: usize = HEAD + V1_BODY;

/// The length of `rec`'s frame.
pub fn len(rec: &Telemetry) -> usize {
    HEAD + if rec.lux.is_some() { V2_BODY_LUX } else { V2_BODY }
}

/// Appends `rec`'s frame to `out`.
pub fn encode(rec: &Telemetry, out: &mut Vec<u8>) {
    let mut body = [0u8; V2_BODY_LUX];
    body[0..8].copy_from_slice(&rec.seq.to_le_bytes());
    body[8..16].copy_from_slice(&rec.ts.to_le_bytes());
    body[16..18].copy_from_slice(&rec.light.to_le_bytes());
    body[18] = FLAG_V2 | if rec.ts_ok { 0 } else { FLAG_TS_UNSYNCED };
    body[19..27].copy_from_slice(&rec.run.to_le_bytes());
    let n = match rec.lux {
        Some(lux) => {
            body[18] |= FLAG_LUX;
            body[27..31].copy_from_slice(&lux.to_le_bytes());
            V2_BODY_LUX
        }
        None => V2_BODY,
    };
    out.push(n as u8);
    out.extend_from_slice(&crc32fast::hash(&body[..n]).to_le_bytes());
    out.extend_from_slice(&body[..n]);
}

/// What is at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decoded {
    /// A valid frame and its length.
    Frame(Telemetry, usize),
    /// The buffer ends before the frame would: read more, or, at the end of the file, a torn tail.
    Short,
    /// Not a valid frame.
    Bad,
}

/// Decodes the frame at the start of `buf`.
pub fn decode(buf: &[u8]) -> Decoded {
    let Some(&n) = buf.first() else { return Decoded::Short };
    let n = n as usize;
    if ![V1_BODY, V1_BODY_LUX, V2_BODY, V2_BODY_LUX].contains(&n) {
        return Decoded::Bad;
    }
    let Some(body) = buf.get(HEAD..HEAD + n) else { return Decoded::Short };
    let crc = u32::from_le_bytes(buf[1..5].try_into().expect("4 bytes"));
    if crc != crc32fast::hash(body) {
        return Decoded::Bad;
    }
    let ts_ok = body[18] & FLAG_TS_UNSYNCED == 0;
    let flags = body[18] & !FLAG_TS_UNSYNCED;
    let word = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes"));
    let f32_at = |at: usize| f32::from_le_bytes(body[at..at + 4].try_into().expect("4 bytes"));
    let (run, lux) = match (flags, n) {
        (FLAG_V2, V2_BODY) => (word(19), None),
        (f, V2_BODY_LUX) if f == FLAG_V2 | FLAG_LUX => (word(19), Some(f32_at(27))),
        (0, V1_BODY) => (0, None),
        (FLAG_LUX, V1_BODY_LUX) => (0, Some(f32_at(19))),
        _ => return Decoded::Bad,
    };
    let rec = Telemetry {
        seq: word(0),
        ts: word(8),
        light: u16::from_le_bytes(body[16..18].try_into().expect("2 bytes")),
        run,
        lux,
        ts_ok,
    };
    Decoded::Frame(rec, HEAD + n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, lux: Option<f32>) -> Telemetry {
        Telemetry { light: 999, ts: 1_763_776_000_123, seq, run: 7, lux, ts_ok: true }
    }

    #[test]
    fn a_frame_round_trips_with_and_without_lux() {
        let unsynced = Telemetry { ts_ok: false, ..rec(44, Some(1.0)) };
        for r in [rec(42, None), rec(43, Some(3.5)), unsynced, Telemetry { ts_ok: false, ..rec(45, None) }] {
            let mut buf = vec![];
            encode(&r, &mut buf);
            assert_eq!(buf.len(), len(&r));
            assert_eq!(decode(&buf), Decoded::Frame(r, buf.len()));
        }
        assert_eq!(len(&rec(1, None)), 32);
    }

    #[test]
    fn every_flipped_bit_and_every_cut_is_noticed() {
        let r = rec(42, Some(3.5));
        let mut buf = vec![];
        encode(&r, &mut buf);
        for i in 0..buf.len() {
            for bit in 0..8 {
                let mut bad = buf.clone();
                bad[i] ^= 1 << bit;
                assert!(!matches!(decode(&bad), Decoded::Frame(x, _) if x == r), "flip at byte {i} bit {bit}");
            }
        }
        for cut in 0..buf.len() {
            assert_eq!(decode(&buf[..cut]), Decoded::Short, "cut at {cut}");
        }
    }

    #[test]
    fn version_1_frames_still_decode_with_run_zero() {
        // seq 5, ts 6, light 300, no lux: the frame the first release wrote.
        let mut body = vec![];
        body.extend_from_slice(&5u64.to_le_bytes());
        body.extend_from_slice(&6u64.to_le_bytes());
        body.extend_from_slice(&300u16.to_le_bytes());
        body.push(0);
        let mut frame = vec![body.len() as u8];
        frame.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        frame.extend_from_slice(&body);
        let want = Telemetry { seq: 5, ts: 6, light: 300, run: 0, lux: None, ts_ok: true };
        assert_eq!(decode(&frame), Decoded::Frame(want, 24));
    }
}
