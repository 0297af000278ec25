//! Step-by-step template builds: Dockerfiles and repositories at a ref.
//!
//! Each step yields at most one layer. `ENV`, `WORKDIR`, `USER`, `CMD`, `ENTRYPOINT` and
//! `HEALTHCHECK` change only the configuration (`WORKDIR` adds a layer with the directory
//! when no layer has it). `COPY`/`ADD` build their layer on the host from the context
//! directory. `RUN` runs in a sandbox made on the layers so far, under the build's egress
//! policy (default: none), as the current user in the current directory; once the command
//! has exited the sandbox is frozen and its overlay upper directory (whiteouts and opaque
//! markers kept) becomes the layer; then the sandbox is destroyed.
//!
//! Every step's result is cached under a key that chains the key of the step before with
//! everything the step depends on (see `abx_template::layers`), so an unchanged rebuild
//! runs nothing, and a change rebuilds that step and the ones after it only.
//!
//! A repository build is three layers on its `from` template (default `base`): the setup
//! command's result, then the repository's tree at the ref, owned by the template's user.
//! The setup layer is keyed by the setup command, the lock files' content and the layers
//! below, not by the commit: when the ref moves but no lock file changed, a refresh
//! replaces only the tree layer. Setup runs once, in a sandbox holding the tree of the ref
//! it was first built at, as the template's user in the repository's directory; its layer
//! leaves out the repository's paths (the tree layer above has the commit's own, and a file
//! a later commit deleted must not show through from the setup layer).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use abx_api::{BuildEvent, BuildTemplate, CreateSandbox, NetworkPolicy};
use abx_template::{Cached, Hold, Template, TemplateConfig};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::error::{CoreError, CoreResult};
use crate::manager::Manager;

/// Lock files a repository build hashes when none are named.
pub const LOCK_FILES: [&str; 22] = [
    "package.json",
    "package-lock.json",
    "npm-shrinkwrap.json",
    "yarn.lock",
    "pnpm-lock.yaml",
    "bun.lockb",
    "requirements.txt",
    "requirements-dev.txt",
    "pyproject.toml",
    "poetry.lock",
    "Pipfile.lock",
    "uv.lock",
    "setup.py",
    "setup.cfg",
    "Cargo.toml",
    "Cargo.lock",
    "go.mod",
    "go.sum",
    "Gemfile.lock",
    "composer.lock",
    "mix.lock",
    "pom.xml",
];

/// Progress and log lines of a build, sent to the client in order; and whether that
/// client is still there (its response stream not dropped).
#[derive(Clone)]
pub struct Out(mpsc::UnboundedSender<BuildEvent>, mpsc::Sender<BuildEvent>, tokio_util::sync::CancellationToken);

impl Out {
    pub fn stage(&self, stage: &str, done: u64, total: u64, message: impl Into<String>) {
        let _ = self.0.send(BuildEvent::Progress {
            stage: stage.into(),
            done,
            total: Some(total),
            message: message.into(),
        });
    }

    /// A progress report of the template store (an import, a pull, a layer being made).
    pub fn progress(&self, p: abx_template::Progress) {
        let _ = self.0.send(BuildEvent::Progress { stage: p.stage, done: p.done, total: p.total, message: p.message });
    }

    fn log(&self, line: &str) {
        let _ = self.0.send(BuildEvent::Progress { stage: "log".into(), done: 0, total: None, message: line.into() });
    }

    /// Resolves once the client went away (Ctrl-C of `template build`, a killed curl) or
    /// the daemon began to shut down; then [`Out::check`] says which.
    async fn gone(&self) {
        tokio::select! {
            () = self.1.closed() => {}
            () = self.2.cancelled() => {}
        }
    }

    /// An error when the client went away: a build nobody waits for is cancelled, as with
    /// `docker build`, rather than replacing the template behind the user's back. A
    /// daemon shutting down cancels it too, and says so to the client (which used to see
    /// its stream end without a word).
    fn check(&self) -> CoreResult<()> {
        if self.2.is_cancelled() {
            Err(CoreError::Conflict(
                "the daemon is shutting down: build cancelled, nothing published; run it again when the daemon is back \
                 (finished steps are cached)"
                    .into(),
            ))
        } else if self.1.is_closed() {
            Err(CoreError::Conflict("the client went away: build cancelled, nothing published".into()))
        } else {
            Ok(())
        }
    }
}

