//! Where sandbox data lives: the slots' overlay `upper` and `work` directories, snapshots,
//! the data of stopped sandboxes and volumes.
//!
//! Snapshots and forks want a copy-on-write filesystem: on btrfs a slot's `data`
//! directory is a subvolume, and a snapshot of it costs the same whatever the sandbox
//! wrote (`abx_sys::btrfs`). Elsewhere they are copies (`cp -a --reflink=auto`).
//!
//! Every sandbox start mounts an overlay, and overlayfs creates and deletes a handful of
//! inodes in `work/` at each mount (its feature checks); destroying a sandbox deletes its
//! upper files. On an ext4 filesystem *without a journal*, ext4 refuses to reuse an inode
//! freed in the last 1–5 minutes and scans past every such inode on each allocation, so
//! under steady sandbox churn every inode allocation becomes a linear scan and sandbox
//! creation slows from ~4 ms to 13 ms and more. Hosts with a journaled ext4 (the usual
//! case), xfs, btrfs or tmpfs do not have the problem.
//!
//! So the data can live either directly under the state root (`dir`) or on a filesystem of
//! its own (`image`): a btrfs filesystem (or, without btrfs, an ext4 filesystem with a
//! journal) in a sparse file `<root>/<prefix>-data.img`, attached to a loop device
//! (detached automatically when unmounted) and mounted at `<root>/<prefix>-data`. `auto`
//! picks `dir` when the state root is on btrfs already, `image` when btrfs images work
//! or the state root is on journal-less ext4, and `dir` otherwise.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use tracing::{info, warn};

/// How sandbox data is stored (`--data`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataMode {
    Auto,
    Dir,
    Image,
}

impl std::str::FromStr for DataMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DataMode::Auto),
            "dir" => Ok(DataMode::Dir),
            "image" => Ok(DataMode::Image),
            other => Err(format!("invalid data mode '{other}': use auto, dir or image")),
        }
    }
}

/// The sandbox data store in use.
#[derive(Debug, Clone)]
pub struct Storage {
    /// Parent of the slot directories.
    pub slots: PathBuf,
    /// The image and its mount point, in `image` mode.
    pub image: Option<Image>,
    /// The data filesystem is btrfs: slot data, snapshots and kept data are subvolumes.
    pub cow: bool,
}

#[derive(Debug, Clone)]
pub struct Image {
    pub file: PathBuf,
    pub mountpoint: PathBuf,
}

