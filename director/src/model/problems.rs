//! Problems found in operator input (manifests, cloud-configs, release
//! specs): each names the file, the path inside it and, where known, the
//! YAML line. Validation collects every problem before failing.

use std::collections::HashMap;
use std::fmt;

/// One problem in an input file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The file, as the operator named it.
    pub file: String,
    /// Path inside the document, e.g. `instance_groups[0].networks[0].static_ips[1]`
    /// (empty for the document itself).
    pub path: String,
    /// 1-based line, when the problem can be tied to one.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if self.path.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in one validation, in document order.
#[derive(Clone, Debug, Default, PartialEq, Eq, thiserror::Error)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(f, "{n} problem{} found:", if n == 1 { "" } else { "s" })?;
        for p in &self.0 {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl Problems {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn push(&mut self, p: Problem) {
        self.0.push(p);
    }

    pub fn extend(&mut self, other: Problems) {
        self.0.extend(other.0);
    }

    /// `Ok(())` when empty, else `Err(self)`.
    pub fn into_result(self) -> Result<(), Problems> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }
}

/// Where each node of a parsed document sits: path (as in [`Problem::path`])
/// to 1-based line. Kept with parsed values so later stages (resolving
/// releases, IPs) can point at the line too.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceMap {
    pub file: String,
    pub lines: HashMap<String, usize>,
}

impl SourceMap {
    pub fn new(file: impl Into<String>) -> Self {
        SourceMap {
            file: file.into(),
            lines: HashMap::new(),
        }
    }

    /// The line of `path`, or of its closest recorded ancestor.
    pub fn line(&self, path: &str) -> Option<usize> {
        let mut p = path;
        loop {
            if let Some(l) = self.lines.get(p) {
                return Some(*l);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }

    /// A problem at `path` in this file.
    pub fn problem(&self, path: impl Into<String>, message: impl Into<String>) -> Problem {
        let path = path.into();
        Problem {
            file: self.file.clone(),
            line: self.line(&path),
            path,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_falls_back_to_ancestor() {
        let mut s = SourceMap::new("m.yml");
        s.lines.insert("instance_groups[0]".into(), 7);
        s.lines.insert("instance_groups[0].networks".into(), 9);
        assert_eq!(
            s.line("instance_groups[0].networks[0].static_ips[1]"),
            Some(9)
        );
        assert_eq!(s.line("instance_groups[0].name"), Some(7));
        assert_eq!(s.line("name"), None);
        let p = s.problem("instance_groups[0].networks[0]", "bad");
        assert_eq!(
            p.to_string(),
            "m.yml:9: instance_groups[0].networks[0]: bad"
        );
    }
}
