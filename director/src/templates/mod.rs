//! Job template rendering with BOSH's template context, in two engines:
//! Ruby's ERB (every BOSH release; [`erb`]) and bosun's own Tera engine
//! ([`tera`], for jobs whose spec says `template_engine: tera`).
//!
//! A deploy renders in one batch ([`render_all`]): every ERB template of
//! every instance in one Ruby process, every Tera template in this
//! process, and every problem of the batch reported together, before any
//! VM changes. For ERB jobs the job's `monit` file is rendered too and
//! shipped as the file `monit` (it decides what the agent runs); Tera jobs
//! ship no `monit` (their processes come from `config/bpm.yml`).
//!
//! This module must not know where rendered files go nor touch the store;
//! the only IO is the Ruby process of [`erb`].

mod erb;
mod tera;

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use serde_json::Value as Json;

use bosun_agent::protocol::RenderedFile;

use crate::release::TemplateEngine;

use erb::RUBY_HINT;

/// A template failure, naming the job, the template file and the line.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("job {job}: template {template}{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Template {
        job: String,
        template: String,
        line: Option<usize>,
        message: String,
    },
    #[error("job {job} has ERB templates and rendering them needs Ruby, which is not on PATH: {RUBY_HINT}")]
    NoRuby { job: String },
    #[error("rendering ERB templates: {message}")]
    Renderer { message: String },
}

/// One instance's view of the world, as templates see it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct InstanceContext {
    pub spec: SpecContext,
    /// The job's properties from the manifest (nested maps).
    pub properties: Json,
    /// Spec defaults, by dotted name.
    pub defaults: BTreeMap<String, Json>,
    /// Resolved links, by the consumer's link name.
    pub links: BTreeMap<String, LinkContext>,
}

/// `spec.*` in templates.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SpecContext {
    pub deployment: String,
    pub name: String,
    pub id: String,
    pub index: u32,
    pub az: String,
    pub address: String,
    pub ip: String,
    pub bootstrap: bool,
    pub networks: Json,
    pub job: NameOnly,
    pub release: ReleaseRef,
}

/// `spec.release`: the job's release.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ReleaseRef {
    pub name: String,
    pub version: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct NameOnly {
    pub name: String,
}

/// A resolved link.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LinkContext {
    pub instances: Vec<LinkInstance>,
    /// The provider group's first instance address (BOSH: `link.address`).
    pub address: String,
    pub properties: Json,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LinkInstance {
    pub name: String,
    pub id: String,
    pub index: u32,
    pub az: String,
    pub address: String,
    pub bootstrap: bool,
}

/// A job's templates, read once and rendered for many instances.
pub struct JobTemplates {
    job: String,
    pub(crate) kind: Kind,
}

pub(crate) enum Kind {
    Tera(Box<tera::TeraTemplates>),
    /// (source name, destination, text), `monit` last when the job has one.
    Erb(Vec<(String, String, String)>),
}

/// The destination of a rendered `monit` file, under the job's directory.
pub const MONIT_FILE: &str = "monit";

impl JobTemplates {
    /// Reads every template of a job. `templates` maps source name to
    /// destination; `sources` maps source name to its text; `consumes`
    /// names the links the job spec declares. Tera templates are parsed
    /// here (a syntax error is reported now); ERB is compiled by Ruby at
    /// render time.
    pub fn new(
        job: &str,
        engine: TemplateEngine,
        templates: &BTreeMap<String, String>,
        sources: &BTreeMap<String, String>,
        monit: Option<&str>,
        consumes: &[String],
    ) -> Result<JobTemplates, TemplateError> {
        let kind = match engine {
            TemplateEngine::Tera => Kind::Tera(Box::new(tera::TeraTemplates::new(
                job, templates, sources, consumes,
            )?)),
            TemplateEngine::Erb => {
                let mut files = Vec::with_capacity(templates.len() + 1);
                for (src, dest) in templates {
                    let text = sources.get(src).ok_or_else(|| TemplateError::Template {
                        job: job.to_string(),
                        template: src.clone(),
                        line: None,
                        message: "template listed in the job spec is missing from the release"
                            .into(),
                    })?;
                    files.push((src.clone(), dest.clone(), text.clone()));
                }
                if let Some(m) = monit {
                    files.push((
                        MONIT_FILE.to_string(),
                        MONIT_FILE.to_string(),
                        m.to_string(),
                    ));
                }
                Kind::Erb(files)
            }
        };
        Ok(JobTemplates {
            job: job.to_string(),
            kind,
        })
    }

