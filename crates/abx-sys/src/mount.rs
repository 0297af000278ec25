//! The new mount API pieces `rustix` lacks: idmapped detached trees (`mount_setattr`).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use crate::cvt;

const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;
const MOUNT_ATTR_NOSUID: u64 = 0x0000_0002;
const MOUNT_ATTR_NODEV: u64 = 0x0000_0004;
const MOUNT_ATTR_NOEXEC: u64 = 0x0000_0008;
const AT_RECURSIVE: libc::c_uint = 0x8000;
/// `MS_PRIVATE`, as `mount_setattr`'s propagation field takes it.
const MS_PRIVATE: u64 = 1 << 18;
const OPEN_TREE_CLONE: libc::c_uint = 1;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Options for [`idmapped_tree`].
#[derive(Debug, Clone, Copy, Default)]
pub struct TreeOptions {
    pub read_only: bool,
    pub recursive: bool,
}

/// Clones the mount tree at `path` into a new detached mount whose ownership is shifted
/// through the id mappings of the user namespace `userns` (on-disk uid 0 appears as that
/// namespace's root). The result can be attached with `move_mount` by a process that has
/// `CAP_SYS_ADMIN` over the target mount namespace, including one inside `userns`.
pub fn idmapped_tree(path: &Path, userns: BorrowedFd<'_>, opts: TreeOptions) -> io::Result<OwnedFd> {
    let cpath = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint;
    if opts.recursive {
        flags |= AT_RECURSIVE;
    }
    // SAFETY: open_tree reads a NUL-terminated path and returns a new descriptor we own.
    let fd = cvt(unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, cpath.as_ptr(), flags) })?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut set = MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
    if opts.read_only {
        set |= MOUNT_ATTR_RDONLY;
    }
    let attr = MountAttr { attr_set: set, attr_clr: 0, propagation: 0, userns_fd: userns.as_raw_fd() as u64 };
    let mut at = libc::AT_EMPTY_PATH as libc::c_uint;
    if opts.recursive {
        at |= AT_RECURSIVE;
    }
    set_attr(tree.as_fd(), at, &attr)?;
    Ok(tree)
}

/// A detached bind mount of the single file `path` (a symlink there is refused, not
/// followed), nosuid, nodev and noexec, to be attached over another file.
pub fn file_tree(path: &Path) -> io::Result<OwnedFd> {
    use rustix::mount::OpenTreeFlags;
    let tree = rustix::mount::open_tree(
        rustix::fs::CWD,
        path,
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC | OpenTreeFlags::AT_SYMLINK_NOFOLLOW,
    )?;
    if rustix::fs::fstat(&tree)?.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(io::Error::other(format!("{} is not a regular file", path.display())));
    }
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    set_attr(tree.as_fd(), libc::AT_EMPTY_PATH as libc::c_uint, &attr)?;
    Ok(tree)
}

/// `mount_setattr` on the mount `tree` itself (`AT_EMPTY_PATH` is part of `at`).
fn set_attr(tree: BorrowedFd<'_>, at: libc::c_uint, attr: &MountAttr) -> io::Result<()> {
    // SAFETY: mount_setattr reads `attr` (a live, correctly sized repr(C) struct) and an
    // empty NUL-terminated path; `tree` is an open mount descriptor.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            at,
            attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })
    .map(drop)
}

/// Makes the detached mount `tree` and any mount below it private. A clone made by
/// [`idmapped_tree`] of a shared mount (the usual state of `/` under systemd) is a peer of
/// it: once attached, mounts made later on either side would propagate to the other
/// (host mounts below the source into a sandbox, a sandbox's mounts onto the host). Call
/// it where the tree was made: it needs `CAP_SYS_ADMIN` over the tree's mount namespace.
pub fn make_private(tree: BorrowedFd<'_>) -> io::Result<()> {
    let attr = MountAttr { attr_set: 0, attr_clr: 0, propagation: MS_PRIVATE, userns_fd: 0 };
    let at = libc::AT_EMPTY_PATH as libc::c_uint | AT_RECURSIVE;
    set_attr(tree.as_fd(), at, &attr)?;
    Ok(())
}

/// Attaches a detached mount (from `open_tree`/`fsmount`) at `target`.
pub fn attach(tree: impl AsFd, target: &Path) -> io::Result<()> {
    rustix::mount::move_mount(
        tree.as_fd(),
        "",
        rustix::fs::CWD,
        target,
        rustix::mount::MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )?;
    Ok(())
}

/// A new instance of the pseudo filesystem `fstype` (sysfs, proc, ...) as a detached
/// mount, nosuid, nodev and noexec, read-only if asked. It belongs to the namespaces of
/// the caller (for sysfs: its network namespace).
pub fn detached_fs(fstype: &str, read_only: bool) -> io::Result<OwnedFd> {
    use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags};
    let fs = rustix::mount::fsopen(fstype, FsOpenFlags::FSOPEN_CLOEXEC)?;
    rustix::mount::fsconfig_create(&fs)?;
    let mut attrs =
        MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV | MountAttrFlags::MOUNT_ATTR_NOEXEC;
    if read_only {
        attrs |= MountAttrFlags::MOUNT_ATTR_RDONLY;
    }
    Ok(rustix::mount::fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs)?)
}

/// A new detached copy of the detached (or attached) mount `tree`, sharing its
/// filesystem instance.
pub fn clone_detached(tree: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    use rustix::mount::OpenTreeFlags;
    Ok(rustix::mount::open_tree(
        tree,
        "",
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC | OpenTreeFlags::AT_EMPTY_PATH,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_tree_takes_regular_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("resolv.conf");
        std::fs::write(&file, "nameserver 10.0.0.1\n").unwrap();
        std::os::unix::fs::symlink(&file, dir.path().join("link")).unwrap();
        // A detached bind of the file itself: reading through it gives the file.
        let tree = file_tree(&file).unwrap();
        let text = std::fs::read_to_string(format!("/proc/self/fd/{}", tree.as_raw_fd())).unwrap();
        assert_eq!(text, "nameserver 10.0.0.1\n");
        assert!(file_tree(&dir.path().join("link")).is_err(), "a symlink is not followed");
        assert!(file_tree(dir.path()).is_err(), "a directory is refused");
        assert!(file_tree(&dir.path().join("missing")).is_err());
    }
}
