//! Limits on what reading one release or stemcell tarball may unpack: the
//! expanded size (every byte that comes out of a decompressor or a tar
//! stream, nested archives included) and the number of tar entries (nested
//! archives' entries included).
//!
//! This module owns the limits' defaults, the one place where they are read
//! from the environment ([`ArchiveLimits::from_env`]), and the meter the
//! archive readers charge as they stream ([`Budget`], [`Metered`]). It must
//! not read archives itself or know their formats: the readers in `release`
//! and `stemcell` decide what to keep, this module only says when to stop.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::io::{self, Read};

/// Environment variable overriding [`DEFAULT_MAX_SIZE`] (bytes; suffixes
/// `K`, `M`, `G`, `T` are powers of 1024).
pub const MAX_SIZE_VAR: &str = "BOSUN_MAX_ARCHIVE_SIZE";

/// Environment variable overriding [`DEFAULT_MAX_ENTRIES`].
pub const MAX_ENTRIES_VAR: &str = "BOSUN_MAX_ARCHIVE_ENTRIES";

/// 20 GiB: several times the largest real stemcell or release, nested
/// archives counted twice (once compressed inside the outer tarball, once
/// expanded).
pub const DEFAULT_MAX_SIZE: u64 = 20 << 30;

/// 200 000 entries: real releases have tens of thousands at most.
pub const DEFAULT_MAX_ENTRIES: u64 = 200_000;

/// Most bytes the tar reader may take to step from one entry to the next
/// beyond what is left of the previous entry: the next header plus its
/// long name and extended attributes, which the tar reader holds in
/// memory. Not configurable: real ones are a few KiB.
pub const MAX_HEADER_BYTES: u64 = 1 << 20;

/// How much one archive read may unpack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArchiveLimits {
    /// Expanded bytes, nested archives included.
    pub max_size: u64,
    /// Tar entries, nested archives' included.
    pub max_entries: u64,
}

impl Default for ArchiveLimits {
    fn default() -> Self {
        ArchiveLimits {
            max_size: DEFAULT_MAX_SIZE,
            max_entries: DEFAULT_MAX_ENTRIES,
        }
    }
}

/// A limit that was exceeded, or a setting that could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("reading the archive limits: {var}={value:?} is not {expected}")]
    BadSetting {
        var: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error(
        "expands to more than {} ({limit} bytes), the limit on an archive's expanded size; \
         if the archive is genuine, raise the limit with {MAX_SIZE_VAR} (e.g. {MAX_SIZE_VAR}={})",
        human(*limit),
        suggest_size(*limit)
    )]
    TooLarge { limit: u64 },
    #[error(
        "has more than {limit} entries, the limit on an archive's entry count; \
         if the archive is genuine, raise the limit with {MAX_ENTRIES_VAR} (e.g. {MAX_ENTRIES_VAR}={})",
        limit.saturating_mul(4)
    )]
    TooManyEntries { limit: u64 },
    #[error(
        "has an entry header (long name or extended attributes) of more than {}, \
         which no genuine archive has",
        human(*limit)
    )]
    HeaderTooLarge { limit: u64 },
}

impl ArchiveLimits {
    /// The defaults, overridden by [`MAX_SIZE_VAR`] and [`MAX_ENTRIES_VAR`]
    /// when set. A value that does not parse is an error (never ignored).
    pub fn from_env() -> Result<Self, LimitError> {
        let var = |name: &'static str| -> Result<Option<String>, LimitError> {
            match std::env::var(name) {
                Ok(v) => Ok(Some(v)),
                Err(std::env::VarError::NotPresent) => Ok(None),
                Err(std::env::VarError::NotUnicode(v)) => Err(LimitError::BadSetting {
                    var: name,
                    value: v.to_string_lossy().into_owned(),
                    expected: "valid UTF-8",
                }),
            }
        };
        Self::from_settings(
            var(MAX_SIZE_VAR)?.as_deref(),
            var(MAX_ENTRIES_VAR)?.as_deref(),
        )
    }

    /// The defaults, overridden by the given settings (as the environment
    /// variables spell them).
    pub fn from_settings(size: Option<&str>, entries: Option<&str>) -> Result<Self, LimitError> {
        let mut limits = ArchiveLimits::default();
        if let Some(v) = size {
            limits.max_size = parse_size(v).ok_or_else(|| LimitError::BadSetting {
                var: MAX_SIZE_VAR,
                value: v.to_string(),
                expected: "a positive size in bytes (e.g. 1073741824, 512M, 20G)",
            })?;
        }
        if let Some(v) = entries {
            limits.max_entries =
                v.trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| LimitError::BadSetting {
                        var: MAX_ENTRIES_VAR,
                        value: v.to_string(),
                        expected: "a positive whole number",
                    })?;
        }
        Ok(limits)
    }
}

