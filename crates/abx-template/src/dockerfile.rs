//! Dockerfile parsing: a Dockerfile becomes the resolved steps of a template build.
//!
//! [`parse`] (or [`parse_with_base`], which also knows the base template's environment,
//! working directory and start configuration) reads a Dockerfile the way `docker build` does
//! and returns a [`Plan`]: the base (`FROM`), the steps that change the filesystem or the
//! build state (`RUN`, `COPY`/`ADD`, `ENV`, `WORKDIR`, `USER`) with every variable already
//! expanded, and the configuration the finished template gets. Nothing here touches the
//! filesystem or runs anything; the build context is [`crate::context`]'s business.
//!
//! # Syntax
//!
//! - Instructions are case-insensitive. Lines whose first non-blank character is `#` are
//!   comments, also between continued lines. A line ending in the escape character (`\`, or
//!   `` ` `` after `# escape=`` ` ``), optionally followed by blanks, continues on the next
//!   line; blank lines inside a continuation are skipped. `Step` line numbers are those of an
//!   instruction's first line.
//! - Parser directives (`# escape=`, `# syntax=`, `# check=`) are read from the top of the
//!   file until the first line that is not one. `syntax` is ignored (this parser is always
//!   used; a warning is given unless it names `docker/dockerfile`), `check` is ignored.
//! - Heredocs in `RUN` (`RUN <<EOF`, `<<-EOF` stripping leading tabs, quoted `<<"EOF"`,
//!   several per instruction): when the instruction is just one heredoc, its body is the
//!   script, run with the shell (or, if it starts with `#!`, with that interpreter reading the
//!   script from `/dev/stdin`); otherwise the instruction and its heredoc bodies are handed to
//!   the shell together, which then does the heredoc redirection itself (`RUN cat <<EOF >f`).
//!   `<<` inside quotes and `<<` followed by a digit (`$((1<<2))`) are not heredocs.
//!
//! # Variables
//!
//! `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:+alt}`, `${VAR+alt}`,
//! `${VAR:?message}` and `${VAR?message}` are expanded, with quote removal (`'...'` literal,
//! `"..."` expanding) and the escape character escaping the next character (`\$` is a literal
//! `$`), in `FROM`, `ARG` defaults, `ENV`, `LABEL`, `WORKDIR`, `USER`, `COPY`/`ADD` (sources,
//! destination and flag values), `EXPOSE` and `STOPSIGNAL`, like docker. `RUN`, `CMD`,
//! `ENTRYPOINT`, `SHELL` and `HEALTHCHECK` are left alone: the shell expands those at run time.
//!
//! Values come from, in order: `ENV` (including the base template's environment given to
//! [`parse_with_base`], so `ENV PATH=/opt/bin:$PATH` works), then `ARG`. An `ARG` declared
//! before `FROM` is visible only in `FROM`, unless redeclared (`ARG NAME` without a value)
//! after it. `--build-arg` values override `ARG` defaults. The automatic platform arguments
//! (`TARGETPLATFORM`, `TARGETOS`, `TARGETARCH`, `TARGETVARIANT` and the `BUILD*` ones, all for
//! this machine) are visible before `FROM` and after it once declared. All `ARG` values in
//! scope are passed to each `RUN` in its [`Step::Run`] environment (not persisted, like docker), as
//! are the predefined proxy arguments (`HTTP_PROXY`, `https_proxy`, ...) when given as build
//! arguments; [`Step::cache_text`] leaves the proxy ones out, so changing a proxy does not
//! invalidate the cache. Build arguments no `ARG` declares are listed in
//! [`Plan::unused_args`] (docker warns about them).
//!
//! # Instructions
//!
//! | instruction | becomes |
//! |---|---|
//! | `FROM image [AS name]` | [`Plan::from`]; exactly one; `--platform` only for this machine's platform |
//! | `ARG name[=default] ...` | variables, see above |
//! | `ENV K=V K2="v 2"`, `ENV K V` | [`Step::Env`]; all pairs of one instruction see the values before it |
//! | `RUN cmd`, `RUN ["exe", "arg"]` | [`Step::Run`]; shell form wrapped in the current `SHELL` (default `/bin/sh -c`) |
//! | `COPY`/`ADD [--chown=] [--chmod=] [--link] src... dest` | [`Step::Copy`]; `ADD` sets `extract_archives`; relative dest resolved against the working directory |
//! | `WORKDIR path` | [`Step::Workdir`] with an absolute path (relative ones resolved against the previous one) |
//! | `USER user[:group]` | [`Step::User`] |
//! | `CMD`, `ENTRYPOINT` | [`Plan::start`] = entrypoint + cmd (a shell-form entrypoint ignores cmd) |
//! | `HEALTHCHECK CMD ...` / `NONE` | [`Plan::ready`] set (exec form shell-quoted into one command) / cleared; `--interval` and the like are accepted and have no effect |
//! | `SHELL ["exe", "arg"]` | the wrapper of later shell-form `RUN`, `CMD` and `ENTRYPOINT` |
//! | `LABEL`, `EXPOSE`, `STOPSIGNAL` | [`Plan::labels`], [`Plan::expose`], [`Plan::stop_signal`] |
//! | `VOLUME`, `ONBUILD`, `MAINTAINER` | ignored, with an entry in [`Plan::warnings`] |
//!
//! `COPY --link` is accepted and changes nothing (every step is a layer of its own anyway).
//!
//! `VOLUME` is ignored rather than rejected because many Dockerfiles declare one and a
//! sandbox has its own volumes; note that docker discards changes a later `RUN` makes below a
//! volume path, which this build keeps. `ONBUILD` only matters when the image is used as a
//! base of another Dockerfile, which templates do not record. `MAINTAINER` is deprecated.
//!
//! # Rejected, with the line number
//!
//! A missing `FROM`, any instruction but `ARG` before it, a second `FROM` (multi-stage
//! builds), `COPY --from`, any other flag of `COPY`/`ADD` (`--parents`, `--exclude`,
//! `--checksum`, ...), `RUN` flags (`--mount`, `--network`, `--security`: a cache or bind
//! mount would silently change what ends up in the layer), URLs and git sources in
//! `ADD`/`COPY`, heredocs in `COPY`/`ADD`, several sources with a destination not ending in
//! `/` (docker rejects that too), a `--chmod` that is not octal, `SHELL` not in JSON form,
//! unknown instructions, unterminated quotes and heredocs, and unknown `${...}` operators.
//!
//! # Differences from docker
//!
//! - A template records one start command, not an entrypoint and a cmd: a Dockerfile with
//!   only `CMD` replaces the base template's start command instead of appending to an
//!   inherited entrypoint. A Dockerfile with neither keeps the base's.
//! - `HEALTHCHECK CMD` in shell form is run by the sandbox runtime (with `/bin/sh -c`), not with
//!   the `SHELL` in effect.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use crate::meta::TemplateConfig;

/// The shell-form wrapper until a `SHELL` instruction changes it.
pub const DEFAULT_SHELL: [&str; 2] = ["/bin/sh", "-c"];

/// Build arguments docker passes to `RUN` without an `ARG` declaring them.
const PROXY_ARGS: [&str; 10] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// How many symbolic expansions deep `${A:-${B:-...}}` may nest.
const MAX_NESTING: usize = 32;

/// A Dockerfile that cannot be built, with the (1-based) line of the offending instruction;
/// line 0 when no particular line is to blame (an empty file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerfileError {
    /// First line of the instruction, counting from 1; 0 for the whole file.
    pub line: usize,
    /// What is wrong, e.g. `COPY --from is not supported (single-stage builds only)`.
    pub message: String,
}

impl DockerfileError {
    fn new(line: usize, message: impl Into<String>) -> DockerfileError {
        DockerfileError { line, message: message.into() }
    }
}

impl fmt::Display for DockerfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            0 => write!(f, "Dockerfile: {}", self.message),
            line => write!(f, "Dockerfile line {line}: {}", self.message),
        }
    }
}

impl std::error::Error for DockerfileError {}

/// A parsed Dockerfile: what to build on, the steps, and the resulting configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The `FROM` image or template reference, variables expanded (`AS name` dropped).
    pub from: String,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// Start command of the template: entrypoint + cmd, shell forms wrapped in the shell; the
    /// base's (as given to [`parse_with_base`]) when the Dockerfile has neither; empty: none.
    pub start: Vec<String>,
    /// Readiness check (`HEALTHCHECK CMD`) as one shell command; the base's unless the
    /// Dockerfile has a `HEALTHCHECK` (`NONE` clears it).
    pub ready: Option<String>,
    /// Environment of the finished template: the base's plus every `ENV`.
    pub env: BTreeMap<String, String>,
    /// Working directory of the finished template (absolute), if the base or a `WORKDIR` set one.
    pub workdir: Option<String>,
    /// User of the finished template, if the base or a `USER` set one.
    pub user: Option<String>,
    /// `LABEL`s, later ones replacing earlier ones.
    pub labels: BTreeMap<String, String>,
    /// `EXPOSE`d ports as written (`80`, `53/udp`, `8000-8010/tcp`).
    pub expose: Vec<String>,
    /// `STOPSIGNAL`, as written.
    pub stop_signal: Option<String>,
    /// Build arguments that no `ARG` declares (docker warns that they were not consumed),
    /// sorted.
    pub unused_args: Vec<String>,
    /// Instructions that were accepted but ignored, as `Dockerfile line N: ...` messages.
    pub warnings: Vec<String>,
}