/// How long a build may go on once the daemon began to shut down before its client is
/// told it was abandoned: within the 5 s the server gives open responses to finish.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Runs an asynchronous build in the background; its events, then `done` or `error`,
/// arrive on the returned channel.
pub fn spawn<F, Fut>(m: &Arc<Manager>, build: F) -> mpsc::Receiver<BuildEvent>
where
    F: FnOnce(Arc<Manager>, Out) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = CoreResult<Template>> + Send,
{
    let (utx, mut urx) = mpsc::unbounded_channel();
    let (tx, rx) = mpsc::channel(256);
    let client = tx.clone();
    tokio::spawn(async move {
        while let Some(ev) = urx.recv().await {
            if tx.send(ev).await.is_err() {
                break;
            }
        }
    });
    let m = m.clone();
    let out = Out(utx.clone(), client, m.stopping.clone());
    let building = Building::start(&m);
    tokio::spawn(async move {
        let stopping = m.stopping.clone();
        let build = build(m, out);
        // A daemon shutting down cancels Dockerfile and repository builds, which then say
        // so themselves; an import, pull or recipe cannot be stopped midway (it runs in a
        // blocking task) and is abandoned after a grace, while the server still answers.
        // Its store is closed by then, so it cannot publish after the client was told.
        let abandoned = async {
            stopping.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        let res = tokio::select! {
            biased;
            res = build => res,
            () = abandoned => Err(CoreError::Conflict(
                "the daemon is shutting down: the build was abandoned, nothing published; run it again when the \
                 daemon is back"
                    .into(),
            )),
        };
        let ev = match res {
            Ok(t) => BuildEvent::Done { template: crate::templates::to_api(t) },
            Err(e) => {
                tracing::info!(error = %e.full_message(), "template build failed");
                BuildEvent::Error { code: e.code().0.into(), message: e.full_message() }
            }
        };
        drop(building);
        let _ = utx.send(ev);
    });
    rx
}

/// Counts a build in progress (`Manager::builds`) until dropped.
struct Building(Arc<Manager>);

impl Building {
    fn start(m: &Arc<Manager>) -> Building {
        m.builds.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Building(m.clone())
    }
}

impl Drop for Building {
    fn drop(&mut self) {
        self.0.builds.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The layers and configuration a build has reached, and the cache key of that state.
#[derive(Debug, Clone)]
struct State {
    layers: Vec<String>,
    config: TemplateConfig,
    key: String,
}

fn hash(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn invalid(msg: impl Into<String>) -> CoreError {
    CoreError::Invalid(msg.into())
}

fn tmpl_err(context: &str, e: abx_template::Error) -> CoreError {
    use abx_template::Error as E;
    match e {
        e @ (E::InvalidName { .. } | E::NotFound { .. } | E::SourceMissing { .. } | E::SourceNotDir { .. }) => {
            CoreError::Invalid(format!("{context}: {e}"))
        }
        e @ E::Closed => CoreError::Conflict(format!("{context}: {e}")),
        e => CoreError::internal(context.to_string(), e),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> CoreResult<T> + Send + 'static) -> CoreResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| CoreError::internal("build task", e.to_string()))?
}

/// What to say when the template a build starts from does not exist: an embedded recipe
/// is built with `template build NAME`, anything else is built, imported or pulled.
fn missing_base(from: &str, said: &str) -> String {
    if abx_template::Store::recipe_for(from).is_some() {
        format!(
            "{said}: no template named '{from}' yet; build it first from its embedded recipe: `agentbox template build {from}`"
        )
    } else {
        format!(
            "{said}: no template named '{from}' (build it, or import or pull the image first: \
             `agentbox template pull REF --name {from}`)"
        )
    }
}

/// The starting point of a build (a template of this daemon, or `scratch`), and the
/// template's whole configuration (its start command and readiness check too, which build
/// steps do not run with).
/// `said` is how the request named it (`FROM x`, `--from x`). Its layers join the build's
/// `hold`, so a `template rm` of the base during the build does not take them away.
fn from_template(m: &Manager, from: &str, said: &str, hold: &Hold) -> CoreResult<(State, TemplateConfig)> {
    if from == "scratch" {
        let st = State { layers: Vec::new(), config: TemplateConfig::default(), key: hash(&["from", "scratch"]) };
        return Ok((st, TemplateConfig::default()));
    }
    let t = m.templates.get(from).map_err(|e| match e {
        abx_template::Error::NotFound { .. } => invalid(missing_base(from, said)),
        e => tmpl_err(&format!("template '{from}'"), e),
    })?;
    m.templates.keep(hold, &t.layers).map_err(|e| match e {
        abx_template::Error::LayerGone { .. } => {
            CoreError::Conflict(format!("{said}: template '{from}' was removed as the build started ({e})"))
        }
        e => tmpl_err(&format!("template '{from}'"), e),
    })?;
    let config = TemplateConfig { start: Vec::new(), ready: None, description: String::new(), ..t.config.clone() };
    let key = hash(&["from", &t.layers.join(","), &serde_json::to_string(&config).unwrap_or_default()]);
    Ok((State { layers: t.layers, config, key }, t.config))
}

/// Checks a Dockerfile build request and starts it.
pub fn dockerfile(m: &Arc<Manager>, req: BuildTemplate) -> CoreResult<mpsc::Receiver<BuildEvent>> {
    abx_template::validate_name(&req.name).map_err(|e| invalid(e.to_string()))?;
    let text = req.dockerfile.clone().unwrap_or_default();
    let plan = abx_template::dockerfile::parse(&text, &req.build_args).map_err(|e| invalid(e.to_string()))?;
    let context = match &req.context {
        Some(c) if !c.starts_with('/') => {
            return Err(invalid(format!("context must be an absolute host path, got '{c}'")));
        }
        Some(c) if !Path::new(c).is_dir() => return Err(invalid(format!("context {c} is not a directory"))),
        Some(c) => Some(PathBuf::from(c)),
        None => None,
    };
    let network = req.network.clone().unwrap_or_default();
    crate::net::policy::Policy::parse(&network).map_err(|e| invalid(format!("network: {e}")))?;
    let name = req.name.clone();
    Ok(spawn(m, move |m, out| async move {
        let hold = m.templates.hold();
        let (mut st, base_config) = from_template(&m, &plan.from, &format!("FROM {}", plan.from), &hold)?;
        let mut b = Builder { m: m.clone(), out, name: name.clone(), network, no_cache: req.no_cache, hold };
        // Again on the base's configuration: its environment is visible to expansions.
        let plan = abx_template::dockerfile::parse_with_base(&text, &req.build_args, &base_config)
            .map_err(|e| invalid(e.to_string()))?;
        for w in &plan.warnings {
            b.out.log(&format!("warning: {w}"));
        }
        if !plan.unused_args.is_empty() {
            b.out.log(&format!("warning: build args not consumed: {}", plan.unused_args.join(", ")));
        }
        let total = plan.steps.len() as u64 + 1;
        b.out.stage("step", 1, total, format!("FROM {}", plan.from));
        for (i, step) in plan.steps.iter().enumerate() {
            b.out.check()?;
            st = b.step(st, step, context.as_deref(), i as u64 + 2, total).await?;
        }
        let mut config = st.config;
        config.start = plan.start.clone();
        config.ready = plan.ready.clone();
        config.description = format!("built from a Dockerfile ({} steps)", plan.steps.len() + 1);
        let label = format!("dockerfile:{}", req.context.as_deref().unwrap_or("-"));
        b.finish(st.layers, config, label, &req).await
    }))
}

struct Builder {
    m: Arc<Manager>,
    out: Out,
    name: String,
    network: NetworkPolicy,
    no_cache: bool,
    /// The layers this build made, found in its cache or starts from: kept by garbage
    /// collection (`template rm`, `template prune`) until the build ends and its template
    /// references them.
    hold: Hold,
}

impl Builder {
    fn cached(&self, key: &str) -> Option<Cached> {
        if self.no_cache { None } else { self.m.templates.cache_get(key, &self.hold) }
    }

    fn apply(st: &mut State, key: String, c: Cached) {
        st.key = key;
        if let Cached::Layer(d) = c {
            st.layers.push(d);
        }
    }

    async fn step(
        &mut self,
        mut st: State,
        step: &abx_template::dockerfile::Step,
        context: Option<&Path>,
        n: u64,
        total: u64,
    ) -> CoreResult<State> {
        use abx_template::dockerfile::Step;
        match step {
            Step::Env { vars, text, .. } => {
                self.out.stage("step", n, total, text.clone());
                for (k, v) in vars {
                    st.config.env.insert(k.clone(), v.clone());
                }
                st.key = hash(&[&st.key, text]);
            }
            Step::User { user, text, .. } => {
                self.out.stage("step", n, total, text.clone());
                st.config.user = Some(user.clone());
                st.key = hash(&[&st.key, text]);
            }
            Step::Workdir { path, text, line } => {
                self.out.stage("step", n, total, text.clone());
                st.config.workdir = Some(path.clone());
                // The user is part of the key: the directories it makes are the user's.
                let user = st.config.user.clone().unwrap_or_default();
                let key = hash(&[&st.key, text, &user]);
                let c = match self.cached(&key) {
                    Some(c) => c,
                    None => {
                        let owner = match user.as_str() {
                            "" | "0" | "root" | "0:0" | "root:root" => None,
                            u => Some(resolve_owner(&self.m, &st.layers, u).map_err(|e| {
                                invalid(format!(
                                    "Dockerfile line {line}: {text}: the owner of the directory, user '{u}': {e}"
                                ))
                            })?),
                        };
                        let (m, layers, path, hold) =
                            (self.m.clone(), st.layers.clone(), path.clone(), self.hold.clone());
                        let c = blocking(move || mkdir_layer(&m, &layers, &path, owner, &hold)).await?;
                        self.m.templates.cache_put(&key, &c).map_err(|e| tmpl_err("build cache", e))?;
                        c
                    }
                };
                Self::apply(&mut st, key, c);
            }
            Step::Copy { sources, dest, chown, chmod, extract_archives: extract, line, text } => {
                let Some(context) = context else {
                    return Err(invalid(format!("Dockerfile line {line}: {text} needs a build context directory")));
                };
                let ignore =
                    abx_template::context::Ignore::load(context).map_err(|e| tmpl_err("read .dockerignore", e))?;
                let selected = abx_template::context::resolve(context, sources, &ignore)
                    .map_err(|e| invalid(format!("Dockerfile line {line}: {e}")))?;
                let digest = abx_template::context::digest(&selected, dest, chown.as_deref(), chmod.as_deref())
                    .map_err(|e| tmpl_err("hash the build context", e))?;
                let workdir = st.config.workdir.clone().unwrap_or_else(|| "/".into());
                let key = hash(&[&st.key, text, &digest, &workdir]);
                let c = match self.cached(&key) {
                    Some(c) => {
                        self.out.stage("step", n, total, format!("{text} (cached)"));
                        c
                    }
                    None => {
                        self.out.stage("step", n, total, text.clone());
                        let owner = match chown {
                            Some(o) => Some(
                                resolve_owner(&self.m, &st.layers, o)
                                    .map_err(|e| invalid(format!("Dockerfile line {line}: --chown={o}: {e}")))?,
                            ),
                            None => None,
                        };
                        let mode = match chmod {
                            Some(s) => Some(u32::from_str_radix(s, 8).map_err(|_| {
                                invalid(format!("Dockerfile line {line}: --chmod={s} is not an octal mode"))
                            })?),
                            None => None,
                        };
                        let (m, layers, dest, extract) = (self.m.clone(), st.layers.clone(), dest.clone(), *extract);
                        let hold = self.hold.clone();
                        let c = blocking(move || {
                            let scratch = m.templates.new_scratch("copy");
                            std::fs::create_dir_all(scratch.path())
                                .map_err(|e| CoreError::internal("create a layer directory", e))?;
                            let view = LowerView::new(&m, &layers)?;
                            let options = abx_template::context::CopyOptions {
                                dest: &dest,
                                workdir: &workdir,
                                chown: owner,
                                chmod: mode,
                                extract_archives: extract,
                                lower: view.path(),
                            };
                            abx_template::context::copy_into(&selected, scratch.path(), &options)
                                .map_err(|e| tmpl_err("copy the build context", e))?;
                            drop(view);
                            inherit_dirs(&m, &layers, scratch.path())?;
                            let (d, _) =
                                m.templates.publish_layer(scratch, &hold).map_err(|e| tmpl_err("publish layer", e))?;
                            Ok(Cached::Layer(d))
                        })
                        .await?;
                        self.m.templates.cache_put(&key, &c).map_err(|e| tmpl_err("build cache", e))?;
                        c
                    }
                };
                Self::apply(&mut st, key, c);
            }
            Step::Run { command, env, line, text } => {
                let net = serde_json::to_string(&self.network).unwrap_or_default();
                let cfg = serde_json::to_string(&st.config).unwrap_or_default();
                let key = hash(&[&st.key, &step.cache_text(), &cfg, &net]);
                let c = match self.cached(&key) {
                    Some(c) => {
                        self.out.stage("step", n, total, format!("{text} (cached)"));
                        c
                    }
                    None => {
                        self.out.stage("step", n, total, text.clone());
                        let c = self.run(&st, command, env, None).await.map_err(|e| match e {
                            CoreError::Invalid(m) => invalid(format!("Dockerfile line {line}: {text}: {m}")),
                            e => e,
                        })?;
                        self.m.templates.cache_put(&key, &c).map_err(|e| tmpl_err("build cache", e))?;
                        c
                    }
                };
                Self::apply(&mut st, key, c);
            }
        }
        Ok(st)
    }

    /// Runs `argv` in a sandbox on the state's layers; its changes become the layer, less
    /// those to the paths the layer `without` has (`Store::layer_from_delta_without`).
    async fn run(
        &self,
        st: &State,
        argv: &[String],
        env: &BTreeMap<String, String>,
        without: Option<&str>,
    ) -> CoreResult<Cached> {
        if st.layers.is_empty() {
            return Err(invalid("RUN needs a root filesystem (FROM scratch has none)"));
        }
        let template = Template {
            name: format!("{}-build", self.name),
            layers: st.layers.clone(),
            config: st.config.clone(),
            size_bytes: 0,
            created_at: 0,
            recipe: String::new(),
            packages: Vec::new(),
        };
        let req = CreateSandbox {
            network: Some(self.network.clone()),
            timeout_secs: Some(0),
            metadata: BTreeMap::from([("agentbox.build".to_string(), self.name.clone())]),
            ..Default::default()
        };
        let sb = self.m.create_on(req, Some(template), true).await?;
        let res = self.run_in(&sb, st, argv, env, without).await;
        let id = sb.id.clone();
        drop(sb);
        let _ = self.m.destroy(&id, true).await;
        res
    }

    async fn run_in(
        &self,
        sb: &Arc<crate::sandbox::Sandbox>,
        st: &State,
        argv: &[String],
        env: &BTreeMap<String, String>,
        without: Option<&str>,
    ) -> CoreResult<Cached> {
        let mut all_env = st.config.env.clone();
        all_env.extend(env.clone());
        let spec = abx_proto::ExecSpec {
            argv: argv.to_vec(),
            env: all_env,
            cwd: st.config.workdir.clone(),
            user: st.config.user.clone(),
            tty: None,
            stdin: false,
            timeout_ms: None,
            background: false,
            tag: Some("build".into()),
        };
        let mut pending = Vec::new();
        let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
        let out = self.out.clone();
        // The client going away ends the command (its exec connection is dropped, which
        // kills it); the caller destroys the sandbox.
        let socket = sb.dirs.agent_socket();
        let running = crate::agent::run(&socket, spec, |_, data| {
            pending.extend_from_slice(data);
            while let Some(i) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=i).collect();
                let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                out.log(&line);
                tail.push_back(line);
                if tail.len() > 10 {
                    tail.pop_front();
                }
            }
        });
        let status = tokio::select! {
            status = running => status.map_err(|e| CoreError::Invalid(format!("could not run it: {e}")))?,
            () = self.out.gone() => return Err(self.out.check().err().unwrap_or_else(|| CoreError::Conflict("build cancelled".into()))),
        };
        if !pending.is_empty() {
            let line = String::from_utf8_lossy(&pending).into_owned();
            out.log(&line);
            tail.push_back(line);
        }
        if status.code != Some(0) {
            let how = match (status.code, status.signal) {
                (Some(c), _) => format!("exit code {c}"),
                (None, Some(s)) => format!("signal {s}"),
                _ => "an unknown status".into(),
            };
            if tail.is_empty() {
                return Err(CoreError::Invalid(format!("failed with {how} and no output")));
            }
            let tail: Vec<String> = tail.into_iter().collect();
            return Err(CoreError::Invalid(format!("failed with {how}; last output:\n{}", tail.join("\n"))));
        }
        // Nothing runs while the changes are read.
        self.m.pause(&sb.id).await?;
        let (m, upper) = (self.m.clone(), sb.dirs.upper());
        // The resolv.conf the sandbox's setup wrote (the daemon's DNS proxy) is not the
        // step's doing: left out, so layers do not depend on the daemon's address.
        if let Some(net) = &self.m.net {
            let p = upper.join("etc/resolv.conf");
            if std::fs::read(&p).is_ok_and(|b| b == net.resolv_conf().as_bytes()) {
                let _ = std::fs::remove_file(&p);
            }
        }
        let without = without.map(|d| self.m.templates.layer_path(d));
        let hold = self.hold.clone();
        blocking(move || {
            let layer = match &without {
                Some(tree) => m.templates.layer_from_delta_without(&upper, tree, &hold),
                None => m.templates.layer_from_delta(&upper, &hold),
            };
            match layer.map_err(|e| tmpl_err("import the changes", e))? {
                Some((d, _)) => Ok(Cached::Layer(d)),
                None => Ok(Cached::Nothing),
            }
        })
        .await
    }

    /// Saves the template (replacing one of its name) and the request that made it, for
    /// `refresh`.
    async fn finish(
        &self,
        layers: Vec<String>,
        config: TemplateConfig,
        recipe: String,
        req: &BuildTemplate,
    ) -> CoreResult<Template> {
        let (m, name, req) = (self.m.clone(), self.name.clone(), req.clone());
        self.out.check()?;
        self.out.stage("publishing", 0, 0, format!("template '{name}'"));
        blocking(move || {
            let size = m.templates.layers_size(&layers).map_err(|e| tmpl_err("template size", e))?;
            let t = Template {
                name: name.clone(),
                layers,
                config,
                size_bytes: size,
                created_at: crate::sandbox::now(),
                recipe,
                packages: Vec::new(),
            };
            m.templates.save_template(&t).map_err(|e| tmpl_err(&format!("save template '{name}'"), e))?;
            save_source(&m, &name, &req);
            Ok(t)
        })
        .await
    }
}

/// The topmost entry for `path` (absolute) in `layers`, unless a whiteout or an opaque
/// directory above hides it.
fn find_in_layers(m: &Manager, layers: &[String], path: &str) -> Option<PathBuf> {
    let rel = path.trim_start_matches('/');
    for d in layers.iter().rev() {
        let root = m.templates.layer_path(d);
        let p = root.join(rel);
        if let Ok(meta) = std::fs::symlink_metadata(&p) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_char_device() && meta.len() == 0 && std::os::unix::fs::MetadataExt::rdev(&meta) == 0
            {
                return None;
            }
            return Some(p);
        }
    }
    None
}

/// A layer with directory `path` (and its missing parents), unless it exists. The
/// directories it makes belong to `owner` (the build's current user, as BuildKit does;
/// None: root); those the layers below have keep their owner and mode.
fn mkdir_layer(
    m: &Manager,
    layers: &[String],
    path: &str,
    owner: Option<(u32, u32)>,
    hold: &Hold,
) -> CoreResult<Cached> {
    if find_in_layers(m, layers, path).is_some_and(|p| p.is_dir()) {
        return Ok(Cached::Nothing);
    }
    let scratch = m.templates.new_scratch("workdir");
    let dir = scratch.path().join(path.trim_start_matches('/'));
    std::fs::create_dir_all(&dir).map_err(|e| CoreError::internal(format!("create {}", dir.display()), e))?;
    inherit_dirs(m, layers, scratch.path())?;
    if let Some((uid, gid)) = owner {
        let mut abs = String::new();
        for name in path.split('/').filter(|n| !n.is_empty()) {
            abs.push('/');
            abs.push_str(name);
            if find_in_layers(m, layers, &abs).is_none() {
                let here = scratch.path().join(abs.trim_start_matches('/'));
                std::os::unix::fs::lchown(&here, Some(uid), Some(gid))
                    .map_err(|e| CoreError::internal(format!("set owner of {}", here.display()), e))?;
            }
        }
    }
    let (d, _) = m.templates.publish_layer(scratch, hold).map_err(|e| tmpl_err("publish layer", e))?;
    Ok(Cached::Layer(d))
}

/// Gives every directory of a new layer that exists in the layers below the mode and
/// owner it has there (an upper directory's metadata wins in the overlay, so a COPY to
/// /home/user/app must not turn /home/user into root's); new directories are 0755 root.
fn inherit_dirs(m: &Manager, layers: &[String], root: &Path) -> CoreResult<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let here = root.join(&rel);
        let abs = format!("/{}", rel.display());
        let below = if rel.as_os_str().is_empty() {
            layers.last().map(|d| m.templates.layer_path(d))
        } else {
            find_in_layers(m, layers, &abs)
        };
        let Some(below) = below.filter(|p| p.is_dir()) else { continue };
        let meta =
            std::fs::metadata(&below).map_err(|e| CoreError::internal(format!("stat {}", below.display()), e))?;
        let fail = |e: std::io::Error| CoreError::internal(format!("set owner of {}", here.display()), e);
        std::os::unix::fs::lchown(&here, Some(meta.uid()), Some(meta.gid())).map_err(fail)?;
        std::fs::set_permissions(&here, std::fs::Permissions::from_mode(meta.mode() & 0o7777)).map_err(fail)?;
        // Only the directories on the way to what was copied: those below a directory
        // the layers do not have are new.
        for e in std::fs::read_dir(&here).map_err(|e| CoreError::internal(format!("read {}", here.display()), e))? {
            let e = e.map_err(|e| CoreError::internal("read directory", e))?;
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(rel.join(e.file_name()));
            }
        }
    }
    Ok(())
}

