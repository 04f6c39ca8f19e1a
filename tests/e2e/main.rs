//! End-to-end tests of the `bosun` binary on the local CPI: real agents in
//! their own namespaces, real compilation, real job processes on loopback.
//! One test binary (faster to link); each test gets its own state dir and
//! its own loopback subnet so tests can run in parallel.

mod support;
mod variables;
mod vars_store;

mod addons;
mod agent_hardening;
mod archive_limits;
mod aws;
mod bosh_releases;
mod cleanup;
mod compiled_releases;
mod cpi_conformance;
mod crash;
mod day2;
mod deploy;
mod docker;
mod external_cpi;
mod hardening;
mod health;
mod limits;
mod manifests;
mod partition;
mod release_dev;
mod releases;