    pub fn job(&self) -> &str {
        &self.job
    }
}

/// One job of one instance group, to be rendered for each of its instances.
pub struct RenderUnit<'a> {
    pub templates: &'a JobTemplates,
    /// The job's properties from the manifest (nested maps).
    pub properties: &'a Json,
    /// Spec defaults, by dotted name.
    pub defaults: &'a BTreeMap<String, Json>,
    /// Every property the job's spec declares (dotted): what an ERB
    /// template sees (Tera templates see all of `properties`).
    pub declared: &'a [String],
    /// Resolved links, by the consumer's link name (the same for every
    /// instance of the group).
    pub links: &'a BTreeMap<String, LinkContext>,
    /// One `spec` per instance, with the instance's name for errors.
    pub specs: Vec<(String, SpecContext)>,
}

/// Every problem of a batch, each with the instance it was found for.
#[derive(Debug)]
pub struct TemplateErrors(pub Vec<(String, TemplateError)>);

/// How many problems a batch's message lists before summing up the rest.
const LISTED_PROBLEMS: usize = 20;

impl fmt::Display for TemplateErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(f, "{n} template problem{}:", if n == 1 { "" } else { "s" })?;
        for (instance, e) in self.0.iter().take(LISTED_PROBLEMS) {
            write!(f, "\n  - {instance}: {}", bosun_cpi::chain::Chain(e))?;
        }
        if n > LISTED_PROBLEMS {
            write!(f, "\n  - ... and {} more", n - LISTED_PROBLEMS)?;
        }
        Ok(())
    }
}

impl std::error::Error for TemplateErrors {}

/// Renders every unit for every one of its instances: `result[u][i]` holds
/// the files of unit `u`'s `i`-th spec. ERB units go to one Ruby process;
/// all problems are gathered.
pub fn render_all(units: &[RenderUnit<'_>]) -> Result<Vec<Vec<Vec<RenderedFile>>>, TemplateErrors> {
    let mut out: Vec<Vec<Vec<RenderedFile>>> = units.iter().map(|_| Vec::new()).collect();
    let mut problems = Vec::new();
    let mut erb_units = Vec::new();
    for (ui, u) in units.iter().enumerate() {
        match &u.templates.kind {
            Kind::Tera(t) => {
                for (instance, spec) in &u.specs {
                    let ctx = InstanceContext {
                        spec: spec.clone(),
                        properties: u.properties.clone(),
                        defaults: u.defaults.clone(),
                        links: u.links.clone(),
                    };
                    match t.render(&ctx) {
                        Ok(files) => out[ui].push(files),
                        Err(e) => {
                            problems.push((instance.clone(), e));
                            out[ui].push(Vec::new());
                        }
                    }
                }
            }
            Kind::Erb(files) => erb_units.push((ui, files)),
        }
    }
    if !erb_units.is_empty() {
        match erb::render(units, &erb_units) {
            Ok(results) => {
                for ((ui, _), rendered) in erb_units.iter().zip(results) {
                    for (i, r) in rendered.into_iter().enumerate() {
                        match r {
                            Ok(files) => out[*ui].push(files),
                            Err(errs) => {
                                let instance = units[*ui].specs[i].0.clone();
                                problems.extend(errs.into_iter().map(|e| (instance.clone(), e)));
                                out[*ui].push(Vec::new());
                            }
                        }
                    }
                }
            }
            Err(e) => problems.push(("(all instances)".to_string(), e)),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(TemplateErrors(problems))
    }
}

/// Whether a rendered file is a script the agent makes executable.
pub(crate) fn executable(dest: &str) -> bool {
    dest.starts_with("bin/")
}
