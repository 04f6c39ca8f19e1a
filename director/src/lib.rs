//! The director: everything between an operator's manifest and converged
//! machines. It reads manifests, cloud-configs and releases, validates them,
//! compiles packages, renders templates, computes desired state, plans the
//! difference to the recorded state (pure), executes the plan through a CPI
//! and the agents, and records every step in its state store.
//!
//! One floor per stage of the data flow, top to bottom (a module imports
//! only from its own floor or the floors below it):
//! - [`ops`]: the operator operations (`Director`: deploy as prepare and
//!   apply, uploads, errands, instances, clean-up).
//! - [`health`]: the health monitor and resurrector, cloud-check.
//! - [`execute`]: carrying out a plan, compiling packages, repairs.
//! - [`plan`]: validation against the cloud-config, addon placement,
//!   desired state, IP allocation, the planner, manifest diffs (no IO).
//! - [`store`]: the records, the SQLite state store and locks, secrets.
//! - [`templates`], [`interpolate`]: rendering job templates, `bosh
//!   interpolate` (ops files, variables, generated values).
//! - [`release`], [`stemcell`], [`archive_limits`]: release directories and
//!   tarballs, stemcell tarballs, and how much one tarball may unpack.
//! - [`model`]: typed, validated operator input (YAML with lines, problems,
//!   manifest, cloud-config, runtime-config, names).
//!
//! The director must see CPIs only through `bosun_cpi::Cpi`, and agents only
//! through `bosun_agent::client`. It never prints: progress goes to an
//! event sink the CLI supplies.

pub mod archive_limits;
pub(crate) mod execute;
pub(crate) mod health;
pub mod interpolate;
pub mod model;
pub(crate) mod ops;
pub(crate) mod plan;
pub mod release;
pub mod stemcell;
pub(crate) mod store;
pub(crate) mod templates;
#[cfg(test)]
mod test_alloc;

// The face the CLI uses: operations, their options and outcomes, and the
// records and events it shows.
pub use execute::executor::Executor;
pub use execute::repair::StateChange;
pub use execute::{Cpis, ExecOptions, Progress};
pub use health::cloudcheck::{CheckProblem, Resolution, Scan};
pub use health::monitor::Monitor;
pub use ops::{
    host_os, CleanUpPlan, CommandRun, DeployOptions, DeployOutcome, Director, ErrandOptions,
    ErrandRun, InstanceInfo, LineSink, OpError, Prepared, ProcessInfo, Report,
};
pub use plan::diff::{DiffLine, DiffTag};
pub use plan::validate::validate_manifest;
pub use plan::Plan;
pub use store::{now, Event, OrphanDisk, StateError, Store, TaskRecord};
