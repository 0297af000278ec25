//! Sandbox data trees (`data/` = the overlay's `upper/` and `work/`) as units that can be
//! snapshotted, cloned and moved: btrfs subvolumes where the data filesystem is btrfs
//! (constant-time snapshots sharing every block), plain directories copied with
//! `cp -a --reflink=auto` elsewhere.

use std::ops::ControlFlow;
use std::path::Path;
use std::process::Command;

/// The error text of a failed operation on `path`.
fn err(what: &str, path: &Path, e: impl std::fmt::Display) -> String {
    format!("{what} {}: {e}", path.display())
}

/// Creates an empty data tree at `data` (which must not exist): a subvolume when `cow`,
/// mode 0700, with `upper/` and `work/` (0755).
pub fn make(data: &Path, cow: bool) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    if cow {
        abx_sys::btrfs::create_subvolume(data).map_err(|e| err("create subvolume", data, e))?;
    } else {
        std::fs::create_dir(data).map_err(|e| err("create", data, e))?;
    }
    std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o700)).map_err(|e| err("chmod", data, e))?;
    for d in ["upper", "work"] {
        let p = data.join(d);
        std::fs::create_dir(&p).map_err(|e| err("create", &p, e))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).map_err(|e| err("chmod", &p, e))?;
    }
    Ok(())
}

/// Removes a data tree, snapshot or volume (a subvolume or a directory); a missing one is
/// not an error.
pub fn remove(path: &Path) -> Result<(), String> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    if abx_sys::btrfs::is_subvolume(path) {
        // A read-only snapshot can be deleted as it is.
        return abx_sys::btrfs::delete_subvolume(path).map_err(|e| err("delete subvolume", path, e));
    }
    crate::manager::remove_tree(path).map_err(|e| err("remove", path, e))
}

