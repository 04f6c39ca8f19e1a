//! bosun's own template engine: Tera 2 with BOSH's template context, for
//! jobs whose spec says `template_engine: tera`.
//!
//! Templates see:
//! - `spec`: `name` (instance group), `id`, `index`, `az`, `address`, `ip`,
//!   `bootstrap`, `deployment`, `networks`, `job.name`, `release.name`.
//! - `p("a.b")`, `p("a.b", fallback)`: a property (manifest value, else the
//!   job spec's default, else the fallback); an error naming the property when
//!   none exists. `if_p("a.b")` / `has_p("a.b")`: whether it is set.
//! - `link("peers")`: `instances` (each `name`, `id`, `index`, `az`,
//!   `address`, `bootstrap`), `address`, `properties` (the provider's
//!   exported properties); an error naming the link when it is not consumed.
//!   `if_link("peers")` / `has_link("peers")`: whether it resolved. The
//!   same data is the `links` variable (`links.peers.instances`); a literal
//!   `link("peers")` is read as `links["peers"]` so attributes may follow it.
//! - filters `json` (`to_json`, `json_encode`) and `yaml`.
//!
//! BOSH's positional call style (`p("a.b", 1)`) is accepted: it is rewritten
//! to Tera's keyword style (`p(name="a.b", default=1)`) before parsing,
//! keeping every line where it was so errors point at the author's line.
//!
//! Rendering is pure: no IO, no clock. This module must not know where the
//! rendered files go.

use std::collections::BTreeMap;

use serde_json::Value as Json;
use tera::{Context, Kwargs, State, Tera, TeraResult, Value};

use bosun_agent::protocol::RenderedFile;

use super::{InstanceContext, TemplateError};

/// A job's templates, parsed once and rendered for many instances.
pub struct TeraTemplates {
    job: String,
    tera: Tera,
    /// (source name, destination path under the job dir)
    files: Vec<(String, String)>,
}

const HIDDEN: &str = "__bosun";

impl TeraTemplates {
    /// Parse every template of a job. `templates` maps source name to
    /// destination; `sources` maps source name to its text; `consumes` names
    /// the links the job spec declares (a template naming another is an error).
    pub fn new(
        job: &str,
        templates: &BTreeMap<String, String>,
        sources: &BTreeMap<String, String>,
        consumes: &[String],
    ) -> Result<TeraTemplates, TemplateError> {
        let mut tera = Tera::default();
        tera.autoescape_on(Vec::<&'static str>::new());
        register_helpers(&mut tera);
        let mut files = Vec::new();
        for (src, dest) in templates {
            let text = sources.get(src).ok_or_else(|| TemplateError::Template {
                job: job.to_string(),
                template: src.clone(),
                line: None,
                message: "template listed in the job spec is missing from the release".into(),
            })?;
            if let Some(line) = erb_tag_line(text) {
                return Err(TemplateError::Template {
                    job: job.to_string(),
                    template: src.clone(),
                    line: Some(line),
                    message: "contains an ERB tag `<%`, but the job spec declares `template_engine: tera`: write it in Tera or drop the key to render the job as ERB".into(),
                });
            }
            let (rewritten, links) = rewrite_calls(text);
            if let Some((name, line)) = links.iter().find(|(n, _)| !consumes.contains(n)) {
                return Err(TemplateError::Template {
                    job: job.to_string(),
                    template: src.clone(),
                    line: Some(*line),
                    message: format!(
                        "unknown link '{name}': the job spec consumes {}",
                        if consumes.is_empty() {
                            "no links".to_string()
                        } else {
                            consumes.join(", ")
                        }
                    ),
                });
            }
            tera.add_raw_template(src, &rewritten)
                .map_err(|e| template_error(job, src, &e))?;
            files.push((src.clone(), dest.clone()));
        }
        Ok(TeraTemplates {
            job: job.to_string(),
            tera,
            files,
        })
    }

    /// Render every template for one instance.
    pub fn render(&self, ctx: &InstanceContext) -> Result<Vec<RenderedFile>, TemplateError> {
        let mut context = Context::new();
        context.insert("spec", &ctx.spec);
        context.insert("links", &ctx.links);
        context.insert(HIDDEN, ctx);
        let mut out = Vec::with_capacity(self.files.len());
        for (src, dest) in &self.files {
            let content = self
                .tera
                .render(src, &context)
                .map_err(|e| template_error(&self.job, src, &e))?;
            out.push(RenderedFile {
                path: dest.clone(),
                content,
                executable: super::executable(dest),
            });
        }
        Ok(out)
    }
}

/// The 1-based line of the first `<%` in a text, if any.
fn erb_tag_line(text: &str) -> Option<usize> {
    let at = text.find("<%")?;
    Some(text[..at].matches('\n').count() + 1)
}

fn template_error(job: &str, template: &str, e: &tera::Error) -> TemplateError {
    let (line, message) = match e.kind() {
        tera::ErrorKind::SyntaxError(r) | tera::ErrorKind::RenderingError(r) => {
            (Some(r.span().start_line), r.message().to_string())
        }
        other => (None, other.to_string()),
    };
    let mut message = message;
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        message.push_str(&format!(": {s}"));
        src = s.source();
    }
    TemplateError::Template {
        job: job.to_string(),
        template: template.to_string(),
        line,
        message,
    }
}

