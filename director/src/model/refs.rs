//! References from a manifest or runtime-config to releases and jobs
//! (`releases:` entries and `jobs: [{name, release}]`), decoded from the
//! line-tracking YAML tree with problems at `file:line: path`.
//!
//! Decoding only: this module must not read release contents or resolve
//! anything against the store.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::model::names;
use crate::model::yaml::{self, Decoder, Fields, Item};

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReleaseRef {
    pub name: String,
    /// `"latest"` when absent.
    pub version: String,
    /// A local release directory or tarball, resolved against the manifest's directory.
    pub path: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct JobRef {
    pub name: String,
    pub release: String,
    /// An object, `{}` when absent.
    pub properties: serde_json::Value,
    pub consumes: BTreeMap<String, serde_json::Value>,
    pub provides: BTreeMap<String, serde_json::Value>,
    pub custom_provider_definitions: Vec<serde_json::Value>,
}

/// A `releases[]` entry (shared with the runtime-config).
pub(crate) fn release_ref(d: &mut Decoder, it: &Item, base_dir: &Path) -> Option<ReleaseRef> {
    let f = d.map(it.node, &it.path, &["name"], RELEASE_KEYS)?;
    for k in ["url", "sha1"] {
        if f.get(k).is_some() {
            d.problem(
                &f.child(k),
                format!("release '{k}' is not supported; point 'path' at a local release directory or tarball"),
            );
        }
    }
    let name = d.str(&f, "name");
    let version = d.opt_text(&f, "version").unwrap_or_else(|| "latest".into());
    let path = d.opt_str(&f, "path").map(|p| {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            base_dir.join(p)
        }
    });
    Some(ReleaseRef {
        name: name?,
        version,
        path,
    })
}

/// A `jobs[]` entry (shared with addons).
pub(crate) fn job_ref(d: &mut Decoder, it: &Item, releases: &[ReleaseRef]) -> Option<JobRef> {
    let f = d.map(it.node, &it.path, &["name", "release"], JOB_KEYS)?;
    let name = names::decode(d, &f, "name", "job name");
    let release = d.str(&f, "release");
    if let Some(r) = &release {
        if !releases.iter().any(|x| &x.name == r) {
            let names: Vec<&str> = releases.iter().map(|x| x.name.as_str()).collect();
            let hint = yaml::did_you_mean(r, &names);
            d.problem(
                &f.child("release"),
                format!("release '{r}' is not declared in 'releases'{hint}"),
            );
        }
    }
    let properties = d.json_object(&f, "properties");
    let consumes = json_entries(d, &f, "consumes");
    let provides = json_entries(d, &f, "provides");
    let custom_provider_definitions = d
        .opt_seq(&f, "custom_provider_definitions")
        .into_iter()
        .map(|it| it.node.to_json())
        .collect();
    Some(JobRef {
        name: name?,
        release: release?,
        properties,
        consumes,
        provides,
        custom_provider_definitions,
    })
}

pub(crate) fn json_entries(
    d: &mut Decoder,
    f: &Fields,
    key: &str,
) -> BTreeMap<String, serde_json::Value> {
    match d.json_object(f, key) {
        serde_json::Value::Object(m) => m.into_iter().collect(),
        _ => BTreeMap::new(),
    }
}

const RELEASE_KEYS: &[&str] = &["version", "path", "url", "sha1"];

const JOB_KEYS: &[&str] = &[
    "properties",
    "consumes",
    "provides",
    "custom_provider_definitions",
];
