//! Operations on rootfs trees: importing (hardlink or copy), clamping mtimes, creating the
//! mount-point directories every layer needs, and removing a tree safely.
//!
//! Every walk visits the children of a directory sorted by their name bytes, so the order (and
//! thus anything derived from it) does not depend on the filesystem.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, Metadata};
use std::io::ErrorKind;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, CWD, FileType, Mode, Timespec, Timestamps};

use crate::error::{Error, IoContext, Result};

/// The directories every layer must contain (mount points of the sandbox runtime), with the
/// mode they get when this crate creates them.
pub const MOUNT_POINTS: [(&str, u32); 4] = [("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("tmp", 0o1777)];

/// The names in `dir`, sorted by their bytes.
pub fn sorted_children(dir: &Path) -> Result<Vec<OsString>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).at("read directory", dir)? {
        names.push(entry.at("read directory", dir)?.file_name());
    }
    names.sort_unstable_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
    Ok(names)
}

/// Sets access and modification time of `path` without following a symlink.
pub fn set_times(path: &Path, atime: (i64, i64), mtime: (i64, i64)) -> Result<()> {
    let spec = |(tv_sec, tv_nsec): (i64, i64)| Timespec { tv_sec, tv_nsec: tv_nsec as _ };
    let times = Timestamps { last_access: spec(atime), last_modification: spec(mtime) };
    rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW).at("set times of", path)
}

/// Gives `path` the owner, mode and times of `meta` (chown before chmod: chown clears setuid).
fn apply_metadata(path: &Path, meta: &Metadata) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(meta.uid()), Some(meta.gid())).at("change owner of", path)?;
    if !meta.file_type().is_symlink() {
        let mode = fs::Permissions::from_mode(meta.mode() & 0o7777);
        fs::set_permissions(path, mode).at("change mode of", path)?;
    }
    set_times(path, (meta.atime(), meta.atime_nsec()), (meta.mtime(), meta.mtime_nsec()))
}

/// Sets every mtime (and atime) in the tree that is later than `epoch` to `epoch`, and every
/// atime to the entry's (clamped) mtime. Children first, so directory times stick.
pub fn clamp_mtimes(path: &Path, epoch: i64) -> Result<()> {
    let meta = fs::symlink_metadata(path).at("inspect", path)?;
    if meta.is_dir() {
        for name in sorted_children(path)? {
            clamp_mtimes(&path.join(name), epoch)?;
        }
    }
    let mtime = if meta.mtime() >= epoch { (epoch, 0) } else { (meta.mtime(), meta.mtime_nsec()) };
    set_times(path, mtime, mtime)
}

/// Creates the [`MOUNT_POINTS`] under `root` (owned by root) where missing.
pub fn ensure_mount_points(root: &Path) -> Result<()> {
    for (name, mode) in MOUNT_POINTS {
        let path = root.join(name);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(Error::MountPointNotDir { path }),
            Err(e) if e.kind() == ErrorKind::NotFound => make_dir(&path, mode, 0, 0)?,
            Err(e) => return Err(e).at("inspect", &path),
        }
    }
    Ok(())
}

/// Creates one directory with an exact mode and owner.
pub fn make_dir(path: &Path, mode: u32, uid: u32, gid: u32) -> Result<()> {
    fs::create_dir(path).at("create directory", path)?;
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).at("change owner of", path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).at("change mode of", path)
}

/// Copies a tree, hardlinking regular files when `link` is set (falling back to copying for
/// the rest of the tree when source and destination are on different filesystems, and for
/// single files the kernel refuses to link). Ownership, modes, times, symlinks and fifos are
/// preserved; device nodes and sockets are skipped. Hardlinks inside a copied tree stay links.
/// A copied file shares no inode with its source (the kernel may share its extents, a
/// reflink, which a later write to either does not affect) and keeps its holes.
pub struct Importer {
    link: bool,
    copied: HashMap<(u64, u64), PathBuf>,
    skipped: u64,
    /// Keep overlayfs whiteouts (character devices 0:0) and opaque-directory markers (a
    /// layer made from an overlay's upper directory).
    overlay: bool,
    /// Directories (device, inode) the source must not hold, with their paths: an import
    /// that meets one (through a bind mount, say) fails.
    refused: Vec<((u64, u64), PathBuf)>,
}