/// `user[:group]` as numeric ids, names looked up in the layers' /etc/passwd and /etc/group.
fn resolve_owner(m: &Manager, layers: &[String], spec: &str) -> Result<(u32, u32), String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let lookup = |file: &str, name: &str, field: usize| -> Result<(u32, u32), String> {
        if let Ok(n) = name.parse::<u32>() {
            return Ok((n, n));
        }
        let path = find_in_layers(m, layers, file).ok_or_else(|| format!("no {file} to look '{name}' up in"))?;
        let text = std::fs::read_to_string(&path).map_err(|e| format!("read {file}: {e}"))?;
        for l in text.lines() {
            let f: Vec<&str> = l.split(':').collect();
            if f.first() == Some(&name) && f.len() > field {
                let id = f[2].parse().map_err(|_| format!("bad entry for '{name}' in {file}"))?;
                let gid = f.get(field).and_then(|g| g.parse().ok()).unwrap_or(id);
                return Ok((id, gid));
            }
        }
        Err(format!("no '{name}' in {file}"))
    };
    let (uid, primary) = lookup("/etc/passwd", user, 3)?;
    let gid = match group {
        Some(g) => lookup("/etc/group", g, 2)?.0,
        None if user.parse::<u32>().is_ok() => uid,
        None => primary,
    };
    Ok((uid, gid))
}