impl Storage {
    /// `dir` or `image`.
    pub fn mode(&self) -> &'static str {
        if self.image.is_some() { "image" } else { "dir" }
    }

    /// The directory holding slots, snapshots, kept data and volumes.
    pub fn base(&self) -> &Path {
        self.slots.parent().unwrap_or(&self.slots)
    }

    /// Snapshots: `<base>/snapshots/<id>` (a read-only subvolume on btrfs) holding `upper/`.
    pub fn snapshots(&self) -> PathBuf {
        self.base().join("snapshots")
    }

    /// Data of stopped sandboxes: `<base>/kept/<id>`.
    pub fn kept(&self) -> PathBuf {
        self.base().join("kept")
    }

    /// Volumes: `<base>/volumes/<name>`.
    pub fn volumes(&self) -> PathBuf {
        self.base().join("volumes")
    }

    fn finish(mut self) -> Result<Storage, String> {
        for d in [self.slots.clone(), self.snapshots(), self.kept(), self.volumes()] {
            std::fs::create_dir_all(&d).map_err(|e| format!("create {}: {e}", d.display()))?;
        }
        self.cow = abx_sys::btrfs::is_btrfs(&self.slots);
        Ok(self)
    }

    /// Opens the data store: in `image` mode, creates the image if needed and mounts it
    /// unless it already is (a daemon restarted while sandboxes ran).
    /// The mode is remembered in `<root>/data-mode`: `auto` keeps what an earlier start
    /// chose, and switching modes is refused while the other location holds sandboxes.
    pub fn open(root: &Path, prefix: &str, mode: DataMode, size: Option<u64>) -> Result<Storage, String> {
        let record = root.join("data-mode");
        let recorded = std::fs::read_to_string(&record).ok().and_then(|s| s.trim().parse::<DataMode>().ok());
        let image =
            Image { file: root.join(format!("{prefix}-data.img")), mountpoint: root.join(format!("{prefix}-data")) };
        let mode = match (mode, recorded) {
            (DataMode::Auto, Some(r)) => r,
            (DataMode::Auto, None) if abx_sys::btrfs::is_btrfs(root) => DataMode::Dir,
            (DataMode::Auto, None) if image_support().is_ok() && btrfs_support().is_ok() => {
                info!("keeping sandbox data on a btrfs image (copy-on-write snapshots)");
                DataMode::Image
            }
            (DataMode::Auto, None) => match journal_less_ext4(root) {
                Some(dev) if image_support().is_ok() => {
                    info!(device = %dev, "state root is on ext4 without a journal; keeping sandbox data on an image");
                    DataMode::Image
                }
                Some(dev) => {
                    warn!(
                        device = %dev,
                        reason = %image_support().err().unwrap_or_default(),
                        "state root is on ext4 without a journal (sandbox creation slows down under churn) \
                         and a data image cannot be used"
                    );
                    DataMode::Dir
                }
                None => DataMode::Dir,
            },
            (m, _) => m,
        };
        if let Some(old) = recorded
            && old != mode
        {
            let old_slots = match old {
                DataMode::Image if is_mountpoint(&image.mountpoint) => Some(image.mountpoint.join("slots")),
                DataMode::Image => None,
                _ => Some(root.join("slots")),
            };
            if let Some(dir) = old_slots
                && std::fs::read_dir(&dir).is_ok_and(|mut rd| rd.next().is_some())
            {
                return Err(format!(
                    "sandbox data is kept as '{}' and {} still holds sandboxes; start with --data {} \
                     (and destroy them) before switching",
                    mode_name(old),
                    dir.display(),
                    mode_name(old)
                ));
            }
            if old == DataMode::Image {
                let s = Storage { slots: image.mountpoint.join("slots"), image: Some(image.clone()), cow: false };
                s.close();
                let _ = std::fs::remove_file(&image.file);
                let _ = std::fs::remove_dir(&image.mountpoint);
            }
        }
        let storage = if mode == DataMode::Dir {
            Storage { slots: root.join("slots"), image: None, cow: false }
        } else {
            image_support().map_err(|e| format!("--data image: {e}"))?;
            Self::open_image(image, size, root, prefix)?
        };
        if recorded != Some(mode) {
            std::fs::write(&record, mode_name(mode)).map_err(|e| format!("write {}: {e}", record.display()))?;
        }
        storage.finish()
    }

    fn open_image(image: Image, size: Option<u64>, root: &Path, prefix: &str) -> Result<Storage, String> {
        if !is_mountpoint(&image.mountpoint) {
            if !image.file.exists() {
                let size = match size {
                    Some(s) => s,
                    None => default_size(root)?,
                };
                create_image(&image.file, size, prefix)?;
            }
            mount_image(&image)?;
        }
        Ok(Storage { slots: image.mountpoint.join("slots"), image: Some(image), cow: false })
    }

    /// Unmounts the image (graceful shutdown with no sandbox left). The loop device goes
    /// with it; the image file stays for the next start.
    pub fn close(&self) {
        let Some(img) = &self.image else { return };
        if !is_mountpoint(&img.mountpoint) {
            return;
        }
        if let Err(e) = rustix::mount::unmount(&img.mountpoint, rustix::mount::UnmountFlags::empty()) {
            warn!(error = %e, path = %img.mountpoint.display(), "unmount of the data image failed; detaching it lazily");
            let _ = rustix::mount::unmount(&img.mountpoint, rustix::mount::UnmountFlags::DETACH);
        }
    }

    /// Gives btrfs back, at once, the chunks that deleted files emptied. When a sandbox
    /// filled the image, its data chunks took every byte, and after it is removed they
    /// stay allocated until the asynchronous discard has handled them (tens of seconds):
    /// until then btrfs has no room to allocate metadata and every create fails with
    /// ENOSPC although the space is free. Turning discard off hands the empty chunks to
    /// btrfs' cleaner, which a `btrfs filesystem sync` wakes, and `btrfs balance -dusage=0`
    /// removes the empty data chunks at once; discard is turned on again after. Only for
    /// the image this daemon mounted. Returns whether space is available
    /// again; blocking (up to ~2 s).
    pub fn reclaim(&self) -> bool {
        use rustix::mount::MountFlags;
        let Some(img) = &self.image else { return false };
        if !self.cow {
            return false;
        }
        let dir = &img.mountpoint;
        let flags = MountFlags::NODEV | MountFlags::NOSUID | MountFlags::NOATIME;
        if let Err(e) = rustix::mount::mount_remount(dir, flags, c"nodiscard") {
            warn!(error = %e, path = %dir.display(), "remounting the data image without discard failed");
            return false;
        }
        let mut available = false;
        for _ in 0..20 {
            let _ = Command::new("btrfs").args(["filesystem", "sync"]).arg(dir).output();
            // Data chunks emptied by the commit are given back now rather than when the
            // cleaner gets to them: without unallocated space btrfs cannot grow its
            // metadata, and creating an inode (a socket, a directory) fails even though
            // data space shows as free (seen in CI). Needs no free space itself.
            let _ = Command::new("btrfs").args(["balance", "start", "-dusage=0"]).arg(dir).output();
            if rustix::fs::statvfs(dir).is_ok_and(|st| st.f_bavail > 0) {
                available = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        if let Err(e) = rustix::mount::mount_remount(dir, flags, c"discard=async") {
            warn!(error = %e, path = %dir.display(), "turning discard on again on the data image failed");
        }
        if available {
            info!(path = %dir.display(), "freed the empty chunks of the full data image");
        } else {
            warn!(path = %dir.display(), "the data image is still full after freeing empty chunks");
        }
        available
    }

    /// Whether the data filesystem is mounted read-only (btrfs and ext4 with
    /// `errors=remount-ro` turn themselves read-only after a failed write).
    pub fn read_only(&self) -> bool {
        let dir = self.image.as_ref().map_or(self.base(), |i| i.mountpoint.as_path());
        rustix::fs::statvfs(dir).is_ok_and(|st| st.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
    }

    /// The error for a failure caused by a read-only data filesystem, naming the likely
    /// cause and the way out.
    pub fn read_only_error(&self) -> String {
        let dir = self.image.as_ref().map_or(self.base(), |i| i.mountpoint.as_path());
        match &self.image {
            Some(img) => format!(
                "the sandbox data filesystem {} is read-only: the kernel turned it read-only after a failed write, \
                 most often because the host filesystem holding its image {} is full; free space there, then \
                 restart the daemon (which mounts the image again)",
                dir.display(),
                img.file.display()
            ),
            None => format!("the sandbox data directory {} is on a read-only filesystem", dir.display()),
        }
    }

    /// Bytes used and available on the data filesystem.
    pub fn usage(&self) -> Option<(u64, u64)> {
        let dir = self.image.as_ref().map_or(self.slots.parent().unwrap_or(&self.slots), |i| &i.mountpoint);
        let st = rustix::fs::statvfs(dir).ok()?;
        let used = (st.f_blocks - st.f_bfree) * st.f_frsize;
        Some((used, st.f_bavail * st.f_frsize))
    }
}

fn mode_name(m: DataMode) -> &'static str {
    match m {
        DataMode::Auto => "auto",
        DataMode::Dir => "dir",
        DataMode::Image => "image",
    }
}

/// Why an image cannot be used here, if it cannot.
fn image_support() -> Result<(), String> {
    if !Path::new("/dev/loop-control").exists() {
        return Err("no /dev/loop-control (loop devices are not available)".into());
    }
    if Command::new("mkfs.ext4").arg("-V").output().is_err() && btrfs_support().is_err() {
        return Err("neither mkfs.btrfs nor mkfs.ext4 found (install btrfs-progs)".into());
    }
    Ok(())
}

/// Why a btrfs image cannot be made here, if it cannot.
fn btrfs_support() -> Result<(), String> {
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !fs.lines().any(|l| l.split_whitespace().last() == Some("btrfs")) {
        return Err("the kernel has no btrfs".into());
    }
    if Command::new("mkfs.btrfs").arg("--version").output().is_err() {
        return Err("mkfs.btrfs not found (install btrfs-progs)".into());
    }
    Ok(())
}

/// The filesystem type in an image file, from its superblock magic.
fn image_fs(file: &Path) -> &'static str {
    use std::os::unix::fs::FileExt;
    let Ok(f) = std::fs::File::open(file) else { return "ext4" };
    let mut magic = [0u8; 8];
    if f.read_exact_at(&mut magic, 0x10040).is_ok() && &magic == b"_BHRfS_M" { "btrfs" } else { "ext4" }
}

