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
//! - [`supervisor`]: starts, restarts (with backoff) and stops job processes.
//!
//! The agent must never call the CPI or the director; it answers. It keeps
//! only what the applied spec names, and trusts no blob it has not verified.

pub mod agent;
pub mod blobs;
pub mod client;
pub mod keys;
pub mod protocol;
pub mod server;
pub mod supervisor;

/// An error and its causes on one line (`what: cause: cause`), for the few
/// places that must turn an error into text: the failures the agent sends
/// the director, which crosses the wire as a message.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_error_chain_names_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("starting job web")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("disk full"));
        assert_eq!(super::error_chain(&e), "starting job web: disk full");
    }
}