fn hidden(state: &State) -> TeraResult<Json> {
    let v: Option<Value> = state.get(HIDDEN)?;
    let v = v.ok_or_else(|| tera::Error::message("template context missing"))?;
    serde_json::to_value(&v).map_err(|e| tera::Error::message(e.to_string()))
}

fn lookup<'a>(props: &'a Json, dotted: &str) -> Option<&'a Json> {
    let mut cur = props;
    for part in dotted.split('.') {
        cur = cur.as_object()?.get(part)?;
    }
    if cur.is_null() {
        None
    } else {
        Some(cur)
    }
}

fn property(ctx: &Json, name: &str) -> Option<Json> {
    lookup(&ctx["properties"], name)
        .cloned()
        .or_else(|| ctx["defaults"].get(name).filter(|v| !v.is_null()).cloned())
}

fn register_helpers(tera: &mut Tera) {
    tera.register_function("p", |kwargs: Kwargs, state: &State| -> TeraResult<Value> {
        let name: String = kwargs.must_get("name")?;
        let ctx = hidden(state)?;
        if let Some(v) = property(&ctx, &name) {
            return Ok(Value::from_serializable(&v));
        }
        if let Some(fallback) = kwargs.get::<Value>("default")? {
            return Ok(fallback);
        }
        Err(tera::Error::message(format!(
            "property '{name}' is not set and has no default"
        )))
    });
    let has_p = |kwargs: Kwargs, state: &State| -> TeraResult<bool> {
        let name: String = kwargs.must_get("name")?;
        Ok(property(&hidden(state)?, &name).is_some())
    };
    tera.register_function("has_p", has_p);
    tera.register_function("if_p", has_p);
    tera.register_function(
        "link",
        |kwargs: Kwargs, state: &State| -> TeraResult<Value> {
            let name: String = kwargs.must_get("name")?;
            let ctx = hidden(state)?;
            match ctx["links"].get(&name) {
                Some(l) => Ok(Value::from_serializable(l)),
                None => Err(tera::Error::message(format!(
                    "link '{name}' is not consumed by this job or was not resolved"
                ))),
            }
        },
    );
    let has_link = |kwargs: Kwargs, state: &State| -> TeraResult<bool> {
        let name: String = kwargs.must_get("name")?;
        Ok(hidden(state)?["links"].get(&name).is_some())
    };
    tera.register_function("has_link", has_link);
    tera.register_function("if_link", has_link);
    let json = |v: Value, _: Kwargs, _: &State| -> TeraResult<Value> {
        let j = serde_json::to_string(&v).map_err(|e| tera::Error::message(e.to_string()))?;
        Ok(Value::safe_string(&j))
    };
    tera.register_filter("json", json);
    tera.register_filter("to_json", json);
    tera.register_filter("json_encode", json);
    tera.register_filter(
        "yaml",
        |v: Value, _: Kwargs, _: &State| -> TeraResult<Value> {
            let y =
                serde_yaml_ng::to_string(&v).map_err(|e| tera::Error::message(e.to_string()))?;
            Ok(Value::safe_string(y.trim_end()))
        },
    );
}

const POSITIONAL_FNS: [&str; 6] = ["p", "if_p", "has_p", "link", "if_link", "has_link"];

/// Rewrite `p("a", x)` into `p(name="a", default=x)` (and `link("l")` into
/// `link(name="l")`) inside `{{ }}` and `{% %}` tags. Inserts text only, never
/// newlines, so line numbers stay.
#[cfg(test)]
fn rewrite_positional_calls(src: &str) -> String {
    rewrite_calls(src).0
}

