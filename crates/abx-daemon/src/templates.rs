//! Template commands: list, get, build (with streamed progress), remove.

use std::sync::Arc;

use abx_api::{BuildEvent, BuildTemplate};
use tokio::sync::mpsc;

use crate::error::{CoreError, CoreResult};
use crate::manager::Manager;

pub fn to_api(t: abx_template::Template) -> abx_api::Template {
    abx_api::Template {
        name: t.name,
        layers: t.layers,
        size_bytes: t.size_bytes,
        created_at: t.created_at,
        recipe: t.recipe,
        env: t.config.env,
        workdir: t.config.workdir,
        user: t.config.user,
        description: t.config.description,
        start: t.config.start,
        ready: t.config.ready,
    }
}

fn map_err(name: &str, e: abx_template::Error) -> CoreError {
    use abx_template::Error as E;
    match e {
        E::NotFound { .. } => CoreError::not_found("template", name),
        e @ (E::InvalidName { .. }
        | E::InvalidRecipe { .. }
        | E::SourceMissing { .. }
        | E::SourceNotDir { .. }
        | E::SourceHoldsStore { .. }
        | E::SourceInStore { .. }) => CoreError::Invalid(e.to_string()),
        e @ E::Closed => CoreError::Conflict(e.to_string()),
        e => CoreError::internal(format!("template '{name}'"), e),
    }
}

pub fn list(m: &Manager) -> CoreResult<Vec<abx_api::Template>> {
    let v = m.templates.list().map_err(|e| map_err("*", e))?;
    Ok(v.into_iter().map(to_api).collect())
}

pub fn get(m: &Manager, name: &str) -> CoreResult<abx_api::Template> {
    m.templates.get(name).map(to_api).map_err(|e| map_err(name, e))
}

/// The fields of a build request that name a path on the daemon's host: `from_dir`,
/// `context`, `import`, `registry_auth.auth_file`, and `repo` unless it is a network URL.
/// They are accepted only on the unix socket, whose callers are root; over TCP the daemon
/// would read any host file on a key holder's behalf.
pub fn host_path_fields(req: &BuildTemplate) -> Vec<&'static str> {
    let auth_file = req.registry_auth.as_ref().is_some_and(|a| a.auth_file.is_some());
    let repo = req.repo.as_deref().is_some_and(|r| !is_network_url(r));
    [
        (req.from_dir.is_some(), "from_dir"),
        (req.context.is_some(), "context"),
        (repo, "repo"),
        (req.import.is_some(), "import"),
        (auth_file, "registry_auth.auth_file"),
    ]
    .into_iter()
    .filter_map(|(named, field)| named.then_some(field))
    .collect()
}

/// `https://`, `http://`, `ssh://` or `git://` with a host: a repository git fetches over
/// the network (not `file://`, a plain path or the `host:path` form, which git reads from
/// the host when such a path exists).
fn is_network_url(repo: &str) -> bool {
    let Some((scheme, rest)) = repo.split_once("://") else { return false };
    ["https", "http", "ssh", "git"].contains(&scheme.to_ascii_lowercase().as_str())
        && !rest.is_empty()
        && !rest.starts_with(['/', '-'])
}

/// Starts a build; progress and the result arrive on the returned channel.
pub fn build(m: &Arc<Manager>, req: BuildTemplate) -> CoreResult<mpsc::Receiver<BuildEvent>> {
    // Before the stream starts, whatever the source: a 400, not an `error` event.
    abx_template::validate_name(&req.name).map_err(|e| map_err(&req.name, e))?;
    let sources = [
        req.recipe.is_some(),
        req.from_dir.is_some(),
        req.from_snapshot.is_some(),
        req.dockerfile.is_some(),
        req.repo.is_some(),
        req.import.is_some(),
        req.pull.is_some(),
    ];
    if sources.iter().filter(|s| **s).count() > 1 {
        return Err(CoreError::Invalid(
            "give one source: recipe, from_dir, from_snapshot, dockerfile, repo, import or pull".into(),
        ));
    }
    if req.dockerfile.is_some() {
        return crate::build::dockerfile(m, req);
    }
    if req.repo.is_some() {
        return crate::build::repo(m, req);
    }
    if req.import.is_some() || req.pull.is_some() {
        return crate::build::image(m, req);
    }
    if let Some(key) = &req.from_snapshot {
        if req.from_dir.is_some() || req.recipe.is_some() {
            return Err(CoreError::Invalid("give from_snapshot alone (not with recipe or from_dir)".into()));
        }
        return from_snapshot(m, &req.name, m.find_snapshot(key)?);
    }
    let recipe = match (&req.from_dir, &req.recipe) {
        (Some(_), Some(_)) => return Err(CoreError::Invalid("give either recipe or from_dir, not both".into())),
        (Some(dir), None) => {
            if !dir.starts_with('/') {
                return Err(CoreError::Invalid(format!("from_dir must be an absolute host path, got '{dir}'")));
            }
            abx_template::Recipe::Dir(dir.into())
        }
        (None, r) => {
            let name = r.as_deref().unwrap_or(&req.name);
            abx_template::Store::recipe_for(name).ok_or_else(|| {
                CoreError::Invalid(format!(
                    "there is no embedded recipe '{name}' (they are base and mini); to build a template from \
                     something else give a Dockerfile (-f), a directory (--from-dir), a repository (--repo) \
                     or a snapshot (template create --from-snapshot), or use template import or pull"
                ))
            })?
        }
    };
    Ok(spawn_build(m, req.name, move |m, name, progress| m.templates.build(&recipe, name, progress)))
}

