//! Addons: jobs placed on every instance group that matches a rule, from the
//! runtime-config (`update-runtime-config`, for every deployment) and from a
//! manifest's own `addons:` section, as BOSH does.
//!
//! Placement rules (`include`, `exclude`): `deployments`, `instance_groups`,
//! `jobs` (`{name, release}`), `stemcell` (`{os}`) and `lifecycle`. Within one
//! key any listed value matches; a rule matches when every key it sets
//! matches. An addon goes to a group that its `include` matches (no
//! `include`: every group) and its `exclude` does not.
//!
//! This module parses and applies; it must not read releases or state.

use std::path::Path;

use serde::Serialize;

use crate::manifest::{self, JobRef, Lifecycle, Manifest, ReleaseRef};
use crate::problems::{Problems, SourceMap};
use crate::yaml::{self, Decoder, Fields, Item};

/// A runtime-config.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RuntimeConfig {
    pub releases: Vec<ReleaseRef>,
    pub addons: Vec<Addon>,
    #[serde(skip)]
    pub source: SourceMap,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Addon {
    pub name: String,
    pub jobs: Vec<JobRef>,
    /// Merged under each addon job's own properties.
    pub properties: serde_json::Value,
    pub include: Option<Placement>,
    pub exclude: Option<Placement>,
    /// Where it was written (`addons[2]`), for messages.
    #[serde(skip)]
    pub path: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Placement {
    pub deployments: Vec<String>,
    pub instance_groups: Vec<String>,
    /// `(name, release)`
    pub jobs: Vec<(String, String)>,
    pub stemcell_os: Vec<String>,
    pub lifecycle: Option<Lifecycle>,
}

const ADDON_KEYS: &[&str] = &["jobs", "properties", "include", "exclude"];
const PLACEMENT_KEYS: &[&str] = &[
    "deployments",
    "instance_groups",
    "jobs",
    "stemcell",
    "lifecycle",
];

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

/// Parse a runtime-config (`base_dir` resolves release `path`s).
pub fn parse_runtime_config(
    file: &str,
    text: &str,
    base_dir: &Path,
) -> Result<RuntimeConfig, Problems> {
    let root = yaml::parse(file, text).map_err(|p| Problems(vec![p]))?;
    let mut source = SourceMap::new(file);
    let mut problems = Problems::default();
    let mut out = RuntimeConfig {
        releases: Vec::new(),
        addons: Vec::new(),
        source: SourceMap::new(file),
    };
    if !root.is_null() {
        let mut d = Decoder::new(&mut source, &mut problems);
        d.record(&root, "");
        if let Some(f) = d.map(&root, "", &[], &["releases", "addons", "tags"]) {
            for it in d.opt_seq(&f, "releases") {
                if let Some(r) = manifest::release_ref(&mut d, &it, base_dir) {
                    out.releases.push(r);
                }
            }
            out.addons = addons(&mut d, &f, &out.releases);
        }
    }
    problems.into_result()?;
    out.source = source;
    Ok(out)
}

/// The `addons` list of a runtime-config or manifest.
pub(crate) fn addons(d: &mut Decoder, f: &Fields, releases: &[ReleaseRef]) -> Vec<Addon> {
    let mut out: Vec<Addon> = Vec::new();
    for it in d.opt_seq(f, "addons") {
        if let Some(a) = addon(d, &it, releases) {
            if out.iter().any(|x| x.name == a.name) {
                d.problem(
                    &yaml::child_path(&it.path, "name"),
                    format!("addon '{}' is listed twice", a.name),
                );
            }
            out.push(a);
        }
    }
    out
}

fn addon(d: &mut Decoder, it: &Item, releases: &[ReleaseRef]) -> Option<Addon> {
    let f = d.map(it.node, &it.path, &["name", "jobs"], ADDON_KEYS)?;
    let name = d.str(&f, "name");
    let mut jobs: Vec<JobRef> = Vec::new();
    for j in d.seq(&f, "jobs") {
        if let Some(job) = manifest::job_ref(d, &j, releases) {
            jobs.push(job);
        }
    }
    let properties = d.json_object(&f, "properties");
    let include = placement(d, &f, "include");
    let exclude = placement(d, &f, "exclude");
    Some(Addon {
        name: name?,
        jobs,
        properties,
        include,
        exclude,
        path: it.path.clone(),
    })
}

fn placement(d: &mut Decoder, f: &Fields, key: &str) -> Option<Placement> {
    let n = f.get(key).filter(|n| !n.is_null())?;
    let pf = d.map(n, &f.child(key), &[], PLACEMENT_KEYS)?;
    let mut p = Placement {
        deployments: d.str_list(&pf, "deployments"),
        instance_groups: d.str_list(&pf, "instance_groups"),
        ..Placement::default()
    };
    for j in d.opt_seq(&pf, "jobs") {
        if let Some(jf) = d.map(j.node, &j.path, &["name", "release"], &[]) {
            if let (Some(n), Some(r)) = (d.str(&jf, "name"), d.str(&jf, "release")) {
                p.jobs.push((n, r));
            }
        }
    }
    for s in d.opt_seq(&pf, "stemcell") {
        if let Some(sf) = d.map(s.node, &s.path, &["os"], &[]) {
            if let Some(os) = d.str(&sf, "os") {
                p.stemcell_os.push(os);
            }
        }
    }
    if let Some(l) = d.opt_str(&pf, "lifecycle") {
        match l.parse::<Lifecycle>() {
            Ok(l) => p.lifecycle = Some(l),
            Err(e) => d.problem(&pf.child("lifecycle"), e.to_string()),
        }
    }
    Some(p)
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
            crate::desired::merge_json(&mut props, &j.properties);
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

    #[test]
    fn bad_runtime_configs_name_file_path_and_line() {
        let e = parse_runtime_config(
            "runtime.yml",
            "addons:\n- name: a\n  jobs: [{name: j, release: nope}]\n  include: {lifecycles: errand}\n",
            Path::new("/"),
        )
        .expect_err("invalid");
        let msgs: Vec<String> = e.0.iter().map(|p| p.to_string()).collect();
        assert!(
            msgs.iter().any(|m| m.contains("runtime.yml:3: addons[0].jobs[0].release: release 'nope' is not declared in 'releases'")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter().any(|m| m.contains("addons[0].include")
                && m.contains("lifecycles")
                && m.contains("lifecycle")),
            "unknown key with a hint: {msgs:?}"
        );
    }
}
