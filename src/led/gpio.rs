//! The LED on a GPIO pin of the 40-pin header, through the kernel's GPIO character device (uAPI
//! v2, the interface libgpiod and gpiozero's lgpio use), with `gpiocdev`.
//!
//! Rules:
//! - The header's chip is found by its **label**, never by its number: Raspberry Pi kernels keep
//!   renumbering the chips (the Pi 5's RP1 chip was `gpiochip4`, then `gpiochip0`, and on some
//!   2026 kernels there is no `gpiochip0` at all). Every `/dev/gpiochip*` is looked at; a gap in
//!   the numbering is not an error.
//! - `led.pin` is a BCM number, which is the line's offset on that chip on every Pi.
//! - The line is requested as an output with the consumer `nightlight`, so `gpioinfo` shows who
//!   holds it; `active_low` is the kernel's flag, so `gpioinfo` shows that too. The request is
//!   released when the LED is dropped, LED off first.
//! - A missing chip, a permission problem and a pin held by another process each get a message
//!   that says what to do (docs/hardware.md, "Troubleshooting").

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use gpiocdev::line::Value;
use gpiocdev::request::Request;

use super::Led;

/// The labels of the chip that drives the 40-pin header: Pi 5 (RP1), Pi 4, Pi 1-3 and Zero.
pub const HEADER_LABELS: [&str; 3] = ["pinctrl-rp1", "pinctrl-bcm2711", "pinctrl-bcm2835"];

/// The consumer name a line request carries (`gpioinfo` shows it).
pub const CONSUMER: &str = "nightlight";

/// What opening one `/dev/gpiochip*` told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Opened; its label.
    Label(String),
    /// Opening it was refused (EACCES or EPERM).
    Denied,
    /// Any other error, as text.
    Failed(String),
}

/// Why no header chip was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoHeaderChip {
    /// No `/dev/gpiochip*` at all.
    NoChips,
    /// Some chips could not be opened for lack of permission, and none that could is the header's.
    Denied(Vec<PathBuf>),
    /// Every chip was looked at; none has a header label. The labels seen, for the message.
    NotFound(Vec<(PathBuf, String)>),
}

/// Picks the header's chip from what was seen, in path order: the first chip whose label is one
/// of [`HEADER_LABELS`]. Pure, so every layout can be tested without a kernel.
///
/// # Errors
/// [`NoHeaderChip`] says why none was chosen.
pub fn pick_header_chip(seen: &[(PathBuf, Seen)]) -> Result<(PathBuf, String), NoHeaderChip> {
    if seen.is_empty() {
        return Err(NoHeaderChip::NoChips);
    }
    for (path, s) in seen {
        if let Seen::Label(label) = s {
            if HEADER_LABELS.contains(&label.as_str()) {
                return Ok((path.clone(), label.clone()));
            }
        }
    }
    let denied: Vec<PathBuf> = seen.iter().filter(|(_, s)| *s == Seen::Denied).map(|(p, _)| p.clone()).collect();
    if !denied.is_empty() {
        return Err(NoHeaderChip::Denied(denied));
    }
    Err(NoHeaderChip::NotFound(
        seen.iter()
            .map(|(p, s)| {
                let what = match s {
                    Seen::Label(l) => l.clone(),
                    Seen::Denied => "permission denied".into(),
                    Seen::Failed(e) => e.clone(),
                };
                (p.clone(), what)
            })
            .collect(),
    ))
}

/// The message for a chip that was not found: what to do about it.
pub fn describe(e: &NoHeaderChip) -> String {
    let wanted = HEADER_LABELS.join(", ");
    match e {
        NoHeaderChip::NoChips => format!(
            "GPIO: no /dev/gpiochip* on this machine: this is not a Raspberry Pi with the GPIO character device (kernel 4.8+); use led.kind = \"virtual\" elsewhere (wanted a chip labelled {wanted})"
        ),
        NoHeaderChip::Denied(paths) => format!(
            "GPIO {}: permission denied: add the user to the `gpio` group (`sudo adduser $USER gpio`) and log in again; the service user gets it from the package where the group exists",
            paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ),
        NoHeaderChip::NotFound(seen) => format!(
            "GPIO: no chip labelled {wanted} (the 40-pin header of a Pi 1-5); found {}: use led.kind = \"virtual\" on other boards",
            seen.iter().map(|(p, l)| format!("{} ({l})", p.display())).collect::<Vec<_>>().join(", ")
        ),
    }
}

