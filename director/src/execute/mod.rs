//! The execute floor: carrying out decisions through CPIs and agents,
//! recording each step. `executor` holds the VM, disk, drain and watch
//! primitives; `run` is one attempt at a `Plan`; `compiler` compiles
//! packages on compilation VMs; `repair` fences, recreates and reattaches
//! one instance for the health monitor and cloud-check.
//!
//! This floor must not decide what should change (the planner and the
//! health floor do), nor print.

pub mod compiler;
pub mod executor;
pub mod repair;
pub mod run;

pub use executor::{Cpis, ExecOptions, Progress};
