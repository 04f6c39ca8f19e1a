//! Line diffs of manifests, shown to the operator before a deploy: the
//! manifest as it will be deployed against the one deployed last, both
//! before variable values are filled in, so a secret never appears in a
//! diff (its `((placeholder))` does).
//!
//! This module only compares text; it must not read state or print.

use serde::Serialize;
use similar::{ChangeTag, TextDiff};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiffTag {
    Same,
    Added,
    Removed,
}

/// One line of a diff.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DiffLine {
    pub tag: DiffTag,
    /// Line number in the old text (removed and same lines).
    pub old_line: Option<usize>,
    /// Line number in the new text (added and same lines).
    pub new_line: Option<usize>,
    pub text: String,
}

/// Changed regions of `new` against `old`, each with up to `context`
/// unchanged lines around it. Empty when the texts are equal.
pub fn diff_lines(old: &str, new: &str, context: usize) -> Vec<Vec<DiffLine>> {
    let diff = TextDiff::from_lines(old, new);
    diff.grouped_ops(context)
        .into_iter()
        .map(|group| {
            group
                .iter()
                .flat_map(|op| diff.iter_changes(op))
                .map(|c| DiffLine {
                    tag: match c.tag() {
                        ChangeTag::Equal => DiffTag::Same,
                        ChangeTag::Insert => DiffTag::Added,
                        ChangeTag::Delete => DiffTag::Removed,
                    },
                    old_line: c.old_index().map(|i| i + 1),
                    new_line: c.new_index().map(|i| i + 1),
                    text: c.value().trim_end_matches(['\n', '\r']).to_string(),
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_texts_have_no_hunks() {
        assert!(diff_lines("a: 1\nb: 2\n", "a: 1\nb: 2\n", 3).is_empty());
    }

    #[test]
    fn changes_come_with_context_and_line_numbers() {
        let old = "a: 1\nb: 2\nc: 3\nd: 4\ne: 5\nf: 6\ng: 7\n";
        let new = "a: 1\nb: 2\nc: 3\nd: 40\ne: 5\nf: 6\ng: 7\nh: 8\n";
        let hunks = diff_lines(old, new, 1);
        assert_eq!(hunks.len(), 2);
        let h: Vec<(DiffTag, &str)> = hunks[0].iter().map(|l| (l.tag, l.text.as_str())).collect();
        assert_eq!(
            h,
            vec![
                (DiffTag::Same, "c: 3"),
                (DiffTag::Removed, "d: 4"),
                (DiffTag::Added, "d: 40"),
                (DiffTag::Same, "e: 5"),
            ]
        );
        assert_eq!(hunks[0][1].old_line, Some(4));
        assert_eq!(hunks[0][2].new_line, Some(4));
        let last = hunks[1].last().unwrap();
        assert_eq!(
            (last.tag, last.text.as_str(), last.new_line),
            (DiffTag::Added, "h: 8", Some(8))
        );
    }

    #[test]
    fn a_first_deploy_is_all_added() {
        let hunks = diff_lines("", "name: x\nupdate: {}\n", 3);
        assert_eq!(hunks.len(), 1);
        assert!(hunks[0].iter().all(|l| l.tag == DiffTag::Added));
    }
}