/// Checks an image import or pull request and starts it.
pub fn image(m: &Arc<Manager>, req: BuildTemplate) -> CoreResult<mpsc::Receiver<BuildEvent>> {
    abx_template::validate_name(&req.name).map_err(|e| invalid(e.to_string()))?;
    if let Some(path) = &req.import
        && !path.starts_with('/')
    {
        return Err(invalid(format!("import must be an absolute host path, got '{path}'")));
    }
    let name = req.name.clone();
    Ok(spawn(m, move |m, out| async move {
        blocking(move || {
            let progress = |p: abx_template::Progress| out.progress(p);
            let res = match (&req.import, &req.pull) {
                (Some(path), _) => m.templates.import_image(Path::new(path), req.image.as_deref(), &name, &progress),
                (None, Some(reference)) => {
                    let auth = req.registry_auth.clone().unwrap_or_default();
                    let opts = abx_template::PullOptions {
                        username: auth.username,
                        password: auth.password,
                        insecure: req.insecure,
                        auth_file: auth.auth_file.map(PathBuf::from),
                    };
                    m.templates.pull(reference, &opts, &name, &progress)
                }
                (None, None) => return Err(invalid("give import or pull")),
            };
            let t = res.map_err(|e| image_err(&name, e))?;
            // A pull is refreshed by pulling again (credentials are not kept).
            let mut source = req.clone();
            source.registry_auth = source.registry_auth.map(|a| abx_api::RegistryAuth { password: None, ..a });
            save_source(&m, &name, &source);
            Ok(t)
        })
        .await
    }))
}

