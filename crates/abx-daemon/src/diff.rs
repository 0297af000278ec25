//! What a sandbox changed in its filesystem since its template: read on the host from the
//! overlay's upper directory (stored with the sandbox's own uids) against the template's
//! layers, without involving the sandbox.
//!
//! - A path in the upper directory that no layer has: **added**.
//! - A file or symlink in both: **changed**, unless content, mode, owner and link target
//!   are all equal to the layer's (overlayfs copies a file up on any open for writing or
//!   metadata change, so presence alone does not mean a change).
//! - A whiteout (a character device 0:0) or a path missing under an opaque directory (the
//!   `user.overlay.opaque` xattr; the overlay is mounted with `userxattr`): **deleted**.
//!
//! Directories that exist in a layer are not listed as changed (overlayfs copies them up
//! whenever something below them changes); their own mode and owner changes are not
//! reported.

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

pub use abx_api::{Diff, DiffEntry};

fn kind(m: &std::fs::Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_dir() {
        "dir"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_file() {
        "file"
    } else {
        "other"
    }
}

fn is_whiteout(m: &std::fs::Metadata) -> bool {
    m.file_type().is_char_device() && m.rdev() == 0
}

fn is_opaque(dir: &Path) -> bool {
    ["user.overlay.opaque", "trusted.overlay.opaque"].iter().any(|name| {
        let mut buf = [0u8; 4];
        matches!(rustix::fs::lgetxattr(dir, *name, &mut buf), Ok(n) if n >= 1 && buf[0] == b'y')
    })
}

/// The topmost layer entry at `rel` (layers top first), honouring whiteouts and opaque
/// directories in the layers themselves.
fn lower(layers: &[PathBuf], rel: &Path) -> Option<(PathBuf, std::fs::Metadata)> {
    for layer in layers {
        let p = layer.join(rel);
        if let Ok(m) = std::fs::symlink_metadata(&p) {
            return if is_whiteout(&m) { None } else { Some((p, m)) };
        }
        // An opaque parent in this layer hides the layers below.
        if rel.ancestors().skip(1).any(|a| !a.as_os_str().is_empty() && is_opaque(&layer.join(a))) {
            return None;
        }
    }
    None
}

fn same_content(a: &Path, b: &Path) -> bool {
    let (Ok(mut fa), Ok(mut fb)) = (std::fs::File::open(a), std::fs::File::open(b)) else { return false };
    let (mut ba, mut bb) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let (Ok(na), Ok(nb)) = (read_full(&mut fa, &mut ba), read_full(&mut fb, &mut bb)) else { return false };
        if na != nb || ba[..na] != bb[..nb] {
            return false;
        }
        if na == 0 {
            return true;
        }
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn unchanged(up: &Path, um: &std::fs::Metadata, low: &Path, lm: &std::fs::Metadata) -> bool {
    if kind(um) != kind(lm) || um.mode() != lm.mode() || um.uid() != lm.uid() || um.gid() != lm.gid() {
        return false;
    }
    if um.file_type().is_symlink() {
        return std::fs::read_link(up).ok() == std::fs::read_link(low).ok();
    }
    if um.file_type().is_file() {
        return um.len() == lm.len() && same_content(up, low);
    }
    // A FIFO, socket or device node: the same kind of node (and device number).
    um.file_type() == lm.file_type() && um.rdev() == lm.rdev()
}

fn entry(rel: &Path, m: &std::fs::Metadata) -> DiffEntry {
    DiffEntry {
        path: format!("/{}", rel.display()),
        kind: kind(m).into(),
        size: if m.file_type().is_file() { m.len() } else { 0 },
    }
}

/// Everything below `rel` in the layers, as deleted entries (an opaque or replaced
/// directory hides them).
fn lower_tree(layers: &[PathBuf], rel: &Path, upper_has: &dyn Fn(&Path) -> bool, out: &mut Vec<DiffEntry>) {
    let mut names = std::collections::BTreeSet::new();
    for layer in layers {
        if let Ok(rd) = std::fs::read_dir(layer.join(rel)) {
            names.extend(rd.flatten().map(|e| e.file_name()));
        }
    }
    for name in names {
        let r = rel.join(&name);
        if upper_has(&r) {
            continue;
        }
        if let Some((_, m)) = lower(layers, &r) {
            out.push(entry(&r, &m));
            if m.is_dir() {
                lower_tree(layers, &r, upper_has, out);
            }
        }
    }
}

/// Compares `upper` with `layers` (top first).
pub fn diff(upper: &Path, layers: &[PathBuf]) -> std::io::Result<Diff> {
    let mut d = Diff::default();
    walk(upper, Path::new(""), layers, &mut d)?;
    for v in [&mut d.added, &mut d.changed, &mut d.deleted] {
        v.sort_by(|a, b| a.path.cmp(&b.path));
        v.dedup_by(|a, b| a.path == b.path);
    }
    Ok(d)
}

/// Compares `upper` with the view a snapshot gave: `snap_upper` (the snapshot's upper
/// directory) over `layers` (top first). Both uppers start from the same template.
///
/// The two merged views are compared path by path, descending only into directories that
/// one of the two uppers has (below anything else both views are the template's). So a
/// path the sandbox no longer has in its upper (after a rollback to an earlier snapshot: a
/// file back at the template's version, a deletion undone, an opaque directory gone) is
/// compared too, not only what the upper holds now.
pub fn diff_since(upper: &Path, snap_upper: &Path, layers: &[PathBuf]) -> std::io::Result<Diff> {
    let mut then = vec![snap_upper.to_path_buf()];
    then.extend_from_slice(layers);
    let mut now = vec![upper.to_path_buf()];
    now.extend_from_slice(layers);
    let mut d = Diff::default();
    compare(&then, &now, Path::new(""), &mut d);
    for v in [&mut d.added, &mut d.changed, &mut d.deleted] {
        v.sort_by(|a, b| a.path.cmp(&b.path));
        v.dedup_by(|a, b| a.path == b.path);
    }
    Ok(d)
}

/// Names in directory `rel` of any of `layers`.
fn names<'a>(layers: impl Iterator<Item = &'a PathBuf>, rel: &Path) -> std::collections::BTreeSet<std::ffi::OsString> {
    let mut names = std::collections::BTreeSet::new();
    for layer in layers {
        if let Ok(rd) = std::fs::read_dir(layer.join(rel)) {
            names.extend(rd.flatten().map(|e| e.file_name()));
        }
    }
    names
}

/// Compares directory `rel` of the merged views `then` and `now` (each its upper first).
fn compare(then: &[PathBuf], now: &[PathBuf], rel: &Path, d: &mut Diff) {
    // The two views share their layers below the uppers: each directory is read once.
    for name in names(then.iter().chain(&now[..1]), rel) {
        let r = rel.join(&name);
        match (lower(then, &r), lower(now, &r)) {
            (None, None) => {}
            (None, Some((_, m))) => {
                d.added.push(entry(&r, &m));
                if m.is_dir() {
                    lower_tree(now, &r, &|_| false, &mut d.added);
                }
            }
            (Some((_, m)), None) => {
                d.deleted.push(entry(&r, &m));
                if m.is_dir() {
                    lower_tree(then, &r, &|_| false, &mut d.deleted);
                }
            }
            (Some((tp, tm)), Some((np, nm))) => match (tm.is_dir(), nm.is_dir()) {
                (true, true) => {
                    // Below a directory neither upper has, both views are the layers'.
                    if [&then[0], &now[0]].iter().any(|u| std::fs::symlink_metadata(u.join(&r)).is_ok()) {
                        compare(then, now, &r, d);
                    }
                }
                (false, false) => {
                    if !unchanged(&np, &nm, &tp, &tm) {
                        d.changed.push(entry(&r, &nm));
                    }
                }
                // A directory replaced by a file or the other way round.
                (true, false) => {
                    d.changed.push(entry(&r, &nm));
                    lower_tree(then, &r, &|_| false, &mut d.deleted);
                }
                (false, true) => {
                    d.changed.push(entry(&r, &nm));
                    lower_tree(now, &r, &|_| false, &mut d.added);
                }
            },
        }
    }
}

fn walk(upper: &Path, rel: &Path, layers: &[PathBuf], d: &mut Diff) -> std::io::Result<()> {
    let dir = upper.join(rel);
    let mut entries: Vec<_> = std::fs::read_dir(&dir)?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let r = rel.join(e.file_name());
        let m = std::fs::symlink_metadata(e.path())?;
        if is_whiteout(&m) {
            if let Some((_, lm)) = lower(layers, &r) {
                d.deleted.push(entry(&r, &lm));
                if lm.is_dir() {
                    lower_tree(layers, &r, &|_| false, &mut d.deleted);
                }
            }
            continue;
        }
        let low = lower(layers, &r);
        match (&low, m.is_dir()) {
            (None, true) => {
                d.added.push(entry(&r, &m));
                walk(upper, &r, layers, d)?;
                // Everything below is new: walk lists it as added (no lower).
            }
            (Some((_, lm)), true) => {
                if !lm.is_dir() {
                    // A file replaced by a directory.
                    d.changed.push(entry(&r, &m));
                }
                if lm.is_dir() && is_opaque(&e.path()) {
                    let has = |p: &Path| std::fs::symlink_metadata(upper.join(p)).is_ok();
                    lower_tree(layers, &r, &has, &mut d.deleted);
                }
                walk(upper, &r, layers, d)?;
            }
            (None, false) => d.added.push(entry(&r, &m)),
            (Some((lp, lm)), false) => {
                if !unchanged(&e.path(), &m, lp, lm) {
                    d.changed.push(entry(&r, &m));
                }
            }
        }
    }
    Ok(())
}

