//! The `base` recipe: Debian built with `debootstrap --variant=minbase`, a user `user`
//! (uid/gid 1000, home /home/user, shell /bin/bash), normalized so that the same package
//! versions give the same layer digest.
//!
//! Steps, in order: debootstrap (its `I:` lines become progress events); `groupadd` and
//! `useradd` in a chroot (with `SOURCE_DATE_EPOCH`, so /etc/shadow's dates are fixed); the
//! package list from `dpkg-query`; [`normalize`]; clamp every mtime to
//! [`SOURCE_DATE_EPOCH`]; create missing mount points.

use std::fs;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::cmd::{Helper, find_program, run_output, run_streaming};
use crate::digest::hex;
use crate::error::{Error, IoContext, Result};
use crate::mini::write_file;
use crate::progress::{DebootstrapParser, Progress};
use crate::recipe::SOURCE_DATE_EPOCH;
use crate::tree::{clamp_mtimes, ensure_mount_points, remove_tree, sorted_children};

/// Bumped whenever the build steps change, so cached trees built the old way are not reused.
const BUILDER_VERSION: u32 = 1;

/// Files truncated to empty: logs (kept, since some tools expect them to exist).
const TRUNCATED_DIRS: [&str; 1] = ["var/log"];
/// Directories whose files are removed (the directories themselves stay): apt's indexes and
/// package cache, which are large and differ from day to day.
const EMPTIED_DIRS: [&str; 2] = ["var/lib/apt/lists", "var/cache/apt"];
/// Files removed: caches and backups that differ between otherwise identical builds.
const REMOVED_FILES: [&str; 7] = [
    "var/cache/ldconfig/aux-cache",
    "etc/passwd-",
    "etc/group-",
    "etc/shadow-",
    "etc/gshadow-",
    "etc/subuid-",
    "etc/subgid-",
];
/// Directories where `*-old` backups (dpkg, debconf) are removed.
const OLD_BACKUP_DIRS: [&str; 2] = ["var/lib/dpkg", "var/cache/debconf"];
/// Directories left empty: device nodes are the runtime's business, and scratch space.
const CLEARED_DIRS: [&str; 3] = ["dev", "tmp", "var/tmp"];

/// Fixed content of files debootstrap copies from the host (or that identify a machine).
const FIXED_FILES: [(&str, &str, u32); 4] = [
    ("etc/hostname", "sandbox\n", 0o644),
    ("etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n", 0o644),
    ("etc/resolv.conf", "# set by agentbox when a sandbox starts\n", 0o644),
    ("etc/machine-id", "", 0o444),
];

/// The inputs of one base build.
#[derive(Debug, Clone, Copy)]
pub struct BaseRecipe<'a> {
    pub mirror: &'a str,
    pub suite: &'a str,
    pub packages: &'a [String],
}

impl BaseRecipe<'_> {
    /// Rejects values that would not reach debootstrap as the single argument they should be.
    pub fn validate(&self) -> Result<()> {
        let invalid = |field, value: &str| Err(Error::InvalidRecipe { field, value: value.to_string() });
        let schemes = ["http://", "https://", "file:/"];
        if !schemes.iter().any(|s| self.mirror.starts_with(s)) || self.mirror.contains(char::is_whitespace) {
            return invalid("mirror", self.mirror);
        }
        if !is_debian_name(self.suite) {
            return invalid("suite", self.suite);
        }
        match self.packages.iter().find(|p| !is_debian_name(p)) {
            Some(bad) => invalid("package", bad),
            None => Ok(()),
        }
    }

    /// The cache key (hash of the inputs) and the inputs as JSON.
    pub fn cache_key(&self) -> (String, serde_json::Value) {
        let packages = self.sorted_packages();
        let arch = std::env::consts::ARCH;
        let canonical = format!(
            "agentbox-base-v{BUILDER_VERSION}\n{arch}\n{}\n{}\n{}\n",
            self.mirror,
            self.suite,
            packages.join(",")
        );
        let inputs = serde_json::json!({
            "builder": BUILDER_VERSION, "arch": arch, "mirror": self.mirror,
            "suite": self.suite, "packages": packages,
        });
        (hex(&Sha256::digest(canonical.as_bytes())), inputs)
    }

    fn sorted_packages(&self) -> Vec<String> {
        let mut packages = self.packages.to_vec();
        packages.sort();
        packages.dedup();
        packages
    }

    /// Builds the tree at `rootfs` (which must not exist) and returns its `name=version` list.
    pub fn build(&self, rootfs: &Path, progress: &dyn Fn(Progress)) -> Result<Vec<String>> {
        let debootstrap = find_program("debootstrap").ok_or(Error::DebootstrapMissing)?;
        self.debootstrap(&debootstrap, rootfs, progress)?;
        progress(Progress::stage("user", "adding user 'user' (uid 1000)"));
        add_user(rootfs)?;
        let packages = list_packages(rootfs)?;
        progress(Progress::stage("normalizing", "removing caches and logs, clamping times"));
        normalize(rootfs)?;
        clamp_mtimes(rootfs, SOURCE_DATE_EPOCH)?;
        ensure_mount_points(rootfs)?;
        Ok(packages)
    }

    fn debootstrap(&self, program: &Path, rootfs: &Path, progress: &dyn Fn(Progress)) -> Result<()> {
        let mut cmd = Helper::new(program);
        cmd.arg("--variant=minbase").arg("--components=main");
        if !self.packages.is_empty() {
            cmd.arg(format!("--include={}", self.sorted_packages().join(",")));
        }
        cmd.arg(self.suite).arg(rootfs).arg(self.mirror);
        let mut parser = DebootstrapParser::default();
        run_streaming(cmd, &mut |line| {
            if let Some(event) = parser.line(line) {
                progress(event);
            }
        })
    }
}