/// One step of a build. `line` is the instruction's first line in the Dockerfile; `text` is
/// the instruction with its variables expanded, for progress output (`RUN` text is as
/// written, plus heredoc bodies). For a cache key use [`Step::cache_text`], which also covers
/// the shell wrapper and the `ARG` environment of a `RUN`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    /// Run a command in the image being built, as the current user in the current working
    /// directory, with the current environment plus `env`.
    Run {
        /// The argv: the shell wrapper plus the command for the shell form, as given for the
        /// exec (JSON) form.
        command: Vec<String>,
        /// `ARG` values in scope (and proxy build arguments), passed in the environment of
        /// this command only. The persisted environment wins over these where both have a
        /// name (docker: "ENV always overrides ARG").
        env: BTreeMap<String, String>,
        #[serde(skip)]
        line: usize,
        #[serde(skip)]
        text: String,
    },
    /// Copy files of the build context into the image (see [`crate::context`]).
    Copy {
        /// Source paths or glob patterns, relative to the build context.
        sources: Vec<String>,
        /// Destination, absolute (resolved against the working directory); ends in `/` when
        /// it names a directory.
        dest: String,
        /// `--chown` as written (`user`, `user:group`, numeric or names; resolve names in the
        /// image's /etc/passwd and /etc/group, see [`crate::context::parse_numeric_owner`]).
        chown: Option<String>,
        /// `--chmod`, octal digits (checked; see [`crate::context::parse_chmod`]).
        chmod: Option<String>,
        /// `ADD`: local tar archives (plain or gzip) are extracted into `dest`.
        extract_archives: bool,
        #[serde(skip)]
        line: usize,
        #[serde(skip)]
        text: String,
    },
    /// Set environment variables, in order, for the later steps and the template.
    Env {
        vars: Vec<(String, String)>,
        #[serde(skip)]
        line: usize,
        #[serde(skip)]
        text: String,
    },
    /// Change the working directory (absolute). Like docker, the build creates it if it is
    /// missing (BuildKit makes it owned by the current `USER`).
    Workdir {
        path: String,
        #[serde(skip)]
        line: usize,
        #[serde(skip)]
        text: String,
    },
    /// Change the user later `RUN` steps (and the template) run as: `user[:group]`, names or ids.
    User {
        user: String,
        #[serde(skip)]
        line: usize,
        #[serde(skip)]
        text: String,
    },
}

impl Step {
    /// The Dockerfile line the instruction starts on.
    pub fn line(&self) -> usize {
        match self {
            Step::Run { line, .. }
            | Step::Copy { line, .. }
            | Step::Env { line, .. }
            | Step::Workdir { line, .. }
            | Step::User { line, .. } => *line,
        }
    }

    /// The instruction with its variables expanded, for progress output.
    pub fn text(&self) -> &str {
        match self {
            Step::Run { text, .. }
            | Step::Copy { text, .. }
            | Step::Env { text, .. }
            | Step::Workdir { text, .. }
            | Step::User { text, .. } => text,
        }
    }

    /// A canonical, unambiguous description of what the step does (JSON of every field but
    /// `line` and `text`; proxy variables left out of a `RUN`'s environment), for cache keys.
    /// A `COPY` key must also cover the content of its sources (see
    /// [`crate::context::digest`]).
    pub fn cache_text(&self) -> String {
        let mut step = self.clone();
        if let Step::Run { env, .. } = &mut step {
            env.retain(|name, _| !PROXY_ARGS.contains(&name.as_str()));
        }
        serde_json::to_string(&step).expect("a step of strings always serializes")
    }
}

/// Parses `text` with the given `--build-arg` values, on an empty base configuration (no
/// environment, working directory `/`). Use [`parse_with_base`] once the base is known: the
/// base environment matters for expansions like `$PATH`.
pub fn parse(text: &str, build_args: &BTreeMap<String, String>) -> Result<Plan, DockerfileError> {
    parse_with_base(text, build_args, &TemplateConfig::default())
}

/// Parses `text` with the given `--build-arg` values on top of the base template's
/// configuration `base` (its environment is visible to expansions, relative `WORKDIR`s
/// resolve against its working directory, its start command and readiness check are kept
/// unless the Dockerfile replaces them). A builder typically calls [`parse`] to learn
/// [`Plan::from`], resolves the base, then parses again with this.
pub fn parse_with_base(
    text: &str,
    build_args: &BTreeMap<String, String>,
    base: &TemplateConfig,
) -> Result<Plan, DockerfileError> {
    let lines: Vec<&str> = text.lines().collect();
    let mut parser = Parser::new(build_args, base);
    let first = parser.directives(&lines)?;
    let mut reader = Reader { lines: &lines, next: first, escape: parser.escape };
    while let Some(instruction) = reader.instruction() {
        parser.dispatch(&instruction, &mut reader)?;
    }
    parser.finish(lines.len())
}

/// One logical line: an instruction with its continuation lines joined.
struct Instruction {
    line: usize,
    /// Upper case.
    keyword: String,
    /// Everything after the keyword, trimmed.
    args: String,
}

/// Hands out instructions and heredoc bodies from the lines of a Dockerfile.
struct Reader<'a> {
    lines: &'a [&'a str],
    /// Index of the next line to read.
    next: usize,
    escape: char,
}

impl<'a> Reader<'a> {
    /// The next instruction, skipping blank lines and comments; `None` at the end.
    fn instruction(&mut self) -> Option<Instruction> {
        let (line, first) = loop {
            let raw = self.lines.get(self.next)?;
            self.next += 1;
            let trimmed = raw.trim_start();
            if !trimmed.is_empty() && !trimmed.starts_with('#') {
                break (self.next, trimmed);
            }
        };
        let mut text = first.to_string();
        while let Some(cut) = continuation(&text, self.escape) {
            text.truncate(cut);
            match self.continued_line() {
                Some(next) => text.push_str(next),
                None => break,
            }
        }
        let text = text.trim();
        let (keyword, args) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
        Some(Instruction { line, keyword: keyword.to_ascii_uppercase(), args: args.trim().to_string() })
    }

    /// The next line that continues an instruction (comments and blank lines skipped).
    fn continued_line(&mut self) -> Option<&'a str> {
        loop {
            let raw = self.lines.get(self.next)?;
            self.next += 1;
            let trimmed = raw.trim_start();
            if !trimmed.is_empty() && !trimmed.starts_with('#') {
                return Some(raw);
            }
        }
    }

    /// The raw lines of a heredoc body and its terminating line.
    fn heredoc(&mut self, heredoc: &Heredoc, line: usize) -> Result<(Vec<&'a str>, &'a str), DockerfileError> {
        let mut body = Vec::new();
        loop {
            let Some(raw) = self.lines.get(self.next) else {
                let delim = &heredoc.delim;
                return Err(DockerfileError::new(line, format!("heredoc <<{delim} has no terminating '{delim}' line")));
            };
            self.next += 1;
            let compared = if heredoc.strip_tabs { raw.trim_start_matches('\t') } else { raw };
            if compared == heredoc.delim {
                return Ok((body, raw));
            }
            body.push(raw);
        }
    }
}

/// Where the continuation marker starts if `text` ends in the escape character (optionally
/// followed by blanks).
fn continuation(text: &str, escape: char) -> Option<usize> {
    let trimmed = text.trim_end_matches([' ', '\t']);
    trimmed.strip_suffix(escape).map(str::len)
}

/// The instructions this parser knows (for "X before FROM" versus "unknown instruction").
const KNOWN: [&str; 18] = [
    "FROM",
    "ARG",
    "ENV",
    "LABEL",
    "RUN",
    "COPY",
    "ADD",
    "WORKDIR",
    "USER",
    "CMD",
    "ENTRYPOINT",
    "HEALTHCHECK",
    "SHELL",
    "EXPOSE",
    "STOPSIGNAL",
    "VOLUME",
    "ONBUILD",
    "MAINTAINER",
];

