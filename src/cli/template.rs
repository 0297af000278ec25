//! `template ls|build|rm|inspect`.

use abx_client::{BuildEvent, BuildTemplate, Client};
use anyhow::bail;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};

use super::parse;

#[derive(Debug, Subcommand)]
pub enum TemplateCmd {
    /// List templates.
    Ls,
    /// Build a template: an embedded recipe (base, mini), a host directory, a Dockerfile
    /// (`-f Dockerfile [CONTEXT] NAME`) or a repository at a ref (`--repo R --ref REF
    /// --setup CMD NAME`).
    Build(BuildArgs),
    /// Import an image: a `docker save` archive, an OCI archive or an OCI layout directory.
    Import {
        /// The archive or layout directory.
        file: std::path::PathBuf,
        /// Template name (default: the file name without .tar, .tar.gz, .tgz, .oci).
        #[arg(long)]
        name: Option<String>,
        /// Which image of an archive holding several (a tag or reference name).
        #[arg(long)]
        image: Option<String>,
    },
    /// Pull an image from an OCI registry (`host[:port]/repo[:tag|@sha256:...]`).
    Pull {
        reference: String,
        /// Template name (default: the repository's last path component and its tag, as
        /// `python:3.12`; a `latest` tag or a digest gives just `python`).
        #[arg(long)]
        name: Option<String>,
        /// Registry user name (the password is read from standard input or --password-env).
        #[arg(long)]
        username: Option<String>,
        /// Environment variable holding the registry password.
        #[arg(long, requires = "username")]
        password_env: Option<String>,
        /// Docker config.json / containers auth.json to read credentials from.
        #[arg(long)]
        auth_file: Option<std::path::PathBuf>,
        /// Allow plain HTTP (always allowed for a registry on loopback).
        #[arg(long)]
        insecure: bool,
    },
    /// Build a template again from what made it (Dockerfile, repository, image); with the
    /// build cache only what changed is redone.
    Refresh { name: String },
    /// Make a template from a snapshot: the snapshot's template layers (shared) plus one
    /// layer with the sandbox's changes.
    Create {
        /// Template name.
        name: String,
        /// Snapshot id or name.
        #[arg(long, required = true)]
        from_snapshot: String,
    },
    /// Remove templates (layers still in use are kept).
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Empty the build cache and remove the layers nothing uses any more.
    Prune {
        /// Only the cache entries no build made or used for this long, e.g. 7d.
        #[arg(long, value_parser = super::parse::duration)]
        unused_for: Option<u64>,
    },
    /// Keep a template under another name too, typically NAME:TAG (a version that stays
    /// while NAME is rebuilt; `-T NAME:TAG` uses it). A tag is not refreshed; tagging over
    /// an existing name replaces it, and refresh then refuses that name too.
    Tag { name: String, target: String },
    /// Show a template as JSON.
    Inspect { name: String },
}

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// `NAME`, or `CONTEXT NAME` with -f.
    #[arg(num_args = 1..=2, required = true)]
    args: Vec<String>,
    /// Embedded recipe to use (base: Debian 12 via debootstrap; mini: busybox).
    #[arg(long)]
    recipe: Option<String>,
    /// Import this host directory as the template's root filesystem.
    #[arg(long)]
    from_dir: Option<std::path::PathBuf>,
    /// Dockerfile to build (`-` for standard input); CONTEXT defaults to its directory.
    #[arg(short = 'f', long = "file")]
    dockerfile: Option<std::path::PathBuf>,
    /// ARG value (repeatable).
    #[arg(long = "build-arg", value_parser = parse::key_value)]
    build_args: Vec<(String, String)>,
    /// Repository to check out (host path or URL).
    #[arg(long)]
    repo: Option<String>,
    /// Branch, tag or commit (default HEAD).
    #[arg(long = "ref", requires = "repo")]
    git_ref: Option<String>,
    /// Command installing the repository's dependencies (cached by its lock files).
    #[arg(long, requires = "repo")]
    setup: Option<String>,
    /// Template the repository goes on (default base).
    #[arg(long, requires = "repo")]
    from: Option<String>,
    /// Where the repository goes (default /workspace).
    #[arg(long, requires = "repo")]
    dest: Option<String>,
    /// Lock file deciding whether setup runs again (repeatable; default: the usual ones).
    #[arg(long = "lock-file", requires = "repo")]
    lock_files: Vec<String>,
    /// Run every step, ignoring the build cache.
    #[arg(long)]
    no_cache: bool,
    /// Egress policy of the build's RUN steps and setup.
    #[command(flatten)]
    policy: super::net::PolicyArgs,
}