impl Importer {
    /// An importer that hardlinks (`link`) or copies.
    pub fn new(link: bool) -> Importer {
        Importer { link, copied: HashMap::new(), skipped: 0, overlay: false, refused: Vec::new() }
    }

    /// An importer that fails on meeting one of `dirs` (those that exist) in the source:
    /// the store's own directories, which an import into the store would copy into itself.
    pub fn refusing(mut self, dirs: &[&Path]) -> Importer {
        for dir in dirs {
            if let Ok(meta) = fs::metadata(dir) {
                self.refused.push(((meta.dev(), meta.ino()), dir.to_path_buf()));
            }
        }
        self
    }

    /// An importer that keeps overlayfs whiteouts and opaque markers.
    pub fn overlay(link: bool) -> Importer {
        Importer { overlay: true, ..Importer::new(link) }
    }

    /// Number of device nodes and sockets left out so far.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Whether files are still being hardlinked (false after a cross-filesystem fallback).
    pub fn linking(&self) -> bool {
        self.link
    }

    /// Recreates the tree at `src` (a directory) as `dst`, which must not exist.
    pub fn import(&mut self, src: &Path, dst: &Path) -> Result<()> {
        let meta = fs::symlink_metadata(src).at("inspect", src)?;
        self.dir(src, dst, &meta)
    }

    fn entry(&mut self, src: &Path, dst: &Path) -> Result<()> {
        let meta = fs::symlink_metadata(src).at("inspect", src)?;
        let kind = FileType::from_raw_mode(meta.mode());
        match kind {
            FileType::Directory => self.dir(src, dst, &meta),
            FileType::RegularFile => self.file(src, dst, &meta),
            FileType::Symlink => symlink(src, dst, &meta),
            FileType::Fifo => fifo(dst, &meta),
            FileType::CharacterDevice if self.overlay && meta.rdev() == 0 => whiteout(dst, &meta),
            _ => {
                self.skipped += 1;
                Ok(())
            }
        }
    }

    fn dir(&mut self, src: &Path, dst: &Path, meta: &Metadata) -> Result<()> {
        if let Some((_, inner)) = self.refused.iter().find(|(id, _)| *id == (meta.dev(), meta.ino())) {
            return Err(Error::SourceHoldsStore { path: src.to_path_buf(), inner: inner.clone() });
        }
        fs::create_dir(dst).at("create directory", dst)?;
        if self.overlay && is_opaque(src) {
            rustix::fs::lsetxattr(dst, OPAQUE_XATTR, b"y", rustix::fs::XattrFlags::empty())
                .map_err(std::io::Error::from)
                .at("mark opaque", dst)?;
        }
        for name in sorted_children(src)? {
            self.entry(&src.join(&name), &dst.join(&name))?;
        }
        apply_metadata(dst, meta)
    }

    fn file(&mut self, src: &Path, dst: &Path, meta: &Metadata) -> Result<()> {
        if self.link {
            match fs::hard_link(src, dst) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::CrossesDevices => self.link = false,
                Err(_) => {} // EMLINK, EPERM...: copy this one file
            }
        }
        if meta.nlink() > 1 {
            let key = (meta.dev(), meta.ino());
            if let Some(first) = self.copied.get(&key) {
                return fs::hard_link(first, dst).at("link", dst);
            }
            self.copied.insert(key, dst.to_path_buf());
        }
        copy_file(src, dst, meta)?;
        apply_metadata(dst, meta)
    }
}