/// An image that cannot be imported or pulled is the caller's to fix (its file, reference,
/// credentials or registry): a client error naming what is wrong, down to the cause (a
/// refused connection, a truncated archive).
fn image_err(name: &str, e: abx_template::Error) -> CoreError {
    match e {
        abx_template::Error::NotFound { .. } => CoreError::not_found("template", name),
        e @ abx_template::Error::Closed => CoreError::Conflict(e.to_string()),
        e => CoreError::Invalid(crate::error::chain_text(&e)),
    }
}

/// Where the request that built a template is kept, for `refresh`: `<name>.json` in
/// `<root>/build-sources/`, or, for a name `template tag` wrote, `<name>.tag` holding the
/// name of the template whose build source counts (a kept version is not rebuilt).
fn source_path(root: &Path, name: &str, ext: &str) -> PathBuf {
    root.join("build-sources").join(format!("{name}.{ext}"))
}

fn save_source(m: &Manager, name: &str, req: &BuildTemplate) {
    save_source_at(&m.cfg.root, name, req)
}

fn save_source_at(root: &Path, name: &str, req: &BuildTemplate) {
    let path = source_path(root, name, "json");
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(bytes) = serde_json::to_vec_pretty(req) {
        let _ = abx_template::write_atomic(&path, &bytes);
    }
    let _ = std::fs::remove_file(source_path(root, name, "tag"));
}

/// Forgets how a removed template was built.
pub fn forget_source(m: &Manager, name: &str) {
    for ext in ["json", "tag"] {
        let _ = std::fs::remove_file(source_path(&m.cfg.root, name, ext));
    }
}

/// Records that `target` was just saved as a copy of `source` (`template tag`): whatever
/// built an earlier `target` no longer describes it, and a kept version is not refreshed.
pub fn tagged(m: &Manager, source: &str, target: &str) {
    tagged_at(&m.cfg.root, source, target)
}

fn tagged_at(root: &Path, source: &str, target: &str) {
    if source == target {
        return;
    }
    let _ = std::fs::remove_file(source_path(root, target, "json"));
    // A tag of a tag names the template the first one was taken from.
    let origin = std::fs::read_to_string(source_path(root, source, "tag")).unwrap_or_else(|_| source.to_string());
    let path = source_path(root, target, "tag");
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = abx_template::write_atomic(&path, origin.trim().as_bytes());
}

/// The request that built template `name` (`recipe`: its recipe label, for the message
/// when there is none).
fn source_of(root: &Path, name: &str, recipe: &str) -> CoreResult<BuildTemplate> {
    if let Ok(origin) = std::fs::read_to_string(source_path(root, name, "tag")) {
        let origin = origin.trim();
        return Err(invalid(format!(
            "template '{name}' is a tag of '{origin}' (a kept version, made by `template tag`) and cannot be \
             refreshed; refresh '{origin}' instead, or build '{name}' again"
        )));
    }
    let bytes = std::fs::read(source_path(root, name, "json")).map_err(|_| {
        invalid(format!(
            "template '{name}' was not built from a Dockerfile, a repository or an image (recipe: {recipe}); build it again instead"
        ))
    })?;
    serde_json::from_slice(&bytes).map_err(|e| CoreError::internal(format!("read how '{name}' was built"), e))
}

