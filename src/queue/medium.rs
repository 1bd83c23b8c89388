//! Is the queue's directory on a medium that keeps what is written across a power cut?
//!
//! Rules:
//! - The mount that holds the directory is the last one in `/proc/self/mountinfo` whose mount
//!   point is the directory or its nearest ancestor (a later mount covers an earlier one).
//! - `tmpfs` and `ramfs` are in memory; so is a filesystem on a `/dev/zram*` device.
//! - An `overlay` is as durable as the mount that holds its `upperdir`: Raspberry Pi OS's
//!   read-only mode (`overlayroot`) puts the upper layer on a tmpfs, so every write is lost at
//!   the next reboot while the queue believes it is durable.
//! - Anything else (ext4, f2fs, btrfs, xfs, vfat, nfs ...) counts as durable: what it does on a
//!   power cut is the queue's own business ([`super`]'s durability rules).
//!
//! Pure over the text of mountinfo, so every layout can be tested without mounting anything.

use std::path::{Path, PathBuf};

/// Where a directory's writes end up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Medium {
    /// On storage that survives a reboot.
    Durable,
    /// In memory: lost at every reboot or power cut.
    Volatile {
        /// The mount point holding the directory.
        mount: PathBuf,
        /// Why it is in memory, for the warning (`tmpfs`, `overlay with its upper layer on tmpfs`).
        why: String,
    },
}

impl Medium {
    pub fn is_durable(&self) -> bool {
        matches!(self, Medium::Durable)
    }

    /// The warning for a volatile medium (`None` when durable): what it is and what to do.
    pub fn warning(&self, dir: &Path) -> Option<String> {
        match self {
            Medium::Durable => None,
            Medium::Volatile { mount, why } => Some(format!(
                "queue.dir {} is in memory ({why}, mounted at {}): readings queued there are lost at every reboot or power cut; \
                 set queue.dir to a directory on the SD card, or keep the data partition out of the read-only overlay \
                 (overlayroot=tmpfs:recurse=0)",
                dir.display(),
                mount.display()
            )),
        }
    }
}

/// One line of mountinfo, the parts that matter here.
#[derive(Debug)]
struct Mount {
    point: PathBuf,
    fstype: String,
    source: String,
    options: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?.to_owned();
            let source = unescape(r.next().unwrap_or(""));
            let options = r.next().unwrap_or("").to_owned();
            Some(Mount { point: PathBuf::from(unescape(point)), fstype, source, options })
        })
        .collect()
}

fn holder<'a>(mounts: &'a [Mount], path: &Path) -> Option<&'a Mount> {
    // The deepest mount point that is an ancestor of `path`; among equals, the last mounted.
    mounts
        .iter()
        .enumerate()
        .filter(|(_, m)| path.starts_with(&m.point))
        .max_by_key(|(i, m)| (m.point.components().count(), *i))
        .map(|(_, m)| m)
}

fn classify_in(mounts: &[Mount], path: &Path, depth: u8) -> Medium {
    let Some(m) = holder(mounts, path) else { return Medium::Durable };
    let volatile = |why: String| Medium::Volatile { mount: m.point.clone(), why };
    match m.fstype.as_str() {
        "tmpfs" | "ramfs" => volatile(m.fstype.clone()),
        _ if m.source.starts_with("/dev/zram") => volatile(format!("{} on {}", m.fstype, m.source)),
        "overlay" if depth < 4 => {
            let upper = m.options.split(',').find_map(|o| o.strip_prefix("upperdir="));
            match upper.map(|u| classify_in(mounts, Path::new(&unescape(u)), depth + 1)) {
                Some(Medium::Volatile { why, .. }) => volatile(format!("overlay with its upper layer on {why}")),
                _ => Medium::Durable,
            }
        }
        _ => Medium::Durable,
    }
}

/// Classifies `path` (absolute; need not exist yet) against the text of a mountinfo file.
pub fn classify(mountinfo: &str, path: &Path) -> Medium {
    classify_in(&parse(mountinfo), path, 0)
}

