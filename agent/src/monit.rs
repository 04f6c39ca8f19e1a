//! A job's rendered `monit` file: parsing its text into checks, and turning
//! those checks (with the job's `config/bpm.yml` for the bpm form) into the
//! processes the [`crate::supervisor`] runs.
//!
//! What is understood: `check process NAME [with] pidfile P`, `check file
//! NAME [with] path P`, `start|stop [program] [=] "CMD"` with optional `as
//! uid X [and gid Y]` and `[with] timeout N seconds`, `depends on A[, B]`,
//! `group G`, `mode active|passive|manual`, `if ... then ACTION [else if ...
//! then ACTION]` (accepted and ignored: the agent restarts dead processes by
//! itself and does not watch resources), `set ...` statements (ignored) and
//! `#` comments. Monit statements are free-form, so a check's clauses may
//! share a line or spread over many. Anything else is an error naming the
//! file and line.
//!
//! It reads no files and runs nothing: the agent hands it text, the
//! supervisor runs what it returns.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::protocol::BpmConfig;
use crate::supervisor::{JobProcess, ProcessKind};

/// Why a monit file could not be read as processes.
#[derive(Debug, thiserror::Error)]
pub enum MonitError {
    #[error("parsing {file} line {line}: {message}")]
    Syntax {
        file: PathBuf,
        line: usize,
        message: String,
    },
    #[error("parsing {file} line {line}: {what} is not supported")]
    Unsupported {
        file: PathBuf,
        line: usize,
        what: String,
    },
    #[error("reading processes of {file}: check {check} (line {line}): {message}")]
    Process {
        file: PathBuf,
        check: String,
        line: usize,
        message: String,
    },
}

/// A parsed monit file: its checks in file order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MonitFile {
    pub checks: Vec<Check>,
}

/// One `check` statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    /// Line of the `check` keyword.
    pub line: usize,
    pub target: CheckTarget,
    pub start: Option<Program>,
    pub stop: Option<Program>,
    pub depends_on: Vec<String>,
    pub groups: Vec<String>,
    pub mode: Mode,
}

/// What a check watches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckTarget {
    /// `check process NAME with pidfile P`.
    Pidfile(PathBuf),
    /// `check file NAME with path P`.
    File(PathBuf),
}

/// A `start program` or `stop program`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Program {
    /// The command line, run with `/bin/sh -c`.
    pub command: String,
    /// `with timeout N seconds`; monit's default is 30 s.
    pub timeout: Option<Duration>,
    /// `as uid X`: the program runs as that user of the VM (a name or a
    /// number).
    pub uid: Option<String>,
    /// `and gid Y`: and that group (default: the user's primary group).
    pub gid: Option<String>,
}

/// Monit's monitoring mode; accepted, every mode is supervised alike.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    #[default]
    Active,
    Passive,
    Manual,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Token {
    text: String,
    line: usize,
    quoted: bool,
}

impl Token {
    fn is(&self, word: &str) -> bool {
        !self.quoted && self.text.eq_ignore_ascii_case(word)
    }
}

fn tokenize(file: &Path, text: &str) -> Result<Vec<Token>, MonitError> {
    let mut out = Vec::new();
    let mut line = 1;
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            '\n' => {
                line += 1;
                chars.next();
            }
            c if c.is_whitespace() => {
                chars.next();
            }
            '#' => {
                while chars.peek().is_some_and(|c| *c != '\n') {
                    chars.next();
                }
            }
            '"' | '\'' => {
                let start = line;
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some(q) if q == c => break,
                        Some('\n') => {
                            line += 1;
                            s.push('\n');
                        }
                        Some(ch) => s.push(ch),
                        None => {
                            return Err(MonitError::Syntax {
                                file: file.to_path_buf(),
                                line: start,
                                message: format!("unterminated string starting with {c}"),
                            })
                        }
                    }
                }
                out.push(Token {
                    text: s,
                    line: start,
                    quoted: true,
                });
            }
            ',' | '=' => {
                chars.next();
                out.push(Token {
                    text: c.to_string(),
                    line,
                    quoted: false,
                });
            }
            _ => {
                let mut s = String::new();
                while let Some(&ch) = chars.peek() {
                    if ch.is_whitespace() || matches!(ch, ',' | '=' | '"' | '\'' | '#') {
                        break;
                    }
                    s.push(ch);
                    chars.next();
                }
                out.push(Token {
                    text: s,
                    line,
                    quoted: false,
                });
            }
        }
    }
    Ok(out)
}

