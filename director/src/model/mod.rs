//! The model floor: operator input as typed, validated values. YAML read
//! into a tree that knows each node's line (`yaml`), problems that name
//! file, path and line (`problems`), the manifest, cloud-config and
//! runtime-config (`manifest`, `cloud_config`, `addons`), the references and
//! small values they share (`refs`, `values`), the names that may become
//! paths (`names`) and JSON helpers (`json`).
//!
//! The lowest floor: it must not import any other director module, read
//! the store, or call CPIs or agents.

pub mod addons;
pub mod cloud_config;
pub mod json;
pub mod manifest;
pub mod names;
pub mod problems;
pub mod refs;
pub mod values;
pub mod yaml;
