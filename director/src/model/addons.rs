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

use crate::model::problems::{Problems, SourceMap};
use crate::model::refs::{JobRef, ReleaseRef};
use crate::model::values::Lifecycle;
use crate::model::yaml::{self, Decoder, Fields, Item};

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
                if let Some(r) = crate::model::refs::release_ref(&mut d, &it, base_dir) {
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
        if let Some(job) = crate::model::refs::job_ref(d, &j, releases) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