/// `1048576`, `512K`, `20G`, `1.5T`, `2GiB`, `3gb` (powers of 1024). Zero
/// and overflow are refused.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return None,
    };
    let bytes = if number.contains('.') {
        let value: f64 = number.parse().ok()?;
        let bytes = value * (1u64 << shift) as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return None;
        }
        bytes as u64
    } else {
        number.parse::<u64>().ok()?.checked_mul(1u64 << shift)?
    };
    (bytes > 0).then_some(bytes)
}

/// `20 GiB`, `1.5 MiB`, `512 bytes`.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    let text = format!("{value:.1}");
    format!("{} {}", text.trim_end_matches(".0"), UNITS[unit])
}

/// Four times `limit`, rounded up to whole GiB (or MiB below 1 GiB).
fn suggest_size(limit: u64) -> String {
    let four = limit.saturating_mul(4);
    if four >= 1 << 30 {
        format!("{}G", four.div_ceil(1 << 30))
    } else {
        format!("{}M", four.div_ceil(1 << 20))
    }
}

/// What one archive read has unpacked so far, against its limits. Shared
/// (by reference) by the reader of an archive and of the archives nested in
/// it; once a limit is hit every further charge fails.
#[derive(Debug)]
pub struct Budget {
    limits: ArchiveLimits,
    bytes: Cell<u64>,
    entries: Cell<u64>,
    /// While the tar reader steps to the next entry: how many more bytes it
    /// may read.
    stepping: Cell<Option<u64>>,
    exceeded: RefCell<Option<LimitError>>,
}

impl Budget {
    pub fn new(limits: ArchiveLimits) -> Self {
        Budget {
            limits,
            bytes: Cell::new(0),
            entries: Cell::new(0),
            stepping: Cell::new(None),
            exceeded: RefCell::new(None),
        }
    }

    pub fn limits(&self) -> ArchiveLimits {
        self.limits
    }

    /// Expanded bytes charged so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.get()
    }

    /// The limit that was exceeded, if one was. Readers check this first
    /// when anything fails: a decompressor or tar error caused by the
    /// meter stopping the stream is really this.
    pub fn exceeded(&self) -> Option<LimitError> {
        self.exceeded.borrow().clone()
    }

    fn fail(&self, e: LimitError) -> LimitError {
        *self.exceeded.borrow_mut() = Some(e.clone());
        e
    }

    /// One more tar entry.
    pub fn charge_entry(&self) -> Result<(), LimitError> {
        if let Some(e) = self.exceeded() {
            return Err(e);
        }
        let n = self.entries.get() + 1;
        self.entries.set(n);
        if n > self.limits.max_entries {
            return Err(self.fail(LimitError::TooManyEntries {
                limit: self.limits.max_entries,
            }));
        }
        Ok(())
    }

    /// Runs `next`, the tar reader's step to its next entry, allowing it to
    /// read `rest_of_previous` bytes (what is left of the previous entry,
    /// padding included) plus [`MAX_HEADER_BYTES`]. Past that, reads fail
    /// with [`LimitError::HeaderTooLarge`]: a huge long name is refused
    /// before the tar reader holds it in memory.
    pub fn step<T>(&self, rest_of_previous: u64, next: impl FnOnce() -> T) -> T {
        self.stepping
            .set(Some(rest_of_previous.saturating_add(MAX_HEADER_BYTES)));
        let out = next();
        self.stepping.set(None);
        out
    }

    /// `n` more expanded bytes.
    pub fn charge_bytes(&self, n: u64) -> Result<(), LimitError> {
        if let Some(e) = self.exceeded() {
            return Err(e);
        }
        if let Some(left) = self.stepping.get() {
            if n > left {
                return Err(self.fail(LimitError::HeaderTooLarge {
                    limit: MAX_HEADER_BYTES,
                }));
            }
            self.stepping.set(Some(left - n));
        }
        let total = self.bytes.get().saturating_add(n);
        self.bytes.set(total);
        if total > self.limits.max_size {
            return Err(self.fail(LimitError::TooLarge {
                limit: self.limits.max_size,
            }));
        }
        Ok(())
    }

    /// Fails now if an entry that declares `size` bytes would take the
    /// expanded size past the limit (so a huge entry is refused before any
    /// of it is read). Charges nothing: the bytes are charged as they are
    /// read.
    pub fn check_declared(&self, size: u64) -> Result<(), LimitError> {
        if self.bytes.get().saturating_add(size) > self.limits.max_size {
            return Err(self.fail(LimitError::TooLarge {
                limit: self.limits.max_size,
            }));
        }
        Ok(())
    }
}