/// Classifies `dir` on this machine: its nearest existing ancestor, resolved, against
/// `/proc/self/mountinfo`. Durable when that cannot be read (not Linux, no /proc).
pub fn of_dir(dir: &Path) -> Medium {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else { return Medium::Durable };
    let abs = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir().map(|c| c.join(dir)).unwrap_or_else(|_| dir.to_path_buf())
    };
    let existing = abs.ancestors().find_map(|a| a.canonicalize().ok()).unwrap_or(abs);
    classify(&mountinfo, &existing)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PI_SD_CARD: &str = "\
22 1 179:2 / / rw,noatime shared:1 - ext4 /dev/mmcblk0p2 rw
25 22 0:23 / /run rw,nosuid,nodev shared:5 - tmpfs tmpfs rw,size=186420k,mode=755
27 22 179:1 / /boot/firmware rw,relatime shared:7 - vfat /dev/mmcblk0p1 rw
";

    // Raspberry Pi OS with `raspi-config nonint do_overlayfs 0` (overlayroot, recurse=1).
    const OVERLAYROOT: &str = "\
20 1 0:25 / /media/root-rw rw,relatime - tmpfs tmpfs-root rw
21 1 179:2 / /media/root-ro ro,relatime - ext4 /dev/mmcblk0p2 ro
22 1 0:26 / / rw,relatime shared:1 - overlay overlayroot rw,lowerdir=/media/root-ro,upperdir=/media/root-rw/overlay,workdir=/media/root-rw/overlay-workdir/_
";

    #[test]
    fn a_queue_on_the_sd_card_is_durable() {
        assert_eq!(classify(PI_SD_CARD, Path::new("/var/lib/nightlight")), Medium::Durable);
    }

    #[test]
    fn a_queue_under_run_is_on_tmpfs_and_names_the_mount() {
        let m = classify(PI_SD_CARD, Path::new("/run/nightlight"));
        assert_eq!(m, Medium::Volatile { mount: "/run".into(), why: "tmpfs".into() });
        assert!(m.warning(Path::new("/run/nightlight")).unwrap().contains("mounted at /run"));
    }

    #[test]
    fn the_read_only_overlay_root_keeps_its_writes_in_memory() {
        let m = classify(OVERLAYROOT, Path::new("/var/lib/nightlight"));
        assert_eq!(m, Medium::Volatile { mount: "/".into(), why: "overlay with its upper layer on tmpfs".into() });
    }

    #[test]
    fn an_overlay_whose_upper_layer_is_on_disk_is_durable() {
        let text = "\
20 1 179:3 / /data rw - ext4 /dev/mmcblk0p3 rw
22 1 0:26 / / rw - overlay overlay rw,lowerdir=/ro,upperdir=/data/upper,workdir=/data/work
";
        assert_eq!(classify(text, Path::new("/var/lib/nightlight")), Medium::Durable);
    }

    #[test]
    fn a_data_partition_mounted_over_the_overlay_is_durable() {
        let text = format!("{OVERLAYROOT}30 22 179:3 / /var/lib/nightlight rw - ext4 /dev/mmcblk0p3 rw\n");
        assert_eq!(classify(&text, Path::new("/var/lib/nightlight/q")), Medium::Durable);
    }

    #[test]
    fn zram_and_ramfs_are_in_memory() {
        let text = "\
22 1 179:2 / / rw - ext4 /dev/mmcblk0p2 rw
40 22 254:0 / /var/log rw - ext4 /dev/zram1 rw
41 22 0:40 / /var/cache rw - ramfs ramfs rw
";
        assert!(!classify(text, Path::new("/var/log/q")).is_durable());
        assert!(!classify(text, Path::new("/var/cache/q")).is_durable());
        assert!(classify(text, Path::new("/var/lib/q")).is_durable());
    }

    #[test]
    fn the_last_of_two_mounts_on_one_point_wins_and_escapes_are_undone() {
        let text = "\
22 1 179:2 / / rw - ext4 /dev/mmcblk0p2 rw
50 22 0:50 / /my\\040data rw - ext4 /dev/sda1 rw
51 22 0:51 / /my\\040data rw - tmpfs tmpfs rw
";
        let m = classify(text, Path::new("/my data/q"));
        assert_eq!(m, Medium::Volatile { mount: "/my data".into(), why: "tmpfs".into() });
    }

    #[test]
    fn a_mount_point_that_only_shares_a_prefix_does_not_hold_the_directory() {
        let text = "\
22 1 179:2 / / rw - ext4 /dev/mmcblk0p2 rw
60 22 0:60 / /var/lib/night rw - tmpfs tmpfs rw
";
        assert!(classify(text, Path::new("/var/lib/nightlight")).is_durable());
    }

    #[test]
    fn this_machine_s_dev_shm_is_in_memory() {
        if Path::new("/dev/shm").is_dir() {
            assert!(!of_dir(Path::new("/dev/shm/nightlight-queue")).is_durable());
        }
    }
}
