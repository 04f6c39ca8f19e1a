use std::collections::BTreeMap;

use serde_json::json;

use super::*;
use crate::release::TemplateEngine;
use crate::templates::{
    render_all, JobTemplates, LinkContext, LinkInstance, NameOnly, ReleaseRef, SpecContext,
};

/// The system's Ruby; `None` (the test says it skipped) outside CI. In CI
/// a missing Ruby fails the test.
fn ruby() -> Option<PathBuf> {
    let r = ruby_path();
    if r.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "ruby is required for the ERB tests in CI: {RUBY_HINT}"
        );
        eprintln!("skipped: no ruby on PATH ({RUBY_HINT})");
    }
    r
}

fn job(name: &str, files: &[(&str, &str, &str)], monit: Option<&str>) -> JobTemplates {
    let mut t = BTreeMap::new();
    let mut s = BTreeMap::new();
    for (src, dest, text) in files {
        t.insert(src.to_string(), dest.to_string());
        s.insert(src.to_string(), text.to_string());
    }
    JobTemplates::new(name, TemplateEngine::Erb, &t, &s, monit, &["peers".into()]).unwrap()
}

fn spec(index: u32) -> (String, SpecContext) {
    let ip = format!("10.0.0.{}", 10 + index);
    (
        format!("zk/id-{index}"),
        SpecContext {
            deployment: "dep".into(),
            name: "zk".into(),
            id: format!("id-{index}"),
            index,
            az: "z1".into(),
            address: ip.clone(),
            ip: ip.clone(),
            bootstrap: index == 0,
            networks: json!({"default": {"ip": ip, "netmask": "255.255.255.0", "gateway": "10.0.0.1", "default": ["dns", "gateway"]}}),
            job: NameOnly { name: "zk".into() },
            release: ReleaseRef {
                name: "zookeeper".into(),
                version: "0.0.9".into(),
            },
        },
    )
}

fn peers() -> BTreeMap<String, LinkContext> {
    let instances: Vec<LinkInstance> = (0..3)
        .map(|i| LinkInstance {
            name: "zk".into(),
            id: format!("id-{i}"),
            index: i,
            az: "z1".into(),
            address: format!("10.0.0.{}", 10 + i),
            bootstrap: i == 0,
        })
        .collect();
    [(
        "peers".to_string(),
        LinkContext {
            address: instances[0].address.clone(),
            instances,
            properties: json!({"client_port": 2181, "tls": {"enabled": false}}),
        },
    )]
    .into_iter()
    .collect()
}

/// The ERB files of a job made by [`job`].
fn erb_files(j: &JobTemplates) -> &ErbFiles {
    match &j.kind {
        crate::templates::Kind::Erb(f) => f,
        crate::templates::Kind::Tera(_) => panic!("not an ERB job"),
    }
}

/// A unit of one instance with no properties, defaults or links.
fn bare<'a>(
    j: &'a JobTemplates,
    empty: &'a (Json, BTreeMap<String, Json>, BTreeMap<String, LinkContext>),
) -> RenderUnit<'a> {
    RenderUnit {
        templates: j,
        properties: &empty.0,
        defaults: &empty.1,
        declared: &[],
        links: &empty.2,
        specs: vec![spec(0)],
    }
}

fn file<'a>(files: &'a [RenderedFile], path: &str) -> &'a str {
    &files
        .iter()
        .find(|f| f.path == path)
        .unwrap_or_else(|| panic!("no {path} in {files:?}"))
        .content
}

const CONFIG: &str = r#"<%
  require 'json'
  require 'yaml'
  class Peers
    def initialize(link) @link = link end
    def line() @link.instances.map(&:address).join(',') end
  end
  def twice(x) x * 2 end
-%>
port=<%= p('zk.port') %>
first=<%= p(['zk.nope', 'zk.port']) %>
fallback=<%= p('zk.unset', 'fb') %>
<% if_p('zk.limit') do |l| -%>
limit=<%= l %>
<% end.else do -%>
no-limit
<% end -%>
<% if_p('zk.name') do |n| -%>
name=<%= n %>
<% end -%>
peers=<%= Peers.new(link('peers')).line %>
<% link('peers').instances.each_with_index do |i, n| -%>
server.<%= i.index %>=<%= i.address %> id=<%= i.id %> az=<%= i.az %> boot=<%= i.bootstrap %> n=<%= n %>
<% end -%>
link.address=<%= link('peers').address %> port=<%= link('peers').p('client_port') %> tls=<%= link('peers').p('tls.enabled') %> def=<%= link('peers').p('x', 7) %>
<% link('peers').if_p('client_port') do |cp| %>lp=<%= cp %><% end %>
<% if_link('peers') do |l| %>has-peers=<%= l.instances.size %><% end %>
<% if_link('nothing') do |l| %>never<% end.else do %>no-nothing<% end %>
spec=<%= spec.name %>/<%= spec.id %> i=<%= spec.index %> az=<%= spec.az %> boot=<%= spec.bootstrap %> dep=<%= spec.deployment %>
addr=<%= spec.address %> ip=<%= spec.ip %> net=<%= spec.networks.default.ip %>/<%= spec.networks.default.netmask %> gw=<%= spec.networks.default.gateway %> d=<%= spec.networks.default.default.join('+') %>
job=<%= spec.job.name %> rel=<%= spec.release.name %>@<%= spec.release.version %> name=<%= name %> index=<%= index %>
props=<%= properties.zk.port %> missing=<%= properties.zk.absent.inspect %>
json=<%= JSON.dump(p('zk.tags')) %>
<%= YAML.dump({'servers' => twice(2)}) -%>
blank=<%= [nil.blank?, ''.blank?, '  '.blank?, [].blank?, {}.blank?, 'x'.blank?, 'x'.present?, nil.present?].join(',') %>
upcase=<%= p('zk.name', 'n').upcase.gsub(/O/, '0') %>
"#;