/// A tar of the added and changed paths, read from `upper` (owners as inside the sandbox).
/// With `whiteouts`, each deletion too, as the OCI image format writes it in a layer: an
/// empty file `.wh.NAME` beside the deleted `NAME`, only for the topmost deleted path of a
/// deleted tree. The tar is then a layer that turns the files it was taken against (the
/// template, or the snapshot) into the sandbox's.
pub fn archive(
    upper: &Path,
    layers: &[PathBuf],
    d: &Diff,
    whiteouts: bool,
    out: impl std::io::Write,
) -> std::io::Result<()> {
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    for e in d.added.iter().chain(d.changed.iter()) {
        let rel = e.path.trim_start_matches('/');
        // A diff since a snapshot also lists paths that are back at the template's
        // version (after a rollback): those are in the layers, not in the upper.
        let (src, m) = match std::fs::symlink_metadata(upper.join(rel)) {
            Ok(m) => (upper.join(rel), m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => lower(layers, Path::new(rel)).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, format!("{rel} is in neither the upper nor a layer"))
            })?,
            Err(e) => return Err(e),
        };
        let t = m.file_type();
        if t.is_dir() {
            b.append_dir(rel, &src)?;
        } else if t.is_file() || t.is_symlink() {
            b.append_path_with_name(&src, rel)?;
        } else if let Some(kind) = special_kind(&t) {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(m.mode() & 0o7777);
            h.set_uid(m.uid().into());
            h.set_gid(m.gid().into());
            h.set_mtime(m.mtime().max(0) as u64);
            h.set_size(0);
            if !matches!(kind, tar::EntryType::Fifo) {
                h.set_device_major(rustix::fs::major(m.rdev()))?;
                h.set_device_minor(rustix::fs::minor(m.rdev()))?;
            }
            b.append_data(&mut h, rel, std::io::empty())?;
        }
        // A socket has no tar form; it is listed in the diff but not archived.
    }
    if whiteouts {
        let deleted: std::collections::BTreeSet<&str> =
            d.deleted.iter().map(|e| e.path.trim_start_matches('/')).collect();
        for rel in &deleted {
            let under_another = Path::new(rel).ancestors().skip(1).any(|a| deleted.contains(a.to_str().unwrap_or("")));
            if under_another {
                continue;
            }
            let p = Path::new(rel);
            let (Some(parent), Some(name)) = (p.parent(), p.file_name()) else { continue };
            let mut wh = std::ffi::OsString::from(".wh.");
            wh.push(name);
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(0);
            b.append_data(&mut h, parent.join(wh), std::io::empty())?;
        }
    }
    b.finish()
}

