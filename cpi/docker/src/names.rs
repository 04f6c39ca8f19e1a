//! Names and labels of the Docker objects this CPI creates: cid checks,
//! sanitized image tags and network names, and metadata to and from labels.
//!
//! This module must not talk to the daemon: it is pure.

use std::collections::HashMap;

use bosun_cpi::{Metadata, StemcellSpec};

use crate::{LABEL_CPI, STEMCELL_LABELS_PREFIX};

/// A cid is used in file names and URL paths: only `[A-Za-z0-9._-]`, not
/// starting with a dot (stemcell cids, image ids, may also contain `:`).
pub(crate) fn valid_cid(cid: &str, allow_colon: bool) -> bool {
    !cid.is_empty()
        && !cid.starts_with('.')
        && cid.len() <= 200
        && cid.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || b == b'-'
                || b == b'_'
                || b == b'.'
                || (allow_colon && b == b':')
        })
}

/// Makes `s` usable in a Docker image tag or object name: characters outside
/// `[A-Za-z0-9_.-]` become `-`, it starts with an alphanumeric character, and
/// it is at most `max` bytes long. Never empty (`x` then).
pub fn sanitize_name(s: &str, max: usize) -> String {
    let mapped: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = mapped.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    let mut out: String = trimmed.chars().take(max.max(1)).collect();
    if out.is_empty() {
        out.push('x');
    }
    out
}

/// A Docker repository name component: lowercase `[a-z0-9]` separated by single `-`.
pub(crate) fn sanitize_repo(s: &str) -> String {
    let lower = s.to_ascii_lowercase();
    let mut out = String::new();
    for c in lower.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    let out = out.trim_end_matches('-').to_string();
    if out.is_empty() {
        "bosun".to_string()
    } else {
        out
    }
}

/// The repository stemcell images are tagged into: `<prefix>-stemcell`.
pub fn stemcell_repo(prefix: &str) -> String {
    format!("{}-stemcell", sanitize_repo(prefix))
}

/// The tag of a stemcell image: `<sanitized name>-<sanitized version>`.
pub fn stemcell_tag(spec: &StemcellSpec) -> String {
    sanitize_name(&format!("{}-{}", spec.name, spec.version), 128)
}

/// The Docker network of a BOSH network: `<prefix>-<sanitized name>`.
pub fn network_name(prefix: &str, network: &str) -> String {
    sanitize_name(&format!("{prefix}-{network}"), 200)
}

/// `bosun.<key>` for every metadata entry, plus `bosun.cpi=<prefix>`.
pub fn labels(prefix: &str, metadata: &Metadata) -> HashMap<String, String> {
    let mut l: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (format!("bosun.{k}"), v.clone()))
        .collect();
    l.insert(LABEL_CPI.into(), prefix.into());
    l
}

/// The metadata an object's labels carry: every `bosun.<key>` label as
/// `<key>`, except the CPI's own labels named in `own` (`bosun.cpi`, ...)
/// and the stemcell image's (`bosun.stemcell.*`, inherited by containers).
pub fn metadata_of_labels(labels: &HashMap<String, String>, own: &[&str]) -> Metadata {
    labels
        .iter()
        .filter(|(k, _)| !own.contains(&k.as_str()) && !k.starts_with(STEMCELL_LABELS_PREFIX))
        .filter_map(|(k, v)| k.strip_prefix("bosun.").map(|k| (k.to_string(), v.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::container_config;
    use crate::test_support::request;
    use crate::{DISK_OWN_LABELS, LABEL_DISK, LABEL_SIZE_MB, VM_OWN_LABELS};
    use bosun_cpi::VmCid;

    #[test]
    fn names_are_sanitized() {
        assert_eq!(
            sanitize_name("bosh-docker/ubuntu jammy", 128),
            "bosh-docker-ubuntu-jammy"
        );
        assert_eq!(sanitize_name("..-x", 128), "x");
        assert_eq!(sanitize_name("", 128), "x");
        assert_eq!(sanitize_name("abcdef", 3), "abc");
        assert_eq!(sanitize_repo("My_Prefix"), "my-prefix");
        assert_eq!(sanitize_repo("--"), "bosun");
        assert_eq!(stemcell_repo("bosun-t12"), "bosun-t12-stemcell");
        let spec = StemcellSpec {
            name: "bosh-docker-debian".into(),
            os: "debian".into(),
            version: "1.2+dev/3".into(),
            image_path: None,
            cloud_properties: serde_json::json!({}),
        };
        assert_eq!(stemcell_tag(&spec), "bosh-docker-debian-1.2-dev-3");
        assert_eq!(network_name("bosun", "z default"), "bosun-z-default");
    }

    #[test]
    fn cids_are_checked_before_use_as_paths() {
        assert!(valid_cid("vm-1234", false));
        assert!(!valid_cid("../etc", false));
        assert!(!valid_cid("a/b", false));
        assert!(!valid_cid("sha256:ab", false));
        assert!(valid_cid("sha256:ab", true));
    }

    #[test]
    fn metadata_comes_back_from_labels_without_the_cpis_own() {
        let req = request();
        let cid = VmCid("vm-1".into());
        let (body, _) = container_config("bosun", &cid, &req, &req.metadata, &[]).unwrap();
        let mut container = body.labels.unwrap();
        // As Docker lists it: with the labels of its image.
        container.insert("bosun.stemcell.name".into(), "bosun-docker".into());
        assert_eq!(metadata_of_labels(&container, VM_OWN_LABELS), req.metadata);

        let mut volume = labels(
            "bosun",
            &Metadata::from([("token".to_string(), "t".to_string())]),
        );
        volume.insert(LABEL_SIZE_MB.into(), "64".into());
        volume.insert(LABEL_DISK.into(), "disk-1".into());
        volume.insert("com.example.other".into(), "x".into());
        assert_eq!(
            metadata_of_labels(&volume, DISK_OWN_LABELS),
            Metadata::from([("token".to_string(), "t".to_string())])
        );
    }
}