/// The block device name when `path` is on an ext4 filesystem that has no journal.
pub fn journal_less_ext4(path: &Path) -> Option<String> {
    const EXT4_SUPER_MAGIC: i64 = 0xEF53;
    let st = rustix::fs::statfs(path).ok()?;
    if st.f_type as i64 != EXT4_SUPER_MAGIC {
        return None;
    }
    let dev = rustix::fs::stat(path).ok()?.st_dev;
    let link =
        std::fs::read_link(format!("/sys/dev/block/{}:{}", rustix::fs::major(dev), rustix::fs::minor(dev))).ok()?;
    let name = link.file_name()?.to_string_lossy().into_owned();
    let task = std::fs::read_to_string(format!("/sys/fs/ext4/{name}/journal_task")).ok()?;
    (task.trim() == "<none>").then_some(name)
}

/// Whether the data image of `prefix` under `root` is mounted (by an earlier daemon whose
/// sandboxes may still use it).
pub fn image_mounted(root: &Path, prefix: &str) -> bool {
    is_mountpoint(&root.join(format!("{prefix}-data")))
}

/// Whether `path` is the root of a mount (listed in this process's mount table).
fn is_mountpoint(path: &Path) -> bool {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    info.lines().any(|l| l.split(' ').nth(4).is_some_and(|m| Path::new(&unescape_mount(m)) == path))
}