/// Copies a regular file's content to the new file `dst`. A file with holes (fewer blocks
/// than its length needs) gets only its data ranges copied, so the copy has the same holes;
/// others go through `fs::copy` (copy_file_range: a reflink where the filesystem can).
fn copy_file(src: &Path, dst: &Path, meta: &Metadata) -> Result<()> {
    if meta.blocks().saturating_mul(512) >= meta.len() {
        return fs::copy(src, dst).map(drop).at("copy", src);
    }
    use std::os::unix::fs::FileExt;
    let from = fs::File::open(src).at("open", src)?;
    let to = fs::OpenOptions::new().write(true).create_new(true).open(dst).at("create", dst)?;
    to.set_len(meta.len()).at("set the length of", dst)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < meta.len() {
        let start = match rustix::fs::seek(&from, rustix::fs::SeekFrom::Data(pos)) {
            Ok(p) => p,
            Err(rustix::io::Errno::NXIO) => break, // nothing but a hole up to the end
            Err(e) => return Err(std::io::Error::from(e)).at("find data in", src),
        };
        let end = rustix::fs::seek(&from, rustix::fs::SeekFrom::Hole(start))
            .map_err(std::io::Error::from)
            .at("find a hole in", src)?
            .min(meta.len());
        pos = start;
        while pos < end {
            let want = (end - pos).min(buf.len() as u64) as usize;
            let n = from.read_at(&mut buf[..want], pos).at("read", src)?;
            if n == 0 {
                break; // the file shrank meanwhile
            }
            to.write_all_at(&buf[..n], pos).at("write", dst)?;
            pos += n as u64;
        }
        pos = pos.max(end);
    }
    Ok(())
}

fn symlink(src: &Path, dst: &Path, meta: &Metadata) -> Result<()> {
    let target = fs::read_link(src).at("read symlink", src)?;
    std::os::unix::fs::symlink(&target, dst).at("create symlink", dst)?;
    apply_metadata(dst, meta)
}

/// The opaque-directory marker of overlays mounted with `userxattr` (as agentbox's are).
pub const OPAQUE_XATTR: &str = "user.overlay.opaque";

/// Whether `dir` carries an overlayfs opaque marker (user or trusted namespace).
pub fn is_opaque(dir: &Path) -> bool {
    [OPAQUE_XATTR, "trusted.overlay.opaque"].iter().any(|name| {
        let mut buf = [0u8; 4];
        matches!(rustix::fs::lgetxattr(dir, *name, &mut buf), Ok(n) if n >= 1 && buf[0] == b'y')
    })
}

/// Whether an extended attribute of an image file is kept in a layer (and is then part of the
/// layer digest): file capabilities, and `user.*` attributes other than overlayfs' own
/// `user.overlay.*` (which overlayfs would interpret in a lower layer).
pub fn kept_xattr(name: &[u8]) -> bool {
    name == b"security.capability" || (name.starts_with(b"user.") && !name.starts_with(b"user.overlay."))
}

/// The [`kept_xattr`] attributes of `path` (a symlink is not followed), sorted by name.
pub fn kept_xattrs(path: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let size = match rustix::fs::llistxattr_query(path) {
        Ok(0) | Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
        other => other.at("list extended attributes of", path)?,
    };
    let mut names = vec![0u8; size];
    let len = rustix::fs::llistxattr(path, &mut names[..]).at("list extended attributes of", path)?;
    names.truncate(len);
    let mut kept = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty() && kept_xattr(n)) {
        let name = std::ffi::OsStr::from_bytes(name);
        let size = rustix::fs::lgetxattr_query(path, name).at("read extended attributes of", path)?;
        let mut value = vec![0u8; size];
        let len = rustix::fs::lgetxattr(path, name, &mut value[..]).at("read extended attributes of", path)?;
        value.truncate(len);
        kept.push((name.as_bytes().to_vec(), value));
    }
    kept.sort();
    Ok(kept)
}

fn whiteout(dst: &Path, meta: &Metadata) -> Result<()> {
    rustix::fs::mknodat(CWD, dst, FileType::CharacterDevice, Mode::empty(), 0).at("create whiteout", dst)?;
    apply_metadata(dst, meta)
}

fn fifo(dst: &Path, meta: &Metadata) -> Result<()> {
    let mode = Mode::from_raw_mode(meta.mode() & 0o7777);
    rustix::fs::mknodat(CWD, dst, FileType::Fifo, mode, 0).at("create fifo", dst)?;
    apply_metadata(dst, meta)
}

