//! The health floor: keeping deployments alive. `monitor` is the health
//! monitor and resurrector (it watches agents and decides repairs);
//! `cloudcheck` finds problems on request and applies the resolutions an
//! operator picks. Both carry repairs out through `execute::repair`.
//!
//! This floor must not plan deployments nor print.

pub mod cloudcheck;
pub mod monitor;
