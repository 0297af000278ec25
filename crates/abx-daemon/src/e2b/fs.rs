//! envd's `filesystem.Filesystem` service.
//!
//! Directory watching is done by the daemon, by listing: a watcher remembers the
//! directory's entries (name, type, size, mtime, mode) and each poll reports the
//! differences as create, write, chmod and remove events. Changes that cancel out
//! between two polls are not seen, and a rename shows as a remove and a create.

use std::collections::{BTreeMap, HashMap};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use futures_util::StreamExt;
use serde_json::{Value, json};

use abx_api::{FileInfo, FileKind, MkdirRequest, RenameRequest};

use super::Envd;
use super::connect::{self, RpcError, RpcResult, bool_field, int_field, str_field, unary};
use crate::core::{Command, Core};
use crate::error::CoreError;

pub async fn rpc(
    State(core): State<Core>,
    env: Envd,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let req = connect::request_message(&headers, body).await;
    if method == "WatchDir" {
        return match req {
            Ok(r) => match watch_dir(&core, &env, &r, connect::keepalive_secs(&headers)).await {
                Ok(s) => connect::stream(s),
                Err(e) => connect::stream_error(e),
            },
            Err(e) => connect::stream_error(e),
        };
    }
    let req = match req {
        Ok(r) => r,
        Err(e) => return unary(Err(e)),
    };
    unary(match method.as_str() {
        "Stat" => stat(&core, &env, &req).await,
        "MakeDir" => make_dir(&core, &env, &req).await,
        "Move" => rename(&core, &env, &req).await,
        "ListDir" => list_dir(&core, &env, &req).await,
        "Remove" => remove(&core, &env, &req).await,
        "CreateWatcher" => create_watcher(&core, &env, &req).await,
        "GetWatcherEvents" => watcher_events(&core, &env, &req).await,
        "RemoveWatcher" => remove_watcher(&env, &req),
        m => Err(RpcError::new("unimplemented", format!("filesystem.Filesystem/{m} is not implemented"))),
    })
}

fn path_of(env: &Envd, req: &Value) -> RpcResult<String> {
    match str_field(req, "path", "path") {
        Some(p) => Ok(env.path(p)),
        None => Err(RpcError::invalid("path is required")),
    }
}

/// Uid and gid names from the sandbox's `/etc/passwd` and `/etc/group`.
#[derive(Default)]
struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    async fn load(core: &Core, env: &Envd) -> Names {
        Names {
            users: id_names(read_small(core, env, "/etc/passwd").await),
            groups: id_names(read_small(core, env, "/etc/group").await),
        }
    }

    fn user(&self, uid: u32) -> String {
        self.users.get(&uid).cloned().unwrap_or_else(|| uid.to_string())
    }

    fn group(&self, gid: u32) -> String {
        self.groups.get(&gid).cloned().unwrap_or_else(|| gid.to_string())
    }
}

/// `name:x:id:...` lines.
fn id_names(text: String) -> HashMap<u32, String> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let id = f.nth(1)?.parse().ok()?;
            Some((id, name.to_string()))
        })
        .collect()
}