/// Parses the rendered text of `file` (used in messages). Blank text (or
/// only comments and `set` statements) has no checks.
pub fn parse(file: &Path, text: &str) -> Result<MonitFile, MonitError> {
    let tokens = tokenize(file, text)?;
    let mut p = Parser {
        file,
        tokens,
        pos: 0,
    };
    let mut checks: Vec<Check> = Vec::new();
    while let Some(t) = p.peek().cloned() {
        if t.is("set") {
            p.pos += 1;
            while p.peek().is_some_and(|t| !starts_statement(t)) {
                p.pos += 1;
            }
        } else if t.is("check") {
            let c = p.check()?;
            if checks.iter().any(|o| o.name == c.name) {
                return Err(p.syntax(c.line, format!("check {} is declared twice", c.name)));
            }
            checks.push(c);
        } else if t.is("include") {
            return Err(p.unsupported(t.line, "include"));
        } else {
            return Err(p.syntax(
                t.line,
                format!("expected `check` or `set`, found `{}`", t.text),
            ));
        }
    }
    Ok(MonitFile { checks })
}

/// A token that begins a top-level statement.
fn starts_statement(t: &Token) -> bool {
    t.is("check") || t.is("set") || t.is("include")
}

struct Parser<'a> {
    file: &'a Path,
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn peek_is(&self, word: &str) -> bool {
        self.peek().is_some_and(|t| t.is(word))
    }

    fn last_line(&self) -> usize {
        self.tokens
            .get(self.pos.saturating_sub(1))
            .or(self.tokens.last())
            .map_or(1, |t| t.line)
    }

    fn syntax(&self, line: usize, message: String) -> MonitError {
        MonitError::Syntax {
            file: self.file.to_path_buf(),
            line,
            message,
        }
    }

    fn unsupported(&self, line: usize, what: &str) -> MonitError {
        MonitError::Unsupported {
            file: self.file.to_path_buf(),
            line,
            what: what.to_string(),
        }
    }

    /// The next token, whatever it is; `what` names it in the error.
    fn value(&mut self, what: &str) -> Result<Token, MonitError> {
        match self.tokens.get(self.pos) {
            Some(t) if t.quoted || !(starts_statement(t) || t.text == "," || t.text == "=") => {
                self.pos += 1;
                Ok(t.clone())
            }
            Some(t) => Err(self.syntax(t.line, format!("expected {what}, found `{}`", t.text))),
            None => Err(self.syntax(
                self.last_line(),
                format!("expected {what}, found the end of the file"),
            )),
        }
    }

    fn expect(&mut self, word: &str) -> Result<(), MonitError> {
        let t = self.value(&format!("`{word}`"))?;
        if t.is(word) {
            Ok(())
        } else {
            Err(self.syntax(t.line, format!("expected `{word}`, found `{}`", t.text)))
        }
    }

    fn eat(&mut self, word: &str) -> bool {
        if self.peek_is(word) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn check(&mut self) -> Result<Check, MonitError> {
        let line = self.peek().map_or(1, |t| t.line);
        self.pos += 1;
        let kind = self.value("a check type")?;
        let name = self.value("a check name")?.text;
        self.eat("with");
        let target = if kind.is("process") {
            let t = self.value("`pidfile`")?;
            if t.is("pidfile") {
                CheckTarget::Pidfile(PathBuf::from(self.value("a pidfile path")?.text))
            } else if t.is("matching") {
                return Err(self.unsupported(
                    t.line,
                    &format!("check process {name} matching (a pidfile is needed)"),
                ));
            } else {
                return Err(self.syntax(
                    t.line,
                    format!(
                        "expected `pidfile` after check process {name}, found `{}`",
                        t.text
                    ),
                ));
            }
        } else if kind.is("file") {
            self.expect("path")?;
            CheckTarget::File(PathBuf::from(self.value("a file path")?.text))
        } else {
            return Err(self.unsupported(kind.line, &format!("check {}", kind.text)));
        };
        let mut check = Check {
            name,
            line,
            target,
            start: None,
            stop: None,
            depends_on: Vec::new(),
            groups: Vec::new(),
            mode: Mode::Active,
        };
        while let Some(t) = self.peek().cloned() {
            if starts_statement(&t) {
                break;
            }
            self.pos += 1;
            if t.is("start") {
                check.start = Some(self.program()?);
            } else if t.is("stop") {
                check.stop = Some(self.program()?);
            } else if t.is("depends") {
                self.eat("on");
                loop {
                    check.depends_on.push(self.value("a check name")?.text);
                    if !(self.eat(",") || self.eat("and")) {
                        break;
                    }
                }
            } else if t.is("group") {
                check.groups.push(self.value("a group name")?.text);
            } else if t.is("mode") {
                let m = self.value("a mode")?;
                check.mode = if m.is("active") {
                    Mode::Active
                } else if m.is("passive") {
                    Mode::Passive
                } else if m.is("manual") {
                    Mode::Manual
                } else {
                    return Err(self.syntax(
                        m.line,
                        format!("expected active, passive or manual, found `{}`", m.text),
                    ));
                };
            } else if t.is("if") {
                self.rule(t.line)?;
            } else if t.is("restart") {
                return Err(self.unsupported(t.line, "restart program"));
            } else {
                return Err(self.syntax(
                    t.line,
                    format!("unexpected `{}` in check {}", t.text, check.name),
                ));
            }
        }
        Ok(check)
    }

    /// After `start`/`stop`: `[program] [=] "CMD"` and its modifiers.
    fn program(&mut self) -> Result<Program, MonitError> {
        self.eat("program");
        self.eat("=");
        let cmd = self.value("a program")?;
        let mut p = Program {
            command: cmd.text,
            timeout: None,
            uid: None,
            gid: None,
        };
        loop {
            if self.peek_is("as") || self.peek_is("and") {
                let save = self.pos;
                self.pos += 1;
                if self.eat("uid") {
                    p.uid = Some(self.value("a user")?.text);
                } else if self.eat("gid") {
                    p.gid = Some(self.value("a group")?.text);
                } else {
                    self.pos = save;
                    break;
                }
            } else if self.eat("uid") {
                p.uid = Some(self.value("a user")?.text);
            } else if self.eat("gid") {
                p.gid = Some(self.value("a group")?.text);
            } else if self.peek_is("with") || self.peek_is("timeout") {
                self.eat("with");
                self.expect("timeout")?;
                let n = self.value("a number of seconds")?;
                let secs: u64 = n.text.parse().map_err(|_| {
                    self.syntax(
                        n.line,
                        format!("expected a number of seconds, found `{}`", n.text),
                    )
                })?;
                if self.peek_is("cycle") || self.peek_is("cycles") {
                    return Err(self.unsupported(n.line, "a program timeout in cycles"));
                }
                if !(self.eat("seconds") || self.eat("second")) {
                    let line = self.peek().map_or(n.line, |t| t.line);
                    return Err(self.syntax(line, "expected `seconds` after the timeout".into()));
                }
                p.timeout = Some(Duration::from_secs(secs));
            } else {
                break;
            }
        }
        Ok(p)
    }

    /// After `if`: everything up to `then`, the action, and any `else if`.
    fn rule(&mut self, line: usize) -> Result<(), MonitError> {
        loop {
            loop {
                match self.peek() {
                    None => {
                        return Err(self.syntax(line, "`if` without `then`".into()));
                    }
                    Some(t) if starts_statement(t) => {
                        return Err(self.syntax(line, "`if` without `then`".into()));
                    }
                    Some(t) if t.is("then") => {
                        self.pos += 1;
                        break;
                    }
                    Some(_) => self.pos += 1,
                }
            }
            let action = self.value("an action")?;
            if action.is("exec") {
                self.value("a program")?;
                while self.peek_is("as") || self.peek_is("and") {
                    self.pos += 1;
                    if !(self.eat("uid") || self.eat("gid")) {
                        let l = self.peek().map_or(action.line, |t| t.line);
                        return Err(self.syntax(l, "expected `uid` or `gid`".into()));
                    }
                    self.value("a user or group")?;
                }
            } else if ![
                "restart",
                "start",
                "stop",
                "alert",
                "unmonitor",
                "monitor",
                "timeout",
            ]
            .iter()
            .any(|w| action.is(w))
            {
                return Err(self.syntax(
                    action.line,
                    format!("unknown action `{}` after `then`", action.text),
                ));
            }
            if self.peek_is("else") {
                self.pos += 1;
                self.expect("if")?;
                continue;
            }
            return Ok(());
        }
    }
}