fn errno(e: &gpiocdev::Error) -> Option<i32> {
    match e {
        gpiocdev::Error::Os(errno) | gpiocdev::Error::Uapi(_, gpiocdev_uapi::Error::Os(errno)) => Some(errno.0),
        _ => None,
    }
}

fn is_denied(e: &gpiocdev::Error) -> bool {
    matches!(errno(e), Some(libc::EACCES | libc::EPERM))
}

/// Looks at every `/dev/gpiochip*` (gpiocdev lists them sorted by number, gaps and all).
fn survey() -> Vec<(PathBuf, Seen)> {
    gpiocdev::chip::chips()
        .unwrap_or_default()
        .into_iter()
        .map(|path| {
            let seen = match gpiocdev::Chip::from_path(&path).and_then(|c| c.info()) {
                Ok(info) => Seen::Label(info.label),
                Err(e) if is_denied(&e) => Seen::Denied,
                Err(e) => Seen::Failed(e.to_string()),
            };
            (path, seen)
        })
        .collect()
}

/// An LED on a GPIO output; off when dropped (a clean stop), and the line released.
pub struct GpioLed {
    req: Request,
    line: u32,
    on: bool,
    failing: bool,
}

impl GpioLed {
    /// Finds the header's chip, claims BCM line `pin` as an output, LED off.
    ///
    /// # Errors
    /// No header chip, no permission, a pin the chip does not have, or a pin held by another
    /// process; each message says what to do.
    pub fn open(pin: u8, active_low: bool) -> anyhow::Result<Self> {
        let (path, label) = pick_header_chip(&survey()).map_err(|e| anyhow!(describe(&e)))?;
        Self::open_on(&path, &label, pin, active_low)
    }

    fn open_on(path: &Path, label: &str, pin: u8, active_low: bool) -> anyhow::Result<Self> {
        let where_ = format!("GPIO BCM {pin} on {} ({label})", path.display());
        let chip = gpiocdev::Chip::from_path(path).map_err(|e| anyhow!("{where_}: {e}"))?;
        let lines = chip.info().map_err(|e| anyhow!("{where_}: {e}"))?.num_lines;
        if u32::from(pin) >= lines {
            return Err(anyhow!(
                "{where_}: the chip has lines 0-{}: led.pin is a BCM number (the lesson's LED is on 5)",
                lines.saturating_sub(1)
            ));
        }
        let line = u32::from(pin);
        let mut builder = Request::builder();
        builder.on_chip(path).with_consumer(CONSUMER).with_line(line).as_output(Value::Inactive);
        if active_low {
            builder.as_active_low();
        }
        let req = builder.request().map_err(|e| match errno(&e) {
            Some(libc::EBUSY) => {
                let holder = chip
                    .line_info(line)
                    .ok()
                    .map(|i| i.consumer)
                    .filter(|c| !c.is_empty())
                    .map_or_else(|| "another process or a kernel driver".to_string(), |c| format!("`{c}`"));
                anyhow!(
                    "{where_}: the line is held by {holder} (`gpioinfo` shows who): stop it, or wire the LED to another pin and set led.pin"
                )
            }
            Some(libc::EACCES | libc::EPERM) => anyhow!(
                "{where_}: permission denied: add the user to the `gpio` group (`sudo adduser $USER gpio`) and log in again"
            ),
            _ => anyhow!("{where_}: {e}"),
        })?;
        tracing::info!(chip = %path.display(), label, line, active_low, "LED on the header's GPIO chip");
        let mut led = GpioLed { req, line, on: true, failing: false };
        led.set(false);
        Ok(led)
    }
}