/// The tar entry type of a FIFO or device node.
fn special_kind(t: &std::fs::FileType) -> Option<tar::EntryType> {
    if t.is_fifo() {
        Some(tar::EntryType::Fifo)
    } else if t.is_char_device() {
        Some(tar::EntryType::Char)
    } else if t.is_block_device() {
        Some(tar::EntryType::Block)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, s: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, s).unwrap();
    }

    #[test]
    fn lists_added_changed_and_deleted() {
        if !rustix::process::geteuid().is_root() {
            return; // whiteouts are device nodes
        }
        let t = tempfile::tempdir().unwrap();
        let (lower, upper) = (t.path().join("lower"), t.path().join("upper"));
        write(&lower.join("etc/keep"), "same");
        write(&lower.join("etc/edit"), "old");
        write(&lower.join("etc/gone"), "x");
        write(&lower.join("old/a"), "a");
        write(&lower.join("touched"), "t");
        write(&upper.join("etc/keep"), "same"); // copied up, unchanged
        write(&upper.join("etc/edit"), "new");
        write(&upper.join("touched"), "t");
        write(&upper.join("new/dir/file"), "n");
        whiteout(&upper.join("etc/gone"));
        whiteout(&upper.join("old"));
        let d = diff(&upper, std::slice::from_ref(&lower)).unwrap();
        let paths = |v: &[DiffEntry]| v.iter().map(|e| e.path.clone()).collect::<Vec<_>>();
        assert_eq!(paths(&d.added), ["/new", "/new/dir", "/new/dir/file"]);
        assert_eq!(paths(&d.changed), ["/etc/edit"]);
        assert_eq!(paths(&d.deleted), ["/etc/gone", "/old", "/old/a"]);
        let mut tar = Vec::new();
        archive(&upper, std::slice::from_ref(&lower), &d, false, &mut tar).unwrap();
        let mut a = tar::Archive::new(&tar[..]);
        let names: Vec<String> =
            a.entries().unwrap().map(|e| e.unwrap().path().unwrap().display().to_string()).collect();
        assert_eq!(names, ["new", "new/dir", "new/dir/file", "etc/edit"]);

        // With whiteouts: a layer that, applied over the lower tree the way OCI tools do,
        // gives the sandbox's files.
        let mut tar = Vec::new();
        archive(&upper, std::slice::from_ref(&lower), &d, true, &mut tar).unwrap();
        let names: Vec<String> = tar::Archive::new(&tar[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["new", "new/dir", "new/dir/file", "etc/edit", "etc/.wh.gone", ".wh.old"]);
        let applied = t.path().join("applied");
        assert!(std::process::Command::new("cp").arg("-a").arg(&lower).arg(&applied).status().unwrap().success());
        for e in tar::Archive::new(&tar[..]).entries().unwrap() {
            let mut e = e.unwrap();
            let rel = e.path().unwrap().into_owned();
            let name = rel.file_name().unwrap().to_str().unwrap().to_string();
            match name.strip_prefix(".wh.") {
                Some(gone) => {
                    let target = applied.join(rel.parent().unwrap()).join(gone);
                    if target.is_dir() {
                        std::fs::remove_dir_all(target).unwrap()
                    } else {
                        std::fs::remove_file(target).unwrap()
                    }
                }
                None => {
                    e.unpack_in(&applied).unwrap();
                }
            }
        }
        let mut files = Vec::new();
        let mut stack = vec![applied.clone()];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = p.strip_prefix(&applied).unwrap().display().to_string();
                    files.push(format!("{rel}={}", std::fs::read_to_string(&p).unwrap()));
                }
            }
        }
        files.sort();
        assert_eq!(files, ["etc/edit=new", "etc/keep=same", "new/dir/file=n", "touched=t"]);
    }

    #[test]
    fn since_a_snapshot_lists_only_later_changes() {
        let t = tempfile::tempdir().unwrap();
        let (lower, snap, upper) = (t.path().join("lower"), t.path().join("snap"), t.path().join("upper"));
        write(&lower.join("etc/base"), "b");
        // At the snapshot: two files made after the template, one edited template file.
        write(&snap.join("work/a"), "a");
        write(&snap.join("work/b"), "b");
        write(&snap.join("etc/base"), "edited");
        // Now: a unchanged, b removed (no whiteout: nothing below), base unchanged since,
        // c new.
        write(&upper.join("work/a"), "a");
        write(&upper.join("etc/base"), "edited");
        write(&upper.join("work/c"), "c");
        let d = diff_since(&upper, &snap, std::slice::from_ref(&lower)).unwrap();
        let paths = |v: &[DiffEntry]| v.iter().map(|e| e.path.clone()).collect::<Vec<_>>();
        assert_eq!(paths(&d.added), ["/work/c"]);
        assert!(d.changed.is_empty(), "{:?}", d.changed);
        assert_eq!(paths(&d.deleted), ["/work/b"]);
    }

    fn whiteout(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let (cwd, ft, mode) = (rustix::fs::CWD, rustix::fs::FileType::CharacterDevice, rustix::fs::Mode::empty());
        rustix::fs::mknodat(cwd, p, ft, mode, 0).unwrap();
    }

    fn fifo(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        rustix::fs::mknodat(rustix::fs::CWD, p, rustix::fs::FileType::Fifo, rustix::fs::Mode::from(0o644), 0).unwrap();
    }

    /// After a rollback to the template's state, the sandbox's upper is empty: what the
    /// snapshot had changed, deleted or hidden under an opaque directory is back.
    #[test]
    fn since_a_snapshot_sees_paths_gone_back_to_the_template() {
        if !rustix::process::geteuid().is_root() {
            return; // whiteouts are device nodes
        }
        let t = tempfile::tempdir().unwrap();
        let (lower, snap, upper) = (t.path().join("lower"), t.path().join("snap"), t.path().join("upper"));
        write(&lower.join("etc/hosts"), "template");
        write(&lower.join("etc/group"), "g");
        write(&lower.join("home/user/.profile"), "p");
        write(&lower.join("bin/tool"), "t");
        write(&snap.join("etc/hosts"), "edited");
        whiteout(&snap.join("etc/group"));
        write(&snap.join("home/h"), "h");
        rustix::fs::setxattr(snap.join("home"), "user.overlay.opaque", b"y", rustix::fs::XattrFlags::empty()).unwrap();
        fifo(&snap.join("w/fifo"));
        std::fs::create_dir_all(&upper).unwrap();
        fifo(&upper.join("w/fifo"));
        let d = diff_since(&upper, &snap, std::slice::from_ref(&lower)).unwrap();
        let paths = |v: &[DiffEntry]| v.iter().map(|e| e.path.clone()).collect::<Vec<_>>();
        assert_eq!(paths(&d.added), ["/etc/group", "/home/user", "/home/user/.profile"]);
        assert_eq!(paths(&d.changed), ["/etc/hosts"], "a FIFO in both is unchanged");
        assert_eq!(paths(&d.deleted), ["/home/h"]);
        // Its archive holds those paths as the template has them (it used to fail: they
        // are not in the upper).
        let mut tar = Vec::new();
        archive(&upper, std::slice::from_ref(&lower), &d, false, &mut tar).unwrap();
        let mut got = std::collections::BTreeMap::new();
        for e in tar::Archive::new(&tar[..]).entries().unwrap() {
            let mut e = e.unwrap();
            let mut text = String::new();
            std::io::Read::read_to_string(&mut e, &mut text).unwrap();
            got.insert(e.path().unwrap().display().to_string(), text);
        }
        let want = [("etc/group", "g"), ("etc/hosts", "template"), ("home/user", ""), ("home/user/.profile", "p")];
        assert_eq!(got, want.map(|(p, t)| (p.to_string(), t.to_string())).into_iter().collect());
        // Unchanged since the snapshot: nothing, FIFO included.
        let d = diff_since(&snap, &snap, std::slice::from_ref(&lower)).unwrap();
        assert!(d.added.is_empty() && d.changed.is_empty() && d.deleted.is_empty(), "{d:?}");
    }

    #[test]
    fn special_files_are_archived() {
        if !rustix::process::geteuid().is_root() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let (lower, upper) = (t.path().join("lower"), t.path().join("upper"));
        std::fs::create_dir_all(&lower).unwrap();
        fifo(&upper.join("w/fifo"));
        write(&upper.join("w/file"), "f");
        let d = diff(&upper, std::slice::from_ref(&lower)).unwrap();
        let mut tar = Vec::new();
        archive(&upper, &[lower], &d, false, &mut tar).unwrap();
        let mut a = tar::Archive::new(&tar[..]);
        let entries: Vec<(String, tar::EntryType)> = a
            .entries()
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| (e.path().unwrap().display().to_string(), e.header().entry_type()))
            .collect();
        assert_eq!(
            entries,
            [
                ("w".to_string(), tar::EntryType::Directory),
                ("w/fifo".to_string(), tar::EntryType::Fifo),
                ("w/file".to_string(), tar::EntryType::Regular)
            ]
        );
    }
}