fn abs(p: &std::path::Path) -> anyhow::Result<String> {
    Ok(std::fs::canonicalize(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?.display().to_string())
}

/// `c` if template names and tags allow it, else `-`.
fn name_char(c: char) -> char {
    if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' { c } else { '-' }
}

/// A template name made from a file or repository name.
fn name_from(s: &str) -> String {
    let mut n: String = s.to_ascii_lowercase().chars().map(name_char).collect();
    n = n.trim_start_matches(|c: char| !c.is_ascii_alphanumeric()).to_string();
    n.truncate(63);
    if n.is_empty() { "image".into() } else { n }
}

/// An archive's file name without the extensions of image archives (`alpine-3.19.tar`
/// gives `alpine-3.19`).
fn archive_stem(file_name: &str) -> &str {
    for ext in [".tar.gz", ".tar.zst", ".tar.xz", ".tgz", ".tar", ".oci"] {
        if let Some(stem) = file_name.strip_suffix(ext).filter(|s| !s.is_empty()) {
            return stem;
        }
    }
    file_name
}

/// The default template name of a pulled image: the repository's last path component,
/// with the image's tag as the template's tag unless it is `latest`
/// (`registry:5000/library/python:3.12` gives `python:3.12`, so that two versions of an
/// image do not replace each other).
fn name_of_reference(reference: &str) -> String {
    let repo = reference.split('@').next().unwrap_or(reference);
    let last = repo.rsplit('/').next().unwrap_or(repo);
    let (base, tag) = match last.split_once(':') {
        Some((base, tag)) => (base, Some(tag)),
        None => (last, None),
    };
    let base = name_from(base);
    match tag.filter(|t| *t != "latest" && !t.is_empty()) {
        Some(tag) => {
            let tag: String = tag.chars().map(name_char).take(64).collect();
            let tag = if tag.starts_with(['.', '-']) { format!("_{}", &tag[..tag.len().min(63)]) } else { tag };
            format!("{base}:{tag}")
        }
        None => base,
    }
}

pub async fn main(client: &Client, cmd: TemplateCmd) -> anyhow::Result<i32> {
    let show = |t: &abx_client::Template| {
        println!("{} ({} layer(s), {})", t.name, t.layers.len(), parse::human_size(t.size_bytes));
    };
    match cmd {
        TemplateCmd::Ls => {
            println!("{:<20} {:<8} {:<10} {:<10} RECIPE", "NAME", "LAYERS", "SIZE", "CREATED");
            for t in client.templates().await? {
                println!(
                    "{:<20} {:<8} {:<10} {:<10} {}",
                    t.name,
                    t.layers.len(),
                    parse::human_size(t.size_bytes),
                    parse::relative(t.created_at),
                    t.recipe
                );
            }
        }
        TemplateCmd::Build(a) => {
            let (context, name) = match a.args.as_slice() {
                [name] => (None, name.clone()),
                [context, name] => (Some(context.clone()), name.clone()),
                _ => bail!("give NAME, or CONTEXT NAME with -f"),
            };
            if context.is_some() && a.dockerfile.is_none() {
                bail!("a CONTEXT is given only with -f Dockerfile");
            }
            let mut req = BuildTemplate {
                name,
                recipe: a.recipe,
                no_cache: a.no_cache,
                network: a.policy.policy(),
                build_args: a.build_args.into_iter().collect(),
                ..Default::default()
            };
            if let Some(d) = a.from_dir {
                req.from_dir = Some(abs(&d)?);
            }
            if let Some(f) = a.dockerfile {
                let text = if f.as_os_str() == "-" {
                    std::io::read_to_string(std::io::stdin())?
                } else {
                    std::fs::read_to_string(&f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?
                };
                req.dockerfile = Some(text);
                let context: Option<std::path::PathBuf> = match context {
                    Some(c) => Some(c.into()),
                    // A daemon over TCP takes no host path: no implicit context (COPY then
                    // says it needs one; an explicit one is refused with the reason).
                    None if matches!(client.host(), abx_client::Host::Http(_)) => None,
                    None if f.as_os_str() == "-" => Some(std::env::current_dir()?),
                    None => {
                        Some(f.parent().filter(|p| !p.as_os_str().is_empty()).map_or(".".into(), |p| p.to_path_buf()))
                    }
                };
                req.context = context.as_deref().map(abs).transpose()?;
            }
            if let Some(r) = a.repo {
                let local = std::path::Path::new(&r);
                req.repo = Some(if !r.contains("://") && local.exists() { abs(local)? } else { r });
                req.git_ref = a.git_ref;
                req.setup = a.setup;
                req.from = a.from;
                req.dest = a.dest;
                req.lock_files = a.lock_files;
            }
            show(&build_request(client, req).await?);
        }
        TemplateCmd::Import { file, name, image } => {
            let file_name = file.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            let req = BuildTemplate {
                name: name.unwrap_or_else(|| name_from(archive_stem(&file_name))),
                import: Some(abs(&file)?),
                image,
                ..Default::default()
            };
            show(&build_request(client, req).await?);
        }
        TemplateCmd::Pull { reference, name, username, password_env, auth_file, insecure } => {
            let password = match (&username, password_env) {
                (None, _) => None,
                (Some(_), Some(var)) => {
                    Some(std::env::var(&var).map_err(|_| anyhow::anyhow!("--password-env: ${var} is not set"))?)
                }
                (Some(_), None) => {
                    let mut p = String::new();
                    std::io::stdin().read_line(&mut p)?;
                    Some(p.trim_end_matches(['\r', '\n']).to_string())
                }
            };
            let auth_file = auth_file.as_deref().map(abs).transpose()?;
            let auth = (username.is_some() || auth_file.is_some()).then_some(abx_client::RegistryAuth {
                username,
                password,
                auth_file,
            });
            let req = BuildTemplate {
                name: name.unwrap_or_else(|| name_of_reference(&reference)),
                pull: Some(reference),
                registry_auth: auth,
                insecure,
                ..Default::default()
            };
            show(&build_request(client, req).await?);
        }
        TemplateCmd::Refresh { name } => {
            let before = client.template(&name).await?;
            let t = client_refresh(client, &name).await?;
            if t.layers == before.layers && same_config(&t, &before) {
                println!("{name}: unchanged ({} layer(s))", t.layers.len());
            } else {
                let same = t.layers.iter().zip(&before.layers).take_while(|(a, b)| a == b).count();
                println!("{name}: rebuilt {} of {} layer(s)", t.layers.len() - same, t.layers.len());
            }
        }
        TemplateCmd::Create { name, from_snapshot } => {
            let req = BuildTemplate { name, from_snapshot: Some(from_snapshot), ..Default::default() };
            show(&build_request(client, req).await?);
        }
        TemplateCmd::Rm { names } => {
            // Each name on its own, like `snapshot rm` and `volume rm`: an error is reported
            // and the rest are still removed.
            let mut code = 0;
            for n in names {
                match client.delete_template(&n).await {
                    Ok(()) => println!("{n}"),
                    Err(e) => {
                        eprintln!("agentbox: {e}");
                        code = super::EXIT_ERROR;
                    }
                }
            }
            return Ok(code);
        }
        TemplateCmd::Tag { name, target } => show(&client.tag_template(&name, &target).await?),
        TemplateCmd::Prune { unused_for } => {
            let removed = client.prune_build_cache(unused_for.map(std::time::Duration::from_secs)).await?;
            println!("removed {} layer(s)", removed.len());
        }
        TemplateCmd::Inspect { name } => println!("{}", serde_json::to_string_pretty(&client.template(&name).await?)?),
    }
    Ok(0)
}

fn same_config(a: &abx_client::Template, b: &abx_client::Template) -> bool {
    (&a.env, &a.workdir, &a.user, &a.start, &a.ready) == (&b.env, &b.workdir, &b.user, &b.start, &b.ready)
}

async fn client_refresh(client: &Client, name: &str) -> anyhow::Result<abx_client::Template> {
    let stream = client.refresh_template(name).await?;
    follow(stream, name).await
}

/// Builds an embedded template with a progress bar.
pub async fn build(client: &Client, name: &str, recipe: Option<String>) -> anyhow::Result<abx_client::Template> {
    build_with(client, name, recipe, None).await
}

async fn build_with(
    client: &Client,
    name: &str,
    recipe: Option<String>,
    from_dir: Option<String>,
) -> anyhow::Result<abx_client::Template> {
    build_request(client, BuildTemplate { name: name.into(), recipe, from_dir, ..Default::default() }).await
}

async fn build_request(client: &Client, req: BuildTemplate) -> anyhow::Result<abx_client::Template> {
    let stream = client.build_template(&req).await?;
    follow(stream, &req.name).await
}

/// Shows a build's progress (and its step output) until it ends.
async fn follow(mut stream: abx_client::NdjsonStream<BuildEvent>, name: &str) -> anyhow::Result<abx_client::Template> {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {prefix:>12} {bar:30} {pos}/{len} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    let mut last_stage = String::new();
    while let Some(ev) = stream.next().await? {
        match ev {
            BuildEvent::Progress { stage, message, .. } if stage == "log" => bar.suspend(|| eprintln!("  | {message}")),
            BuildEvent::Progress { stage, done, total, message } => {
                if stage == "step" {
                    bar.suspend(|| eprintln!("step {done}/{}: {message}", total.unwrap_or(0)));
                }
                if stage != last_stage {
                    if !last_stage.is_empty() && !bar.is_hidden() {
                        bar.println(format!("  {last_stage} done"));
                    }
                    last_stage = stage.clone();
                    bar.set_prefix(stage);
                }
                bar.set_length(total.unwrap_or(0));
                bar.set_position(done);
                bar.set_message(message);
            }
            BuildEvent::Done { template } => {
                bar.finish_and_clear();
                eprintln!("built template {} in {:.1?}", template.name, bar.elapsed());
                return Ok(template);
            }
            BuildEvent::Error { message, .. } => {
                bar.finish_and_clear();
                bail!("building template {name} failed: {message}");
            }
        }
    }
    bar.finish_and_clear();
    bail!("the daemon ended the build of {name} without a result")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pulled_image_is_named_with_its_tag() {
        assert_eq!(name_of_reference("127.0.0.1:5000/library/python:3.12"), "python:3.12");
        assert_eq!(name_of_reference("127.0.0.1:5000/library/python"), "python");
        assert_eq!(name_of_reference("localhost:5000/team/App:latest"), "app");
        assert_eq!(name_of_reference("reg:5000/alpine@sha256:0123abcd"), "alpine");
        assert_eq!(name_of_reference("reg:5000/alpine:3.19@sha256:0123abcd"), "alpine:3.19");
        // Tags the daemon would refuse (it wants `[A-Za-z0-9_][A-Za-z0-9._-]{0,63}`) are mended.
        assert_eq!(name_of_reference("reg/x:.hidden"), "x:_.hidden");
        assert_eq!(name_of_reference("reg/x:-rc"), "x:_-rc");
        assert_eq!(name_of_reference(&format!("reg/x:{}", "a".repeat(80))), format!("x:{}", "a".repeat(64)));
    }

    #[test]
    fn an_imported_archive_is_named_after_its_file_without_extensions() {
        assert_eq!(name_from(archive_stem("alpine-3.19.tar")), "alpine-3.19");
        assert_eq!(name_from(archive_stem("app.tar.gz")), "app");
        assert_eq!(name_from(archive_stem("layout")), "layout");
        assert_eq!(name_from(archive_stem(".tar")), "tar");
    }
}
