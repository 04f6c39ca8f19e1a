//! ERB rendering through the system's Ruby: one `ruby` process per batch,
//! driven by bosun's own renderer script (`renderer.rb`, carried inside the
//! binary), with a clean environment, a temporary working directory and a
//! time limit.
//!
//! This module owns the process and its JSON exchange; it must not read
//! or write anything but the batch's temporary directory.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value as Json};

use bosun_agent::protocol::RenderedFile;

use super::{executable, RenderUnit, TemplateError};

/// What to tell an operator whose director has no Ruby.
pub const RUBY_HINT: &str = "install ruby: apt-get install ruby";

/// The renderer: standard library only.
const SCRIPT: &str = include_str!("renderer.rb");

/// How long one batch may take.
const TIME_LIMIT: Duration = Duration::from_secs(120);

/// How much of Ruby's stderr an error keeps (its end).
const STDERR_TAIL: usize = 4096;

/// The PATH the renderer runs with: the system's, nothing of the director's.
const CLEAN_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// `ruby` on the director's PATH, if there is one.
pub fn ruby_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("ruby"))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// (source name, destination, text) of one job's ERB files.
type ErbFiles = Vec<(String, String, String)>;

/// Per unit, per instance: the files, or every problem of that instance.
pub(super) type ErbResults = Vec<Vec<Result<Vec<RenderedFile>, Vec<TemplateError>>>>;

#[derive(Deserialize)]
struct Answer {
    groups: Vec<AnswerGroup>,
}

#[derive(Deserialize)]
struct AnswerGroup {
    instances: Vec<AnswerInstance>,
}

#[derive(Deserialize)]
struct AnswerInstance {
    files: Vec<AnswerFile>,
    errors: Vec<AnswerError>,
}

#[derive(Deserialize)]
struct AnswerFile {
    path: String,
    content: String,
}

#[derive(Deserialize)]
struct AnswerError {
    template: String,
    line: Option<usize>,
    message: String,
}