/// A small file's text (empty when it cannot be read).
async fn read_small(core: &Core, env: &Envd, path: &str) -> String {
    let Ok(o) = core.execute(Command::ReadFile { id: env.id.clone(), path: path.into(), user: None }).await else {
        return String::new();
    };
    let Ok((_, mut conn)) = o.content() else { return String::new() };
    let mut out = Vec::new();
    while let Ok(Some(f)) = conn.next().await {
        if f.kind != abx_proto::Kind::Data || out.len() > 1 << 20 {
            break;
        }
        out.extend_from_slice(&f.payload);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `-rw-r--r--`, `drwxr-xr-x`, `Lrwxrwxrwx` (Go's `FileMode.String()`, as envd reports).
fn permissions(kind: FileKind, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(match kind {
        FileKind::Dir => 'd',
        FileKind::Symlink => 'L',
        _ => '-',
    });
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

fn file_type(kind: FileKind) -> &'static str {
    match kind {
        FileKind::File => "FILE_TYPE_FILE",
        FileKind::Dir => "FILE_TYPE_DIRECTORY",
        FileKind::Symlink => "FILE_TYPE_SYMLINK",
        FileKind::Other => "FILE_TYPE_UNSPECIFIED",
    }
}

/// An `EntryInfo`.
fn entry(f: &FileInfo, names: &Names) -> Value {
    let mut v = json!({
        "name": f.name,
        "type": file_type(f.kind),
        "path": f.path,
        "size": f.size.to_string(),
        "mode": f.mode & 0o7777,
        "permissions": permissions(f.kind, f.mode),
        "owner": names.user(f.uid),
        "group": names.group(f.gid),
        "modifiedTime": super::time::rfc3339_ms(f.mtime_ms),
    });
    if f.kind == FileKind::Symlink {
        v["isSymlink"] = json!(true);
        if let Some(t) = &f.symlink_target {
            v["symlinkTarget"] = json!(t);
        }
    }
    v
}

async fn stat_info(core: &Core, env: &Envd, path: String) -> Result<FileInfo, CoreError> {
    core.execute(Command::Stat { id: env.id.clone(), path, user: env.user.clone() }).await?.file_info()
}

/// `Stat`: the entry (a final symlink is not followed).
async fn stat(core: &Core, env: &Envd, req: &Value) -> RpcResult<Value> {
    let info = stat_info(core, env, path_of(env, req)?).await?;
    Ok(json!({ "entry": entry(&info, &Names::load(core, env).await) }))
}

/// `MakeDir`: creates the directory and missing parents; `already_exists` if it exists.
async fn make_dir(core: &Core, env: &Envd, req: &Value) -> RpcResult<Value> {
    let path = path_of(env, req)?;
    if stat_info(core, env, path.clone()).await.is_ok() {
        return Err(RpcError::new("already_exists", format!("directory {path} already exists")));
    }
    let req = MkdirRequest { path, parents: true, mode: None, user: env.user.clone() };
    let info = core.execute(Command::Mkdir { id: env.id.clone(), req }).await?.file_info()?;
    Ok(json!({ "entry": entry(&info, &Names::load(core, env).await) }))
}

/// `Move`: renames; answers the entry at its new path.
async fn rename(core: &Core, env: &Envd, req: &Value) -> RpcResult<Value> {
    let from = str_field(req, "source", "source").ok_or_else(|| RpcError::invalid("source is required"))?;
    let to =
        str_field(req, "destination", "destination").ok_or_else(|| RpcError::invalid("destination is required"))?;
    let r = RenameRequest { from: env.path(from), to: env.path(to), user: env.user.clone() };
    let info = core.execute(Command::Rename { id: env.id.clone(), req: r }).await?.file_info()?;
    Ok(json!({ "entry": entry(&info, &Names::load(core, env).await) }))
}

/// `ListDir`: entries down to `depth` levels (default 1).
async fn list_dir(core: &Core, env: &Envd, req: &Value) -> RpcResult<Value> {
    let path = path_of(env, req)?;
    let depth = int_field(req, "depth", "depth").unwrap_or(1).clamp(1, 64) as u32;
    let files =
        core.execute(Command::ListDir { id: env.id.clone(), path, user: env.user.clone(), depth }).await?.files()?;
    let names = Names::load(core, env).await;
    Ok(json!({ "entries": files.iter().map(|f| entry(f, &names)).collect::<Vec<_>>() }))
}

/// `Remove`: a file or a whole directory tree.
async fn remove(core: &Core, env: &Envd, req: &Value) -> RpcResult<Value> {
    let path = path_of(env, req)?;
    core.execute(Command::Remove { id: env.id.clone(), path, user: env.user.clone(), recursive: true }).await?;
    Ok(json!({}))
}

/// What a watcher remembers of one entry.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    kind: FileKind,
    size: u64,
    mtime_ms: i64,
    mode: u32,
}

struct Watcher {
    sandbox: String,
    root: String,
    user: Option<String>,
    recursive: bool,
    /// By path relative to the root.
    seen: BTreeMap<String, Seen>,
}

/// Watchers by id. Bounded: a sandbox may hold [`MAX_WATCHERS`]; watchers of sandboxes
/// that are gone are dropped when the next watcher is made.
static WATCHERS: LazyLock<Mutex<HashMap<String, Watcher>>> = LazyLock::new(Default::default);
const MAX_WATCHERS: usize = 64;
/// How deep a recursive watch looks.
const RECURSIVE_DEPTH: u32 = 16;
/// How often a streaming watch (`WatchDir`) looks.
const POLL: Duration = Duration::from_millis(200);

fn watchers() -> std::sync::MutexGuard<'static, HashMap<String, Watcher>> {
    WATCHERS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The directory's entries by relative path.
async fn snapshot(
    core: &Core,
    sandbox: &str,
    root: &str,
    user: Option<String>,
    recursive: bool,
) -> RpcResult<BTreeMap<String, Seen>> {
    let depth = if recursive { RECURSIVE_DEPTH } else { 1 };
    let files = core
        .execute(Command::ListDir { id: sandbox.to_string(), path: root.to_string(), user, depth })
        .await?
        .files()?;
    let prefix = format!("{}/", root.trim_end_matches('/'));
    Ok(files
        .into_iter()
        .filter_map(|f| {
            let rel = f.path.strip_prefix(&prefix)?.to_string();
            Some((rel, Seen { kind: f.kind, size: f.size, mtime_ms: f.mtime_ms, mode: f.mode }))
        })
        .collect())
}

/// The events between two listings: removes, then creates, writes and chmods, by path.
fn diff(old: &BTreeMap<String, Seen>, new: &BTreeMap<String, Seen>) -> Vec<Value> {
    let ev = |name: &str, t: &str| json!({ "name": name, "type": t });
    let mut out: Vec<Value> =
        old.keys().filter(|k| !new.contains_key(*k)).map(|k| ev(k, "EVENT_TYPE_REMOVE")).collect();
    for (k, n) in new {
        match old.get(k) {
            None => {
                out.push(ev(k, "EVENT_TYPE_CREATE"));
                if n.kind == FileKind::File && n.size > 0 {
                    out.push(ev(k, "EVENT_TYPE_WRITE"));
                }
            }
            Some(o) if o.kind != n.kind => {
                out.push(ev(k, "EVENT_TYPE_REMOVE"));
                out.push(ev(k, "EVENT_TYPE_CREATE"));
            }
            Some(o) => {
                if n.kind != FileKind::Dir && (o.size != n.size || o.mtime_ms != n.mtime_ms) {
                    out.push(ev(k, "EVENT_TYPE_WRITE"));
                }
                if o.mode != n.mode {
                    out.push(ev(k, "EVENT_TYPE_CHMOD"));
                }
            }
        }
    }
    out
}

async fn watched_dir(core: &Core, env: &Envd, req: &Value) -> RpcResult<(String, bool)> {
    if bool_field(req, "includeEntry", "include_entry") {
        return Err(RpcError::new("unimplemented", "watch events with entries are not supported"));
    }
    let path = path_of(env, req)?;
    let info = stat_info(core, env, path.clone()).await?;
    if info.kind != FileKind::Dir {
        return Err(RpcError::invalid(format!("{path} is not a directory")));
    }
    Ok((path, bool_field(req, "recursive", "recursive")))
}

/// `CreateWatcher`: remembers the directory's entries; `GetWatcherEvents` reports what
/// changed since.
async fn create_watcher(core: &Core, env: &Envd, req: &Value) -> RpcResult<Value> {
    let (root, recursive) = watched_dir(core, env, req).await?;
    let seen = snapshot(core, &env.id, &root, env.user.clone(), recursive).await?;
    let live: Vec<String> = match core.execute(Command::ListSandboxes).await.and_then(|o| o.sandboxes()) {
        Ok(v) => v.into_iter().map(|s| s.id).collect(),
        Err(_) => vec![],
    };
    let mut w = watchers();
    w.retain(|_, x| live.contains(&x.sandbox));
    if w.values().filter(|x| x.sandbox == env.id).count() >= MAX_WATCHERS {
        return Err(RpcError::new("resource_exhausted", format!("at most {MAX_WATCHERS} watchers per sandbox")));
    }
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).map_err(|e| RpcError::new("internal", e.to_string()))?;
    let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    w.insert(id.clone(), Watcher { sandbox: env.id.clone(), root, user: env.user.clone(), recursive, seen });
    Ok(json!({ "watcherId": id }))
}

async fn watcher_events(core: &Core, env: &Envd, req: &Value) -> RpcResult<Value> {
    let id = str_field(req, "watcherId", "watcher_id").ok_or_else(|| RpcError::invalid("watcherId is required"))?;
    let (root, user, recursive) = {
        let w = watchers();
        let x = w
            .get(id)
            .filter(|x| x.sandbox == env.id)
            .ok_or_else(|| RpcError::not_found(format!("watcher {id} not found")))?;
        (x.root.clone(), x.user.clone(), x.recursive)
    };
    let now = snapshot(core, &env.id, &root, user, recursive).await?;
    let mut w = watchers();
    let x = w.get_mut(id).ok_or_else(|| RpcError::not_found(format!("watcher {id} not found")))?;
    let events = diff(&x.seen, &now);
    x.seen = now;
    Ok(json!({ "events": events }))
}

fn remove_watcher(env: &Envd, req: &Value) -> RpcResult<Value> {
    let id = str_field(req, "watcherId", "watcher_id").ok_or_else(|| RpcError::invalid("watcherId is required"))?;
    let mut w = watchers();
    match w.get(id) {
        Some(x) if x.sandbox == env.id => {
            w.remove(id);
            Ok(json!({}))
        }
        _ => Err(RpcError::not_found(format!("watcher {id} not found"))),
    }
}

/// `WatchDir` (server stream): `start`, then `filesystem` events as polling finds them,
/// `keepalive`s in between. Ends when the client goes away or the directory does.
async fn watch_dir(core: &Core, env: &Envd, req: &Value, keepalive: Option<u64>) -> RpcResult<connect::MessageStream> {
    let (root, recursive) = watched_dir(core, env, req).await?;
    let seen = snapshot(core, &env.id, &root, env.user.clone(), recursive).await?;
    let core = core.clone();
    let sandbox = env.id.clone();
    let user = env.user.clone();
    let keep_every = keepalive.map(|k| (Duration::from_secs(k).as_millis() / POLL.as_millis()).max(1) as u64);
    let start = futures_util::stream::once(async { Ok(json!({ "start": {} })) });
    let state = (seen, Vec::<Value>::new(), 0u64, false);
    let events = futures_util::stream::unfold(state, move |(mut seen, mut queue, mut ticks, done)| {
        let core = core.clone();
        let sandbox = sandbox.clone();
        let root = root.clone();
        let user = user.clone();
        async move {
            if done {
                return None;
            }
            loop {
                if let Some(ev) = queue.pop() {
                    return Some((Ok(json!({ "filesystem": ev })), (seen, queue, ticks, false)));
                }
                tokio::time::sleep(POLL).await;
                ticks += 1;
                match snapshot(&core, &sandbox, &root, user.clone(), recursive).await {
                    Ok(now) => {
                        queue = diff(&seen, &now);
                        queue.reverse();
                        seen = now;
                    }
                    Err(e) => return Some((Err(e), (seen, queue, ticks, true))),
                }
                if queue.is_empty() && keep_every.is_some_and(|k| ticks % k == 0) {
                    return Some((Ok(json!({ "keepalive": {} })), (seen, queue, ticks, false)));
                }
            }
        }
    });
    Ok(Box::pin(start.chain(events)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_strings() {
        assert_eq!(permissions(FileKind::File, 0o644), "-rw-r--r--");
        assert_eq!(permissions(FileKind::Dir, 0o755), "drwxr-xr-x");
    }

    #[test]
    fn diffs() {
        let s = |size, mtime_ms| Seen { kind: FileKind::File, size, mtime_ms, mode: 0o644 };
        let old: BTreeMap<String, Seen> = [("a".to_string(), s(1, 1)), ("b".to_string(), s(1, 1))].into();
        let new: BTreeMap<String, Seen> = [("b".to_string(), s(2, 2)), ("c".to_string(), s(0, 3))].into();
        let names: Vec<(String, String)> = diff(&old, &new)
            .iter()
            .map(|e| (e["name"].as_str().unwrap().into(), e["type"].as_str().unwrap().into()))
            .collect();
        assert_eq!(
            names,
            [("a", "EVENT_TYPE_REMOVE"), ("b", "EVENT_TYPE_WRITE"), ("c", "EVENT_TYPE_CREATE")]
                .map(|(a, b)| (a.to_string(), b.to_string()))
        );
    }
}