const MONIT: &str = r#"<% unless p("zk.disable") -%>
check process zk
  with pidfile /var/vcap/sys/run/bpm/zk/zk.pid
  start program "/var/vcap/jobs/bpm/bin/bpm start zk"
  stop program "/var/vcap/jobs/bpm/bin/bpm stop zk"
  group vcap
<% end -%>
"#;

#[test]
fn renders_the_bosh_template_context() {
    let Some(ruby) = ruby() else { return };
    let j = job(
        "zk",
        &[
            ("config.erb", "config/zoo.cfg", CONFIG),
            (
                "ctl.erb",
                "bin/ctl",
                "#!/bin/bash\nexec zk <%= spec.index %>\n",
            ),
            ("pre-start", "bin/pre-start", "<%= p('zk.script', '') %>"),
        ],
        Some(MONIT),
    );
    let props = json!({"zk": {"port": 2181, "tags": ["a", 1], "script": "echo hi"}});
    let defaults: BTreeMap<String, Json> = [
        ("zk.limit".to_string(), json!(5)),
        ("zk.disable".to_string(), json!(false)),
        ("zk.port".to_string(), json!(1)),
    ]
    .into_iter()
    .collect();
    let links = peers();
    let declared: Vec<String> = [
        "zk.disable",
        "zk.limit",
        "zk.name",
        "zk.port",
        "zk.script",
        "zk.tags",
    ]
    .map(String::from)
    .to_vec();
    let units = vec![RenderUnit {
        templates: &j,
        properties: &props,
        defaults: &defaults,
        declared: &declared,
        links: &links,
        specs: vec![spec(0), spec(1)],
    }];
    let out = render_with(Some(ruby), TIME_LIMIT, &units, &[(0, erb_files(&j))]).unwrap();
    let first = out[0][0].as_ref().unwrap();
    let second = out[0][1].as_ref().unwrap();
    let cfg = file(first, "config/zoo.cfg");
    let expected = "port=2181\nfirst=2181\nfallback=fb\nlimit=5\n\
peers=10.0.0.10,10.0.0.11,10.0.0.12\n\
server.0=10.0.0.10 id=id-0 az=z1 boot=true n=0\n\
server.1=10.0.0.11 id=id-1 az=z1 boot=false n=1\n\
server.2=10.0.0.12 id=id-2 az=z1 boot=false n=2\n\
link.address=10.0.0.10 port=2181 tls=false def=7\n\
lp=2181\n\
has-peers=3\n\
no-nothing\n\
spec=zk/id-0 i=0 az=z1 boot=true dep=dep\n\
addr=10.0.0.10 ip=10.0.0.10 net=10.0.0.10/255.255.255.0 gw=10.0.0.1 d=dns+gateway\n\
job=zk rel=zookeeper@0.0.9 name=zk index=0\n\
props=2181 missing=nil\n\
json=[\"a\",1]\n\
---\nservers: 4\n\
blank=true,true,true,true,true,false,true,false\n\
upcase=N\n";
    assert_eq!(cfg, expected);
    assert!(file(second, "config/zoo.cfg").contains("spec=zk/id-1 i=1 az=z1 boot=false"));
    assert_eq!(file(second, "bin/ctl"), "#!/bin/bash\nexec zk 1\n");
    assert!(second.iter().any(|f| f.path == "bin/ctl" && f.executable));
    assert_eq!(file(first, "bin/pre-start"), "echo hi");
    let monit = file(first, "monit");
    assert!(monit.starts_with("check process zk\n"), "{monit}");
    assert!(!first.iter().any(|f| f.path == "monit" && f.executable));
}