/// Removes a tree. Anything mounted inside it (debootstrap mounts /proc and /sys in its
/// target, and may bind-mount /dev) is detached first, so the removal never reaches into a
/// mounted filesystem. A missing tree is not an error.
/// Anything but a directory (a symlink included, which is never followed) is just unlinked.
pub fn remove_tree(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return fs::remove_file(path).at("remove", path),
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).at("inspect", path),
    }
    // A directory, not a symlink: resolving the path only resolves its ancestors, and the
    // result matches how mountinfo spells mount points.
    let path = fs::canonicalize(path).at("resolve", path)?;
    for mount in mounts_under(&path)? {
        rustix::mount::unmount(&mount, rustix::mount::UnmountFlags::DETACH).at("unmount", &mount)?;
    }
    match fs::remove_dir_all(&path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(e).at("remove", &path),
        _ => Ok(()),
    }
}

/// Mount points at or below `path`, deepest first.
fn mounts_under(path: &Path) -> Result<Vec<PathBuf>> {
    let table = Path::new("/proc/self/mountinfo");
    let text = fs::read(table).at("read", table)?;
    let mut found: Vec<PathBuf> = text
        .split(|&b| b == b'\n')
        .filter_map(|line| line.split(|&b| b == b' ').nth(4))
        .map(|field| PathBuf::from(OsString::from_vec(unescape_mountinfo(field))))
        .filter(|mount| mount.starts_with(path))
        .collect();
    found.sort_by_key(|mount| std::cmp::Reverse(mount.as_os_str().len()));
    Ok(found)
}