/// Renders the ERB units (`(index into units, files)`) in one Ruby process.
pub(super) fn render(
    units: &[RenderUnit<'_>],
    erb_units: &[(usize, &ErbFiles)],
) -> Result<ErbResults, TemplateError> {
    render_with(ruby_path(), TIME_LIMIT, units, erb_units)
}

/// [`render`] with a given Ruby (none: not installed) and time limit.
fn render_with(
    ruby: Option<PathBuf>,
    limit: Duration,
    units: &[RenderUnit<'_>],
    erb_units: &[(usize, &ErbFiles)],
) -> Result<ErbResults, TemplateError> {
    let Some(ruby) = ruby else {
        let job = erb_units
            .first()
            .map(|(ui, _)| units[*ui].templates.job().to_string())
            .unwrap_or_default();
        return Err(TemplateError::NoRuby { job });
    };
    let started = Instant::now();
    let input = request(units, erb_units);
    let bytes =
        serde_json::to_vec(&input).map_err(|e| renderer(format!("encoding the request: {e}")))?;
    let stdout = run(&ruby, &bytes, limit)?;
    let answer: Answer = serde_json::from_slice(&stdout)
        .map_err(|e| renderer(format!("reading the renderer's answer: {e}")))?;
    if answer.groups.len() != erb_units.len() {
        return Err(renderer(format!(
            "the renderer answered for {} job groups, {} were asked",
            answer.groups.len(),
            erb_units.len()
        )));
    }
    let instances: usize = erb_units.iter().map(|(ui, _)| units[*ui].specs.len()).sum();
    let templates: usize = erb_units
        .iter()
        .map(|(ui, f)| units[*ui].specs.len() * f.len())
        .sum();
    tracing::info!(
        templates,
        instances,
        elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
        "rendered ERB templates in one Ruby process"
    );
    let mut out = Vec::with_capacity(erb_units.len());
    for ((ui, _), group) in erb_units.iter().zip(answer.groups) {
        let job = units[*ui].templates.job();
        let per_instance = group
            .instances
            .into_iter()
            .map(|inst| {
                if inst.errors.is_empty() {
                    Ok(inst
                        .files
                        .into_iter()
                        .map(|f| RenderedFile {
                            executable: executable(&f.path),
                            path: f.path,
                            content: f.content,
                        })
                        .collect())
                } else {
                    Err(inst
                        .errors
                        .into_iter()
                        .map(|e| TemplateError::Template {
                            job: job.to_string(),
                            template: e.template,
                            line: e.line,
                            message: e.message,
                        })
                        .collect())
                }
            })
            .collect::<Vec<_>>();
        if per_instance.len() != units[*ui].specs.len() {
            return Err(renderer(format!(
                "the renderer answered for {} instances of job {job}, {} were asked",
                per_instance.len(),
                units[*ui].specs.len()
            )));
        }
        out.push(per_instance);
    }
    Ok(out)
}

fn renderer(message: String) -> TemplateError {
    TemplateError::Renderer { message }
}

/// The renderer's input: each job's files once, each group's properties
/// (spec defaults filled in) and links once, one spec per instance.
fn request(units: &[RenderUnit<'_>], erb_units: &[(usize, &ErbFiles)]) -> Json {
    let mut jobs: Vec<Json> = Vec::new();
    let mut job_index: BTreeMap<*const ErbFiles, usize> = BTreeMap::new();
    let mut groups = Vec::with_capacity(erb_units.len());
    for (ui, files) in erb_units {
        let key: *const ErbFiles = *files;
        let ji = *job_index.entry(key).or_insert_with(|| {
            jobs.push(json!({
                "name": units[*ui].templates.job(),
                "templates": files.iter().map(|(name, dest, text)| json!({
                    "name": name, "dest": dest, "text": text,
                })).collect::<Vec<_>>(),
            }));
            jobs.len() - 1
        });
        let u = &units[*ui];
        groups.push(json!({
            "job": ji,
            "properties": bound_properties(u.properties, u.declared, u.defaults),
            "links": u.links,
            "specs": u.specs.iter().map(|(_, s)| s).collect::<Vec<_>>(),
        }));
    }
    json!({"jobs": jobs, "groups": groups})
}

/// The properties a template sees, as BOSH binds them: each property the
/// spec declares, with the manifest's value, else its default, else null
/// (which `p` treats as unset); nothing the spec does not declare.
fn bound_properties(
    properties: &Json,
    declared: &[String],
    defaults: &BTreeMap<String, Json>,
) -> Json {
    let mut out = json!({});
    for dotted in declared {
        let given = dotted
            .split('.')
            .try_fold(properties, |v, part| v.get(part))
            .filter(|v| !v.is_null());
        let value = given
            .or_else(|| defaults.get(dotted))
            .cloned()
            .unwrap_or(Json::Null);
        set_dotted(&mut out, dotted, value);
    }
    out
}

/// Sets `dotted` in the nested maps of `out` unless a value is there
/// already (a declared parent's value holds its children) or a part of the
/// way is not a map.
fn set_dotted(out: &mut Json, dotted: &str, value: Json) {
    let parts: Vec<&str> = dotted.split('.').collect();
    let mut cur = out;
    for (i, part) in parts.iter().enumerate() {
        let Some(map) = cur.as_object_mut() else {
            return;
        };
        if i + 1 == parts.len() {
            let slot = map.entry(part.to_string()).or_insert(Json::Null);
            if slot.is_null() {
                *slot = value;
            }
            return;
        }
        let next = map.entry(part.to_string()).or_insert_with(|| json!({}));
        if next.is_null() {
            *next = json!({});
        }
        cur = next;
    }
}

/// Runs the renderer on `input`; returns its stdout.
fn run(ruby: &Path, input: &[u8], limit: Duration) -> Result<Vec<u8>, TemplateError> {
    let dir = tempfile::Builder::new()
        .prefix("bosun-erb-")
        .tempdir()
        .map_err(|e| renderer(format!("creating a working directory: {e}")))?;
    let script = dir.path().join("renderer.rb");
    std::fs::write(&script, SCRIPT)
        .map_err(|e| renderer(format!("writing {}: {e}", script.display())))?;
    let mut child = Command::new(ruby)
        .arg("--disable-gems")
        .arg(&script)
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", CLEAN_PATH)
        .env("LANG", "C.UTF-8")
        .env("HOME", dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| renderer(format!("starting {}: {e}", ruby.display())))?;
    let (Some(mut stdin), Some(mut stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(renderer("the renderer's pipes were not set up".into()));
    };
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        stdout.read_to_end(&mut buf).map(|_| buf)
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        stderr.read_to_end(&mut buf).map(|_| buf)
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > limit => {
                if let Err(e) = child.kill() {
                    tracing::warn!(error = %e, "killing the ERB renderer");
                }
                if let Err(e) = child.wait() {
                    tracing::warn!(error = %e, "reaping the ERB renderer");
                }
                return Err(renderer(format!(
                    "the renderer did not finish within {} s",
                    limit.as_secs_f64()
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => return Err(renderer(format!("waiting for the renderer: {e}"))),
        }
    };
    let joined = |what: &str| renderer(format!("the renderer's {what} thread panicked"));
    let write_result = writer.join().map_err(|_| joined("stdin"))?;
    let out = out_reader.join().map_err(|_| joined("stdout"))?;
    let err = err_reader.join().map_err(|_| joined("stderr"))?;
    let err = err.unwrap_or_default();
    let tail = String::from_utf8_lossy(&err[err.len().saturating_sub(STDERR_TAIL)..])
        .trim()
        .to_string();
    if !status.success() {
        return Err(renderer(format!(
            "the renderer failed ({status}){}",
            if tail.is_empty() {
                String::new()
            } else {
                format!(": {tail}")
            }
        )));
    }
    if let Err(e) = write_result {
        return Err(renderer(format!("sending templates to the renderer: {e}")));
    }
    if !tail.is_empty() {
        tracing::debug!(stderr = %tail, "ERB renderer wrote to stderr");
    }
    out.map_err(|e| renderer(format!("reading the renderer's answer: {e}")))
}

#[cfg(test)]
mod tests;