/// Mount table paths escape space, tab, newline and backslash as octal.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Half the free space of the filesystem holding `root`, between 1 GiB and 1 TiB. The
/// image is sparse: it takes host space only as sandboxes write.
fn default_size(root: &Path) -> Result<u64, String> {
    let st = rustix::fs::statvfs(root).map_err(|e| format!("statvfs {}: {e}", root.display()))?;
    let free = st.f_bavail * st.f_frsize;
    Ok((free / 2).clamp(1 << 30, 1 << 40) & !((1 << 20) - 1))
}

/// Creates the image under a temporary name and renames it into place once it holds a
/// filesystem: a failure leaves nothing half-made.
fn create_image(file: &Path, size: u64, prefix: &str) -> Result<(), String> {
    let tmp = file.with_extension("img.tmp");
    let _ = std::fs::remove_file(&tmp);
    let made = (|| {
        let f = std::fs::File::create(&tmp).map_err(|e| format!("create {}: {e}", tmp.display()))?;
        f.set_len(size).map_err(|e| format!("size {} to {size} bytes: {e}", tmp.display()))?;
        drop(f);
        let label: String = format!("{prefix}-data").chars().take(16).collect();
        let (tool, out) = if btrfs_support().is_ok() {
            // Single copies of data and metadata: the image is one file on one device.
            let out = Command::new("mkfs.btrfs")
                .args(["-q", "-f", "-m", "single", "-d", "single", "-L", &label])
                .arg(&tmp)
                .output();
            ("mkfs.btrfs", out)
        } else {
            let out = Command::new("mkfs.ext4")
                .args(["-q", "-F", "-b", "4096", "-m", "0", "-L", &label])
                .args(["-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
                .arg(&tmp)
                .output();
            ("mkfs.ext4", out)
        };
        let out = out.map_err(|e| format!("run {tool}: {e}"))?;
        if !out.status.success() {
            return Err(format!("{tool} {}: {}", tmp.display(), String::from_utf8_lossy(&out.stderr).trim()));
        }
        std::fs::rename(&tmp, file).map_err(|e| format!("rename {}: {e}", tmp.display()))
    })();
    if made.is_err() {
        let _ = std::fs::remove_file(&tmp);
    } else {
        info!(image = %file.display(), size, "created the sandbox data image");
    }
    made
}

/// Attaches the image to a loop device and mounts it. A filesystem that does not mount
/// (a host crash in the middle of a write) is checked with `e2fsck -p` once.
fn mount_image(img: &Image) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(&img.mountpoint).map_err(|e| format!("create {}: {e}", img.mountpoint.display()))?;
    std::fs::set_permissions(&img.mountpoint, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("chmod {}: {e}", img.mountpoint.display()))?;
    let first = attach_and_mount(img);
    let Err(first) = first else { return Ok(()) };
    if image_fs(&img.file) != "ext4" {
        return Err(first);
    }
    warn!(error = %first, "mounting the data image failed; checking it");
    let out = Command::new("e2fsck").arg("-p").arg(&img.file).output().map_err(|e| format!("run e2fsck: {e}"))?;
    // Exit codes 0-2: clean or fixed.
    if out.status.code().is_none_or(|c| c > 2) {
        return Err(format!(
            "{first}; e2fsck -p {} could not repair it: {}",
            img.file.display(),
            String::from_utf8_lossy(&out.stdout).trim()
        ));
    }
    attach_and_mount(img)
}

fn attach_and_mount(img: &Image) -> Result<(), String> {
    let backing = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img.file)
        .map_err(|e| format!("open {}: {e}", img.file.display()))?;
    let name = img.file.display().to_string();
    let mut opts =
        abx_sys::loopdev::LoopOptions { read_only: false, direct_io: true, autoclear: true, block_size: 4096 };
    let dev = match abx_sys::loopdev::attach(backing.as_fd(), &name, opts) {
        // Some backing filesystems cannot do direct I/O.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            opts.direct_io = false;
            abx_sys::loopdev::attach(backing.as_fd(), &name, opts)
        }
        r => r,
    }
    .map_err(|e| format!("attach {} to a loop device: {e}", img.file.display()))?;
    drop(backing);
    use rustix::mount::MountFlags;
    // `discard` returns the space of deleted files to the host (the loop device punches
    // holes in the image); nodev and nosuid: nothing on it is a device or setuid for the host.
    let fs = image_fs(&img.file);
    let opts = if fs == "btrfs" { c"discard=async" } else { c"discard" };
    rustix::mount::mount(
        dev.path(),
        &img.mountpoint,
        fs,
        MountFlags::NODEV | MountFlags::NOSUID | MountFlags::NOATIME,
        Some(opts),
    )
    .map_err(|e| {
        format!("mount {} ({}) on {}: {e}", dev.path().display(), img.file.display(), img.mountpoint.display())
    })?;
    // The mount holds the device now; dropping our descriptor lets autoclear detach it
    // when the filesystem is unmounted.
    drop(dev);
    info!(image = %img.file.display(), at = %img.mountpoint.display(), "mounted the sandbox data image");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_modes() {
        assert_eq!("auto".parse::<DataMode>().unwrap(), DataMode::Auto);
        assert_eq!("image".parse::<DataMode>().unwrap(), DataMode::Image);
        assert!("disk".parse::<DataMode>().unwrap_err().contains("auto, dir or image"));
    }

    #[test]
    fn unescapes_mount_paths() {
        assert_eq!(unescape_mount(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape_mount("/plain"), "/plain");
        assert_eq!(unescape_mount(r"/end\04"), r"/end\04");
    }
}