/// The processes a job's monit file names, in start order (a check after
/// the checks it depends on). `bpm` is the job's parsed `config/bpm.yml`,
/// if it has one; bpm-form checks select their process from it.
pub fn job_processes(
    file: &Path,
    job: &str,
    monit: &MonitFile,
    bpm: Option<&BpmConfig>,
) -> Result<Vec<JobProcess>, MonitError> {
    let fail = |c: &Check, message: String| MonitError::Process {
        file: file.to_path_buf(),
        check: c.name.clone(),
        line: c.line,
        message,
    };
    let mut out: Vec<JobProcess> = Vec::new();
    for c in &monit.checks {
        let (CheckTarget::Pidfile(p) | CheckTarget::File(p)) = &c.target;
        if !p.is_absolute() {
            return Err(fail(c, format!("{} is not an absolute path", p.display())));
        }
        let kind = match &c.target {
            CheckTarget::File(path) => ProcessKind::File {
                path: path.clone(),
                start: c.start.clone(),
                stop: c.stop.clone(),
            },
            CheckTarget::Pidfile(pidfile) => {
                let start = c
                    .start
                    .clone()
                    .ok_or_else(|| fail(c, "it has no start program".into()))?;
                match bpm_start(&start.command) {
                    Some(Ok((bpm_job, process))) => {
                        if bpm_job != job {
                            return Err(fail(
                                c,
                                format!("bpm starts job {bpm_job}, not this job ({job})"),
                            ));
                        }
                        let cfg = bpm.ok_or_else(|| {
                            fail(c, "bpm form, but the job has no config/bpm.yml".into())
                        })?;
                        let proc = cfg
                            .processes
                            .iter()
                            .find(|p| p.name == process)
                            .ok_or_else(|| {
                                fail(c, format!("config/bpm.yml declares no process {process}"))
                            })?;
                        ProcessKind::Bpm(Box::new(proc.clone()))
                    }
                    Some(Err(message)) => return Err(fail(c, message)),
                    None => ProcessKind::Ctl {
                        pidfile: pidfile.clone(),
                        start,
                        stop: c.stop.clone(),
                    },
                }
            }
        };
        out.push(JobProcess {
            name: c.name.clone(),
            depends_on: c.depends_on.clone(),
            kind,
        });
    }
    order_by_dependencies(file, monit, out)
}