impl Led for GpioLed {
    fn set(&mut self, on: bool) -> bool {
        let changed = on != self.on;
        self.on = on;
        let value = if on { Value::Active } else { Value::Inactive };
        match self.req.set_value(self.line, value) {
            Ok(()) => self.failing = false,
            Err(e) => {
                // Logged once per run of failures; the state is still the commanded one, and the
                // next command tries again.
                if !self.failing {
                    tracing::warn!(line = self.line, error = %e, "cannot drive the LED's GPIO line");
                }
                self.failing = true;
            }
        }
        changed
    }

    fn is_on(&self) -> bool {
        self.on
    }
}

impl Drop for GpioLed {
    fn drop(&mut self) {
        self.set(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chip(n: u32, seen: Seen) -> (PathBuf, Seen) {
        (PathBuf::from(format!("/dev/gpiochip{n}")), seen)
    }
    fn label(l: &str) -> Seen {
        Seen::Label(l.into())
    }

    #[test]
    fn a_pi_4_uses_gpiochip0_by_its_label() {
        let seen = [chip(0, label("pinctrl-bcm2711")), chip(1, label("raspberrypi-exp-gpio"))];
        assert_eq!(pick_header_chip(&seen).unwrap(), ("/dev/gpiochip0".into(), "pinctrl-bcm2711".into()));
    }

    #[test]
    fn a_pi_5_of_2024_finds_rp1_before_the_soc_chips_from_10() {
        let seen = [
            chip(0, label("pinctrl-rp1")),
            chip(10, label("gpio-brcmstb@107d508500")),
            chip(11, label("gpio-brcmstb@107d508520")),
        ];
        assert_eq!(pick_header_chip(&seen).unwrap().0, PathBuf::from("/dev/gpiochip0"));
    }

    #[test]
    fn a_pi_5_of_2026_with_no_gpiochip0_finds_rp1_among_11_to_15() {
        let seen = [
            chip(11, label("gpio-brcmstb@107d508500")),
            chip(12, label("gpio-brcmstb@107d508520")),
            chip(13, label("pinctrl-rp1")),
            chip(14, label("gpio-brcmstb@107d517c00")),
            chip(15, label("gpio-brcmstb@107d517c20")),
        ];
        assert_eq!(pick_header_chip(&seen).unwrap(), ("/dev/gpiochip13".into(), "pinctrl-rp1".into()));
    }

    #[test]
    fn a_chip_that_cannot_be_opened_does_not_stop_the_search() {
        let seen = [chip(0, Seen::Failed("No such device".into())), chip(4, label("pinctrl-bcm2835"))];
        assert_eq!(pick_header_chip(&seen).unwrap().1, "pinctrl-bcm2835");
    }

    #[test]
    fn no_chips_at_all_says_this_is_not_a_pi() {
        let e = pick_header_chip(&[]).unwrap_err();
        assert_eq!(e, NoHeaderChip::NoChips);
        assert!(describe(&e).contains("led.kind = \"virtual\""));
    }

    #[test]
    fn chips_refused_for_permission_ask_for_the_gpio_group() {
        let seen = [chip(0, Seen::Denied), chip(1, label("raspberrypi-exp-gpio"))];
        let e = pick_header_chip(&seen).unwrap_err();
        assert_eq!(e, NoHeaderChip::Denied(vec!["/dev/gpiochip0".into()]));
        assert!(describe(&e).contains("`gpio` group"), "{}", describe(&e));
    }

    #[test]
    fn other_boards_are_told_which_labels_were_found() {
        let seen = [chip(0, label("9030000.pl061"))];
        let text = describe(&pick_header_chip(&seen).unwrap_err());
        assert!(text.contains("/dev/gpiochip0 (9030000.pl061)"), "{text}");
        assert!(text.contains("pinctrl-rp1"), "{text}");
    }
}