/// Rewrite positional calls (as `rewrite_positional_calls`), also returning each literal `link("name")`
/// with its 1-based line.
fn rewrite_calls(src: &str) -> (String, Vec<(String, usize)>) {
    let mut link_names = Vec::new();
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len() + 32);
    let mut i = 0;
    let mut last = 0;
    let mut in_tag = false;
    while i < b.len() {
        if !in_tag {
            if b[i] == b'{' && i + 1 < b.len() && (b[i + 1] == b'{' || b[i + 1] == b'%') {
                in_tag = true;
                i += 2;
            } else if b[i] == b'{' && i + 1 < b.len() && b[i + 1] == b'#' {
                // comment: skip to its end
                match src[i..].find("#}") {
                    Some(off) => i += off + 2,
                    None => break,
                }
            } else {
                i += 1;
            }
            continue;
        }
        let c = b[i];
        if (c == b'}' || c == b'%') && i + 1 < b.len() && b[i + 1] == b'}' {
            in_tag = false;
            i += 2;
            continue;
        }
        if c == b'"' || c == b'\'' || c == b'`' {
            i = skip_string(b, i);
            continue;
        }
        if is_ident_start(c) && (i == 0 || (!is_ident(b[i - 1]) && b[i - 1] != b'.')) {
            let start = i;
            while i < b.len() && is_ident(b[i]) {
                i += 1;
            }
            let ident = &src[start..i];
            if !POSITIONAL_FNS.contains(&ident) {
                continue;
            }
            let mut j = skip_ws(b, i);
            if j >= b.len() || b[j] != b'(' {
                continue;
            }
            j = skip_ws(b, j + 1);
            if j >= b.len() || !(b[j] == b'"' || b[j] == b'\'') {
                continue;
            }
            let end = skip_string(b, j);
            if ident == "link" {
                // `link("x")` becomes `links["x"]` so attributes can follow it
                // (Tera allows no attribute access on a call's result).
                let close = skip_ws(b, end);
                if close < b.len() && b[close] == b')' {
                    let line = 1 + src[..start].matches('\n').count();
                    link_names.push((src[j + 1..end - 1].to_string(), line));
                    out.push_str(&src[last..start]);
                    out.push_str("links[");
                    out.push_str(&src[j..end]);
                    out.push(']');
                    last = close + 1;
                    i = close + 1;
                    continue;
                }
            }
            out.push_str(&src[last..j]);
            out.push_str("name=");
            out.push_str(&src[j..end]);
            last = end;
            i = end;
            if ident == "p" {
                let k = skip_ws(b, end);
                if k < b.len() && b[k] == b',' {
                    let m = skip_ws(b, k + 1);
                    if !is_kwarg_at(b, m) {
                        out.push_str(&src[last..m]);
                        out.push_str("default=");
                        last = m;
                        i = m;
                    }
                }
            }
            continue;
        }
        i += 1;
    }
    out.push_str(&src[last..]);
    (out, link_names)
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_'
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && (b[i] == b' ' || b[i] == b'\t') {
        i += 1;
    }
    i
}

/// Index just past the string literal starting at `i`.
fn skip_string(b: &[u8], i: usize) -> usize {
    let q = b[i];
    let mut j = i + 1;
    while j < b.len() && b[j] != q {
        if b[j] == b'\\' {
            j += 1;
        }
        j += 1;
    }
    (j + 1).min(b.len())
}