/// Debian package and suite names: `[a-z0-9][a-z0-9+.-]*`.
fn is_debian_name(name: &str) -> bool {
    let valid = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+.-".contains(&b);
    name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) && name.bytes().all(valid)
}

/// Runs a program inside the tree with `chroot`.
fn in_chroot(rootfs: &Path, args: &[&str]) -> Result<Vec<u8>> {
    let chroot = find_program("chroot").unwrap_or_else(|| "chroot".into());
    let mut cmd = Helper::new(&chroot);
    cmd.arg(rootfs).args(args);
    run_output(cmd)
}

fn add_user(rootfs: &Path) -> Result<()> {
    in_chroot(rootfs, &["groupadd", "--gid", "1000", "user"])?;
    let useradd = ["useradd", "--uid", "1000", "--gid", "1000", "--create-home", "--home-dir", "/home/user"];
    in_chroot(rootfs, &[&useradd[..], &["--shell", "/bin/bash", "user"]].concat())?;
    Ok(())
}

fn list_packages(rootfs: &Path) -> Result<Vec<String>> {
    let out = in_chroot(rootfs, &["dpkg-query", "--show", "--showformat=${Package}=${Version}\\n"])?;
    let mut packages: Vec<String> = String::from_utf8_lossy(&out).lines().map(str::to_string).collect();
    packages.sort();
    Ok(packages)
}

/// Removes or fixes everything that differs between two builds of the same packages (found
/// by diffing two builds: logs, ldconfig's aux-cache, apt indexes; plus files copied from the
/// host and backups), and the device nodes debootstrap made.
pub fn normalize(root: &Path) -> Result<()> {
    for dir in TRUNCATED_DIRS {
        for_each_file(&root.join(dir), &mut |file| truncate(file))?;
    }
    for dir in EMPTIED_DIRS {
        for_each_file(&root.join(dir), &mut |file| fs::remove_file(file).at("remove", file))?;
    }
    for file in REMOVED_FILES {
        remove_tree(&root.join(file))?;
    }
    for dir in OLD_BACKUP_DIRS {
        remove_children(&root.join(dir), |name| name.ends_with("-old"))?;
    }
    for dir in CLEARED_DIRS {
        remove_children(&root.join(dir), |_| true)?;
    }
    remove_tree(&root.join("debootstrap"))?;
    for (file, content, mode) in FIXED_FILES {
        write_file(&root.join(file), content, mode)?;
    }
    fix_shadow_dates(&root.join("etc/shadow"))
}

fn truncate(file: &Path) -> Result<()> {
    fs::OpenOptions::new().write(true).truncate(true).open(file).map(drop).at("truncate", file)
}

/// Calls `f` for every regular file below `dir` (a missing `dir` has none).
fn for_each_file(dir: &Path, f: &mut dyn FnMut(&Path) -> Result<()>) -> Result<()> {
    let Ok(meta) = fs::symlink_metadata(dir) else { return Ok(()) };
    if !meta.is_dir() {
        return Ok(());
    }
    for name in sorted_children(dir)? {
        let path = dir.join(name);
        let meta = fs::symlink_metadata(&path).at("inspect", &path)?;
        if meta.is_dir() {
            for_each_file(&path, f)?;
        } else if meta.is_file() {
            f(&path)?;
        }
    }
    Ok(())
}

/// Removes the entries of `dir` whose names match (a missing `dir` has none).
fn remove_children(dir: &Path, matches: impl Fn(&str) -> bool) -> Result<()> {
    if !fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) {
        return Ok(());
    }
    for name in sorted_children(dir)? {
        if matches(&name.to_string_lossy()) {
            remove_tree(&dir.join(name))?;
        }
    }
    Ok(())
}