/// A reader that charges every byte it yields to a [`Budget`] and fails
/// once the budget is exceeded. Put it right after the decompressor (or
/// the file, for a plain tar) so that everything the tar reader sees,
/// including entries it skips, is counted.
pub struct Metered<'b, R> {
    inner: R,
    budget: &'b Budget,
}

impl<'b, R: Read> Metered<'b, R> {
    pub fn new(inner: R, budget: &'b Budget) -> Self {
        Metered { inner, budget }
    }
}

impl<R> fmt::Debug for Metered<'_, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metered")
            .field("budget", self.budget)
            .finish_non_exhaustive()
    }
}

impl<R: Read> Read for Metered<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(e) = self.budget.exceeded() {
            return Err(io::Error::other(e));
        }
        let n = self.inner.read(buf)?;
        self.budget
            .charge_bytes(n as u64)
            .map_err(io::Error::other)?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        assert_eq!(parse_size("512K"), Some(512 << 10));
        assert_eq!(parse_size(" 20G "), Some(20 << 30));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("3mb"), Some(3 << 20));
        assert_eq!(parse_size("1.5T"), Some(3 << 39));
        for bad in ["", "0", "G", "12X", "-1", "1e9", "99999999999T"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }

    #[test]
    fn settings_override_defaults_and_bad_values_are_errors() {
        assert_eq!(
            ArchiveLimits::from_settings(None, None).unwrap(),
            ArchiveLimits::default()
        );
        let l = ArchiveLimits::from_settings(Some("1M"), Some("10")).unwrap();
        assert_eq!((l.max_size, l.max_entries), (1 << 20, 10));
        let e = ArchiveLimits::from_settings(Some("lots"), None).unwrap_err();
        assert!(
            e.to_string().contains("BOSUN_MAX_ARCHIVE_SIZE=\"lots\""),
            "{e}"
        );
        let e = ArchiveLimits::from_settings(None, Some("0")).unwrap_err();
        assert!(e.to_string().contains("BOSUN_MAX_ARCHIVE_ENTRIES"), "{e}");
    }

    #[test]
    fn the_meter_stops_at_the_limit_and_says_how_to_raise_it() {
        let budget = Budget::new(ArchiveLimits {
            max_size: 1000,
            max_entries: 2,
        });
        let mut r = Metered::new(io::repeat(0).take(5000), &budget);
        let err = io::copy(&mut r, &mut io::sink()).unwrap_err();
        let limit = budget.exceeded().unwrap();
        assert_eq!(limit, LimitError::TooLarge { limit: 1000 });
        assert!(err.to_string().contains("1000 bytes"), "{err}");
        let msg = limit.to_string();
        assert!(msg.contains("BOSUN_MAX_ARCHIVE_SIZE=1M"), "{msg}");
        assert!(budget.bytes() <= 1000 + 8192, "stops within one read");

        let budget = Budget::new(ArchiveLimits {
            max_size: 1000,
            max_entries: 2,
        });
        assert!(budget.charge_entry().is_ok() && budget.charge_entry().is_ok());
        let e = budget.charge_entry().unwrap_err();
        assert!(e.to_string().contains("more than 2 entries"), "{e}");
        assert!(e.to_string().contains("BOSUN_MAX_ARCHIVE_ENTRIES=8"), "{e}");
        assert!(
            budget.check_declared(10).is_ok(),
            "entries and bytes are separate"
        );
        assert!(budget.charge_bytes(1).is_err(), "but once exceeded, always");
    }

    #[test]
    fn stepping_to_the_next_entry_reads_little() {
        let budget = Budget::new(ArchiveLimits::default());
        let mut r = Metered::new(io::repeat(0).take(8 << 20), &budget);
        let mut buf = vec![0u8; 64 << 10];
        // Skipping 2 MiB of the previous entry plus headers: fine.
        budget
            .step(2 << 20, || {
                for _ in 0..(3 << 20) / buf.len() {
                    r.read_exact(&mut buf)?;
                }
                io::Result::Ok(())
            })
            .unwrap();
        // Outside a step, reads are only charged.
        r.read_exact(&mut buf).unwrap();
        let err = budget
            .step(0, || io::copy(&mut r, &mut io::sink()))
            .unwrap_err();
        assert!(err.to_string().contains("entry header"), "{err}");
        assert_eq!(
            budget.exceeded(),
            Some(LimitError::HeaderTooLarge {
                limit: MAX_HEADER_BYTES
            })
        );
    }

    #[test]
    fn declared_sizes_are_checked_before_reading() {
        let budget = Budget::new(ArchiveLimits {
            max_size: 100,
            max_entries: 10,
        });
        budget.charge_bytes(60).unwrap();
        assert!(budget.check_declared(40).is_ok());
        assert!(budget.check_declared(41).is_err());
        assert_eq!(human(20 << 30), "20 GiB");
        assert_eq!(human(1536), "1.5 KiB");
    }
}