/// Runs a template build of the store in the background ([`crate::build::spawn`]): its
/// progress, then `done` or `error`, arrive on the returned channel.
fn spawn_build(
    m: &Arc<Manager>,
    name: String,
    build: impl FnOnce(&Manager, &str, &dyn Fn(abx_template::Progress)) -> abx_template::Result<abx_template::Template>
    + Send
    + 'static,
) -> mpsc::Receiver<BuildEvent> {
    crate::build::spawn(m, move |m, out| async move {
        tokio::task::spawn_blocking(move || build(&m, &name, &|p| out.progress(p)).map_err(|e| map_err(&name, e)))
            .await
            .map_err(|e| CoreError::internal("template build task", e.to_string()))?
    })
}

/// A template from a snapshot: its layers plus the snapshot's changes as one more layer.
fn from_snapshot(
    m: &Arc<Manager>,
    name: &str,
    snap: crate::lifecycle::SnapRecord,
) -> CoreResult<mpsc::Receiver<BuildEvent>> {
    abx_template::validate_name(name).map_err(|e| map_err(name, e))?;
    Ok(spawn_build(m, name.to_string(), move |m, name, progress| {
        let mut config = m.templates.get(&snap.template).map(|t| t.config).unwrap_or_default();
        config.env = snap.env.clone();
        config.workdir = snap.workdir.clone().or(config.workdir);
        config.user = snap.user.clone().or(config.user);
        config.description = format!("from snapshot {} of sandbox {}", snap.id, snap.sandbox);
        let delta = m.storage.snapshots().join(&snap.id).join("upper");
        let label = format!("snapshot:{}", snap.id);
        m.templates.build_from_delta(name, &snap.layers, &delta, config, label, progress)
    }))
}

pub async fn remove(m: &Arc<Manager>, name: &str) -> CoreResult<()> {
    if m.pools.has(name) {
        return Err(CoreError::Conflict(format!(
            "template '{name}' has a warm pool; remove it first (agentbox pool rm {name}, DELETE /v1/pools/{name})"
        )));
    }
    let m = m.clone();
    let name = name.to_string();
    tokio::task::spawn_blocking(move || {
        // No create may resolve the template meanwhile (see `pins.rs`).
        m.collecting(|in_use| m.templates.remove(&name, in_use)).map_err(|e| map_err(&name, e))?;
        crate::build::forget_source(&m, &name);
        crate::build::prune_mirrors(&m);
        Ok(())
    })
    .await
    .map_err(|e| CoreError::internal("template removal task", e.to_string()))?
}

/// Keeps template `name` under `target` as well (`NAME:TAG`).
/// What built an earlier `target` no longer describes it: refresh refuses a tag.
pub fn tag(m: &Manager, name: &str, target: &str) -> CoreResult<abx_api::Template> {
    let t = m.templates.tag(name, target).map_err(|e| match e {
        abx_template::Error::NotFound { .. } => CoreError::not_found("template", name),
        e => map_err(target, e),
    })?;
    crate::build::tagged(m, name, target);
    Ok(to_api(t))
}

/// Empties the build cache (with `unused_for`: of the entries no build made or used for
/// that long) and collects garbage; returns the removed layers.
pub async fn prune(m: &Arc<Manager>, unused_for: Option<std::time::Duration>) -> CoreResult<Vec<String>> {
    let m = m.clone();
    tokio::task::spawn_blocking(move || {
        let removed =
            m.collecting(|in_use| m.templates.prune_build_cache(in_use, unused_for)).map_err(|e| map_err("*", e));
        crate::build::prune_mirrors(&m);
        removed
    })
    .await
    .map_err(|e| CoreError::internal("prune task", e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every build field that names a host path is found (what a TCP request may not give);
    /// a repository is a host path unless it is a network URL.
    #[test]
    fn host_paths_of_a_build_request() {
        let none = BuildTemplate { name: "t".into(), dockerfile: Some("FROM mini\n".into()), ..Default::default() };
        assert!(host_path_fields(&none).is_empty());
        let all = BuildTemplate {
            from_dir: Some("/etc".into()),
            context: Some("/root".into()),
            repo: Some("/srv/repo".into()),
            import: Some("/x.tar".into()),
            registry_auth: Some(abx_api::RegistryAuth {
                auth_file: Some("/root/.docker/config.json".into()),
                ..Default::default()
            }),
            ..none.clone()
        };
        assert_eq!(host_path_fields(&all), ["from_dir", "context", "repo", "import", "registry_auth.auth_file"]);
        for url in
            ["https://github.com/a/b.git", "http://127.0.0.1:8080/r", "ssh://git@host/r", "git://host/r", "HTTPS://h/r"]
        {
            assert!(is_network_url(url), "{url}");
        }
        for path in [
            "/srv/repo",
            "repo",
            "file:///etc",
            "https:///etc",
            "ssh://-oProxyCommand=x/r",
            "host:path",
            "ext::sh -c x",
            "",
        ] {
            assert!(!is_network_url(path), "{path}");
        }
    }
}