struct Parser<'a> {
    build_args: &'a BTreeMap<String, String>,
    escape: char,
    /// ARGs declared before FROM (plus the automatic platform ones), with their values.
    meta: BTreeMap<String, Option<String>>,
    /// Every ARG name declared anywhere.
    declared: BTreeSet<String>,
    from: Option<String>,
    /// ARGs declared after FROM, with their values (`None`: declared without a value).
    args: BTreeMap<String, Option<String>>,
    /// The base environment plus ENV.
    env: BTreeMap<String, String>,
    shell: Vec<String>,
    workdir: Option<String>,
    user: Option<String>,
    /// ENTRYPOINT and whether it is in shell form.
    entrypoint: Option<(Vec<String>, bool)>,
    cmd: Option<Vec<String>>,
    base_start: Vec<String>,
    ready: Option<String>,
    steps: Vec<Step>,
    labels: BTreeMap<String, String>,
    expose: Vec<String>,
    stop_signal: Option<String>,
    warnings: Vec<String>,
}

impl<'a> Parser<'a> {
    fn new(build_args: &'a BTreeMap<String, String>, base: &TemplateConfig) -> Parser<'a> {
        let meta = platform_args()
            .into_iter()
            .map(|(name, value)| {
                let value = build_args.get(name).cloned().unwrap_or(value);
                (name.to_string(), Some(value))
            })
            .collect();
        Parser {
            build_args,
            escape: '\\',
            meta,
            declared: BTreeSet::new(),
            from: None,
            args: BTreeMap::new(),
            env: base.env.clone(),
            shell: DEFAULT_SHELL.iter().map(|s| s.to_string()).collect(),
            workdir: base.workdir.clone(),
            user: base.user.clone(),
            entrypoint: None,
            cmd: None,
            base_start: base.start.clone(),
            ready: base.ready.clone(),
            steps: Vec::new(),
            labels: BTreeMap::new(),
            expose: Vec::new(),
            stop_signal: None,
            warnings: Vec::new(),
        }
    }

    /// Reads the parser directives at the top; returns the index of the first other line.
    fn directives(&mut self, lines: &[&str]) -> Result<usize, DockerfileError> {
        let mut seen = BTreeSet::new();
        for (index, raw) in lines.iter().enumerate() {
            let line = index + 1;
            let Some((key, value)) = raw.trim().strip_prefix('#').and_then(|body| body.split_once('=')) else {
                return Ok(index);
            };
            let key = key.trim().to_ascii_lowercase();
            let value = value.trim();
            if !matches!(key.as_str(), "escape" | "syntax" | "check") {
                return Ok(index); // an ordinary comment, which ends the directives
            }
            if !seen.insert(key.clone()) {
                return Err(DockerfileError::new(line, format!("parser directive '{key}' given twice")));
            }
            match key.as_str() {
                "escape" => {
                    self.escape = match value {
                        "\\" => '\\',
                        "`" => '`',
                        _ => {
                            let message = format!("invalid escape character '{value}' (must be \\ or `)");
                            return Err(DockerfileError::new(line, message));
                        }
                    }
                }
                "syntax" if !value.starts_with("docker/dockerfile") => self.warn(
                    line,
                    format!("# syntax={value} is ignored (agentbox always uses its own Dockerfile parser)"),
                ),
                _ => {}
            }
        }
        Ok(lines.len())
    }

    fn warn(&mut self, line: usize, message: impl fmt::Display) {
        self.warnings.push(format!("Dockerfile line {line}: {message}"));
    }

    fn dispatch(&mut self, ins: &Instruction, reader: &mut Reader<'_>) -> Result<(), DockerfileError> {
        let (line, kw, args) = (ins.line, ins.keyword.as_str(), ins.args.as_str());
        if !KNOWN.contains(&kw) {
            return Err(DockerfileError::new(line, format!("unknown instruction {kw}")));
        }
        if self.from.is_none() && !matches!(kw, "ARG" | "FROM") {
            return Err(DockerfileError::new(line, format!("{kw} before FROM (only ARG may come before FROM)")));
        }
        let needs_args = !matches!(kw, "CMD" | "ENTRYPOINT");
        if needs_args && args.is_empty() {
            return Err(DockerfileError::new(line, format!("{kw} needs an argument")));
        }
        match kw {
            "FROM" => self.from(line, args),
            "ARG" => self.arg(line, args),
            "ENV" => self.env(line, args),
            "LABEL" => self.label(line, args),
            "RUN" => self.run(line, args, reader),
            "COPY" | "ADD" => self.copy(line, kw, args),
            "WORKDIR" => self.workdir(line, args),
            "USER" => self.user(line, args),
            "CMD" | "ENTRYPOINT" => self.start(line, kw, args),
            "HEALTHCHECK" => self.healthcheck(line, args),
            "SHELL" => self.shell(line, args),
            "EXPOSE" => self.expose(line, args),
            "STOPSIGNAL" => self.stop_signal(line, args),
            "VOLUME" => {
                self.warn(line, "VOLUME is ignored (sandboxes have their own volumes)");
                Ok(())
            }
            "ONBUILD" => {
                self.warn(line, "ONBUILD is ignored (templates do not record build triggers)");
                Ok(())
            }
            _ => {
                self.warn(line, "MAINTAINER is deprecated and ignored (use LABEL)");
                Ok(())
            }
        }
    }

    /// The value of a variable for expansion: only pre-FROM ARGs before and in FROM; ENV,
    /// then ARG after.
    fn lookup(&self, name: &str) -> Option<String> {
        if self.from.is_none() {
            return self.meta.get(name).cloned().flatten();
        }
        self.env.get(name).cloned().or_else(|| self.args.get(name).cloned().flatten())
    }

    fn expand(&self, line: usize, word: &str) -> Result<String, DockerfileError> {
        let lookup = |name: &str| self.lookup(name);
        let mut expander = Expander { chars: word.chars().collect(), pos: 0, escape: self.escape, lookup: &lookup };
        expander.word(0).map_err(|message| DockerfileError::new(line, message))
    }

    /// Splits into words (quotes respected) and expands each.
    fn expand_words(&self, line: usize, text: &str) -> Result<Vec<String>, DockerfileError> {
        split_words(text, self.escape).iter().map(|word| self.expand(line, word)).collect()
    }

    fn from(&mut self, line: usize, args: &str) -> Result<(), DockerfileError> {
        if self.from.is_some() {
            return Err(DockerfileError::new(
                line,
                "a second FROM: multi-stage builds are not supported (single-stage builds only)",
            ));
        }
        let (flags, rest) = take_flags(args);
        for (name, value) in flags {
            let value = match (name.as_str(), value) {
                ("platform", Some(value)) => self.expand(line, &value)?,
                (name, _) => return Err(DockerfileError::new(line, format!("FROM --{name} is not supported"))),
            };
            let host = host_platform();
            if value != host {
                let message = format!("FROM --platform={value}: only this machine's platform ({host}) can be built");
                return Err(DockerfileError::new(line, message));
            }
        }
        let words = split_words(rest, self.escape);
        let image = match words.as_slice() {
            [image] => image,
            [image, as_, _name] if as_.eq_ignore_ascii_case("as") => image,
            _ => return Err(DockerfileError::new(line, "FROM takes an image and optionally AS <name>")),
        };
        let image = self.expand(line, image)?;
        if image.is_empty() {
            return Err(DockerfileError::new(line, "FROM names an empty image (an unset ARG?)"));
        }
        self.from = Some(image);
        Ok(())
    }

    fn arg(&mut self, line: usize, args: &str) -> Result<(), DockerfileError> {
        for word in split_words(args, self.escape) {
            let (name, default) = match split_assignment(&word, self.escape) {
                Some((name, value)) => (name.to_string(), Some(self.expand(line, value)?)),
                None => (word.clone(), None),
            };
            check_name(line, "ARG", &name)?;
            self.declared.insert(name.clone());
            let value = match self.build_args.get(&name) {
                Some(value) => Some(value.clone()),
                None if default.is_some() => default,
                None if self.from.is_some() => self.meta.get(&name).cloned().flatten(),
                None => None,
            };
            match self.from {
                None => self.meta.insert(name, value),
                Some(_) => self.args.insert(name, value),
            };
        }
        Ok(())
    }

    /// Name/value pairs of ENV and LABEL (`K=V ...` or the legacy `K V`), expanded with the
    /// values from before the instruction.
    fn pairs(&self, line: usize, kw: &str, args: &str) -> Result<Vec<(String, String)>, DockerfileError> {
        let words = split_words(args, self.escape);
        let mut pairs = Vec::new();
        if words.first().is_some_and(|first| split_assignment(first, self.escape).is_none()) {
            // Legacy form: the first word is the name, everything after it the value.
            let (name, value) = args.split_once(char::is_whitespace).unwrap_or((args, ""));
            let value = value.trim_start();
            if value.is_empty() {
                return Err(DockerfileError::new(line, format!("{kw} {name} needs a value ({kw} NAME=VALUE)")));
            }
            pairs.push((self.expand(line, name)?, self.expand(line, value)?));
        } else {
            for word in &words {
                let Some((name, value)) = split_assignment(word, self.escape) else {
                    return Err(DockerfileError::new(line, format!("{kw} '{word}' is not of the form NAME=VALUE")));
                };
                pairs.push((self.expand(line, name)?, self.expand(line, value)?));
            }
        }
        for (name, _) in &pairs {
            check_name(line, kw, name)?;
        }
        Ok(pairs)
    }

    fn env(&mut self, line: usize, args: &str) -> Result<(), DockerfileError> {
        let vars = self.pairs(line, "ENV", args)?;
        self.env.extend(vars.iter().cloned());
        let shown: Vec<String> = vars.iter().map(|(name, value)| format!("{name}={}", show(value))).collect();
        let text = format!("ENV {}", shown.join(" "));
        self.steps.push(Step::Env { vars, line, text });
        Ok(())
    }

    fn label(&mut self, line: usize, args: &str) -> Result<(), DockerfileError> {
        let labels = self.pairs(line, "LABEL", args)?;
        self.labels.extend(labels);
        Ok(())
    }

    /// The environment a RUN gets on top of the persisted one.
    fn run_env(&self) -> BTreeMap<String, String> {
        let args = self.args.iter().filter_map(|(name, value)| Some((name.as_str(), value.as_deref()?)));
        let proxies =
            PROXY_ARGS.iter().filter_map(|&name| Some((name, self.build_args.get(name).map(String::as_str)?)));
        args.chain(proxies)
            .filter(|(name, _)| !self.env.contains_key(*name))
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect()
    }

    /// `shell + [command]`.
    fn shell_form(&self, command: String) -> Vec<String> {
        self.shell.iter().cloned().chain([command]).collect()
    }

    fn run(&mut self, line: usize, args: &str, reader: &mut Reader<'_>) -> Result<(), DockerfileError> {
        let (flags, rest) = take_flags(args);
        if let Some((name, _)) = flags.first() {
            let message = format!("RUN --{name} is not supported (cache and bind mounts, network and security modes)");
            return Err(DockerfileError::new(line, message));
        }
        if rest.is_empty() {
            return Err(DockerfileError::new(line, "RUN needs a command"));
        }
        let (command, text) = if let Some(argv) = json_array(rest) {
            if argv.is_empty() {
                return Err(DockerfileError::new(line, "RUN needs a command (the JSON array is empty)"));
            }
            (argv, format!("RUN {rest}"))
        } else {
            let heredocs = find_heredocs(rest);
            if heredocs.is_empty() {
                (self.shell_form(rest.to_string()), format!("RUN {rest}"))
            } else {
                let mut script = format!("{rest}\n");
                let mut bodies = Vec::new();
                for heredoc in &heredocs {
                    let (body, end) = reader.heredoc(heredoc, line)?;
                    for raw in &body {
                        script.push_str(raw);
                        script.push('\n');
                    }
                    script.push_str(end);
                    script.push('\n');
                    bodies.push(body);
                }
                let only = &heredocs[0];
                let command = if heredocs.len() == 1 && rest.trim() == &rest[only.start..only.end] {
                    let mut body = String::new();
                    for raw in &bodies[0] {
                        body.push_str(if only.strip_tabs { raw.trim_start_matches('\t') } else { raw });
                        body.push('\n');
                    }
                    self.shell_form(heredoc_script(&body, &only.delim))
                } else {
                    self.shell_form(script.clone())
                };
                (command, format!("RUN {}", script.trim_end()))
            }
        };
        let env = self.run_env();
        self.steps.push(Step::Run { command, env, line, text });
        Ok(())
    }

    fn copy(&mut self, line: usize, kw: &str, args: &str) -> Result<(), DockerfileError> {
        let (flags, rest) = take_flags(args);
        let (mut chown, mut chmod) = (None, None);
        for (name, value) in flags {
            match (name.as_str(), value) {
                ("from", _) => {
                    let message = format!("{kw} --from is not supported (single-stage builds only)");
                    return Err(DockerfileError::new(line, message));
                }
                ("chown", Some(value)) => chown = Some(self.expand(line, &value)?).filter(|v| !v.is_empty()),
                ("chmod", Some(value)) => {
                    let value = self.expand(line, &value)?;
                    if crate::context::parse_chmod(&value).is_err() {
                        let message = format!("{kw} --chmod={value}: only octal modes (like 755) are supported");
                        return Err(DockerfileError::new(line, message));
                    }
                    chmod = Some(value);
                }
                ("link", None) => {}
                ("link", Some(value)) if matches!(value.as_str(), "true" | "false") => {}
                (name, _) => return Err(DockerfileError::new(line, format!("{kw} --{name} is not supported"))),
            }
        }
        let words = match json_array(rest) {
            Some(words) => words.iter().map(|word| self.expand(line, word)).collect::<Result<Vec<_>, _>>()?,
            None => {
                if split_words(rest, self.escape).iter().any(|word| word.starts_with("<<")) {
                    let message = format!("heredocs are only supported in RUN, not in {kw}");
                    return Err(DockerfileError::new(line, message));
                }
                self.expand_words(line, rest)?
            }
        };
        let Some((dest, sources)) = words.split_last().filter(|(_, sources)| !sources.is_empty()) else {
            return Err(DockerfileError::new(line, format!("{kw} needs at least one source and a destination")));
        };
        for source in sources {
            if is_remote(source) {
                let message = match kw {
                    "ADD" => format!("ADD {source}: only local sources are supported (no URLs or git repositories)"),
                    _ => format!("COPY source {source} is a URL (COPY takes local paths only)"),
                };
                return Err(DockerfileError::new(line, message));
            }
            if source.is_empty() {
                return Err(DockerfileError::new(line, format!("{kw} has an empty source (an unset variable?)")));
            }
        }
        let dir_like = dest.ends_with('/') || matches!(dest.rsplit('/').next(), Some("." | ".."));
        if sources.len() > 1 && !dir_like {
            let message =
                format!("{kw} with more than one source needs a destination directory ending in / (not {dest})");
            return Err(DockerfileError::new(line, message));
        }
        let mut absolute = join_path(self.workdir.as_deref(), dest);
        if dir_like && absolute != "/" {
            absolute.push('/');
        }
        let mut text = kw.to_string();
        for (flag, value) in [("chown", &chown), ("chmod", &chmod)] {
            if let Some(value) = value {
                text.push_str(&format!(" --{flag}={}", show(value)));
            }
        }
        for word in sources.iter().chain([&absolute]) {
            text.push(' ');
            text.push_str(&show(word));
        }
        let sources = sources.to_vec();
        let extract_archives = kw == "ADD";
        self.steps.push(Step::Copy { sources, dest: absolute, chown, chmod, extract_archives, line, text });
        Ok(())
    }

    fn workdir(&mut self, line: usize, args: &str) -> Result<(), DockerfileError> {
        let path = self.expand(line, args)?;
        if path.is_empty() {
            return Err(DockerfileError::new(line, "WORKDIR is empty (an unset variable?)"));
        }
        let path = join_path(self.workdir.as_deref(), &path);
        self.workdir = Some(path.clone());
        let text = format!("WORKDIR {}", show(&path));
        self.steps.push(Step::Workdir { path, line, text });
        Ok(())
    }

    fn user(&mut self, line: usize, args: &str) -> Result<(), DockerfileError> {
        let user = self.expand(line, args)?;
        if user.is_empty() || user.contains(char::is_whitespace) {
            return Err(DockerfileError::new(line, format!("invalid USER '{user}'")));
        }
        self.user = Some(user.clone());
        let text = format!("USER {user}");
        self.steps.push(Step::User { user, line, text });
        Ok(())
    }

    fn start(&mut self, line: usize, kw: &str, args: &str) -> Result<(), DockerfileError> {
        let (argv, shell) = match json_array(args) {
            Some(argv) => (argv, false),
            None if args.is_empty() => return Err(DockerfileError::new(line, format!("{kw} needs a command"))),
            None => (self.shell_form(args.to_string()), true),
        };
        if kw == "CMD" {
            self.cmd = Some(argv);
        } else {
            self.entrypoint = Some((argv, shell));
        }
        Ok(())
    }

    fn healthcheck(&mut self, line: usize, args: &str) -> Result<(), DockerfileError> {
        let (flags, rest) = take_flags(args);
        for (name, value) in &flags {
            let known = ["interval", "timeout", "start-period", "start-interval", "retries"];
            if !known.contains(&name.as_str()) || value.is_none() {
                return Err(DockerfileError::new(line, format!("HEALTHCHECK --{name} is not supported")));
            }
        }
        let (word, command) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        let command = command.trim();
        match word.to_ascii_uppercase().as_str() {
            "NONE" if command.is_empty() && flags.is_empty() => self.ready = None,
            "NONE" => return Err(DockerfileError::new(line, "HEALTHCHECK NONE takes no other arguments")),
            "CMD" => {
                let ready = match json_array(command) {
                    Some(argv) => argv.iter().map(|arg| shell_quote(arg)).collect::<Vec<_>>().join(" "),
                    None => command.to_string(),
                };
                if ready.is_empty() {
                    return Err(DockerfileError::new(line, "HEALTHCHECK CMD needs a command"));
                }
                self.ready = Some(ready);
            }
            _ => return Err(DockerfileError::new(line, "HEALTHCHECK must be NONE or CMD <command>")),
        }
        Ok(())
    }

    fn shell(&mut self, line: usize, args: &str) -> Result<(), DockerfileError> {
        match json_array(args) {
            Some(shell) if !shell.is_empty() => {
                self.shell = shell;
                Ok(())
            }
            _ => Err(DockerfileError::new(line, "SHELL needs the JSON form, e.g. SHELL [\"/bin/bash\", \"-c\"]")),
        }
    }

    fn expose(&mut self, line: usize, args: &str) -> Result<(), DockerfileError> {
        for port in self.expand_words(line, args)? {
            if !valid_port(&port) {
                let message = format!("invalid EXPOSE '{port}' (expected port[-port][/tcp|udp|sctp])");
                return Err(DockerfileError::new(line, message));
            }
            if !self.expose.contains(&port) {
                self.expose.push(port);
            }
        }
        Ok(())
    }

    fn stop_signal(&mut self, line: usize, args: &str) -> Result<(), DockerfileError> {
        let signal = self.expand(line, args)?;
        if signal.is_empty() || signal.contains(char::is_whitespace) {
            return Err(DockerfileError::new(line, format!("invalid STOPSIGNAL '{signal}'")));
        }
        self.stop_signal = Some(signal);
        Ok(())
    }

    fn finish(self, lines: usize) -> Result<Plan, DockerfileError> {
        let Some(from) = self.from else {
            return Err(DockerfileError::new(lines, "no FROM instruction (a Dockerfile needs exactly one)"));
        };
        let start = match (self.entrypoint, self.cmd) {
            (Some((entrypoint, true)), _) | (Some((entrypoint, false)), None) => entrypoint,
            (Some((entrypoint, false)), Some(cmd)) => entrypoint.into_iter().chain(cmd).collect(),
            (None, Some(cmd)) => cmd,
            (None, None) => self.base_start,
        };
        let unused_args = self
            .build_args
            .keys()
            .filter(|name| !self.declared.contains(*name) && !PROXY_ARGS.contains(&name.as_str()))
            .cloned()
            .collect();
        Ok(Plan {
            from,
            steps: self.steps,
            start,
            ready: self.ready,
            env: self.env,
            workdir: self.workdir,
            user: self.user,
            labels: self.labels,
            expose: self.expose,
            stop_signal: self.stop_signal,
            unused_args,
            warnings: self.warnings,
        })
    }
}

/// This machine's platform in docker's spelling, e.g. `linux/amd64`.
fn host_platform() -> String {
    format!("linux/{}", host_arch())
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// The automatic platform arguments of BuildKit, for a build on and for this machine.
fn platform_args() -> [(&'static str, String); 8] {
    let (platform, arch) = (host_platform(), host_arch().to_string());
    [
        ("BUILDPLATFORM", platform.clone()),
        ("BUILDOS", "linux".to_string()),
        ("BUILDARCH", arch.clone()),
        ("BUILDVARIANT", String::new()),
        ("TARGETPLATFORM", platform),
        ("TARGETOS", "linux".to_string()),
        ("TARGETARCH", arch),
        ("TARGETVARIANT", String::new()),
    ]
}

/// Rejects names that could not be an environment variable or label key.
fn check_name(line: usize, kw: &str, name: &str) -> Result<(), DockerfileError> {
    if name.is_empty() {
        return Err(DockerfileError::new(line, format!("{kw} has an empty name")));
    }
    if kw != "LABEL" && name.contains(|c: char| c.is_whitespace() || c == '=' || c == '\0') {
        return Err(DockerfileError::new(line, format!("{kw} name '{name}' is invalid")));
    }
    Ok(())
}

/// Leading `--name[=value]` words of an instruction, and the rest.
fn take_flags(args: &str) -> (Vec<(String, Option<String>)>, &str) {
    let mut flags = Vec::new();
    let mut rest = args.trim_start();
    while let Some(flag) = rest.strip_prefix("--").filter(|f| f.starts_with(|c: char| c.is_ascii_alphabetic())) {
        let end = flag.find(char::is_whitespace).unwrap_or(flag.len());
        let (name, value) = match flag[..end].split_once('=') {
            Some((name, value)) => (name, Some(value.to_string())),
            None => (&flag[..end], None),
        };
        flags.push((name.to_ascii_lowercase(), value));
        rest = flag[end..].trim_start();
    }
    (flags, rest)
}

/// The exec (JSON) form: a JSON array of strings; anything else is the shell form.
fn json_array(args: &str) -> Option<Vec<String>> {
    let args = args.trim();
    if !args.starts_with('[') {
        return None;
    }
    serde_json::from_str(args).ok()
}

/// Splits at unquoted, unescaped whitespace, keeping quotes and escapes in the words (they
/// are removed by expansion).
fn split_words(text: &str, escape: char) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c.is_whitespace() {
            if in_word {
                words.push(std::mem::take(&mut word));
                in_word = false;
            }
            continue;
        }
        in_word = true;
        word.push(c);
        if c == escape {
            word.extend(chars.next());
        } else if c == '\'' || c == '"' {
            while let Some(inner) = chars.next() {
                word.push(inner);
                if inner == escape && c == '"' {
                    word.extend(chars.next());
                } else if inner == c {
                    break;
                }
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// `name=value` split at the first `=` outside quotes and escapes; `None` if there is none.
fn split_assignment(word: &str, escape: char) -> Option<(&str, &str)> {
    let mut quote = None;
    let mut escaped = false;
    for (index, c) in word.char_indices() {
        if escaped {
            escaped = false;
        } else if c == escape && quote != Some('\'') {
            escaped = true;
        } else if let Some(q) = quote {
            if c == q {
                quote = None;
            }
        } else if c == '\'' || c == '"' {
            quote = Some(c);
        } else if c == '=' {
            return Some((&word[..index], &word[index + 1..]));
        }
    }
    None
}

/// The shell-like word processing docker applies to expanded instructions: variables,
/// quote removal, escapes.
struct Expander<'a> {
    chars: Vec<char>,
    pos: usize,
    escape: char,
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Expander<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += 1;
        Some(c)
    }

    /// Processes up to the end, or (`depth > 0`, inside `${...}`) up to the closing brace,
    /// which is left for the caller.
    fn word(&mut self, depth: usize) -> Result<String, String> {
        let mut out = String::new();
        while let Some(c) = self.peek() {
            if depth > 0 && c == '}' {
                return Ok(out);
            }
            self.pos += 1;
            if c == self.escape {
                out.push(self.bump().unwrap_or(c));
            } else if c == '\'' {
                loop {
                    match self.bump() {
                        Some('\'') => break,
                        Some(inner) => out.push(inner),
                        None => return Err("unterminated single quote".to_string()),
                    }
                }
            } else if c == '"' {
                loop {
                    match self.bump() {
                        Some('"') => break,
                        Some('$') => out.push_str(&self.variable(depth)?),
                        Some(inner) if inner == self.escape => match self.bump() {
                            Some(next) if next == '"' || next == '$' || next == self.escape => out.push(next),
                            Some(next) => {
                                out.push(inner);
                                out.push(next);
                            }
                            None => return Err("unterminated double quote".to_string()),
                        },
                        Some(inner) => out.push(inner),
                        None => return Err("unterminated double quote".to_string()),
                    }
                }
            } else if c == '$' {
                out.push_str(&self.variable(depth)?);
            } else {
                out.push(c);
            }
        }
        if depth > 0 {
            return Err("missing '}' in ${...}".to_string());
        }
        Ok(out)
    }

    fn name(&mut self) -> String {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            self.pos += 1;
        }
        self.chars[start..self.pos].iter().collect()
    }

    /// Expands what follows a `$`.
    fn variable(&mut self, depth: usize) -> Result<String, String> {
        if self.peek() != Some('{') {
            let name = self.name();
            return Ok(if name.is_empty() { "$".to_string() } else { (self.lookup)(&name).unwrap_or_default() });
        }
        self.pos += 1;
        let name = self.name();
        if name.is_empty() {
            return Err("bad substitution: ${ without a variable name".to_string());
        }
        let value = (self.lookup)(&name);
        let colon = self.peek() == Some(':');
        if colon {
            self.pos += 1;
        }
        let op = self.bump();
        if op == Some('}') && !colon {
            return Ok(value.unwrap_or_default());
        }
        if !matches!(op, Some('-' | '+' | '?')) {
            return Err(format!("unsupported substitution in ${{{name}...}} (supported: :- :+ :? - + ?)"));
        }
        if depth >= MAX_NESTING {
            return Err("${...} nested too deeply".to_string());
        }
        let word = self.word(depth + 1)?;
        self.pos += 1; // the closing brace
        // With a colon, an empty value counts as unset.
        let set = value.as_ref().is_some_and(|v| !colon || !v.is_empty());
        match op {
            Some('-') => Ok(if set { value.unwrap_or_default() } else { word }),
            Some('+') => Ok(if set { word } else { String::new() }),
            _ if set => Ok(value.unwrap_or_default()),
            _ if word.is_empty() => Err(format!("{name}: parameter not set")),
            _ => Err(format!("{name}: {word}")),
        }
    }
}

/// A heredoc marker in a `RUN` command.
#[derive(Debug)]
struct Heredoc {
    delim: String,
    /// `<<-`: leading tabs are stripped from the body and the terminating line.
    strip_tabs: bool,
    /// Byte span of the marker in the command.
    start: usize,
    end: usize,
}

/// The heredoc markers of a shell command, outside quotes.
fn find_heredocs(text: &str) -> Vec<Heredoc> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let at = |i: usize| chars.get(i).map(|&(_, c)| c);
    let offset = |i: usize| chars.get(i).map_or(text.len(), |&(pos, _)| pos);
    let mut found = Vec::new();
    let mut quote = None;
    let mut i = 0;
    while let Some(c) = at(i) {
        i += 1;
        match quote {
            Some('"') if c == '\\' => i += 1,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\\' => i += 1,
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == '<' && at(i) == Some('<') && at(i + 1) != Some('<') && (i < 2 || at(i - 2) != Some('<')) => {
                let start = i - 1;
                let mut j = i + 1;
                let strip_tabs = at(j) == Some('-');
                if strip_tabs {
                    j += 1;
                }
                while matches!(at(j), Some(' ' | '\t')) {
                    j += 1;
                }
                let quoted = at(j).filter(|&q| q == '\'' || q == '"');
                if quoted.is_some() {
                    j += 1;
                }
                let word_start = j;
                while let Some(w) = at(j) {
                    let ends = match quoted {
                        Some(q) => w == q,
                        None => !(w.is_ascii_alphanumeric() || matches!(w, '_' | '-' | '.')),
                    };
                    if ends {
                        break;
                    }
                    j += 1;
                }
                let delim: String = chars[word_start..j].iter().map(|&(_, c)| c).collect();
                if let Some(q) = quoted {
                    if at(j) != Some(q) {
                        continue;
                    }
                    j += 1;
                }
                let valid = delim.starts_with(|c: char| quoted.is_some() || c.is_ascii_alphabetic() || c == '_');
                if valid && !delim.is_empty() {
                    found.push(Heredoc { delim, strip_tabs, start: offset(start), end: offset(j) });
                    i = j;
                }
            }
            None => {}
        }
    }
    found
}

/// The shell command that runs a `RUN <<EOF` script: the script itself, or for a `#!`
/// script, its interpreter reading the script from standard input.
fn heredoc_script(body: &str, delim: &str) -> String {
    let Some(shebang) = body.strip_prefix("#!") else {
        return body.to_string();
    };
    let shebang = shebang.lines().next().unwrap_or_default().trim();
    let (interpreter, arg) = shebang.split_once([' ', '\t']).unwrap_or((shebang, ""));
    let mut command = format!("exec {}", shell_quote(interpreter));
    if !arg.trim().is_empty() {
        command.push(' ');
        command.push_str(&shell_quote(arg.trim()));
    }
    // The body ends before the first line equal to the delimiter, so it cannot contain one.
    format!("{command} /dev/stdin <<'{delim}'\n{body}{delim}\n")
}

/// Quotes `arg` for a POSIX shell, unless it is made only of safe characters.
fn shell_quote(arg: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c);
    if !arg.is_empty() && arg.chars().all(safe) {
        return arg.to_string();
    }
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// A value for step texts: as is when unambiguous, else as a JSON string.
fn show(value: &str) -> String {
    let plain = |c: char| !c.is_whitespace() && !c.is_control() && !"\"'\\`$".contains(c);
    if !value.is_empty() && value.chars().all(plain) {
        return value.to_string();
    }
    serde_json::to_string(value).expect("a string always serializes")
}

/// Whether a COPY/ADD source is a URL or a git repository.
fn is_remote(source: &str) -> bool {
    let lower = source.to_ascii_lowercase();
    lower.contains("://") || lower.starts_with("git@")
}

/// `port[-port][/proto]`.
fn valid_port(spec: &str) -> bool {
    let (ports, proto) = spec.split_once('/').unwrap_or((spec, "tcp"));
    let number = |p: &str| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
    let ports_ok = match ports.split_once('-') {
        Some((low, high)) => number(low) && number(high),
        None => number(ports),
    };
    ports_ok && matches!(proto.to_ascii_lowercase().as_str(), "tcp" | "udp" | "sctp")
}

/// `path` resolved against `base` (or `/`), with `.`, `..` and repeated slashes removed.
fn join_path(base: Option<&str>, path: &str) -> String {
    let joined = if path.starts_with('/') { path.to_string() } else { format!("{}/{path}", base.unwrap_or("/")) };
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    format!("/{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn plan(text: &str) -> Plan {
        parse(text, &BTreeMap::new()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn error(text: &str) -> DockerfileError {
        parse(text, &BTreeMap::new()).expect_err("should fail")
    }

    fn sh(command: &str) -> Vec<String> {
        vec!["/bin/sh".to_string(), "-c".to_string(), command.to_string()]
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn basic_instructions() {
        let plan = plan(
            "FROM debian:12 AS base\n\
             # a comment\n\
             ENV A=1 B=\"two words\"\n\
             ENV LEGACY some value\n\
             RUN echo $A\n\
             RUN [\"/bin/echo\", \"hi\"]\n\
             WORKDIR /app\n\
             WORKDIR sub/../src\n\
             USER user:user\n\
             COPY --chown=1000:1000 --chmod=755 a b ./\n\
             ADD x.tar.gz /opt\n\
             LABEL org.example=\"v 1\" other=2\n\
             EXPOSE 80 53/udp\n\
             STOPSIGNAL SIGTERM\n\
             CMD [\"serve\", \"--port\", \"80\"]\n",
        );
        assert_eq!(plan.from, "debian:12");
        assert_eq!(plan.steps.len(), 9);
        let Step::Env { vars, text, line } = &plan.steps[0] else { panic!() };
        assert_eq!(vars, &[("A".into(), "1".into()), ("B".into(), "two words".into())]);
        assert_eq!((text.as_str(), *line), ("ENV A=1 B=\"two words\"", 3));
        let Step::Env { vars, .. } = &plan.steps[1] else { panic!() };
        assert_eq!(vars, &[("LEGACY".into(), "some value".into())]);
        let Step::Run { command, text, .. } = &plan.steps[2] else { panic!() };
        assert_eq!((command, text.as_str()), (&sh("echo $A"), "RUN echo $A"));
        assert!(matches!(&plan.steps[3], Step::Run { command, .. } if command == &strings(&["/bin/echo", "hi"])));
        assert!(matches!(&plan.steps[4], Step::Workdir { path, .. } if path == "/app"));
        assert!(matches!(&plan.steps[5], Step::Workdir { path, .. } if path == "/app/src"));
        assert!(matches!(&plan.steps[6], Step::User { user, .. } if user == "user:user"));
        let Step::Copy { sources, dest, chown, chmod, extract_archives, text, .. } = &plan.steps[7] else { panic!() };
        assert_eq!(sources, &strings(&["a", "b"]));
        assert_eq!(dest, "/app/src/");
        assert_eq!((chown.as_deref(), chmod.as_deref(), *extract_archives), (Some("1000:1000"), Some("755"), false));
        assert_eq!(text, "COPY --chown=1000:1000 --chmod=755 a b /app/src/");
        let Step::Copy { dest, extract_archives, .. } = &plan.steps[8] else { panic!() };
        assert_eq!((dest.as_str(), *extract_archives), ("/opt", true));
        assert_eq!(plan.labels, args(&[("org.example", "v 1"), ("other", "2")]));
        assert_eq!(plan.expose, strings(&["80", "53/udp"]));
        assert_eq!(plan.stop_signal.as_deref(), Some("SIGTERM"));
        assert_eq!(plan.start, strings(&["serve", "--port", "80"]));
        assert_eq!(plan.workdir.as_deref(), Some("/app/src"));
        assert_eq!(plan.user.as_deref(), Some("user:user"));
        assert_eq!(plan.env, args(&[("A", "1"), ("B", "two words"), ("LEGACY", "some value")]));
        assert!(plan.warnings.is_empty() && plan.unused_args.is_empty());
    }

    #[test]
    fn continuations_comments_and_case() {
        let plan = plan(
            "from alpine\n\
             run apt-get install \\\n\
             # a comment inside\n\
             \n\
             \x20   curl \\  \n\
             \x20   git\n\
             RUN echo done \\",
        );
        let Step::Run { command, line, .. } = &plan.steps[0] else { panic!() };
        assert_eq!(command, &sh("apt-get install     curl     git"));
        assert_eq!(*line, 2);
        let Step::Run { command, line, .. } = &plan.steps[1] else { panic!() };
        assert_eq!((command, *line), (&sh("echo done"), 7));
    }

    #[test]
    fn escape_directive() {
        let plan = plan(
            "# escape=`\n\
             FROM windowsish\n\
             WORKDIR C:\\dir\n\
             RUN a `\n\
             \x20 b\n\
             ENV X=`$HOME",
        );
        assert!(matches!(&plan.steps[0], Step::Workdir { path, .. } if path == "/C:\\dir"));
        assert!(matches!(&plan.steps[1], Step::Run { command, .. } if command == &sh("a   b")));
        assert!(matches!(&plan.steps[2], Step::Env { vars, .. } if vars[0].1 == "$HOME"));
        // A directive after a comment is just a comment.
        let plan = parse("# hello\n# escape=`\nFROM x\nRUN a \\\n b", &BTreeMap::new()).unwrap();
        assert!(matches!(&plan.steps[0], Step::Run { command, .. } if command == &sh("a  b")));
        assert!(error("# escape=x\nFROM a").message.contains("invalid escape"));
        let warned = plan_warnings("# syntax=example.com/frontend\nFROM a");
        assert_eq!(warned.len(), 1);
        assert!(plan_warnings("# syntax=docker/dockerfile:1\nFROM a").is_empty());
    }

    fn plan_warnings(text: &str) -> Vec<String> {
        plan(text).warnings
    }

    #[test]
    fn arg_scoping_and_build_args() {
        let text = "ARG VERSION=12\n\
                    ARG REGISTRY\n\
                    FROM ${REGISTRY:-docker.io}/debian:$VERSION\n\
                    RUN echo one\n\
                    ARG VERSION\n\
                    ARG OTHER=x-$VERSION\n\
                    ARG EMPTY\n\
                    RUN echo two\n\
                    ENV OTHER=fromenv\n\
                    RUN echo three\n\
                    WORKDIR /w/$OTHER/$VERSION";
        let plan = parse(text, &args(&[("VERSION", "13"), ("UNUSED", "1"), ("http_proxy", "http://p")])).unwrap();
        assert_eq!(plan.from, "docker.io/debian:13");
        assert_eq!(plan.unused_args, strings(&["UNUSED"]));
        let envs: Vec<_> = plan
            .steps
            .iter()
            .filter_map(|step| match step {
                Step::Run { env, .. } => Some(env.clone()),
                _ => None,
            })
            .collect();
        // Before redeclaration the pre-FROM ARG is invisible.
        assert_eq!(envs[0], args(&[("http_proxy", "http://p")]));
        assert_eq!(envs[1], args(&[("OTHER", "x-13"), ("VERSION", "13"), ("http_proxy", "http://p")]));
        // ENV overrides ARG.
        assert_eq!(envs[2], args(&[("VERSION", "13"), ("http_proxy", "http://p")]));
        assert!(matches!(plan.steps.last(), Some(Step::Workdir { path, .. }) if path == "/w/fromenv/13"));
        // The proxy is not part of the cache key.
        assert!(!plan.steps[0].cache_text().contains("proxy"));
        assert!(plan.steps[1].cache_text().contains("x-13"));
        // A pre-FROM ARG not redeclared expands to nothing after FROM.
        let plan = parse("ARG V=1\nFROM a\nENV X=[$V]", &BTreeMap::new()).unwrap();
        assert!(matches!(&plan.steps[0], Step::Env { vars, .. } if vars[0].1 == "[]"));
        // Automatic platform arguments.
        let plan = parse("FROM img:$TARGETARCH\nARG TARGETOS\nENV OS=$TARGETOS", &BTreeMap::new()).unwrap();
        assert_eq!(plan.from, format!("img:{}", host_arch()));
        assert!(matches!(&plan.steps[0], Step::Env { vars, .. } if vars[0].1 == "linux"));
    }

    #[test]
    fn expansion_rules() {
        let text = r#"FROM a
ARG SET=value
ARG EMPTY=
ENV A=${SET:-d} B=${UNSET:-d} C=${EMPTY:-d} D=${EMPTY-d} E=${SET:+alt} F=${UNSET:+alt} G=\$SET H='$SET' I="$SET x" J=${UNSET:-${SET}!} K=$SET-$ L=a\ b
ENV SET=new OLD=$SET
ENV AFTER=$SET"#;
        let plan = plan(text);
        let Step::Env { vars, .. } = &plan.steps[0] else { panic!() };
        let got: BTreeMap<_, _> = vars.iter().cloned().collect();
        let want = args(&[
            ("A", "value"),
            ("B", "d"),
            ("C", "d"),
            ("D", ""),
            ("E", "alt"),
            ("F", ""),
            ("G", "$SET"),
            ("H", "$SET"),
            ("I", "value x"),
            ("J", "value!"),
            ("K", "value-$"),
            ("L", "a b"),
        ]);
        assert_eq!(got, want);
        // All pairs of one ENV see the values from before it.
        assert!(matches!(&plan.steps[1], Step::Env { vars, .. } if vars[1] == ("OLD".into(), "value".into())));
        assert!(matches!(&plan.steps[2], Step::Env { vars, .. } if vars[0].1 == "new"));
        // RUN and CMD are left to the shell.
        let plan = plan_of("FROM a\nARG X=1\nRUN echo ${X:-y}\nCMD echo $X");
        assert!(matches!(&plan.steps[0], Step::Run { command, .. } if command == &sh("echo ${X:-y}")));
        assert_eq!(plan.start, sh("echo $X"));
        assert!(error("FROM a\nENV A=${B:?must_be_set}").message.contains("B: must_be_set"));
        assert!(error("FROM a\nENV A=${B/x/y}").message.contains("unsupported substitution"));
        assert!(error("FROM a\nENV A=\"open").message.contains("unterminated double quote"));
        assert!(error("FROM a\nENV A=${B:-x").message.contains("missing '}'"));
    }

    fn plan_of(text: &str) -> Plan {
        plan(text)
    }

    #[test]
    fn base_config_is_visible() {
        let base = TemplateConfig {
            env: args(&[("PATH", "/usr/bin:/bin")]),
            workdir: Some("/home/user".into()),
            start: strings(&["old"]),
            ready: Some("true".into()),
            ..TemplateConfig::default()
        };
        let plan = parse_with_base("FROM a\nENV PATH=/opt/bin:$PATH\nWORKDIR proj", &BTreeMap::new(), &base).unwrap();
        assert_eq!(plan.env["PATH"], "/opt/bin:/usr/bin:/bin");
        assert_eq!(plan.workdir.as_deref(), Some("/home/user/proj"));
        assert_eq!((plan.start, plan.ready), (strings(&["old"]), Some("true".to_string())));
        let plan = parse_with_base("FROM a\nHEALTHCHECK NONE\nENTRYPOINT [\"x\"]", &BTreeMap::new(), &base).unwrap();
        assert_eq!((plan.start, plan.ready), (strings(&["x"]), None));
        // A relative COPY destination uses the base working directory.
        let plan = parse_with_base("FROM a\nCOPY f .", &BTreeMap::new(), &base).unwrap();
        assert!(matches!(&plan.steps[0], Step::Copy { dest, .. } if dest == "/home/user/"));
    }

    #[test]
    fn start_and_ready() {
        let start = |text: &str| plan(&format!("FROM a\n{text}")).start;
        assert_eq!(start("ENTRYPOINT [\"/ep\"]\nCMD [\"a\"]"), strings(&["/ep", "a"]));
        assert_eq!(start("CMD [\"a\"]\nENTRYPOINT [\"/ep\", \"-x\"]"), strings(&["/ep", "-x", "a"]));
        assert_eq!(start("ENTRYPOINT run me\nCMD [\"ignored\"]"), sh("run me"));
        assert_eq!(start("CMD serve --x"), sh("serve --x"));
        assert_eq!(start("CMD [\"a\"]\nCMD [\"b\"]"), strings(&["b"]));
        assert_eq!(
            start("SHELL [\"/bin/bash\", \"-eu\", \"-c\"]\nCMD run"),
            strings(&["/bin/bash", "-eu", "-c", "run"])
        );
        let ready = |text: &str| plan(&format!("FROM a\n{text}")).ready;
        assert_eq!(
            ready("HEALTHCHECK --interval=5s --retries=3 CMD curl -f http://localhost/"),
            Some("curl -f http://localhost/".into())
        );
        assert_eq!(
            ready("HEALTHCHECK CMD [\"test\", \"-e\", \"/tmp/it's ready\"]"),
            Some(r"test -e '/tmp/it'\''s ready'".into())
        );
        assert_eq!(ready("HEALTHCHECK CMD true\nHEALTHCHECK NONE"), None);
        assert!(error("FROM a\nHEALTHCHECK --bogus=1 CMD x").message.contains("--bogus"));
        assert!(error("FROM a\nHEALTHCHECK x").message.contains("NONE or CMD"));
    }

    #[test]
    fn shell_instruction() {
        let plan = plan("FROM a\nRUN one\nSHELL [\"/bin/bash\", \"-o\", \"pipefail\", \"-c\"]\nRUN two | three");
        assert!(matches!(&plan.steps[0], Step::Run { command, .. } if command == &sh("one")));
        let want = strings(&["/bin/bash", "-o", "pipefail", "-c", "two | three"]);
        assert!(matches!(&plan.steps[1], Step::Run { command, .. } if command == &want));
        assert!(plan.steps[0].cache_text() != plan.steps[1].cache_text());
        assert!(error("FROM a\nSHELL /bin/bash -c").message.contains("JSON form"));
    }

    #[test]
    fn heredocs() {
        let plan = plan(
            "FROM a\n\
             RUN <<EOF\n\
             set -e\n\
             echo $HOME\n\
             EOF\n\
             RUN cat <<'END' > /etc/motd && echo <<X\n\
             hello\n\
             END\n\
             x\n\
             X\n\
             RUN <<-EOT\n\
             \t\techo tabs\n\
             \tEOT\n\
             RUN <<PY\n\
             #!/usr/bin/env python3\n\
             print('hi')\n\
             PY\n\
             RUN echo $((1<<2)) \"<<NOT\"\n\
             USER nobody",
        );
        let commands: Vec<_> = plan
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Run { command, .. } => Some(command[2].clone()),
                _ => None,
            })
            .collect();
        assert_eq!(commands[0], "set -e\necho $HOME\n");
        assert_eq!(commands[1], "cat <<'END' > /etc/motd && echo <<X\nhello\nEND\nx\nX\n");
        assert_eq!(commands[2], "echo tabs\n");
        assert_eq!(
            commands[3],
            "exec /usr/bin/env python3 /dev/stdin <<'PY'\n#!/usr/bin/env python3\nprint('hi')\nPY\n"
        );
        assert_eq!(commands[4], "echo $((1<<2)) \"<<NOT\"");
        assert!(matches!(plan.steps.last(), Some(Step::User { line: 19, .. })));
        assert_eq!(plan.steps[0].text(), "RUN <<EOF\nset -e\necho $HOME\nEOF");
        let err = error("FROM a\nRUN <<EOF\necho\n");
        assert_eq!(err.line, 2);
        assert!(err.message.contains("no terminating 'EOF'"), "{err}");
        assert!(error("FROM a\nCOPY <<EOF /x\nhi\nEOF").message.contains("only supported in RUN"));
    }

    #[test]
    fn heredoc_scripts_run() {
        let plan = plan("FROM a\nRUN <<PY\n#!/bin/sh -e\necho \"$0\" ok\nPY\nRUN cat <<EOF | tr a-z A-Z\nabc\nEOF");
        let outputs: Vec<String> = plan
            .steps
            .iter()
            .map(|step| {
                let Step::Run { command, .. } = step else { panic!() };
                let out = std::process::Command::new(&command[0]).args(&command[1..]).output().unwrap();
                assert!(out.status.success(), "{command:?}");
                String::from_utf8(out.stdout).unwrap()
            })
            .collect();
        assert_eq!(outputs, ["/dev/stdin ok\n", "ABC\n"]);
    }

    #[test]
    fn rejected_with_line_numbers() {
        let err = error("FROM a\nRUN x\nFROM b");
        assert_eq!(err.line, 3);
        assert!(err.message.contains("multi-stage"));
        let err = error("FROM a\n\nRUN a \\\n b\nCOPY --from=builder /x /y");
        assert_eq!(err.to_string(), "Dockerfile line 5: COPY --from is not supported (single-stage builds only)");
        let crate_error = crate::Error::from(err);
        assert_eq!(
            crate_error.to_string(),
            "Dockerfile line 5: COPY --from is not supported (single-stage builds only)"
        );
        assert!(matches!(crate_error, crate::Error::Dockerfile(DockerfileError { line: 5, .. })));
        assert!(error("FROM a\nADD https://example.com/f /f").message.contains("only local sources"));
        assert!(error("FROM a\nADD git@github.com:a/b.git /f").message.contains("only local sources"));
        assert!(error("FROM a\nCOPY http://x/y /f").message.contains("URL"));
        assert!(error("FROM a\nCOPY --parents a /b/").message.contains("--parents"));
        assert!(error("FROM a\nCOPY --chmod=u+x a /b").message.contains("octal"));
        assert!(error("FROM a\nCOPY a b /dir").message.contains("ending in /"));
        assert!(error("FROM a\nCOPY onlyone").message.contains("source and a destination"));
        assert!(error("FROM a\nRUN --mount=type=cache,target=/x true").message.contains("RUN --mount"));
        assert!(error("FROM --platform=linux/s390x-nope a").message.contains("platform"));
        let err = error("ARG X\nRUN echo\nFROM a");
        assert_eq!((err.line, err.message.as_str()), (2, "RUN before FROM (only ARG may come before FROM)"));
        let err = error("FROM a\nFROBNICATE x");
        assert_eq!(err.to_string(), "Dockerfile line 2: unknown instruction FROBNICATE");
        let err = error("# only a comment\nARG X=1\n");
        assert_eq!((err.line, err.message.contains("no FROM")), (2, true));
        assert_eq!(error("").to_string(), "Dockerfile: no FROM instruction (a Dockerfile needs exactly one)");
        assert!(error("FROM a\nWORKDIR $UNSET").message.contains("empty"));
        assert!(error("FROM a\nEXPOSE 80/http").message.contains("EXPOSE"));
        assert!(error("FROM a\nENV A").message.contains("needs a value"));
        assert!(error("FROM a b c d").message.contains("AS <name>"));
    }

    #[test]
    fn ignored_instructions_warn() {
        let plan = plan("FROM a\nVOLUME /data\nONBUILD RUN x\nMAINTAINER me\nCOPY --link a /b");
        assert_eq!(plan.warnings.len(), 3);
        assert!(plan.warnings[0].starts_with("Dockerfile line 2: VOLUME"));
        assert_eq!(plan.steps.len(), 1);
        let host = host_platform();
        assert_eq!(parse(&format!("FROM --platform={host} a"), &BTreeMap::new()).unwrap().from, "a");
        assert_eq!(parse("FROM --platform=$BUILDPLATFORM a", &BTreeMap::new()).unwrap().from, "a");
    }

    #[test]
    fn copy_forms() {
        let plan = plan(
            "FROM a\nARG SRC=dir\nWORKDIR /w\nCOPY [\"with space\", \"$SRC/x\", \"/dest dir/\"]\nCOPY \"quoted name\" rel\nCOPY $SRC ..\nADD --chown=app:app src/*.tgz /",
        );
        let copies: Vec<_> = plan
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Copy { sources, dest, text, .. } => Some((sources.clone(), dest.clone(), text.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(copies[0].0, strings(&["with space", "dir/x"]));
        assert_eq!(copies[0].1, "/dest dir/");
        assert_eq!(copies[0].2, "COPY \"with space\" dir/x \"/dest dir/\"");
        assert_eq!((copies[1].0.clone(), copies[1].1.as_str()), (strings(&["quoted name"]), "/w/rel"));
        assert_eq!(copies[2].1, "/");
        assert_eq!(copies[3].2, "ADD --chown=app:app src/*.tgz /");
    }

    #[test]
    fn helpers() {
        assert_eq!(split_words(r#"a "b c" d\ e 'f g'"#, '\\'), strings(&["a", "\"b c\"", "d\\ e", "'f g'"]));
        assert_eq!(split_assignment("\"a=b\"=c", '\\'), Some(("\"a=b\"", "c")));
        assert_eq!(split_assignment("a\\=b", '\\'), None);
        assert_eq!(join_path(Some("/a/b"), "../c/./d/"), "/a/c/d");
        assert_eq!(join_path(None, "../.."), "/");
        assert!(valid_port("8000-8010/tcp") && valid_port("53/UDP") && !valid_port("x") && !valid_port("1/ip"));
        assert_eq!(shell_quote("plain-arg"), "plain-arg");
        assert_eq!(shell_quote(""), "''");
        let (flags, rest) = take_flags("--chown=a:b --link  src dst");
        assert_eq!(flags, vec![("chown".into(), Some("a:b".into())), ("link".into(), None)]);
        assert_eq!(rest, "src dst");
    }
}
