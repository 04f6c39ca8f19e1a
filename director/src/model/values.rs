//! The small typed values of a manifest (`update` durations and
//! percentages, restart policies, VM strategies, lifecycles): parsing from
//! text and printing back.
//!
//! Values only: this module must not know where in a manifest a value
//! sits (the decoders report the path).

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// How the resurrector replaces a VM that went silent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RestartPolicy {
    /// Fence first: the old VM is deleted and the CPI must confirm it gone
    /// before its persistent disk moves to the replacement.
    Consistent,
    /// Replace at once: the old VM is deleted without waiting for the
    /// CPI's confirmation (and the replacement proceeds if that fails).
    Available,
}

/// A duration as the manifest writes it: seconds (`5`, `0.5`) or with a
/// unit (`500ms`, `5s`, `2m`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seconds(pub std::time::Duration);

impl FromStr for Seconds {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        let t = s.trim();
        let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
            (n, 0.001)
        } else if let Some(n) = t.strip_suffix('s') {
            (n, 1.0)
        } else if let Some(n) = t.strip_suffix('m') {
            (n, 60.0)
        } else {
            (t, 1.0)
        };
        match num.trim().parse::<f64>() {
            Ok(v) if v.is_finite() && v >= 0.0 && v * scale < 1e9 => {
                Ok(Seconds(std::time::Duration::from_secs_f64(v * scale)))
            }
            _ => Err(ValueError::Duration(s.to_string())),
        }
    }
}

impl FromStr for RestartPolicy {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        match s {
            "consistent" => Ok(RestartPolicy::Consistent),
            "available" => Ok(RestartPolicy::Available),
            _ => Err(ValueError::RestartPolicy(s.to_string())),
        }
    }
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RestartPolicy::Consistent => "consistent",
            RestartPolicy::Available => "available",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Lifecycle {
    Service,
    Errand,
}

/// `max_in_flight`: a count (`2`) or a percentage of the group (`"25%"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MaxInFlight {
    Count(u32),
    Percent(u32),
}

/// A watch time in ms: `5000` (min = max) or `"1000-30000"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct WatchTime {
    pub min_ms: u64,
    pub max_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmStrategy {
    DeleteCreate,
    CreateSwapDelete,
}

/// A malformed value in a manifest field (the text form of update settings,
/// lifecycle, ...). Parsing collects these as [`Problems`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("expected a positive number or a percentage like '25%', found '{0}'")]
    MaxInFlight(String),
    #[error("expected milliseconds like 5000 or a range like '1000-30000', found '{0}'")]
    WatchTime(String),
    #[error("watch time range '{0}' has its minimum above its maximum")]
    WatchTimeOrder(String),
    #[error("expected 'delete-create' or 'create-swap-delete', found '{0}'")]
    VmStrategy(String),
    #[error("expected 'service' or 'errand', found '{0}'")]
    Lifecycle(String),
    #[error("expected seconds like 5 or 0.5, or a duration like '500ms', '5s', '2m', found '{0}'")]
    Duration(String),
    #[error("expected 'consistent' or 'available', found '{0}'")]
    RestartPolicy(String),
    #[error("expected a percentage from 0 to 100, found '{0}'")]
    Percent(String),
}

impl MaxInFlight {
    /// How many of `instances` may be updated at once: percentages round up;
    /// never more than `instances`, never less than 1.
    pub fn resolve(&self, instances: u32) -> u32 {
        let n = match *self {
            MaxInFlight::Count(n) => n,
            MaxInFlight::Percent(p) => {
                let v = (u64::from(instances) * u64::from(p)).div_ceil(100);
                u32::try_from(v).unwrap_or(u32::MAX)
            }
        };
        n.min(instances).max(1)
    }
}

impl FromStr for MaxInFlight {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        let t = s.trim();
        let err = || ValueError::MaxInFlight(s.to_string());
        if let Some(p) = t.strip_suffix('%') {
            let p: u32 = p.trim().parse().map_err(|_| err())?;
            if p == 0 || p > 100 {
                return Err(err());
            }
            Ok(MaxInFlight::Percent(p))
        } else {
            let n: u32 = t.parse().map_err(|_| err())?;
            if n == 0 {
                return Err(err());
            }
            Ok(MaxInFlight::Count(n))
        }
    }
}

impl fmt::Display for MaxInFlight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaxInFlight::Count(n) => write!(f, "{n}"),
            MaxInFlight::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl FromStr for WatchTime {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        let err = || ValueError::WatchTime(s.to_string());
        let num = |t: &str| t.trim().parse::<u64>().map_err(|_| err());
        let (min_ms, max_ms) = match s.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => {
                let v = num(s)?;
                (v, v)
            }
        };
        if min_ms > max_ms {
            return Err(ValueError::WatchTimeOrder(s.to_string()));
        }
        Ok(WatchTime { min_ms, max_ms })
    }
}

impl fmt::Display for WatchTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min_ms == self.max_ms {
            write!(f, "{}", self.min_ms)
        } else {
            write!(f, "{}-{}", self.min_ms, self.max_ms)
        }
    }
}

impl FromStr for VmStrategy {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        match s {
            "delete-create" => Ok(VmStrategy::DeleteCreate),
            "create-swap-delete" => Ok(VmStrategy::CreateSwapDelete),
            _ => Err(ValueError::VmStrategy(s.to_string())),
        }
    }
}

impl fmt::Display for VmStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmStrategy::DeleteCreate => "delete-create",
            VmStrategy::CreateSwapDelete => "create-swap-delete",
        })
    }
}

impl FromStr for Lifecycle {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        match s {
            "service" => Ok(Lifecycle::Service),
            "errand" => Ok(Lifecycle::Errand),
            _ => Err(ValueError::Lifecycle(s.to_string())),
        }
    }
}

impl fmt::Display for Lifecycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Lifecycle::Service => "service",
            Lifecycle::Errand => "errand",
        })
    }
}