/// Whether any check of `monit` starts its process through bpm.
pub fn uses_bpm(monit: &MonitFile) -> bool {
    monit
        .checks
        .iter()
        .filter_map(|c| c.start.as_ref())
        .any(|p| bpm_start(&p.command).is_some())
}

/// `bpm start JOB [-p|--process PROCESS]` → (job, process); `None` when the
/// command is not bpm's; an error when it is bpm's but malformed.
fn bpm_start(command: &str) -> Option<Result<(String, String), String>> {
    let argv: Vec<&str> = command.split_whitespace().collect();
    let exe = argv.first()?;
    if Path::new(exe).file_name().and_then(|n| n.to_str()) != Some("bpm") {
        return None;
    }
    if argv.get(1) != Some(&"start") {
        return Some(Err(format!(
            "start program {command:?} runs bpm but not `bpm start`"
        )));
    }
    let Some(job) = argv.get(2) else {
        return Some(Err(format!("start program {command:?} names no job")));
    };
    let process = match &argv[3..] {
        [] => job.to_string(),
        [flag, p] if *flag == "-p" || *flag == "--process" => p.to_string(),
        [one] if one.starts_with("--process=") => one["--process=".len()..].to_string(),
        _ => {
            return Some(Err(format!(
                "start program {command:?}: expected `bpm start JOB [-p PROCESS]`"
            )))
        }
    };
    Some(Ok((job.to_string(), process)))
}

