//! The `mini` recipe: a tiny rootfs made of Debian's static busybox, for fast tests.
//!
//! Layout: `/bin/busybox` plus a symlink to it for every applet (`busybox --list-full`),
//! `/etc/{passwd,group,hosts,hostname}` with root (0), user (1000, home /home/user) and nobody
//! (65534), a placeholder `/etc/resolv.conf` (a sandbox with networking gets its slot's file
//! bound over it), `/tmp` (1777), `/root` (0700), `/home/user` (1000:1000) and empty `/proc`,
//! `/sys`, `/dev`, `/run`, `/var/tmp`. Every time is the fixed epoch, so the digest depends
//! only on the busybox binary.

use std::fs;
use std::path::Path;

use crate::cmd::{Helper, run_output};
use crate::error::{Error, IoContext, Result};
use crate::recipe::SOURCE_DATE_EPOCH;
use crate::tree::{clamp_mtimes, make_dir};

/// Where Debian's busybox-static installs the binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Directories, with mode and owner, in creation order.
const DIRS: [(&str, u32, u32); 16] = [
    ("bin", 0o755, 0),
    ("sbin", 0o755, 0),
    ("usr", 0o755, 0),
    ("usr/bin", 0o755, 0),
    ("usr/sbin", 0o755, 0),
    ("etc", 0o755, 0),
    ("proc", 0o555, 0),
    ("sys", 0o555, 0),
    ("dev", 0o755, 0),
    ("run", 0o755, 0),
    ("tmp", 0o1777, 0),
    ("var", 0o755, 0),
    ("var/tmp", 0o1777, 0),
    ("root", 0o700, 0),
    ("home", 0o755, 0),
    ("home/user", 0o755, 1000),
];

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh
user:x:1000:1000:user:/home/user:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
";
const GROUP: &str = "root:x:0:\nuser:x:1000:\nnogroup:x:65534:\n";
const HOSTS: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";

/// Builds the mini rootfs at `root` (which must not exist) from the busybox at `busybox`.
pub fn build(root: &Path, busybox: &Path) -> Result<()> {
    check_busybox(busybox)?;
    make_dir(root, 0o755, 0, 0)?;
    for (dir, mode, owner) in DIRS {
        make_dir(&root.join(dir), mode, owner, owner)?;
    }
    install_busybox(root, busybox)?;
    write_file(&root.join("etc/passwd"), PASSWD, 0o644)?;
    write_file(&root.join("etc/group"), GROUP, 0o644)?;
    write_file(&root.join("etc/hosts"), HOSTS, 0o644)?;
    write_file(&root.join("etc/hostname"), "sandbox\n", 0o644)?;
    write_file(&root.join("etc/resolv.conf"), "# set by agentbox when a sandbox starts\n", 0o644)?;
    clamp_mtimes(root, SOURCE_DATE_EPOCH)
}

/// Fails unless `busybox` exists and is statically linked.
fn check_busybox(busybox: &Path) -> Result<()> {
    let bytes = match fs::read(busybox) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::BusyboxMissing { path: busybox.to_path_buf() });
        }
        Err(e) => return Err(e).at("read", busybox),
    };
    if elf_has_interpreter(&bytes) {
        return Err(Error::BusyboxNotStatic { path: busybox.to_path_buf() });
    }
    Ok(())
}

/// Copies the binary to /bin/busybox and links every applet to it.
fn install_busybox(root: &Path, busybox: &Path) -> Result<()> {
    let dest = root.join("bin/busybox");
    fs::copy(busybox, &dest).at("copy", busybox)?;
    set_owner_mode(&dest, 0o755)?;
    let mut list = Helper::new(busybox);
    list.arg("--list-full");
    let list = run_output(list)?;
    let applets = String::from_utf8_lossy(&list);
    for applet in applets.lines().map(str::trim).filter(|a| is_safe_relative(a) && *a != "bin/busybox") {
        link_applet(root, applet)?;
    }
    if fs::symlink_metadata(root.join("bin/sh")).is_err() {
        link_applet(root, "bin/sh")?;
    }
    Ok(())
}

/// Whether an applet path is plain and relative (no `..`, no leading `/`).
fn is_safe_relative(path: &str) -> bool {
    !path.is_empty() && !path.starts_with('/') && path.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

fn link_applet(root: &Path, applet: &str) -> Result<()> {
    let link = root.join(applet);
    if fs::symlink_metadata(&link).is_ok() {
        return Ok(()); // listed twice
    }
    if let Some(parent) = link.parent().filter(|p| !p.exists()) {
        fs::create_dir_all(parent).at("create directory", parent)?;
        set_owner_mode(parent, 0o755)?;
    }
    std::os::unix::fs::symlink("/bin/busybox", &link).at("create symlink", &link)
}

/// Creates (or replaces) a root-owned file with exact content and mode.
pub fn write_file(path: &Path, content: &str, mode: u32) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).at("remove", path),
        _ => {}
    }
    fs::write(path, content).at("write", path)?;
    set_owner_mode(path, mode)
}

fn set_owner_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::lchown(path, Some(0), Some(0)).at("change owner of", path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).at("change mode of", path)
}

/// Whether a 64-bit little-endian ELF file has a `PT_INTERP` program header (i.e. is
/// dynamically linked). Anything else reads as "no".
fn elf_has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let at = phoff.saturating_add(i * phentsize);
        elf.get(at..at + 4).is_some_and(|t| u32::from_le_bytes(t.try_into().expect("4 bytes")) == PT_INTERP)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_dynamic_elf() {
        let sh = fs::read(crate::cmd::find_program("sh").unwrap()).unwrap();
        assert!(elf_has_interpreter(&sh), "/bin/sh is dynamically linked on Debian");
        assert!(!elf_has_interpreter(b"#!/bin/sh\n"));
        assert!(!elf_has_interpreter(&[]));
    }

    #[test]
    fn missing_busybox_names_the_package() {
        let dir = tempfile::tempdir().unwrap();
        let err = build(&dir.path().join("root"), &dir.path().join("busybox")).unwrap_err();
        assert!(err.to_string().contains("apt-get install busybox-static"), "{err}");
        assert!(!dir.path().join("root").exists());
    }

    #[test]
    fn dynamic_busybox_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let err = build(&dir.path().join("root"), &crate::cmd::find_program("sh").unwrap()).unwrap_err();
        assert!(matches!(err, Error::BusyboxNotStatic { .. }), "{err}");
    }

    #[test]
    fn applet_paths() {
        assert!(is_safe_relative("usr/bin/["));
        for bad in ["", "/bin/x", "../x", "a//b", "a/./b"] {
            assert!(!is_safe_relative(bad), "{bad}");
        }
    }
}
