//! The director: everything between an operator's manifest and converged
//! machines. It reads manifests, cloud-configs and releases, validates them,
//! compiles packages, renders templates, computes desired state, plans the
//! difference to the recorded state (pure), executes the plan through a CPI
//! and the agents, and records every step in its state store.
//!
//! Layout:
//! - [`problems`]: input problems with file, path and line.
//! - [`yaml`]: YAML parsed into a tree that knows each node's line.
//! - [`manifest`], [`cloud_config`]: typed, validated operator input.
//! - [`addons`]: the runtime-config and addon placement.
//! - [`ipam`]: IP address management (pure).
//! - [`names`]: the names operators give, checked before they become paths.
//! - [`release`]: BOSH-layout release directories and tarballs.
//! - [`archive_limits`]: how much reading one release or stemcell tarball may unpack.
//! - [`templates`]: Tera rendering with BOSH's template context.
//! - [`interpolate`]: `bosh interpolate`: ops files, variables, generated values.
//! - [`secrets`]: encryption at rest of generated variable values.
//! - [`state`]: the SQLite state store, blobs, the deployment lock.
//! - [`desired`]: manifest + cloud-config + releases -> desired state.
//! - [`diff`]: manifest line diffs shown before a deploy.
//! - [`planner`]: desired + recorded state -> a `Plan` value (no IO).
//! - [`executor`]: carries out a plan, one attempt, recording each step.
//! - [`compiler`]: package compilation on compilation VMs.
//! - [`stemcell`]: building and reading stemcell tarballs.
//! - [`repair`]: fencing, recreating and reattaching one instance.
//! - [`monitor`]: the health monitor and resurrector.
//! - [`cloudcheck`]: finding and resolving problems (`cloud-check`).
//! - [`ops`]: the operator operations (deploy, delete, instances, uploads).
//!
//! The director must see CPIs only through `bosun_cpi::Cpi`, and agents only
//! through `bosun_agent::client`. It never prints: progress goes to an
//! event sink the CLI supplies.

pub mod addons;
pub mod archive_limits;
pub mod cloud_config;
pub mod cloudcheck;
pub mod compiler;
pub mod desired;
pub mod diff;
pub mod executor;
pub mod interpolate;
pub mod ipam;
pub mod manifest;
pub mod monitor;
pub mod names;
pub mod ops;
pub mod planner;
pub mod problems;
pub mod release;
pub mod repair;
pub mod secrets;
pub mod state;
pub mod stemcell;
pub mod templates;
#[cfg(test)]
mod test_alloc;
pub mod yaml;
