//! The bosun agent: the process that runs on every VM, serves the director
//! over SSH, lays down what the director asks for, supervises job processes
//! and reports their health. Also the director's side of the wire: the typed
//! client and the protocol types.
//!
//! Layout:
//! - [`protocol`]: the wire types (actions, apply spec, state).
//! - [`keys`]: ed25519 key generation and OpenSSH encoding, shared with the director.
//! - [`blobs`]: the agent's content-addressed blob store (sha256-verified).
//! - [`server`]: the russh SSH server (director key auth only, host key from
//!   settings), RPC subsystem and blob channels, dispatching to an [`server::ActionHandler`].
//! - [`client`]: the director's typed client (pins the host key).
//! - [`agent`]: the action handler: apply, start/stop, drain, scripts,
//!   compilation, logs, disk mounts.
//! - [`monit`]: reads a job's rendered `monit` file into the processes to run.
//! - [`supervisor`]: starts, restarts (with backoff) and stops job processes
//!   (bpm processes directly, monit ctl programs through their pidfiles).
//!
//! The agent must never call the CPI or the director; it answers. It keeps
//! only what the applied spec names, and trusts no blob it has not verified.

pub mod agent;
pub mod blobs;
pub mod client;
pub mod keys;
pub mod monit;
pub mod protocol;
pub mod server;
pub mod settings_source;
pub mod supervisor;
