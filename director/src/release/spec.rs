//! Parsing and checking job and package `spec` files.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use super::{
    JobSpec, LinkDef, PackageSpec, PropertyDef, ReleaseError, ReleaseErrorKind, TemplateEngine,
};

#[derive(Deserialize)]
struct RawJobSpec {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    templates: Option<BTreeMap<String, String>>,
    #[serde(default)]
    packages: Option<Vec<String>>,
    #[serde(default)]
    properties: Option<BTreeMap<String, Option<RawProperty>>>,
    #[serde(default)]
    consumes: Option<Vec<RawLink>>,
    #[serde(default)]
    provides: Option<Vec<RawLink>>,
    #[serde(default)]
    template_engine: Option<String>,
}

#[derive(Deserialize)]
struct RawProperty {
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    default: Option<serde_json::Value>,
    #[serde(default)]
    example: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawLink {
    name: String,
    #[serde(rename = "type")]
    link_type: String,
    #[serde(default)]
    optional: Option<bool>,
    #[serde(default)]
    properties: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct RawPackageSpec {
    name: String,
    #[serde(default)]
    dependencies: Option<Vec<String>>,
    #[serde(default)]
    files: Option<Vec<String>>,
    #[serde(default)]
    excluded_files: Option<Vec<String>>,
}

/// Parse YAML, turning serde_yaml_ng's error into a [`ReleaseError`] with the line.
pub(crate) fn parse_yaml<T: for<'de> Deserialize<'de>>(
    file: &str,
    text: &str,
) -> Result<T, ReleaseError> {
    serde_yaml_ng::from_str(text).map_err(|e| yaml_error(file, &e))
}

pub(crate) fn yaml_error(file: &str, e: &serde_yaml_ng::Error) -> ReleaseError {
    let mut message = e.to_string();
    // The line goes into `line`; drop serde_yaml_ng's own " at line N column M".
    if let Some(at) = message.find(" at line ") {
        message.truncate(at);
    }
    ReleaseError::new(ReleaseErrorKind::Syntax, file, message)
        .at_line(e.location().map(|l| l.line()))
}

/// The first line of `text` mentioning `needle`, to point errors somewhere.
fn line_of(text: &str, needle: &str) -> Option<usize> {
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1)
}

/// A job, package or link name: non-empty, no path separators, no leading dot.
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.starts_with('.')
        || name.contains(['/', '\\'])
        || name.chars().any(char::is_control)
    {
        return Err(format!(
            "{what} '{name}' is not a valid name (non-empty, no '/', no leading '.')"
        ));
    }
    Ok(())
}

/// A relative path that stays inside its directory.
pub(crate) fn check_relative_path(what: &str, path: &str) -> Result<(), String> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains('\\')
        || path.chars().any(char::is_control)
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(format!(
            "{what} '{path}' must be a relative path without '.', '..' or empty parts"
        ));
    }
    Ok(())
}

/// Keys BOSH knows in a job spec (and bosun's `template_engine`).
const JOB_KEYS: &[&str] = &[
    "name",
    "description",
    "templates",
    "packages",
    "properties",
    "consumes",
    "provides",
    "template_engine",
];
/// Keys of one property of a job spec.
const PROPERTY_KEYS: &[&str] = &["description", "default", "example"];
/// Keys of one `consumes` / `provides` entry.
const LINK_KEYS: &[&str] = &["name", "type", "optional", "properties"];
/// Keys BOSH knows in a package spec (`no_compression` is accepted and ignored).
const PACKAGE_KEYS: &[&str] = &[
    "name",
    "dependencies",
    "files",
    "excluded_files",
    "no_compression",
];

/// `file:line: unknown key 'k' ignored` for every key of `value` (a
/// mapping, else nothing) not in `known`; `at` prefixes nested keys.
fn unknown_keys(
    file: &str,
    text: &str,
    value: Option<&serde_yaml_ng::Value>,
    known: &[&str],
    at: &str,
    out: &mut Vec<String>,
) {
    let Some(map) = value.and_then(|v| v.as_mapping()) else {
        return;
    };
    for key in map.keys() {
        let name = match key {
            serde_yaml_ng::Value::String(s) => s.clone(),
            other => serde_yaml_ng::to_string(other)
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "?".to_string()),
        };
        if known.contains(&name.as_str()) {
            continue;
        }
        let place = match key_line(text, &name) {
            Some(line) => format!("{file}:{line}"),
            None => file.to_string(),
        };
        out.push(format!("{place}: unknown key '{at}{name}' ignored"));
    }
}

/// The first line where `key` is written as a mapping key.
fn key_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_start().trim_start_matches("- ");
            let l = l.trim_start_matches(['"', '\'']);
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start_matches(['"', '\'']).starts_with(':'))
        })
        .map(|i| i + 1)
}

/// Parse a job `spec` (`file` names it in errors); unknown keys are
/// ignored (see [`parse_job_spec_with_warnings`] to hear about them).
pub fn parse_job_spec(file: &str, text: &str) -> Result<JobSpec, ReleaseError> {
    parse_job_spec_with_warnings(file, text).map(|(spec, _)| spec)
}

