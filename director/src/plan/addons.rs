//! Placing addons: which instance groups an addon's `include` and
//! `exclude` rules match, and adding its jobs (and the releases they need)
//! to a manifest, as BOSH does. Parsing the runtime-config is
//! `model::addons`.
//!
//! Placement only: this module must not read releases, files or state.

use crate::model::addons::{Addon, Placement};
use crate::model::manifest::{self, Manifest};
use crate::model::problems::{Problems, SourceMap};
use crate::model::refs::{JobRef, ReleaseRef};

impl Placement {
    /// Whether instance group `g` of manifest `m` matches every key set here.
    pub fn matches(&self, m: &Manifest, g: &manifest::InstanceGroup) -> bool {
        let os = m
            .stemcells
            .iter()
            .find(|s| s.alias == g.stemcell)
            .and_then(|s| s.os.as_deref());
        (self.deployments.is_empty() || self.deployments.contains(&m.name))
            && (self.instance_groups.is_empty() || self.instance_groups.contains(&g.name))
            && (self.jobs.is_empty()
                || self
                    .jobs
                    .iter()
                    .any(|(n, r)| g.jobs.iter().any(|j| &j.name == n && &j.release == r)))
            && (self.stemcell_os.is_empty()
                || os.is_some_and(|os| self.stemcell_os.iter().any(|x| x == os)))
            && self.lifecycle.is_none_or(|l| l == g.lifecycle)
    }
}

/// Place `addons` (written in `source`) into the manifest's instance groups,
/// adding the `releases` they need. A job an instance group already has, or
/// a release already listed with another version, is a problem.
pub fn apply(
    m: &mut Manifest,
    addons: &[Addon],
    releases: &[ReleaseRef],
    source: &SourceMap,
) -> Result<(), Problems> {
    let mut problems = Problems::default();
    for r in releases {
        match m.releases.iter().find(|x| x.name == r.name) {
            None => m.releases.push(r.clone()),
            Some(x) if x.version == r.version || r.version == "latest" => {}
            Some(x) => {
                let i = releases.iter().position(|y| y.name == r.name).unwrap_or(0);
                problems.push(source.problem(
                    format!("releases[{i}].version"),
                    format!(
                        "release '{}' is {} here but {} in the manifest '{}'",
                        r.name, r.version, x.version, m.name
                    ),
                ));
            }
        }
    }
    let placed: Vec<(usize, &Addon)> = (0..m.instance_groups.len())
        .flat_map(|gi| addons.iter().map(move |a| (gi, a)))
        .filter(|(gi, a)| {
            let g = &m.instance_groups[*gi];
            a.include.as_ref().is_none_or(|p| p.matches(m, g))
                && !a.exclude.as_ref().is_some_and(|p| p.matches(m, g))
        })
        .collect();
    let mut additions: Vec<(usize, JobRef)> = Vec::new();
    for (gi, a) in placed {
        let g = &m.instance_groups[gi];
        for (ji, j) in a.jobs.iter().enumerate() {
            if g.jobs.iter().any(|x| x.name == j.name)
                || additions.iter().any(|(i, x)| *i == gi && x.name == j.name)
            {
                problems.push(source.problem(
                    format!("{}.jobs[{ji}].name", a.path),
                    format!(
                        "addon '{}' would add job '{}' to instance group '{}', which already has a job of that name",
                        a.name, j.name, g.name
                    ),
                ));
                continue;
            }
            let mut job = j.clone();
            let mut props = a.properties.clone();
            crate::model::json::merge_json(&mut props, &j.properties);
            job.properties = props;
            additions.push((gi, job));
        }
    }
    problems.into_result()?;
    for (gi, job) in additions {
        m.instance_groups[gi].jobs.push(job);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::addons::{parse_runtime_config, RuntimeConfig};
    use std::path::Path;

    fn manifest() -> Manifest {
        manifest::parse_manifest(
            "m.yml",
            manifest::tests_support::QUICKSTART,
            Path::new("/deploy"),
        )
        .expect("valid")
    }

    fn rc(text: &str) -> RuntimeConfig {
        parse_runtime_config("runtime.yml", text, Path::new("/rc")).expect("valid runtime-config")
    }

    fn jobs_of(m: &Manifest, group: &str) -> Vec<String> {
        m.instance_group(group)
            .unwrap()
            .jobs
            .iter()
            .map(|j| j.name.clone())
            .collect()
    }

    #[test]
    fn addons_go_where_include_matches_and_exclude_does_not() {
        let r = rc("releases:
- name: os-conf
  version: '22'
addons:
- name: everywhere
  jobs: [{name: banner, release: os-conf, properties: {text: hi}}]
  properties: {text: default, level: 1}
- name: zk-only
  jobs: [{name: zk-agent, release: os-conf}]
  include: {jobs: [{name: zookeeper, release: zookeeper}], deployments: [zookeeper]}
- name: not-errands
  jobs: [{name: syslog, release: os-conf}]
  exclude: {lifecycle: errand}
- name: other-deployment
  jobs: [{name: never, release: os-conf}]
  include: {deployments: [cf]}
- name: by-os
  jobs: [{name: os-tool, release: os-conf}]
  include: {stemcell: [{os: ubuntu-jammy}], instance_groups: [smoke-tests]}
");
        let mut m = manifest();
        apply(&mut m, &r.addons, &r.releases, &r.source).unwrap();
        assert_eq!(
            jobs_of(&m, "zookeeper"),
            ["zookeeper", "banner", "zk-agent", "syslog"]
        );
        assert_eq!(
            jobs_of(&m, "smoke-tests"),
            ["smoke-tests", "banner", "os-tool"]
        );
        let banner = &m.instance_group("zookeeper").unwrap().jobs[1];
        assert_eq!(
            banner.properties,
            serde_json::json!({"text": "hi", "level": 1}),
            "addon properties under the job's own"
        );
        assert!(m
            .releases
            .iter()
            .any(|r| r.name == "os-conf" && r.version == "22"));
    }

    #[test]
    fn collisions_and_version_conflicts_are_problems_with_lines() {
        let r = rc("releases:
- name: zookeeper
  version: '9'
addons:
- name: dup
  jobs:
  - name: zookeeper
    release: zookeeper
");
        let mut m = manifest();
        let e = apply(&mut m, &r.addons, &r.releases, &r.source).expect_err("conflicts");
        let msgs: Vec<String> = e.0.iter().map(|p| p.to_string()).collect();
        assert!(
            msgs.iter().any(|m| m.starts_with("runtime.yml:3: releases[0].version: release 'zookeeper' is 9 here but latest in the manifest")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter().any(|m| m.starts_with("runtime.yml:7: addons[0].jobs[0].name: addon 'dup' would add job 'zookeeper' to instance group 'zookeeper'")),
            "{msgs:?}"
        );
        assert_eq!(jobs_of(&m, "zookeeper"), ["zookeeper"], "nothing applied");
    }
}
