//! The egress audits of removed sandboxes, kept for `--audit-retention` so that a platform
//! team can still answer "what did that agent's sandbox reach" after it is gone.
//!
//! `<audit dir>/removed/<id>.json` holds what the sandbox was ([`KeptAudit`]) and
//! `<id>.jsonl` its events, moved there from the live log when the sandbox is removed. The
//! description is written first: a daemon that dies between the two leaves a description
//! with no events (an empty log), never events nobody can attribute. Only sandboxes that
//! recorded something are kept, so sandboxes without network activity cost nothing here.

use std::path::{Path, PathBuf};

use abx_api::{KeptAudit, NetEvent};

/// The directory of kept audits inside the audit directory.
pub fn dir(audit_dir: &Path) -> PathBuf {
    audit_dir.join("removed")
}

/// Whether `key` can name a file here (an id or a name, never a path).
fn plain(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with('.')
        && key.len() <= 128
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Moves the live log `live` of the removed sandbox `meta.id` into `dir` with its
/// description. A log with no events is removed instead.
pub fn keep(dir: &Path, live: &Path, mut meta: KeptAudit) -> std::io::Result<bool> {
    let events = match std::fs::read(live) {
        Ok(b) => b.iter().filter(|&&c| c == b'\n').count() as u64,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if events == 0 || !plain(&meta.id) {
        std::fs::remove_file(live)?;
        return Ok(false);
    }
    std::fs::create_dir_all(dir)?;
    meta.events = events;
    let json = serde_json::to_vec(&meta).map_err(std::io::Error::other)?;
    let desc = dir.join(format!("{}.json", meta.id));
    let tmp = dir.join(format!("{}.json.new", meta.id));
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, &desc)?;
    std::fs::rename(live, dir.join(format!("{}.jsonl", meta.id)))?;
    Ok(true)
}

fn read_meta(path: &Path) -> Option<KeptAudit> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Every kept audit, oldest removal first.
pub fn list(dir: &Path) -> Vec<KeptAudit> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<KeptAudit> = rd
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .filter_map(|e| read_meta(&e.path()))
        .collect();
    out.sort_by(|a, b| (a.removed_at, &a.id).cmp(&(b.removed_at, &b.id)));
    out
}

/// The kept audit of the sandbox with id `key`, or else of the one last removed that had
/// the name `key`.
pub fn find(dir: &Path, key: &str) -> Option<KeptAudit> {
    if !plain(key) {
        return None;
    }
    if let Some(m) = read_meta(&dir.join(format!("{key}.json"))) {
        return Some(m);
    }
    list(dir).into_iter().rev().find(|m| m.name.as_deref() == Some(key))
}

/// The events of a kept audit and how many older ones its log had dropped.
pub fn events(dir: &Path, id: &str) -> (Vec<NetEvent>, u64) {
    if !plain(id) {
        return (Vec::new(), 0);
    }
    let a = super::read_audit_file(&dir.join(format!("{id}.jsonl")));
    (a.events.into(), a.dropped)
}

/// Removes the audits removed more than `retention_secs` before `now` (Unix seconds), and
/// files that belong to no description (left by a daemon that died while writing one).
/// Returns how many audits went.
pub fn prune(dir: &Path, now: u64, retention_secs: u64) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    let mut gone = 0;
    let mut described = std::collections::HashSet::new();
    let mut others = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        match name.strip_suffix(".json").map(|id| (id.to_string(), read_meta(&e.path()))) {
            Some((id, Some(m))) if m.removed_at.saturating_add(retention_secs) > now => {
                described.insert(id);
            }
            Some((id, _)) => {
                let _ = std::fs::remove_file(dir.join(format!("{id}.jsonl")));
                if std::fs::remove_file(e.path()).is_ok() {
                    gone += 1;
                }
            }
            None => others.push((name, e.path())),
        }
    }
    for (name, path) in others {
        let id = name.strip_suffix(".jsonl").unwrap_or(&name);
        if !described.contains(id) {
            let _ = std::fs::remove_file(path);
        }
    }
    gone
}