/// Parse a job `spec`, returning the warnings about keys BOSH would
/// ignore (each naming `file` and the line).
pub fn parse_job_spec_with_warnings(
    file: &str,
    text: &str,
) -> Result<(JobSpec, Vec<String>), ReleaseError> {
    let doc: serde_yaml_ng::Value = parse_yaml(file, text)?;
    let mut warnings = Vec::new();
    unknown_keys(file, text, Some(&doc), JOB_KEYS, "", &mut warnings);
    if let Some(props) = doc.get("properties").and_then(|p| p.as_mapping()) {
        for (name, def) in props {
            let name = name.as_str().unwrap_or("?");
            let at = format!("properties.{name}.");
            unknown_keys(file, text, Some(def), PROPERTY_KEYS, &at, &mut warnings);
        }
    }
    for kind in ["consumes", "provides"] {
        if let Some(list) = doc.get(kind).and_then(|l| l.as_sequence()) {
            for (i, l) in list.iter().enumerate() {
                let at = format!("{kind}[{i}].");
                unknown_keys(file, text, Some(l), LINK_KEYS, &at, &mut warnings);
            }
        }
    }
    let raw: RawJobSpec = parse_yaml(file, text)?;
    let fail = |needle: &str, message: String| {
        ReleaseError::invalid(file, message).at_line(line_of(text, needle))
    };
    check_name("job name", &raw.name).map_err(|m| fail("name", m))?;

    let templates = raw.templates.unwrap_or_default();
    let mut destinations = BTreeSet::new();
    for (src, dst) in &templates {
        check_relative_path("template source", src).map_err(|m| fail(src, m))?;
        check_relative_path("template destination", dst).map_err(|m| fail(src, m))?;
        if !destinations.insert(dst.as_str()) {
            return Err(fail(
                dst,
                format!("templates: more than one template renders to '{dst}'"),
            ));
        }
    }

    let packages = raw.packages.unwrap_or_default();
    check_unique("packages", &packages).map_err(|(n, m)| fail(&n, m))?;

    let properties = raw
        .properties
        .unwrap_or_default()
        .into_iter()
        .map(|(name, p)| {
            let def = match p {
                Some(p) => PropertyDef {
                    description: p.description,
                    default: p.default,
                    example: p.example,
                },
                None => PropertyDef {
                    description: None,
                    default: None,
                    example: None,
                },
            };
            (name, def)
        })
        .collect();

    let consumes = links(raw.consumes).map_err(|(n, m)| fail(&n, format!("consumes: {m}")))?;
    let provides = links(raw.provides).map_err(|(n, m)| fail(&n, format!("provides: {m}")))?;
    let template_engine = match raw.template_engine.as_deref() {
        None => TemplateEngine::default(),
        Some(e) => TemplateEngine::from_spec(e).ok_or_else(|| {
            fail(
                "template_engine",
                format!(
                    "template_engine '{e}' is not one of: {}",
                    TemplateEngine::ALLOWED.join(", ")
                ),
            )
        })?,
    };

    Ok((
        JobSpec {
            name: raw.name,
            description: raw.description,
            templates,
            packages,
            properties,
            consumes,
            provides,
            template_engine,
        },
        warnings,
    ))
}

fn links(raw: Option<Vec<RawLink>>) -> Result<Vec<LinkDef>, (String, String)> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for l in raw.unwrap_or_default() {
        check_name("link", &l.name).map_err(|m| (l.name.clone(), m))?;
        if l.link_type.is_empty() {
            return Err((
                l.name.clone(),
                format!("link '{}' has an empty type", l.name),
            ));
        }
        if !seen.insert(l.name.clone()) {
            return Err((
                l.name.clone(),
                format!("link '{}' is declared twice", l.name),
            ));
        }
        out.push(LinkDef {
            name: l.name,
            link_type: l.link_type,
            optional: l.optional.unwrap_or(false),
            properties: l.properties.unwrap_or_default(),
        });
    }
    Ok(out)
}

fn check_unique(what: &str, names: &[String]) -> Result<(), (String, String)> {
    let mut seen = BTreeSet::new();
    for n in names {
        check_name(what, n).map_err(|m| (n.clone(), m))?;
        if !seen.insert(n) {
            return Err((n.clone(), format!("{what}: '{n}' is listed twice")));
        }
    }
    Ok(())
}

/// Parse a package `spec` (`file` names it in errors); unknown keys are
/// ignored (see [`parse_package_spec_with_warnings`]).
pub fn parse_package_spec(file: &str, text: &str) -> Result<PackageSpec, ReleaseError> {
    parse_package_spec_with_warnings(file, text).map(|(spec, _)| spec)
}

/// Parse a package `spec`, returning the warnings about keys BOSH would
/// ignore (each naming `file` and the line).
pub fn parse_package_spec_with_warnings(
    file: &str,
    text: &str,
) -> Result<(PackageSpec, Vec<String>), ReleaseError> {
    let doc: serde_yaml_ng::Value = parse_yaml(file, text)?;
    let mut warnings = Vec::new();
    unknown_keys(file, text, Some(&doc), PACKAGE_KEYS, "", &mut warnings);
    let raw: RawPackageSpec = parse_yaml(file, text)?;
    let fail = |needle: &str, message: String| {
        ReleaseError::invalid(file, message).at_line(line_of(text, needle))
    };
    check_name("package name", &raw.name).map_err(|m| fail("name", m))?;
    let dependencies = raw.dependencies.unwrap_or_default();
    check_unique("dependencies", &dependencies).map_err(|(n, m)| fail(&n, m))?;
    if dependencies.contains(&raw.name) {
        return Err(fail(
            "dependencies",
            format!("package '{}' depends on itself", raw.name),
        ));
    }
    let files = raw.files.unwrap_or_default();
    let excluded_files = raw.excluded_files.unwrap_or_default();
    for g in files.iter().chain(&excluded_files) {
        if g.is_empty() || g.starts_with('/') || g.split('/').any(|c| c == "..") {
            return Err(fail(
                g,
                format!("file glob '{g}' must be relative and must not contain '..'"),
            ));
        }
    }
    Ok((
        PackageSpec {
            name: raw.name,
            dependencies,
            files,
            excluded_files,
        },
        warnings,
    ))
}
