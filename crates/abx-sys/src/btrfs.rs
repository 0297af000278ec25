//! Btrfs subvolumes: create, snapshot (copy-on-write, constant time in the number of
//! files) and delete, through the filesystem's ioctls on the parent directory.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `_IOW(0x94, nr, 4096)`: both argument structs are 4096 bytes.
const fn iow(nr: u64) -> libc::Ioctl {
    ((1u64 << 30) | (4096u64 << 16) | (0x94u64 << 8) | nr) as libc::Ioctl
}
const BTRFS_IOC_SUBVOL_CREATE: libc::Ioctl = iow(14);
const BTRFS_IOC_SNAP_DESTROY: libc::Ioctl = iow(15);
const BTRFS_IOC_SNAP_CREATE_V2: libc::Ioctl = iow(23);
const BTRFS_SUBVOL_RDONLY: u64 = 1 << 1;
const BTRFS_SUPER_MAGIC: i64 = 0x9123_683E;
/// Inode number of every subvolume's root directory.
const BTRFS_FIRST_FREE_OBJECTID: u64 = 256;

/// `struct btrfs_ioctl_vol_args`.
#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; 4088],
}

/// `struct btrfs_ioctl_vol_args_v2` (the unions flattened to their largest member).
#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; 4040],
}

const _: () = assert!(std::mem::size_of::<VolArgs>() == 4096);
const _: () = assert!(std::mem::size_of::<VolArgsV2>() == 4096);

/// Splits `path` into an open parent directory and a final component that fits `cap`
/// bytes (plus the terminating NUL).
fn parent_and_name(path: &Path, cap: usize) -> io::Result<(std::os::fd::OwnedFd, &OsStr)> {
    let invalid = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("{m}: {}", path.display()));
    let name = path.file_name().ok_or_else(|| invalid("no final component"))?;
    if name.len() >= cap {
        return Err(invalid("name too long for a subvolume"));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let fd = rustix::fs::open(
        parent,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    Ok((fd, name))
}

/// Whether `path` is on a btrfs filesystem.
#[allow(clippy::unnecessary_cast)] // f_type's type differs between architectures
pub fn is_btrfs(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|s| s.f_type as i64 == BTRFS_SUPER_MAGIC)
}

/// Whether `path` is the root directory of a btrfs subvolume.
pub fn is_subvolume(path: &Path) -> bool {
    is_btrfs(path) && rustix::fs::stat(path).is_ok_and(|s| s.st_ino == BTRFS_FIRST_FREE_OBJECTID)
}

/// Creates an empty subvolume at `path` (which must not exist; its parent must be on btrfs).
pub fn create_subvolume(path: &Path) -> io::Result<()> {
    let (dir, name) = parent_and_name(path, 4088)?;
    let mut args = VolArgs { fd: 0, name: [0; 4088] };
    args.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: the ioctl reads a live, correctly laid out `btrfs_ioctl_vol_args` whose
    // name is NUL-terminated (the buffer is longer than the name).
    let r = unsafe { libc::ioctl(dir.as_raw_fd(), BTRFS_IOC_SUBVOL_CREATE, &args as *const VolArgs) };
    crate::cvt(r as libc::c_long).map(drop)
}

/// Snapshots the subvolume `source` to `dest` (which must not exist, on the same
/// filesystem). The snapshot shares every block with the source until either changes.
/// Btrfs writes the source's dirty data first, then commits.
pub fn snapshot(source: &Path, dest: &Path, read_only: bool) -> io::Result<()> {
    let src = rustix::fs::open(
        source,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    snapshot_fd(src.as_fd(), dest, read_only)
}

/// [`snapshot`] of an open subvolume root.
pub fn snapshot_fd(source: BorrowedFd<'_>, dest: &Path, read_only: bool) -> io::Result<()> {
    let (dir, name) = parent_and_name(dest, 4040)?;
    let mut args = VolArgsV2 {
        fd: source.as_raw_fd() as i64,
        transid: 0,
        flags: if read_only { BTRFS_SUBVOL_RDONLY } else { 0 },
        unused: [0; 4],
        name: [0; 4040],
    };
    args.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: the ioctl reads a live, correctly laid out `btrfs_ioctl_vol_args_v2` with a
    // NUL-terminated name; `fd` stays open for the call.
    let r = unsafe { libc::ioctl(dir.as_raw_fd(), BTRFS_IOC_SNAP_CREATE_V2, &args as *const VolArgsV2) };
    crate::cvt(r as libc::c_long).map(drop)
}

/// Deletes the subvolume at `path` (also a read-only one) with everything in it. The
/// space is reclaimed by the filesystem in the background.
pub fn delete_subvolume(path: &Path) -> io::Result<()> {
    let (dir, name) = parent_and_name(path, 4088)?;
    let mut args = VolArgs { fd: 0, name: [0; 4088] };
    args.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: as in `create_subvolume`.
    let r = unsafe { libc::ioctl(dir.as_raw_fd(), BTRFS_IOC_SNAP_DESTROY, &args as *const VolArgs) };
    crate::cvt(r as libc::c_long).map(drop)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(super::BTRFS_IOC_SUBVOL_CREATE, 0x5000_940E);
        assert_eq!(super::BTRFS_IOC_SNAP_DESTROY, 0x5000_940F);
        assert_eq!(super::BTRFS_IOC_SNAP_CREATE_V2, 0x5000_9417);
    }

    #[test]
    fn refuses_outside_btrfs() {
        let dir = tempfile::tempdir().unwrap();
        if super::is_btrfs(dir.path()) {
            return;
        }
        assert!(super::create_subvolume(&dir.path().join("v")).is_err());
        assert!(!super::is_subvolume(dir.path()));
    }
}
