//! The meta file: the run, how far `seq` is reserved, and how far the broker acknowledged.
//!
//! `meta` is 8 KiB, written once in full when it is made (as `meta.new`, synced, renamed, the
//! directory synced), so later writes overwrite blocks the file already owns and need no free
//! space. It holds two slots, one per 4 KiB block, so a torn page can destroy at most one:
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..4 | magic `NLQ2` |
//! | 4..12 | generation u64 (the newer valid slot wins) |
//! | 12..20 | `run` u64: the run that wrote it |
//! | 20..28 | `reserved` u64: every `seq` below it may have been handed out |
//! | 28..36 | `acked_through` u64: every `seq` up to it was acknowledged |
//! | 36..40 | crc32 of bytes 0..36 |
//!
//! Every write goes to the slot that does not hold the newest *synced* copy, and only a
//! successful sync makes that slot the durable one: an unsynced write (the lazy acknowledged
//! position) can be lost or torn, never the copy a crash falls back to.

use std::io;
use std::path::{Path, PathBuf};

use super::storage::Storage;

const MAGIC: &[u8; 4] = b"NLQ2";
/// The first release's meta: two 32-byte slots at 0 and 512 (no run).
const MAGIC_V1: &[u8; 4] = b"NLQ1";
const SLOT: u64 = 4096;
const SLOT_LEN: usize = 40;
pub const FILE_LEN: u64 = 2 * SLOT;

/// What the meta file records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Meta {
    pub run: u64,
    pub reserved: u64,
    pub acked_through: u64,
}

/// What was found in the directory.
pub enum Found<F> {
    Valid(MetaFile<F>, Meta),
    Missing,
    /// The file exists but neither slot is valid.
    Unreadable,
}

/// The open meta file.
pub struct MetaFile<F> {
    file: F,
    generation: u64,
    /// The slot (0 or 1) holding the newest synced copy.
    durable_slot: u64,
}

fn meta_path(dir: &Path) -> PathBuf {
    dir.join("meta")
}

fn encode(generation: u64, m: &Meta) -> [u8; SLOT_LEN] {
    let mut b = [0u8; SLOT_LEN];
    b[0..4].copy_from_slice(MAGIC);
    b[4..12].copy_from_slice(&generation.to_le_bytes());
    b[12..20].copy_from_slice(&m.run.to_le_bytes());
    b[20..28].copy_from_slice(&m.reserved.to_le_bytes());
    b[28..36].copy_from_slice(&m.acked_through.to_le_bytes());
    let crc = crc32fast::hash(&b[..36]);
    b[36..40].copy_from_slice(&crc.to_le_bytes());
    b
}

fn word(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Decodes one slot: (generation, meta).
fn decode(b: &[u8]) -> Option<(u64, Meta)> {
    if b.len() >= SLOT_LEN && &b[..4] == MAGIC {
        let crc = u32::from_le_bytes(b[36..40].try_into().expect("4 bytes"));
        if crc != crc32fast::hash(&b[..36]) {
            return None;
        }
        return Some((word(b, 4), Meta { run: word(b, 12), reserved: word(b, 20), acked_through: word(b, 28) }));
    }
    if b.len() >= 32 && &b[..4] == MAGIC_V1 {
        let crc = u32::from_le_bytes(b[28..32].try_into().expect("4 bytes"));
        if crc != crc32fast::hash(&b[..28]) {
            return None;
        }
        return Some((word(b, 4), Meta { run: 0, reserved: word(b, 12), acked_through: word(b, 20) }));
    }
    None
}

impl<F> MetaFile<F> {
    /// Reads `dir/meta`. Removes a `meta.new` left by a creation that was cut short.
    pub fn open<S: Storage<File = F>>(st: &S, dir: &Path) -> io::Result<Found<F>> {
        let names = st.list(dir)?;
        if names.iter().any(|n| n == "meta.new") {
            st.remove(&dir.join("meta.new"))?;
        }
        if !names.iter().any(|n| n == "meta") {
            return Ok(Found::Missing);
        }
        let file = st.open(&meta_path(dir))?;
        // The newest slot may be an unsynced write of a killed run: make it the durable copy
        // before the next write goes to the other slot.
        st.sync(&file)?;
        let mut best: Option<(u64, u64, Meta)> = None;
        let v1 = {
            let mut b = [0u8; 4];
            st.read_at(&file, &mut b, 0)? == 4 && &b == MAGIC_V1
        };
        let offsets: [u64; 2] = if v1 { [0, 512] } else { [0, SLOT] };
        for (slot, at) in offsets.into_iter().enumerate() {
            let mut b = [0u8; SLOT_LEN];
            let n = st.read_at(&file, &mut b, at)?;
            if let Some((generation, m)) = decode(&b[..n]) {
                if best.is_none_or(|(g, _, _)| generation > g) {
                    best = Some((generation, slot as u64, m));
                }
            }
        }
        match best {
            Some((generation, slot, m)) if !v1 && st.len(&file)? == FILE_LEN => {
                Ok(Found::Valid(MetaFile { file, generation, durable_slot: slot }, m))
            }
            // A first-release meta: valid, but made anew in this layout by the caller.
            Some((_, _, m)) => Ok(Found::Valid(MetaFile { file, generation: 0, durable_slot: u64::MAX }, m)),
            None => Ok(Found::Unreadable),
        }
    }

    /// Whether this is a first-release file that must be made anew (see [`MetaFile::create`]).
    pub fn is_old_layout(&self) -> bool {
        self.durable_slot == u64::MAX
    }

    /// Makes `dir/meta` anew holding `m`: written in full as `meta.new`, synced, renamed over
    /// `meta`, and the directory synced. A cut at any point leaves the old `meta` or the new one.
    pub fn create<S: Storage<File = F>>(st: &S, dir: &Path, m: &Meta) -> io::Result<Self> {
        let tmp = dir.join("meta.new");
        let file = match st.create(&tmp) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                st.remove(&tmp)?;
                st.create(&tmp)?
            }
            Err(e) => return Err(e),
        };
        let mut block = vec![0u8; FILE_LEN as usize];
        block[..SLOT_LEN].copy_from_slice(&encode(1, m));
        let res = st
            .write_at(&file, &block, 0)
            .and_then(|()| st.sync(&file))
            .and_then(|()| st.rename(&tmp, &meta_path(dir)))
            .and_then(|()| st.sync_dir(dir));
        if let Err(e) = res {
            let _ = st.remove(&tmp);
            return Err(e);
        }
        Ok(MetaFile { file, generation: 1, durable_slot: 0 })
    }

    /// Writes `m` to the slot without the newest synced copy; with `sync`, that slot becomes it.
    pub fn write<S: Storage<File = F>>(&mut self, st: &S, m: &Meta, sync: bool) -> io::Result<()> {
        let slot = 1 - self.durable_slot;
        self.generation += 1;
        st.write_at(&self.file, &encode(self.generation, m), slot * SLOT)?;
        if sync {
            st.sync(&self.file)?;
            self.durable_slot = slot;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_round_trips_and_a_flipped_bit_invalidates_it() {
        let m = Meta { run: 3, reserved: 8193, acked_through: 77 };
        let b = encode(9, &m);
        assert_eq!(decode(&b), Some((9, m)));
        for i in 0..SLOT_LEN {
            let mut bad = b;
            bad[i] ^= 0x10;
            assert_eq!(decode(&bad), None, "flip at byte {i}");
        }
    }
}
