//! The plan floor: from typed input to a `Plan` value, with no side
//! effects. `validate` checks a manifest against a cloud-config, `addons`
//! places addons, `desired` resolves releases, links and properties into
//! desired state, `ipam` allocates addresses, `planner` compares desired
//! with recorded state, and `diff` shows manifest changes line by line.
//!
//! This floor must not call CPIs or agents, nor write the store: it reads
//! records it is given and returns values.

pub mod addons;
pub mod desired;
pub mod diff;
pub mod ipam;
pub mod planner;
pub mod validate;

pub use planner::Plan;