/// Builds a template again from the request that made it: with the build cache, only
/// what changed (a moved ref, changed lock files or context files, a new image) is redone.
pub fn refresh(m: &Arc<Manager>, name: &str) -> CoreResult<mpsc::Receiver<BuildEvent>> {
    let before = m.templates.get(name).map_err(|e| match e {
        abx_template::Error::NotFound { .. } => CoreError::not_found("template", name),
        e => tmpl_err(&format!("template '{name}'"), e),
    })?;
    let req = source_of(&m.cfg.root, name, &before.recipe)?;
    if let (Some(reference), Some(auth)) = (&req.pull, &req.registry_auth)
        && auth.username.is_some()
        && auth.auth_file.is_none()
    {
        return Err(invalid(format!(
            "template '{name}' was pulled with a password, which is not kept; pull it again: \
             `agentbox template pull {reference} --name {name} --username {}` (or use --auth-file, which refresh can reuse)",
            auth.username.as_deref().unwrap_or_default()
        )));
    }
    crate::templates::build(m, req)
}

/// Checks a repository build request and starts it.
pub fn repo(m: &Arc<Manager>, req: BuildTemplate) -> CoreResult<mpsc::Receiver<BuildEvent>> {
    abx_template::validate_name(&req.name).map_err(|e| invalid(e.to_string()))?;
    let repo = req.repo.clone().unwrap_or_default();
    if repo.is_empty() || repo.starts_with('-') {
        return Err(invalid(format!("repo must be a host path or a URL, got '{repo}'")));
    }
    let git_ref = req.git_ref.clone().unwrap_or_else(|| "HEAD".into());
    if git_ref.starts_with('-') || git_ref.is_empty() {
        return Err(invalid(format!("ref '{git_ref}' is not a branch, tag or commit")));
    }
    let dest = repo_dest(req.dest.as_deref())?;
    for f in &req.lock_files {
        if f.starts_with('/') || f.split('/').any(|c| c == "..") {
            return Err(invalid(format!("lock file '{f}' must be a path inside the repository")));
        }
    }
    let network = req.network.clone().unwrap_or_default();
    crate::net::policy::Policy::parse(&network).map_err(|e| invalid(format!("network: {e}")))?;
    let from = req.from.clone().unwrap_or_else(|| "base".into());
    let hold = m.templates.hold();
    let (base, _) = from_template(m, &from, &format!("--from {from}"), &hold)?;
    let name = req.name.clone();
    Ok(spawn(m, move |m, out| async move {
        let b = Builder { m: m.clone(), out, name: name.clone(), network, no_cache: req.no_cache, hold };
        b.out.stage("fetch", 1, 4, format!("fetching {repo}"));
        let (mm, r, gr) = (m.clone(), repo.clone(), git_ref.clone());
        let (mirror, commit) = blocking(move || fetch(&mm, &r, &gr)).await?;
        b.out.check()?;
        b.out.stage("fetch", 1, 4, format!("{git_ref} is {commit}"));
        let owner_spec = base.config.user.clone().unwrap_or_else(|| "0".into());
        let owner =
            resolve_owner(&m, &base.layers, &owner_spec).map_err(|e| invalid(format!("user '{owner_spec}': {e}")))?;

        // The tree at the commit, owned by the template's user.
        let tree_key = hash(&["repo-tree", &commit, &dest, &format!("{}:{}", owner.0, owner.1)]);
        let tree = match b.cached(&tree_key) {
            Some(Cached::Layer(d)) => {
                b.out.stage("tree", 2, 4, format!("tree of {commit} (cached)"));
                d
            }
            _ => {
                b.out.stage("tree", 2, 4, format!("exporting the tree of {commit} to {dest}"));
                let (mm, layers, c, d) = (m.clone(), base.layers.clone(), commit.clone(), dest.clone());
                let hold = b.hold.clone();
                let digest = blocking(move || export_tree(&mm, &layers, &mirror, &c, &d, owner, &hold)).await?;
                m.templates
                    .cache_put(&tree_key, &Cached::Layer(digest.clone()))
                    .map_err(|e| tmpl_err("build cache", e))?;
                digest
            }
        };

        b.out.check()?;
        // Setup, keyed by its inputs: lock files, command, layers below, policy.
        let mut layers = base.layers.clone();
        let mut config = base.config.clone();
        config.workdir = Some(dest.clone());
        if let Some(setup) = &req.setup {
            let (mm, t, d, lf) = (m.clone(), tree.clone(), dest.clone(), req.lock_files.clone());
            let locks = blocking(move || lock_digest(&mm, &t, &d, &lf)).await?;
            let net = serde_json::to_string(&b.network).unwrap_or_default();
            // "-2": setup layers before it kept their copies of the repository's files.
            let key = hash(&["repo-setup-2", &base.key, setup, &locks.0, &dest, &net]);
            let c = match b.cached(&key) {
                Some(c) => {
                    b.out.stage(
                        "setup",
                        3,
                        4,
                        format!("{setup} (cached; lock files unchanged: {})", locks.1.join(", ")),
                    );
                    c
                }
                None => {
                    b.out.stage("setup", 3, 4, format!("{setup} (lock files: {})", locks.1.join(", ")));
                    let mut st = State { layers: base.layers.clone(), config: config.clone(), key: String::new() };
                    st.layers.push(tree.clone());
                    let argv = vec!["/bin/sh".to_string(), "-c".to_string(), setup.clone()];
                    // Its copies of the repository's files are left out: the tree layer
                    // on top has the commit's, and a later commit may not have them.
                    let c = b.run(&st, &argv, &BTreeMap::new(), Some(&tree)).await.map_err(|e| match e {
                        CoreError::Invalid(msg) => invalid(format!("setup `{setup}`: {msg}")),
                        e => e,
                    })?;
                    m.templates.cache_put(&key, &c).map_err(|e| tmpl_err("build cache", e))?;
                    c
                }
            };
            if let Cached::Layer(d) = c {
                layers.push(d);
            }
        }
        layers.push(tree);
        config.description = format!("{repo} at {git_ref} ({})", &commit[..12.min(commit.len())]);
        let label = format!("repo:{repo}@{git_ref}");
        b.finish(layers, config, label, &req).await
    }))
}