#[test]
fn every_problem_names_job_template_and_line_and_all_are_gathered() {
    let Some(_) = ruby() else { return };
    let j = job(
        "zk",
        &[
            (
                "a.erb",
                "config/a",
                "ok\n<% abort('zk.port must be set') if p('zk.port') == 0 %>\n",
            ),
            ("b.erb", "config/b", "\n\n<%= p('zk.nope') %>\n"),
            (
                "c.erb",
                "config/c",
                "<% raise ArgumentError, 'bad peers' if spec.index == 1 %>fine",
            ),
            ("d.erb", "config/d", "one\n<% if %>\n"),
        ],
        None,
    );
    let props = json!({"zk": {"port": 0}});
    let defaults = BTreeMap::new();
    let links = peers();
    let declared = vec!["zk.port".to_string()];
    let units = vec![RenderUnit {
        templates: &j,
        properties: &props,
        defaults: &defaults,
        declared: &declared,
        links: &links,
        specs: vec![spec(0), spec(1)],
    }];
    let err = render_all(&units).unwrap_err();
    let text = err.to_string();
    // 3 problems on instance 0 (a, b, d) and 4 on instance 1 (a, b, c, d).
    assert_eq!(err.0.len(), 7, "{text}");
    assert!(text.starts_with("7 template problems:"), "{text}");
    assert!(
        text.contains("zk/id-0: job zk: template a.erb line 2: zk.port must be set"),
        "{text}"
    );
    assert!(
        text.contains("zk/id-1: job zk: template b.erb line 3: UnknownProperty: Can't find property 'zk.nope'"),
        "{text}"
    );
    assert!(
        text.contains("zk/id-1: job zk: template c.erb line 1: ArgumentError: bad peers"),
        "{text}"
    );
    assert!(!text.contains("zk/id-0: job zk: template c.erb"), "{text}");
    assert!(
        text.contains("job zk: template d.erb line 2: SyntaxError"),
        "{text}"
    );
}

#[test]
fn no_ruby_is_a_clear_error() {
    let j = job("zk", &[("a.erb", "a", "x")], None);
    let empty = (json!({}), BTreeMap::new(), BTreeMap::new());
    let units = vec![bare(&j, &empty)];
    let err = render_with(None, TIME_LIMIT, &units, &[(0, erb_files(&j))]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "job zk has ERB templates and rendering them needs Ruby, which is not on PATH: install ruby: apt-get install ruby"
    );
}

#[test]
fn the_renderer_runs_clean_in_a_temporary_directory_within_a_time_limit() {
    let Some(ruby) = ruby() else { return };
    let j = job(
        "zk",
        &[(
            "env.erb",
            "env",
            "<%= ENV.keys.sort.join(',') %>|<%= Dir.pwd == ENV['HOME'] && Dir.pwd.include?('bosun-erb-') %>",
        )],
        None,
    );
    let empty = (json!({}), BTreeMap::new(), BTreeMap::new());
    let units = vec![bare(&j, &empty)];
    let out = render_with(
        Some(ruby.clone()),
        TIME_LIMIT,
        &units,
        &[(0, erb_files(&j))],
    )
    .unwrap();
    let text = file(out[0][0].as_ref().unwrap(), "env");
    let (keys, pwd) = text.split_once('|').unwrap();
    assert_eq!(pwd, "true", "{text}");
    for k in keys.split(',') {
        assert!(
            ["HOME", "LANG", "PATH"].contains(&k) || k.starts_with("RUBY"),
            "unexpected variable {k} in the renderer's environment: {keys}"
        );
    }
    let slow = job("zk", &[("slow.erb", "slow", "<% sleep 30 %>")], None);
    let units = vec![bare(&slow, &empty)];
    let started = Instant::now();
    let err = render_with(
        Some(ruby),
        Duration::from_millis(500),
        &units,
        &[(0, erb_files(&slow))],
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("did not finish within 0.5 s"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn templates_see_only_the_properties_their_spec_declares() {
    let Some(ruby) = ruby() else { return };
    let j = job(
        "zk",
        &[(
            "a.erb",
            "config/a",
            "<%= p('zk.port') %> <%= p('zk.hidden', 'unseen') %> <%= p('zk.unset', 'no-value') %> <%= properties.zk.tls.ca %> <%= p('top', 'none') %>",
        )],
        None,
    );
    // `zk.hidden` and `top` are in the manifest but not declared; `zk.unset`
    // is declared with no value and no default; `zk.tls` holds its child.
    let props = json!({"zk": {"port": 1, "hidden": "secret", "tls": {"ca": "CA"}}, "top": "x"});
    let defaults: BTreeMap<String, Json> =
        [("zk.port".to_string(), json!(9))].into_iter().collect();
    let declared: Vec<String> = ["zk.port", "zk.tls", "zk.unset"].map(String::from).to_vec();
    let links = BTreeMap::new();
    let units = vec![RenderUnit {
        templates: &j,
        properties: &props,
        defaults: &defaults,
        declared: &declared,
        links: &links,
        specs: vec![spec(0)],
    }];
    let out = render_with(Some(ruby), TIME_LIMIT, &units, &[(0, erb_files(&j))]).unwrap();
    let files = out[0][0].as_ref().unwrap();
    assert_eq!(file(files, "config/a"), "1 unseen no-value CA none");
    let bound = bound_properties(&props, &declared, &defaults);
    assert_eq!(
        bound,
        json!({"zk": {"port": 1, "tls": {"ca": "CA"}, "unset": null}})
    );
}