/// Copies `src` (a directory) to `dest` (which must not exist) with owners, modes, times,
/// xattrs (overlayfs' opaque markers) and device nodes (its whiteouts); shares blocks
/// where the filesystem can (xfs, btrfs).
fn copy_tree(src: &Path, dest: &Path) -> Result<(), String> {
    let out = Command::new("cp")
        .args(["-a", "--reflink=auto", "--no-target-directory"])
        .arg(src)
        .arg(dest)
        .output()
        .map_err(|e| format!("run cp: {e}"))?;
    if !out.status.success() {
        let _ = crate::manager::remove_tree(dest);
        return Err(format!(
            "copy {} to {}: {}",
            src.display(),
            dest.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Writes out the dirty data of the data tree `data` before it is frozen for a snapshot, so
/// that the snapshot itself has little left to write and the freeze is short.
///
/// On btrfs this is a throwaway read-only snapshot of the data tree at `scratch` (deleted at
/// once): creating it writes the dirty data of that one subvolume and commits. `syncfs`
/// would also wait for every other sandbox's dirty data on the filesystem: while another
/// sandbox wrote large files, a quiet sandbox's snapshot took 0.1-0.5 s that way and a few
/// milliseconds this way (docs/performance.md). Elsewhere (a copy, or a reflink copy that writes each file
/// out first), `syncfs` of the filesystem.
pub fn flush(data: &Path, scratch: &Path) {
    if abx_sys::btrfs::is_subvolume(data) {
        match abx_sys::btrfs::snapshot(data, scratch, true) {
            Ok(()) => {
                if let Err(e) = abx_sys::btrfs::delete_subvolume(scratch) {
                    tracing::warn!(path = %scratch.display(), error = %e, "deleting the snapshot that flushed a data tree");
                }
                return;
            }
            Err(e) => tracing::debug!(data = %data.display(), error = %e, "flush by snapshot failed; syncfs"),
        }
    }
    if let Ok(f) = std::fs::File::open(data) {
        let _ = rustix::fs::syncfs(&f);
    }
}

/// The name of the throwaway snapshot [`flush`] makes for the snapshot `id`; a daemon that
/// died in between leaves it, and the next start removes it ([`is_flush_scratch`]).
pub fn flush_scratch_name(id: &str) -> String {
    format!("{id}{FLUSH_SUFFIX}")
}

const FLUSH_SUFFIX: &str = ".flush";

/// Whether `name` (an entry of the snapshots directory) is a leftover of [`flush`].
pub fn is_flush_scratch(name: &str) -> bool {
    name.strip_suffix(FLUSH_SUFFIX).is_some_and(crate::manager::is_id)
}

/// Takes a read-only snapshot of the data tree `data` at `dest` (which must not exist);
/// the snapshot's `upper/` holds the sandbox's changes. Constant time on btrfs.
pub fn snapshot(data: &Path, dest: &Path) -> Result<(), String> {
    if abx_sys::btrfs::is_subvolume(data) && abx_sys::btrfs::is_btrfs(dest.parent().unwrap_or(dest)) {
        return abx_sys::btrfs::snapshot(data, dest, true).map_err(|e| err("snapshot to", dest, e));
    }
    std::fs::create_dir(dest).map_err(|e| err("create", dest, e))?;
    let made = copy_tree(&data.join("upper"), &dest.join("upper"));
    if made.is_err() {
        let _ = std::fs::remove_dir_all(dest);
    }
    made
}

/// Makes `data` a writable copy of the snapshot `snap`, with an empty `work/`. The copy is
/// made beside it (`<data>.new`) and swapped in with one atomic exchange, so `data` holds
/// either the old tree or the whole new one whenever the daemon dies; a stale `<data>.new`
/// from such a death is removed first.
pub fn clone_into(snap: &Path, data: &Path, cow: bool) -> Result<(), String> {
    let mut staged = data.as_os_str().to_owned();
    staged.push(".new");
    let staged = std::path::PathBuf::from(staged);
    remove(&staged)?;
    let made = clone_to(snap, &staged, cow);
    if made.is_err() {
        let _ = remove(&staged);
        return made;
    }
    if std::fs::symlink_metadata(data).is_err() {
        return std::fs::rename(&staged, data).map_err(|e| err("move into place", data, e));
    }
    rustix::fs::renameat_with(rustix::fs::CWD, &staged, rustix::fs::CWD, data, rustix::fs::RenameFlags::EXCHANGE)
        .map_err(|e| err("swap in", data, e))?;
    // `staged` now holds the old tree.
    remove(&staged)
}

/// A writable copy of the snapshot `snap` at `dest` (which must not exist).
fn clone_to(snap: &Path, dest: &Path, cow: bool) -> Result<(), String> {
    if cow && abx_sys::btrfs::is_subvolume(snap) {
        abx_sys::btrfs::snapshot(snap, dest, false).map_err(|e| err("snapshot to", dest, e))?;
        let work = dest.join("work");
        remove(&work)?;
        std::fs::create_dir(&work).map_err(|e| err("create", &work, e))?;
        return Ok(());
    }
    make(dest, cow)?;
    let upper = dest.join("upper");
    std::fs::remove_dir(&upper).map_err(|e| err("remove", &upper, e))?;
    copy_tree(&snap.join("upper"), &upper)
}

/// Moves a data tree (same filesystem; a subvolume moves like a directory).
pub fn rename(from: &Path, to: &Path) -> Result<(), String> {
    remove(to)?;
    std::fs::rename(from, to).map_err(|e| format!("move {} to {}: {e}", from.display(), to.display()))
}

/// Visits every entry under `dir`, depth first, until `visit` breaks; unreadable
/// directories are skipped.
fn walk(dir: &Path, mut visit: impl FnMut(&std::fs::DirEntry) -> ControlFlow<()>) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            if visit(&e).is_break() {
                return;
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
}

/// Whether `dir` holds at least `n` entries, counted over its whole tree (the walk stops
/// at `n`). An unreadable directory counts as empty.
pub fn has_entries(dir: &Path, n: usize) -> bool {
    let mut seen = 0;
    walk(dir, |_| {
        seen += 1;
        if seen >= n { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
    });
    seen >= n
}

/// Bytes the files under `dir` take on disk (allocated blocks, like `du`: a sparse file
/// counts what it holds, a file with several hard links once) and the number of entries.
pub fn usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut bytes = 0;
    let mut entries = 0;
    let mut linked = std::collections::HashSet::new();
    walk(dir, |e| {
        let Ok(m) = e.metadata() else { return ControlFlow::Continue(()) };
        entries += 1;
        if !m.is_dir() && (m.nlink() < 2 || linked.insert((m.dev(), m.ino()))) {
            bytes += m.blocks() * 512;
        }
        ControlFlow::Continue(())
    });
    (bytes, entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_flush_scratch_names_are_leftovers() {
        let id = crate::manager::new_id();
        assert!(is_flush_scratch(&flush_scratch_name(&id)));
        for name in [id.as_str(), ".flush", "a.b.flush", "x.flushed", "flush", "cache.flush"] {
            assert!(!is_flush_scratch(name), "{name}");
        }
    }

    #[test]
    fn copy_snapshot_and_clone_keep_files_and_whiteout_markers() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        make(&data, false).unwrap();
        std::fs::write(data.join("upper/a"), "one").unwrap();
        std::fs::create_dir(data.join("upper/d")).unwrap();
        rustix::fs::setxattr(
            data.join("upper/d").as_path(),
            "user.overlay.opaque",
            b"y",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        let snap = dir.path().join("snap");
        snapshot(&data, &snap).unwrap();
        std::fs::write(data.join("upper/a"), "two").unwrap();
        assert_eq!(std::fs::read_to_string(snap.join("upper/a")).unwrap(), "one", "the snapshot does not change");
        let fork = dir.path().join("fork");
        clone_into(&snap, &fork, false).unwrap();
        assert_eq!(std::fs::read_to_string(fork.join("upper/a")).unwrap(), "one");
        assert!(fork.join("work").is_dir());
        let mut buf = [0u8; 1];
        assert_eq!(rustix::fs::getxattr(fork.join("upper/d").as_path(), "user.overlay.opaque", &mut buf).unwrap(), 1);
        remove(&fork).unwrap();
        assert!(!fork.exists());
        assert_eq!(usage(&snap).1, 3);
    }

    /// Guards the size of volumes and snapshots: a hard-linked file counted once per link,
    /// and a sparse file by its length, not by what it takes.
    #[test]
    fn usage_counts_allocated_blocks_and_hard_links_once() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, vec![7u8; 1 << 20]).unwrap();
        let (one, _) = usage(dir.path());
        assert!(one >= 1 << 20, "{one}");
        std::fs::hard_link(&a, dir.path().join("b")).unwrap();
        let sparse = std::fs::File::create(dir.path().join("sparse")).unwrap();
        sparse.set_len(1 << 30).unwrap();
        assert_eq!(usage(dir.path()), (one, 3));
    }

    #[test]
    fn has_entries_counts_the_whole_tree_up_to_n() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!has_entries(dir.path(), 1));
        assert!(!has_entries(&dir.path().join("missing"), 1));
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/f"), "").unwrap();
        assert!(has_entries(dir.path(), 3), "a, a/b and a/b/f");
        assert!(!has_entries(dir.path(), 4));
    }
}