fn git(args: &[&str], dir: Option<&Path>) -> CoreResult<String> {
    let mut cmd = std::process::Command::new("git");
    cmd.args(["-c", "safe.directory=*", "-c", "protocol.ext.allow=never"]);
    if let Some(d) = dir {
        cmd.arg("-C").arg(d);
    }
    cmd.args(args).env("GIT_TERMINAL_PROMPT", "0").stdin(std::process::Stdio::null());
    let out = cmd.output().map_err(|e| CoreError::internal("run git (is it installed?)", e))?;
    if !out.status.success() {
        return Err(invalid(format!("git {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Where the mirror of `repo` is kept.
fn mirror_path(root: &Path, repo: &str) -> PathBuf {
    root.join("repos").join(format!("{}.git", &hash(&[repo])[..16]))
}

/// Removes the repository mirrors no template's build source names any more (after a
/// template removal; a mirror is what `template refresh` fetches into). Skipped while a
/// build runs, whose mirror has no build source yet: a later removal catches up.
pub fn prune_mirrors(m: &Manager) {
    if m.builds.load(std::sync::atomic::Ordering::SeqCst) > 0 {
        return;
    }
    prune_mirrors_at(&m.cfg.root);
}

fn prune_mirrors_at(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root.join("repos")) else { return };
    let mut wanted = std::collections::HashSet::new();
    for e in std::fs::read_dir(root.join("build-sources")).into_iter().flatten().flatten() {
        let Ok(bytes) = std::fs::read(e.path()) else { continue };
        if let Ok(BuildTemplate { repo: Some(repo), .. }) = serde_json::from_slice(&bytes) {
            wanted.insert(mirror_path(root, &repo));
        }
    }
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "git") && !wanted.contains(&path) {
            tracing::info!(mirror = %path.display(), "removing a repository mirror no template uses");
            if let Err(err) = std::fs::remove_dir_all(&path) {
                tracing::warn!(mirror = %path.display(), error = %err, "removing a repository mirror");
            }
        }
    }
}

/// Mirrors the repository under `<root>/repos/` and resolves the ref to a commit.
fn fetch(m: &Manager, repo: &str, git_ref: &str) -> CoreResult<(PathBuf, String)> {
    let dir = m.cfg.root.join("repos");
    std::fs::create_dir_all(&dir).map_err(|e| CoreError::internal("create repos directory", e))?;
    let mirror = mirror_path(&m.cfg.root, repo);
    if mirror.join("HEAD").exists() {
        git(&["fetch", "--prune", "--force", "origin", "+refs/*:refs/*"], Some(&mirror))?;
    } else {
        let tmp = dir.join(format!(".tmp-{}-{}", std::process::id(), crate::manager::new_id()));
        let res = git(&["clone", "--mirror", "--quiet", "--", repo, &tmp.display().to_string()], None);
        if let Err(e) = res {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        if std::fs::rename(&tmp, &mirror).is_err() {
            // Another build mirrored it meanwhile.
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    let commit = git(&["rev-parse", "--verify", "--end-of-options", &format!("{git_ref}^{{commit}}")], Some(&mirror))
        .map_err(|_| invalid(format!("ref '{git_ref}' not found in {repo}")))?;
    Ok((mirror, commit))
}

/// Where a repository template puts the tree (default `/workspace`): an absolute path,
/// not a system directory whose contents the tree would hide (the tree's directory is
/// owned by the template's user).
fn repo_dest(dest: Option<&str>) -> CoreResult<String> {
    let given = dest.unwrap_or("/workspace");
    let dest = given.trim_end_matches('/');
    let bad = |why: &str| Err(invalid(format!("dest '{given}' {why}")));
    if !given.starts_with('/') || given.split('/').any(|c| c == ".." || c == ".") {
        return bad("must be an absolute path without '.' or '..'");
    }
    const SYSTEM: &[&str] = &[
        "",
        "/bin",
        "/boot",
        "/etc",
        "/home",
        "/lib",
        "/lib32",
        "/lib64",
        "/libx32",
        "/opt",
        "/root",
        "/run",
        "/sbin",
        "/srv",
        "/tmp",
        "/usr",
        "/var",
        "/usr/bin",
        "/usr/lib",
        "/usr/local",
        "/usr/sbin",
        "/usr/share",
        "/var/lib",
    ];
    if SYSTEM.contains(&dest) {
        return bad("is a system directory; use a directory of its own such as /workspace or /srv/app");
    }
    if ["/proc", "/sys", "/dev"].iter().any(|p| dest == *p || dest.starts_with(&format!("{p}/"))) {
        return bad("is inside /proc, /sys or /dev, which the sandbox mounts over");
    }
    Ok(dest.to_string())
}

/// The tree of `commit` at `dest`, files owned by `owner`, as a layer.
fn export_tree(
    m: &Manager,
    layers: &[String],
    mirror: &Path,
    commit: &str,
    dest: &str,
    owner: (u32, u32),
    hold: &Hold,
) -> CoreResult<String> {
    let scratch = m.templates.new_scratch("repo");
    let target = scratch.path().join(dest.trim_start_matches('/'));
    std::fs::create_dir_all(&target).map_err(|e| CoreError::internal("create the tree directory", e))?;
    let mut child = std::process::Command::new("git")
        .args(["-c", "safe.directory=*", "-C"])
        .arg(mirror)
        .args(["archive", "--format=tar", commit])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| CoreError::internal("run git archive", e))?;
    let stdout = child.stdout.take().ok_or_else(|| CoreError::internal("git archive", "no output"))?;
    let mut archive = tar::Archive::new(stdout);
    archive.set_preserve_permissions(true);
    archive.set_overwrite(true);
    let unpacked = archive.unpack(&target);
    let status = child.wait().map_err(|e| CoreError::internal("git archive", e))?;
    unpacked.map_err(|e| CoreError::internal("unpack the repository tree", e))?;
    if !status.success() {
        return Err(CoreError::internal("git archive", format!("exited with {status}")));
    }
    chown_tree(&target, owner)?;
    inherit_dirs(m, layers, scratch.path())?;
    // The repository's own directory belongs to the user too (inherit_dirs left it alone
    // unless the layers had it).
    std::os::unix::fs::lchown(&target, Some(owner.0), Some(owner.1))
        .map_err(|e| CoreError::internal("set owner of the tree", e))?;
    let (d, _) = m.templates.publish_layer(scratch, hold).map_err(|e| tmpl_err("publish layer", e))?;
    Ok(d)
}

fn chown_tree(dir: &Path, owner: (u32, u32)) -> CoreResult<()> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| CoreError::internal(format!("read {}", d.display()), e))? {
            let e = e.map_err(|e| CoreError::internal("read directory", e))?;
            let p = e.path();
            std::os::unix::fs::lchown(&p, Some(owner.0), Some(owner.1))
                .map_err(|e| CoreError::internal(format!("set owner of {}", p.display()), e))?;
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            }
        }
    }
    Ok(())
}