/// Decodes the `\ooo` octal escapes the kernel uses for spaces and the like in mountinfo.
fn unescape_mountinfo(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal =
            field.get(i + 1..i + 4).filter(|d| field[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |acc, c| acc.wrapping_mul(8).wrapping_add(c - b'0')));
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

/// A directory being built: removed (with [`remove_tree`]) when dropped, unless it was moved
/// into place with [`Scratch::publish`]. A failed build therefore leaves nothing behind.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// Guards `path` (which need not exist yet).
    pub fn new(path: PathBuf) -> Scratch {
        Scratch { path }
    }

    /// The guarded path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the tree to `target`. If `target` already exists (another build published the
    /// same content first), the scratch tree is removed instead. Returns whether it was moved.
    pub fn publish(self, target: &Path) -> Result<bool> {
        match fs::rename(&self.path, target) {
            Ok(()) => {
                std::mem::forget(self);
                Ok(true)
            }
            Err(e) if matches!(e.kind(), ErrorKind::AlreadyExists | ErrorKind::DirectoryNotEmpty) => Ok(false),
            Err(e) => Err(e).at("move into place", target),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = remove_tree(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo(br"/a\040b\134c"), b"/a b\\c");
        assert_eq!(unescape_mountinfo(br"/x\04"), br"/x\04");
    }

    #[test]
    fn scratch_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        {
            let scratch = Scratch::new(path.clone());
            fs::create_dir_all(scratch.path().join("a/b")).unwrap();
            fs::write(scratch.path().join("a/b/f"), "x").unwrap();
        }
        assert!(!path.exists());
    }

    #[test]
    fn remove_tree_does_not_follow_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), "").unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir(&tree).unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("link")).unwrap();
        remove_tree(&tree.join("link")).unwrap();
        remove_tree(&tree).unwrap();
        assert!(outside.join("keep").exists());
        assert!(!tree.exists());
        remove_tree(&tree).unwrap();
    }

    #[test]
    fn scratch_publish_onto_existing_keeps_existing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("old"), "1").unwrap();
        let scratch = Scratch::new(dir.path().join("s"));
        fs::create_dir(scratch.path()).unwrap();
        fs::write(scratch.path().join("new"), "2").unwrap();
        assert!(!scratch.publish(&target).unwrap());
        assert!(target.join("old").exists());
        assert!(!dir.path().join("s").exists());
    }

    #[test]
    fn mount_points_created_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("proc")).unwrap();
        ensure_mount_points(dir.path()).unwrap();
        for (name, _) in MOUNT_POINTS {
            assert!(dir.path().join(name).is_dir());
        }
        let tmp_mode = fs::metadata(dir.path().join("tmp")).unwrap().mode() & 0o7777;
        assert_eq!(tmp_mode, 0o1777);
        let other = tempfile::tempdir().unwrap();
        fs::write(other.path().join("dev"), "").unwrap();
        assert!(matches!(ensure_mount_points(other.path()), Err(Error::MountPointNotDir { .. })));
    }

    #[test]
    fn copy_import_preserves_metadata_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir(&src).unwrap();
        fs::write(src.join("f"), "hello").unwrap();
        fs::set_permissions(src.join("f"), fs::Permissions::from_mode(0o640)).unwrap();
        fs::hard_link(src.join("f"), src.join("g")).unwrap();
        std::os::unix::fs::symlink("f", src.join("l")).unwrap();
        set_times(&src.join("f"), (1000, 0), (1000, 5)).unwrap();
        let dst = dir.path().join("dst");
        Importer::new(false).import(&src, &dst).unwrap();
        let f = fs::symlink_metadata(dst.join("f")).unwrap();
        let g = fs::symlink_metadata(dst.join("g")).unwrap();
        assert_eq!((f.mode() & 0o7777, f.mtime(), f.mtime_nsec()), (0o640, 1000, 5));
        assert_eq!(f.ino(), g.ino());
        assert_ne!(f.ino(), fs::metadata(src.join("f")).unwrap().ino());
        assert_eq!(fs::read_link(dst.join("l")).unwrap(), Path::new("f"));
    }

    #[test]
    fn link_import_shares_inodes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("d")).unwrap();
        fs::write(src.join("d/f"), "x").unwrap();
        let dst = dir.path().join("dst");
        let mut importer = Importer::new(true);
        importer.import(&src, &dst).unwrap();
        assert!(importer.linking());
        let ino = |p: &Path| fs::metadata(p).unwrap().ino();
        assert_eq!(ino(&src.join("d/f")), ino(&dst.join("d/f")));
    }

    /// A copy import (how `template build --from-dir` imports) shares no inode with the
    /// source: a later edit or chmod of the source does not change the layer.
    #[test]
    fn copy_import_is_independent_of_the_source_and_keeps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir(&src).unwrap();
        fs::write(src.join("f"), "before").unwrap();
        fs::set_permissions(src.join("f"), fs::Permissions::from_mode(0o644)).unwrap();
        let sparse = fs::File::create(src.join("sparse")).unwrap();
        sparse.set_len(64 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&sparse, b"middle", 32 << 20).unwrap();
        drop(sparse);
        let dst = dir.path().join("dst");
        Importer::new(false).import(&src, &dst).unwrap();
        fs::write(src.join("f"), "after!").unwrap();
        fs::set_permissions(src.join("f"), fs::Permissions::from_mode(0o4755)).unwrap();
        assert_eq!(fs::read_to_string(dst.join("f")).unwrap(), "before");
        assert_eq!(fs::metadata(dst.join("f")).unwrap().mode() & 0o7777, 0o644);
        let copy = fs::metadata(dst.join("sparse")).unwrap();
        assert_eq!(copy.len(), 64 << 20);
        assert!(copy.blocks() * 512 < 1 << 20, "holes kept: {} blocks", copy.blocks());
        let bytes = fs::read(dst.join("sparse")).unwrap();
        assert_eq!(&bytes[32 << 20..(32 << 20) + 6], b"middle");
        assert!(bytes[..32 << 20].iter().all(|b| *b == 0));
    }

    /// An import that meets a refused directory (the store's own) fails instead of copying it.
    #[test]
    fn import_refuses_a_source_holding_a_refused_directory() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("a/state")).unwrap();
        let err = Importer::new(false).refusing(&[&src.join("a/state")]).import(&src, &dir.path().join("dst"));
        assert!(matches!(err, Err(Error::SourceHoldsStore { ref inner, .. }) if inner.ends_with("a/state")), "{err:?}");
    }

    #[test]
    fn clamp_only_lowers() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("old"), "").unwrap();
        fs::write(dir.path().join("new"), "").unwrap();
        set_times(&dir.path().join("old"), (5, 0), (5, 0)).unwrap();
        clamp_mtimes(dir.path(), 100).unwrap();
        let mtime = |n: &str| fs::symlink_metadata(dir.path().join(n)).unwrap().mtime();
        assert_eq!((mtime("old"), mtime("new")), (5, 100));
        assert_eq!(fs::metadata(dir.path()).unwrap().mtime(), 100);
    }
}