/// Removes kept audits, oldest removal first, until those left take at most `max_bytes`
/// (their description and events). Returns how many went.
pub fn cap(dir: &Path, max_bytes: u64) -> usize {
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let mut all: Vec<(KeptAudit, u64)> = list(dir)
        .into_iter()
        .map(|m| {
            let bytes = size(&dir.join(format!("{}.json", m.id))) + size(&dir.join(format!("{}.jsonl", m.id)));
            (m, bytes)
        })
        .collect();
    let mut total: u64 = all.iter().map(|(_, b)| b).sum();
    let mut gone = 0;
    // `list` gives the oldest first.
    all.reverse();
    while total > max_bytes {
        let Some((m, bytes)) = all.pop() else { break };
        // The description goes first: events without one are strays, which `prune` removes.
        if std::fs::remove_file(dir.join(format!("{}.json", m.id))).is_ok() {
            gone += 1;
        }
        let _ = std::fs::remove_file(dir.join(format!("{}.jsonl", m.id)));
        total = total.saturating_sub(bytes);
    }
    gone
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: &str, name: Option<&str>, removed_at: u64) -> KeptAudit {
        KeptAudit {
            id: id.into(),
            name: name.map(Into::into),
            tenant: None,
            template: "mini".into(),
            created_at: removed_at.saturating_sub(10),
            removed_at,
            events: 0,
        }
    }

    /// A sandbox's live log `<id>.jsonl` in `dir` with `text`.
    fn live_log(dir: &Path, id: &str, text: &str) -> PathBuf {
        let live = dir.join(format!("{id}.jsonl"));
        std::fs::write(&live, text).unwrap();
        live
    }

    #[test]
    fn a_log_with_events_is_kept_and_found_by_id_or_latest_name() {
        let tmp = tempfile::tempdir().unwrap();
        let kept = dir(tmp.path());
        for (id, at) in [("a1", 100), ("b2", 200)] {
            let live = live_log(tmp.path(), id, "{}\n{}\n");
            assert!(keep(&kept, &live, meta(id, Some("agent"), at)).unwrap());
            assert!(!live.exists());
        }
        assert_eq!(find(&kept, "a1").unwrap().events, 2);
        assert_eq!(find(&kept, "agent").unwrap().id, "b2", "the name's last sandbox");
        assert_eq!(list(&kept).iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), ["a1", "b2"]);
        assert!(find(&kept, "../x").is_none() && find(&kept, "nope").is_none());
    }

    #[test]
    fn an_empty_or_missing_log_is_not_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let kept = dir(tmp.path());
        let live = live_log(tmp.path(), "e", "");
        assert!(!keep(&kept, &live, meta("e", None, 5)).unwrap());
        assert!(!live.exists(), "the empty live log is removed");
        assert!(!keep(&kept, &live, meta("e", None, 5)).unwrap());
        assert!(list(&kept).is_empty());
    }

    #[test]
    fn prune_removes_what_is_older_than_the_retention_and_strays() {
        let tmp = tempfile::tempdir().unwrap();
        let kept = dir(tmp.path());
        for (id, at) in [("old", 100), ("new", 1000)] {
            keep(&kept, &live_log(tmp.path(), id, "{}\n"), meta(id, None, at)).unwrap();
        }
        std::fs::write(kept.join("stray.jsonl"), "{}\n").unwrap();
        assert_eq!(prune(&kept, 1100, 500), 1);
        let left: Vec<String> = {
            let mut v: Vec<String> =
                std::fs::read_dir(&kept).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
            v.sort();
            v
        };
        assert_eq!(left, ["new.json", "new.jsonl"]);
    }

    #[test]
    fn cap_removes_the_oldest_until_the_rest_fits() {
        let tmp = tempfile::tempdir().unwrap();
        let kept = dir(tmp.path());
        // The same size each, removed at 1300, 1100 and 1200.
        let line = format!("{{\"pad\":\"{}\"}}\n", "x".repeat(100));
        for (id, at) in [("c", 1300), ("a", 1100), ("b", 1200)] {
            keep(&kept, &live_log(tmp.path(), id, &line.repeat(10)), meta(id, None, at)).unwrap();
        }
        let size = |f: &str| std::fs::metadata(kept.join(f)).unwrap().len();
        let each = size("a.json") + size("a.jsonl");
        assert_eq!(each, size("c.json") + size("c.jsonl"));
        assert_eq!(cap(&kept, 3 * each), 0, "all three fit");
        assert_eq!(cap(&kept, 2 * each + 1), 1);
        let ids: Vec<String> = list(&kept).into_iter().map(|m| m.id).collect();
        assert_eq!(ids, ["b", "c"], "the oldest removal went first");
        assert!(!kept.join("a.jsonl").exists());
        assert_eq!(cap(&kept, 0), 2);
        assert!(std::fs::read_dir(&kept).unwrap().next().is_none(), "nothing is left");
    }
}
