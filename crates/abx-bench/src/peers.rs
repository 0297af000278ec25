//! Peers measured on the same root filesystem: bubblewrap and crun (both from Debian).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};

use crate::CycleFn;

static SEQ: AtomicU64 = AtomicU64::new(0);
const BUNDLE: &str = "/tmp/abxbench-crun-bundle";

fn which(name: &str) -> anyhow::Result<PathBuf> {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = PathBuf::from(dir).join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{name} is not installed (apt-get install {})", if name == "bwrap" { "bubblewrap" } else { name })
}

/// `bwrap --unshare-all` with the rootfs read-only, a fresh /dev, /proc and /tmp.
pub fn bwrap(rootfs: PathBuf) -> anyhow::Result<CycleFn> {
    let bin = which("bwrap")?;
    Ok(Arc::new(move || {
        let (bin, rootfs) = (bin.clone(), rootfs.clone());
        Box::pin(async move {
            let t = Instant::now();
            let out = tokio::process::Command::new(&bin)
                .arg("--unshare-all")
                .arg("--die-with-parent")
                .arg("--ro-bind")
                .arg(&rootfs)
                .args(["/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "echo", "hi"])
                .output()
                .await?;
            if out.stdout != b"hi\n" {
                bail!("bwrap failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(t.elapsed())
        })
    }))
}

/// `crun run` of an OCI bundle whose rootfs is the template's (read-only), with crun's
/// default namespaces (pid, ipc, uts, mount, network) plus a user namespace.
pub fn crun(rootfs: PathBuf) -> anyhow::Result<CycleFn> {
    let bin = which("crun")?;
    let bundle = PathBuf::from(BUNDLE);
    let _ = std::fs::remove_dir_all(&bundle);
    std::fs::create_dir_all(&bundle)?;
    let status = std::process::Command::new(&bin).arg("spec").current_dir(&bundle).status()?;
    if !status.success() {
        bail!("crun spec failed");
    }
    // A copy inside the (world-searchable) bundle: crun sets up the root from inside its
    // user namespace, which may not search the daemon's private state root.
    let copy = std::process::Command::new("cp").arg("-a").arg(&rootfs).arg(bundle.join("rootfs")).status()?;
    if !copy.success() {
        bail!("copying {} into the crun bundle failed", rootfs.display());
    }
    let cfg_path = bundle.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path)?)?;
    cfg["root"] = serde_json::json!({"path": "rootfs", "readonly": true});
    cfg["process"]["terminal"] = false.into();
    cfg["process"]["args"] = serde_json::json!(["echo", "hi"]);
    let ns = cfg["linux"]["namespaces"].as_array_mut().context("crun spec without namespaces")?;
    ns.push(serde_json::json!({"type": "user"}));
    cfg["linux"]["uidMappings"] = serde_json::json!([{"containerID": 0, "hostID": 300000000u64, "size": 65536}]);
    cfg["linux"]["gidMappings"] = serde_json::json!([{"containerID": 0, "hostID": 300000000u64, "size": 65536}]);
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg)?)?;
    Ok(Arc::new(move || {
        let (bin, bundle) = (bin.clone(), bundle.clone());
        Box::pin(async move {
            let id = format!("abxbench-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
            let t = Instant::now();
            let out = tokio::process::Command::new(&bin)
                .args(["--root", "/run/abxbench-crun", "run", "--bundle"])
                .arg(&bundle)
                .arg(&id)
                .output()
                .await?;
            if out.stdout != b"hi\n" {
                bail!("crun failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(t.elapsed())
        })
    }))
}

pub fn cleanup() {
    let _ = std::fs::remove_dir_all(BUNDLE);
    let _ = std::fs::remove_dir_all("/run/abxbench-crun");
}

/// Gives this (still single-threaded) process a private mount namespace without the
/// cgroup2 mount of a hybrid host. The host's mounts are not touched.
pub fn hide_cgroup2() -> anyhow::Result<()> {
    let unified = std::path::Path::new("/sys/fs/cgroup/unified");
    if !unified.join("cgroup.controllers").exists() {
        return Ok(());
    }
    abx_sys::process::unshare(abx_sys::process::ns::MOUNT).context("unshare the mount namespace")?;
    use rustix::mount::{MountPropagationFlags, UnmountFlags};
    rustix::mount::mount_change("/", MountPropagationFlags::PRIVATE | MountPropagationFlags::REC)?;
    rustix::mount::unmount(unified, UnmountFlags::DETACH).context("detach /sys/fs/cgroup/unified")?;
    Ok(())
}
