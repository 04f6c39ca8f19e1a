//! Printing an error with its causes: `operation: cause: deeper cause`, each
//! cause once. Error messages in bosun name their operation and leave the
//! cause to `source()`; where an error becomes text inside the program (a
//! problem, a progress line, an event), [`Chain`] prints the whole chain.
//!
//! Formatting only: this module must not decide what an error means.

use std::error::Error;
use std::fmt;

/// Displays an error followed by each of its sources, joined by `: `; a
/// source whose text already ends the message before it is skipped.
pub struct Chain<'a>(pub &'a (dyn Error + 'a));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A cause some other library already put at the end of its own
        // message is not printed again.
        let mut last = self.0.to_string();
        f.write_str(&last)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            let text = c.to_string();
            if !last.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            last = text;
            cause = c.source();
        }
        Ok(())
    }
}

/// The error and its causes as one line (see [`Chain`]).
pub fn chain(e: &dyn Error) -> String {
    Chain(e).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading the manifest")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn each_cause_is_printed_once_in_order() {
        let e = Outer(std::io::Error::other("disk on fire"));
        assert_eq!(chain(&e), "reading the manifest: disk on fire");
        let plain = std::io::Error::other("alone");
        assert_eq!(Chain(&plain).to_string(), "alone");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("wrapped: {0}")]
    struct Chatty(#[source] std::io::Error);

    #[test]
    fn a_cause_already_at_the_end_of_the_message_is_not_repeated() {
        let e = Chatty(std::io::Error::other("gone"));
        assert_eq!(chain(&e), "wrapped: gone");
    }
}