/// Sets the "last password change" field of every /etc/shadow entry to the fixed epoch's
/// day (useradd honours `SOURCE_DATE_EPOCH`; entries made during debootstrap may not).
fn fix_shadow_dates(shadow: &Path) -> Result<()> {
    let Ok(text) = fs::read_to_string(shadow) else { return Ok(()) };
    let day = (SOURCE_DATE_EPOCH / 86_400).to_string();
    let mut fixed = String::with_capacity(text.len());
    for line in text.lines() {
        let mut fields: Vec<&str> = line.split(':').collect();
        if fields.len() > 2 && !fields[2].is_empty() {
            fields[2] = &day;
        }
        fixed.push_str(&fields.join(":"));
        fixed.push('\n');
    }
    fs::write(shadow, fixed).at("write", shadow) // in place: keeps mode 0640 and group shadow
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(packages: &[String]) -> BaseRecipe<'_> {
        BaseRecipe { mirror: "http://deb.debian.org/debian", suite: "bookworm", packages }
    }

    #[test]
    fn cache_key_ignores_package_order() {
        let a = ["git".to_string(), "curl".to_string()];
        let b = ["curl".to_string(), "git".to_string(), "git".to_string()];
        assert_eq!(recipe(&a).cache_key().0, recipe(&b).cache_key().0);
        let c = ["curl".to_string()];
        assert_ne!(recipe(&a).cache_key().0, recipe(&c).cache_key().0);
        assert_eq!(recipe(&a).cache_key().0.len(), 64);
    }

    #[test]
    fn validation() {
        let ok = ["python3".to_string(), "g++".to_string(), "libc6".to_string()];
        recipe(&ok).validate().unwrap();
        let bad = ["--foo".to_string()];
        let err = recipe(&bad).validate().unwrap_err();
        assert_eq!(err.to_string(), "invalid package '--foo' in recipe");
        let comma = ["a,b".to_string()];
        assert!(recipe(&comma).validate().is_err());
        let suite = BaseRecipe { suite: "-x", ..recipe(&ok) };
        assert!(suite.validate().is_err());
        let mirror = BaseRecipe { mirror: "ftp://x", ..recipe(&ok) };
        assert!(mirror.validate().is_err());
    }

    #[test]
    fn shadow_dates_fixed() {
        let dir = tempfile::tempdir().unwrap();
        let shadow = dir.path().join("shadow");
        fs::write(&shadow, "root:*:20779:0:99999:7:::\nuser:!:20779:0:99999:7:::\nodd\n").unwrap();
        fix_shadow_dates(&shadow).unwrap();
        let text = fs::read_to_string(&shadow).unwrap();
        assert_eq!(text, "root:*:19518:0:99999:7:::\nuser:!:19518:0:99999:7:::\nodd\n");
    }

    #[test]
    fn normalize_fixes_known_differences() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in
            ["var/log/apt", "var/lib/apt/lists/partial", "var/cache/ldconfig", "var/lib/dpkg", "etc", "dev/pts", "tmp"]
        {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::write(root.join("var/log/dpkg.log"), "time").unwrap();
        fs::write(root.join("var/lib/apt/lists/x_Packages"), "p").unwrap();
        fs::write(root.join("var/cache/ldconfig/aux-cache"), "a").unwrap();
        fs::write(root.join("var/lib/dpkg/status-old"), "s").unwrap();
        fs::write(root.join("var/lib/dpkg/status"), "s").unwrap();
        fs::write(root.join("etc/hostname"), "buildhost\n").unwrap();
        fs::write(root.join("etc/passwd-"), "").unwrap();
        std::os::unix::fs::symlink("/proc/self/fd", root.join("dev/fd")).unwrap();
        normalize(root).unwrap();
        assert_eq!(fs::read(root.join("var/log/dpkg.log")).unwrap(), b"");
        assert!(root.join("var/lib/apt/lists/partial").is_dir());
        assert!(!root.join("var/lib/apt/lists/x_Packages").exists());
        assert!(!root.join("var/cache/ldconfig/aux-cache").exists());
        assert!(!root.join("var/lib/dpkg/status-old").exists());
        assert!(root.join("var/lib/dpkg/status").exists());
        assert!(!root.join("etc/passwd-").exists());
        assert_eq!(fs::read_to_string(root.join("etc/hostname")).unwrap(), "sandbox\n");
        assert_eq!(fs::read(root.join("etc/machine-id")).unwrap(), b"");
        assert_eq!(fs::read_dir(root.join("dev")).unwrap().count(), 0);
    }
}