/// Orders `procs` so that each comes after what it depends on in this job;
/// a cycle is an error. Dependencies on checks of other jobs are kept.
fn order_by_dependencies(
    file: &Path,
    monit: &MonitFile,
    procs: Vec<JobProcess>,
) -> Result<Vec<JobProcess>, MonitError> {
    let line_of = |name: &str| {
        monit
            .checks
            .iter()
            .find(|c| c.name == name)
            .map_or(1, |c| c.line)
    };
    // Checks of other jobs on the VM (monit's names are VM-wide) are
    // ordered by the agent across jobs; here they do not hold anything up.
    let names: HashSet<String> = procs.iter().map(|p| p.name.clone()).collect();
    let mut left: BTreeMap<usize, JobProcess> = procs.into_iter().enumerate().collect();
    let mut done: HashSet<String> = HashSet::new();
    let mut out = Vec::with_capacity(left.len());
    while !left.is_empty() {
        let ready: Vec<usize> = left
            .iter()
            .filter(|(_, p)| {
                p.depends_on
                    .iter()
                    .all(|d| done.contains(d) || !names.contains(d))
            })
            .map(|(i, _)| *i)
            .collect();
        if ready.is_empty() {
            let stuck: Vec<&str> = left.values().map(|p| p.name.as_str()).collect();
            let first = stuck.first().copied().unwrap_or_default();
            return Err(MonitError::Process {
                file: file.to_path_buf(),
                check: first.to_string(),
                line: line_of(first),
                message: format!("dependency cycle among {}", stuck.join(", ")),
            });
        }
        for i in ready {
            if let Some(p) = left.remove(&i) {
                done.insert(p.name.clone());
                out.push(p);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> MonitFile {
        parse(Path::new("jobs/j/monit"), text).unwrap()
    }

    fn parse_err(text: &str) -> String {
        parse(Path::new("jobs/j/monit"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn empty_and_comment_only_files_have_no_checks() {
        assert!(parse_ok("").checks.is_empty());
        assert!(parse_ok("\n  \n# nothing here\n").checks.is_empty());
        assert!(parse_ok("set daemon 10\nset httpd port 2822 and use address 127.0.0.1\n  allow cleartext /var/vcap/monit/monit.user\n")
            .checks
            .is_empty());
    }

    #[test]
    fn bpm_form_spread_over_lines() {
        let m = parse_ok(
            "check process zk\n  with pidfile /var/vcap/sys/run/bpm/zk/zk.pid\n  start program \"/var/vcap/jobs/bpm/bin/bpm start zk\"\n  stop program \"/var/vcap/jobs/bpm/bin/bpm stop zk\"\n  group vcap\n",
        );
        assert_eq!(m.checks.len(), 1);
        let c = &m.checks[0];
        assert_eq!(c.name, "zk");
        assert_eq!(c.line, 1);
        assert_eq!(
            c.target,
            CheckTarget::Pidfile("/var/vcap/sys/run/bpm/zk/zk.pid".into())
        );
        assert_eq!(
            c.start.as_ref().unwrap().command,
            "/var/vcap/jobs/bpm/bin/bpm start zk"
        );
        assert_eq!(
            c.stop.as_ref().unwrap().command,
            "/var/vcap/jobs/bpm/bin/bpm stop zk"
        );
        assert_eq!(c.groups, vec!["vcap".to_string()]);
        assert_eq!(c.mode, Mode::Active);
    }

    #[test]
    fn ctl_form_with_modifiers_rules_and_dependencies() {
        let m = parse_ok(
            r#"# rendered
check process db with pidfile /var/vcap/sys/run/db/db.pid
  start program = "/var/vcap/jobs/db/bin/ctl start" as uid vcap and gid vcap
    with timeout 60 seconds
  stop program "/var/vcap/jobs/db/bin/ctl stop" with timeout 5 seconds
  mode manual
  if totalmem > 3000.0 Mb for 5 cycles then restart
  if failed host 127.0.0.1 port 5432 then alert else if succeeded then exec "/bin/true"
  group vcap

check process web pidfile /var/vcap/sys/run/web/web.pid
  start program "/var/vcap/jobs/db/bin/web_ctl start"
  depends on db, cache and other
check file marker with path /var/vcap/sys/run/db/marker
"#,
        );
        assert_eq!(m.checks.len(), 3);
        let db = &m.checks[0];
        assert_eq!(db.line, 2);
        let start = db.start.as_ref().unwrap();
        assert_eq!(start.command, "/var/vcap/jobs/db/bin/ctl start");
        assert_eq!(start.timeout, Some(Duration::from_secs(60)));
        assert_eq!(start.uid.as_deref(), Some("vcap"));
        assert_eq!(start.gid.as_deref(), Some("vcap"));
        assert_eq!(
            db.stop.as_ref().unwrap().timeout,
            Some(Duration::from_secs(5))
        );
        assert_eq!(db.mode, Mode::Manual);
        let web = &m.checks[1];
        assert_eq!(web.line, 11);
        assert_eq!(web.depends_on, vec!["db", "cache", "other"]);
        assert!(web.stop.is_none());
        assert_eq!(
            m.checks[2].target,
            CheckTarget::File("/var/vcap/sys/run/db/marker".into())
        );
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let e =
            parse_err("check process a with pidfile /p\n  start program \"x\"\n  frobnicate yes\n");
        assert!(e.contains("jobs/j/monit line 3"), "{e}");
        assert!(e.contains("frobnicate"), "{e}");
        let e = parse_err("\n\nhello world\n");
        assert!(e.contains("line 3") && e.contains("`hello`"), "{e}");
        let e = parse_err("check process a\n  matching \"java\"\n");
        assert!(
            e.contains("line 2") && e.contains("matching") && e.contains("not supported"),
            "{e}"
        );
        let e = parse_err("check host h with address 1.2.3.4\n");
        assert!(e.contains("check host is not supported"), "{e}");
        let e = parse_err("check process a with pidfile /p\n start program \"x\n");
        assert!(e.contains("line 2") && e.contains("unterminated"), "{e}");
        let e = parse_err(
            "check process a with pidfile /p\n if cpu > 1% \ncheck process b with pidfile /q\n",
        );
        assert!(e.contains("line 2") && e.contains("then"), "{e}");
        let e = parse_err("check process a with pidfile\n");
        assert!(e.contains("end of the file"), "{e}");
        let e = parse_err("check process a with pidfile /p\ncheck process a with pidfile /q\n");
        assert!(e.contains("line 2") && e.contains("twice"), "{e}");
        let e = parse_err("check process a with pidfile /p\n start \"x\" with timeout 3 cycles\n");
        assert!(e.contains("cycles is not supported"), "{e}");
    }

    fn bpm_cfg() -> BpmConfig {
        serde_yaml_ng::from_str(
            "processes:\n- {name: one, executable: /bin/true}\n- {name: two, executable: /bin/true}\n- {name: j, executable: /bin/true}\n",
        )
        .unwrap()
    }

    fn names(p: &[JobProcess]) -> Vec<&str> {
        p.iter().map(|p| p.name.as_str()).collect()
    }

    #[test]
    fn bpm_checks_select_their_process() {
        let m = parse_ok(
            "check process two with pidfile /x\n start program \"/var/vcap/jobs/bpm/bin/bpm start j -p two\"\n\
             check process j with pidfile /y\n start program \"/var/vcap/jobs/bpm/bin/bpm start j\"\n",
        );
        let cfg = bpm_cfg();
        let procs = job_processes(Path::new("monit"), "j", &m, Some(&cfg)).unwrap();
        assert_eq!(names(&procs), vec!["two", "j"]);
        assert!(matches!(&procs[0].kind, ProcessKind::Bpm(p) if p.name == "two"));
        assert!(matches!(&procs[1].kind, ProcessKind::Bpm(p) if p.name == "j"));

        let m = parse_ok("check process x with pidfile /x\n start program \"/var/vcap/jobs/bpm/bin/bpm start j -p three\"\n");
        let e = job_processes(Path::new("monit"), "j", &m, Some(&cfg))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no process three"), "{e}");
        let e = job_processes(Path::new("monit"), "j", &m, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no config/bpm.yml"), "{e}");
        let m = parse_ok("check process x with pidfile /x\n start program \"/var/vcap/jobs/bpm/bin/bpm start other -p one\"\n");
        let e = job_processes(Path::new("monit"), "j", &m, Some(&cfg))
            .unwrap_err()
            .to_string();
        assert!(e.contains("job other"), "{e}");
    }

    #[test]
    fn ctl_and_file_checks_and_dependency_order() {
        let m = parse_ok(
            "check process web with pidfile /w\n start program \"/jobs/j/bin/web start\"\n depends on db\n\
             check file f with path /f\n\
             check process db with pidfile /d\n start program \"/jobs/j/bin/db start\"\n stop program \"/jobs/j/bin/db stop\"\n",
        );
        let procs = job_processes(Path::new("monit"), "j", &m, None).unwrap();
        assert_eq!(names(&procs), vec!["f", "db", "web"]);
        assert!(
            matches!(&procs[1].kind, ProcessKind::Ctl { pidfile, stop: Some(s), .. }
            if pidfile == Path::new("/d") && s.command == "/jobs/j/bin/db stop")
        );
        assert!(
            matches!(&procs[0].kind, ProcessKind::File { path, start: None, .. } if path == Path::new("/f"))
        );

        let m =
            parse_ok("check process a with pidfile /a\n start program \"x\"\n depends on nope\n");
        let procs = job_processes(Path::new("monit"), "j", &m, None).unwrap();
        assert_eq!(procs[0].depends_on, vec!["nope"], "kept for the agent");
        let m = parse_ok(
            "check process a with pidfile /a\n start program \"x\"\n depends on b\ncheck process b with pidfile /b\n start program \"y\"\n depends on a\n",
        );
        let e = job_processes(Path::new("monit"), "j", &m, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cycle"), "{e}");
        let m = parse_ok("check process a with pidfile run/a.pid\n start program \"x\"\n");
        let e = job_processes(Path::new("monit"), "j", &m, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("run/a.pid is not an absolute path"), "{e}");
        let m = parse_ok("check process a with pidfile /a\n");
        let e = job_processes(Path::new("monit"), "j", &m, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no start program"), "{e}");
    }
}