/// The digest of the lock files present in the tree layer, and their names.
fn lock_digest(m: &Manager, tree: &str, dest: &str, named: &[String]) -> CoreResult<(String, Vec<String>)> {
    let repo_root = m.templates.layer_path(tree).join(dest.trim_start_matches('/'));
    let names: Vec<String> =
        if named.is_empty() { LOCK_FILES.iter().map(|s| s.to_string()).collect() } else { named.to_vec() };
    let mut found = Vec::new();
    let mut h = Sha256::new();
    for n in &names {
        let p = repo_root.join(n);
        if let Ok(bytes) = std::fs::read(&p) {
            h.update(n.as_bytes());
            h.update([0]);
            h.update(Sha256::digest(&bytes));
            found.push(n.clone());
        } else if !named.is_empty() {
            return Err(invalid(format!("lock file '{n}' is not in the repository")));
        }
    }
    Ok((h.finalize().iter().map(|b| format!("{b:02x}")).collect(), found))
}

/// A read-only merged view of layers on the host: the layer itself when there is one, a
/// read-only overlay mount (inside a scratch directory of the store, which detaches it when
/// dropped) when there are several.
struct LowerView {
    path: Option<PathBuf>,
    mounted: Option<(abx_template::Scratch, PathBuf)>,
}

impl LowerView {
    fn new(m: &Manager, layers: &[String]) -> CoreResult<LowerView> {
        match layers {
            [] => Ok(LowerView { path: None, mounted: None }),
            [one] => Ok(LowerView { path: Some(m.templates.layer_path(one)), mounted: None }),
            many => {
                let scratch = m.templates.new_scratch("abxview");
                let target = scratch.path().join("merged");
                std::fs::create_dir_all(&target).map_err(|e| CoreError::internal("create the lower view", e))?;
                let lower: Vec<String> =
                    many.iter().rev().map(|d| m.templates.layer_path(d).display().to_string()).collect();
                let status = std::process::Command::new("mount")
                    .args(["-t", "overlay", "abx-view", "-o"])
                    .arg(format!("ro,userxattr,lowerdir={}", lower.join(":")))
                    .arg(&target)
                    .status()
                    .map_err(|e| CoreError::internal("mount the lower view", e))?;
                if !status.success() {
                    return Err(CoreError::internal("mount the lower view", format!("mount exited with {status}")));
                }
                Ok(LowerView { path: Some(target.clone()), mounted: Some((scratch, target)) })
            }
        }
    }

    fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

impl Drop for LowerView {
    fn drop(&mut self) {
        if let Some((_scratch, target)) = &self.mounted {
            let _ = rustix::mount::unmount(target, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A missing embedded recipe's template is built with `template build NAME` (the
    /// message suggested pulling an image named `base`).
    #[test]
    fn a_missing_base_says_how_to_make_it() {
        let m = missing_base("base", "--from base");
        assert!(m.starts_with("--from base: ") && m.contains("`agentbox template build base`"), "{m}");
        let m = missing_base("python", "FROM python");
        assert!(m.starts_with("FROM python: ") && m.contains("template pull REF --name python"), "{m}");
    }

    /// Mirrors of repositories that no build source names any more are removed (they
    /// stayed forever); the others, and anything that is not a mirror, stay.
    #[test]
    fn mirrors_no_template_uses_are_removed() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        let req = |repo: &str| BuildTemplate { name: "x".into(), repo: Some(repo.into()), ..Default::default() };
        save_source_at(root, "app", &req("/srv/app"));
        save_source_at(root, "gone", &req("https://example.com/gone.git"));
        let (kept, gone) = (mirror_path(root, "/srv/app"), mirror_path(root, "https://example.com/gone.git"));
        for d in [&kept, &gone, &root.join("repos/.tmp-1-x")] {
            std::fs::create_dir_all(d.join("objects")).unwrap();
        }
        prune_mirrors_at(root);
        assert!(kept.is_dir() && gone.is_dir());
        std::fs::remove_file(source_path(root, "gone", "json")).unwrap();
        prune_mirrors_at(root);
        assert!(kept.is_dir() && !gone.exists());
        assert!(root.join("repos/.tmp-1-x").is_dir(), "a clone in progress is not a mirror");
    }

    /// `template tag SRC NAME` over a built NAME drops NAME's build source (refresh rebuilt
    /// the old NAME, not what inspect showed), and refreshing a tag says it is one; a build
    /// of the name afterwards makes it refreshable again.
    #[test]
    fn a_tag_replaces_the_build_source_of_its_name() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        let req = |ctx: &str| BuildTemplate {
            name: "x".into(),
            dockerfile: Some("FROM mini\n".into()),
            context: Some(ctx.into()),
            ..Default::default()
        };
        save_source_at(root, "app", &req("/ctx1"));
        save_source_at(root, "feat", &req("/ctx5"));
        assert_eq!(source_of(root, "app", "-").unwrap().context.as_deref(), Some("/ctx1"));
        tagged_at(root, "feat", "app");
        let CoreError::Invalid(e) = source_of(root, "app", "-").unwrap_err() else { panic!() };
        assert!(e.contains("'app' is a tag of 'feat'") && e.contains("refresh 'feat'"), "{e}");
        assert_eq!(source_of(root, "feat", "-").unwrap().context.as_deref(), Some("/ctx5"));
        // A tag of a tag names the first source; tagging a name onto itself changes nothing.
        tagged_at(root, "app", "app:v1");
        let CoreError::Invalid(e) = source_of(root, "app:v1", "-").unwrap_err() else { panic!() };
        assert!(e.contains("'app:v1' is a tag of 'feat'"), "{e}");
        tagged_at(root, "feat", "feat");
        assert!(source_of(root, "feat", "-").is_ok());
        // Built again: refreshable again.
        save_source_at(root, "app", &req("/ctx1"));
        assert_eq!(source_of(root, "app", "-").unwrap().context.as_deref(), Some("/ctx1"));
        // Never built nor tagged: the old message.
        let CoreError::Invalid(e) = source_of(root, "mini", "mini").unwrap_err() else { panic!() };
        assert!(e.contains("was not built from a Dockerfile"), "{e}");
    }

    #[test]
    fn a_repository_goes_to_a_directory_of_its_own() {
        assert_eq!(repo_dest(None).unwrap(), "/workspace");
        assert_eq!(repo_dest(Some("/srv/app/")).unwrap(), "/srv/app");
        assert_eq!(repo_dest(Some("/usr/src/app")).unwrap(), "/usr/src/app");
        assert_eq!(repo_dest(Some("/home/agent/repo")).unwrap(), "/home/agent/repo");
        for bad in ["/", "/etc", "/etc/", "/usr", "/proc/x", "/dev", "relative", "/a/../etc", "/a/./b"] {
            assert!(repo_dest(Some(bad)).is_err(), "{bad}");
        }
        let CoreError::Invalid(e) = repo_dest(Some("/etc")).unwrap_err() else { panic!() };
        assert!(e.contains("'/etc'") && e.contains("system directory"), "{e}");
    }
}