fn is_kwarg_at(b: &[u8], i: usize) -> bool {
    if i >= b.len() || !is_ident_start(b[i]) {
        return false;
    }
    let mut j = i;
    while j < b.len() && is_ident(b[j]) {
        j += 1;
    }
    let k = skip_ws(b, j);
    k < b.len() && b[k] == b'=' && (k + 1 >= b.len() || b[k + 1] != b'=')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::templates::{LinkContext, LinkInstance, SpecContext};
    use serde_json::json;

    fn job(templates: &[(&str, &str, &str)]) -> TeraTemplates {
        let mut t = BTreeMap::new();
        let mut s = BTreeMap::new();
        for (src, dest, text) in templates {
            t.insert(src.to_string(), dest.to_string());
            s.insert(src.to_string(), text.to_string());
        }
        TeraTemplates::new("kv", &t, &s, &["peers".to_string()]).unwrap()
    }

    fn ctx() -> InstanceContext {
        let mut links = BTreeMap::new();
        links.insert(
            "peers".to_string(),
            LinkContext {
                instances: vec![
                    LinkInstance {
                        address: "10.0.0.2".into(),
                        index: 0,
                        ..Default::default()
                    },
                    LinkInstance {
                        address: "10.0.0.3".into(),
                        index: 1,
                        ..Default::default()
                    },
                ],
                address: "10.0.0.2".into(),
                properties: json!({"kv": {"port": 9000}}),
            },
        );
        InstanceContext {
            spec: SpecContext {
                address: "10.0.0.2".into(),
                index: 0,
                ..Default::default()
            },
            properties: json!({"kv": {"port": 9000, "name": "a<b"}}),
            defaults: [("kv.timeout".to_string(), json!(5))].into_iter().collect(),
            links,
        }
    }

    #[test]
    fn rewrite_keeps_lines_and_handles_fallbacks() {
        assert_eq!(
            rewrite_positional_calls(r#"{{ p("a.b") }} p("x") {{ p("c", 3) }}"#),
            r#"{{ p(name="a.b") }} p("x") {{ p(name="c", default=3) }}"#
        );
        assert_eq!(
            rewrite_positional_calls(r#"{% if has_p('x') %}{{ link("l").address }}{% endif %}"#),
            r#"{% if has_p(name='x') %}{{ links["l"].address }}{% endif %}"#
        );
        assert_eq!(
            rewrite_positional_calls(r#"{{ p(name="a", default=1) }}{# p("z") #}{{ x.p("q") }}"#),
            r#"{{ p(name="a", default=1) }}{# p("z") #}{{ x.p("q") }}"#
        );
    }

    #[test]
    fn renders_bosh_context() {
        let j = job(&[
            (
                "config.json",
                "config/config.json",
                r#"{"port": {{ p("kv.port") }}, "t": {{ p("kv.timeout") }}, "f": {{ p("kv.none", "x") | json }}, "n": {{ p("kv.name") | json }},
"peers": [{% for i in link("peers").instances %}{% if i.address != spec.address %}"{{ i.address }}:{{ link("peers").properties.kv.port }}"{% endif %}{% endfor %}], "has": {{ has_p("kv.port") }}/{{ has_p("nope") }}/{{ has_link("nope") }}}"#,
            ),
            ("ctl", "bin/ctl", "#!/bin/sh\necho {{ spec.index }}\n"),
        ]);
        let files = j.render(&ctx()).unwrap();
        assert_eq!(files.len(), 2);
        let cfg = files
            .iter()
            .find(|f| f.path == "config/config.json")
            .unwrap();
        assert_eq!(
            cfg.content,
            "{\"port\": 9000, \"t\": 5, \"f\": \"x\", \"n\": \"a<b\",\n\"peers\": [\"10.0.0.3:9000\"], \"has\": true/false/false}"
        );
        assert!(!cfg.executable);
        let ctl = files.iter().find(|f| f.path == "bin/ctl").unwrap();
        assert!(ctl.executable);
        assert_eq!(ctl.content, "#!/bin/sh\necho 0\n");
    }

    #[test]
    fn missing_property_names_job_template_and_line() {
        let j = job(&[("cfg", "config/cfg", "a\nb\nport={{ p(\"kv.missing\") }}\n")]);
        let err = j.render(&ctx()).unwrap_err().to_string();
        assert!(err.contains("job kv: template cfg line 3"), "{err}");
        assert!(err.contains("property 'kv.missing' is not set"), "{err}");
    }

    #[test]
    fn unknown_link_and_syntax_errors_are_located() {
        let mut t = BTreeMap::new();
        t.insert("cfg".to_string(), "config/cfg".to_string());
        let mut s = BTreeMap::new();
        s.insert(
            "cfg".to_string(),
            "x\n{{ link(\"other\").address }}\n".to_string(),
        );
        let err = TeraTemplates::new("kv", &t, &s, &["peers".to_string()])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("job kv: template cfg line 2"), "{err}");
        assert!(err.contains("unknown link 'other'"), "{err}");
        let mut t = BTreeMap::new();
        t.insert("bad".to_string(), "config/bad".to_string());
        let mut s = BTreeMap::new();
        s.insert("bad".to_string(), "ok\n\n{% if %}\n".to_string());
        let err = TeraTemplates::new("kv", &t, &s, &[])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("job kv: template bad line 3"), "{err}");
    }

    #[test]
    fn erb_tags_in_a_tera_job_are_refused_with_the_line() {
        let mut t = BTreeMap::new();
        t.insert("pre-start".to_string(), "bin/pre-start".to_string());
        let mut s = BTreeMap::new();
        s.insert(
            "pre-start".to_string(),
            "#!/bin/sh\necho <%= p('script') %>\n".to_string(),
        );
        let err = TeraTemplates::new("kv", &t, &s, &[])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("job kv: template pre-start line 2") && err.contains("ERB tag"),
            "{err}"
        );
    }
}
