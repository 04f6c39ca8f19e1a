//! The store floor: what the director remembers. `records` is the shared
//! vocabulary (plain data the planner, executor, monitor and cloud-check
//! use); `state` is the SQLite engine, blobs and locks that keep them;
//! `secrets` seals generated variable values at rest.
//!
//! This floor must not plan, call CPIs or agents: it stores what it is told.

pub mod records;
pub mod secrets;
pub mod state;

pub use records::*;
pub use state::{DeploymentLock, StateError, Store};
