//! Where sandbox data lives: directly under the state root, or on a loop-mounted btrfs
//! image (the default where btrfs works, as on this CI host; ext4 with a journal without
//! btrfs). The choice is remembered and cannot change under live sandboxes.

use abx_client::Limits;

use crate::harness::Daemon;

fn mounted(path: &std::path::Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines().find(|l| l.split(' ').nth(4) == path.to_str()).map(|l| {
        // After the " - " separator: fstype source options.
        l.split(" - ").nth(1).unwrap_or_default().to_string()
    })
}

#[tokio::test]
async fn image_mode_keeps_sandbox_data_on_a_btrfs_image_with_subvolumes() {
    let mut d = Daemon::start_with(&["--data", "image"]).await;
    let info = d.client.system().await.unwrap().data;
    assert_eq!(info.mode, "image");
    let mountpoint = d.root.join(format!("{}-data", d.prefix));
    let image = d.root.join(format!("{}-data.img", d.prefix));
    assert_eq!(info.image.as_deref(), image.to_str());
    assert!(info.slots.starts_with(mountpoint.to_str().unwrap()), "{info:?}");
    let mount = mounted(&mountpoint).expect("the image is mounted");
    assert!(mount.starts_with("btrfs /dev/loop"), "{mount}");
    assert!(info.available_bytes > 1 << 30, "{info:?}");

    let id = d.mini(Limits::default()).await;
    d.sh(&id, "echo kept > /tmp/file").await;
    let slot = d.slot_of(&d.client.get_sandbox(&id).await.unwrap());
    let upper = d.slots.join(format!("{}-u{slot}", d.prefix)).join("data/upper/tmp/file");
    assert_eq!(std::fs::read_to_string(&upper).unwrap(), "kept\n", "the write landed on the image");
    // The data tree is a subvolume (the unit of snapshots): its root has inode 256.
    let data = upper.parent().unwrap().parent().unwrap().parent().unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(data).unwrap()), 256);
    d.client.delete_sandbox(&id, true).await.unwrap();

    // A graceful stop with no sandbox left unmounts it (and with it the loop device).
    d.stop();
    assert_eq!(mounted(&mountpoint), None);
    assert!(image.exists(), "the image stays for the next start");
    d.spawn(&["--data", "image"]).await;
    assert!(mounted(&mountpoint).is_some(), "mounted again");
}

#[tokio::test]
async fn dir_mode_keeps_sandbox_data_under_the_state_root() {
    let d = Daemon::start_with(&["--data", "dir"]).await;
    let info = d.client.system().await.unwrap().data;
    assert_eq!((info.mode.as_str(), info.image.as_deref()), ("dir", None));
    assert_eq!(info.slots, d.root.join("slots").display().to_string());
    let id = d.mini(Limits::default()).await;
    assert_eq!(d.sh(&id, "echo ok").await.0, "ok\n");
    assert!(d.mounts().is_empty(), "nothing mounted on the host: {:?}", d.mounts());
}

#[tokio::test]
async fn the_data_mode_does_not_change_under_live_sandboxes() {
    let mut d = Daemon::start_with(&["--data", "image"]).await;
    let id = d.mini(Limits::default()).await;
    d.kill9();
    let err = d.try_spawn(&["--data", "dir"]).await.unwrap_err();
    assert!(err.contains("start with --data image"), "{err}");
    // `auto` keeps the recorded choice, and the sandbox is found again.
    d.spawn(&["--data", "auto"]).await;
    assert_eq!(d.client.system().await.unwrap().data.mode, "image");
    assert_eq!(d.sh(&id, "echo still").await.0, "still\n");
    d.client.delete_sandbox(&id, true).await.unwrap();
    d.wait_for("the slot to be released", std::time::Duration::from_secs(10), || async {
        d.client.system().await.unwrap().sandboxes == 0
    })
    .await;
    // With no sandbox left, switching is fine, and the image goes.
    d.stop();
    d.spawn(&["--data", "dir"]).await;
    assert_eq!(d.client.system().await.unwrap().data.mode, "dir");
    assert!(!d.root.join(format!("{}-data.img", d.prefix)).exists());
    let id = d.mini(Limits::default()).await;
    assert_eq!(d.sh(&id, "echo ok").await.0, "ok\n");
}

/// A sandbox that filled the btrfs image and was removed leaves its data chunks allocated
/// until btrfs' cleaner frees them (up to 30 s), so every create failed with ENOSPC in
/// between; the daemon now frees them on ENOSPC and tries the create again. A sandbox that
/// fills the disk keeps its files through a stop.
#[tokio::test]
async fn a_create_right_after_a_sandbox_filled_the_disk_succeeds() {
    let d = Daemon::start_with(&["--data", "image", "--data-size", "1G"]).await;
    let id = d.mini(Limits { memory_bytes: Some(512 << 20), ..Default::default() }).await;
    let (out, _, _) = d.sh(&id, "dd if=/dev/zero of=/tmp/big bs=1M count=2000 2>&1 | tail -1; df -k / | tail -1").await;
    let full = out.lines().last().and_then(|l| l.split_whitespace().nth(3)).and_then(|a| a.parse::<u64>().ok());
    assert!(full.is_some_and(|avail| avail < 20 << 10), "the image is full: {out}");
    d.client.delete_sandbox(&id, true).await.unwrap();
    let again = d.mini(Limits { memory_bytes: Some(512 << 20), ..Default::default() }).await;
    assert_eq!(d.sh(&again, "echo room").await.0, "room\n");
    assert!(d.log().contains("freed the empty chunks"), "the space came back through the reclaim");
    // A sandbox that filled the disk stops with its files (the stop used to fail making
    // the slot's next data tree, leaving the sandbox exited), and starts again.
    let (out, _, _) = d.sh(&again, "dd if=/dev/zero of=/tmp/big bs=1M count=2000 2>/dev/null; wc -c < /tmp/big").await;
    let size = out.trim().to_string();
    assert!(size.parse::<u64>().is_ok_and(|n| n > 500 << 20), "{out}");
    // The stop keeps the files whatever happens. When btrfs still has room for the rename
    // that moves them out of the slot, it is stopped (the fresh tree for the slot, which
    // used to fail the stop, is made later); on a disk so full that even the rename fails,
    // the stop fails and the files stay in place.
    let diff_has_big = |diff: abx_client::Diff| diff.added.iter().any(|f| f.path == "/tmp/big");
    match d.client.stop(&again).await {
        Ok(sb) => {
            assert_eq!(sb.state, abx_client::SandboxState::Stopped);
            // With its own files filling the disk it may not boot again (no room for a few
            // bytes of setup), but that fails cleanly: it stays stopped, its files kept.
            match d.client.start(&again).await {
                Ok(sb) => assert_eq!(d.sh(&sb.id, "wc -c < /tmp/big").await.0.trim(), size),
                Err(e) => {
                    assert!(e.to_string().contains("No space left"), "{e}");
                    assert_eq!(d.client.get_sandbox(&again).await.unwrap().state, abx_client::SandboxState::Stopped);
                }
            }
        }
        Err(e) => assert!(e.to_string().contains("No space left"), "{e}"),
    }
    assert!(diff_has_big(d.client.diff(&again).await.unwrap()), "the files are kept");
    d.client.delete_sandbox(&again, true).await.unwrap();
    // Then the space is there again for new sandboxes (this second fill leaves btrfs
    // with less metadata room: allow it a few seconds, as a client would retry).
    let req = abx_client::CreateSandbox { template: Some("mini".into()), ..Default::default() };
    let mut third = d.client.create_sandbox(&req).await;
    for _ in 0..5 {
        match &third {
            Err(e) if e.to_string().contains("No space left") => {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                third = d.client.create_sandbox(&req).await;
            }
            _ => break,
        }
    }
    let third = third.unwrap_or_else(|e| panic!("no room for a new sandbox: {e}\n{}", d.log())).id;
    assert_eq!(d.sh(&third, "echo room").await.0, "room\n");
}

/// A data image the kernel turned read-only (btrfs does after a failed write, as when the
/// host disk holding the image is full) is reported, and creates say why they fail.
#[tokio::test]
async fn a_read_only_data_filesystem_is_reported_and_named_in_errors() {
    let d = Daemon::start_with(&["--data", "image"]).await;
    d.template("mini").await;
    let mountpoint = d.root.join(format!("{}-data", d.prefix));
    assert!(!d.client.system().await.unwrap().data.read_only);
    let remount = |opt: &str| {
        let st = std::process::Command::new("mount").args(["-o", &format!("remount,{opt}")]).arg(&mountpoint).status();
        assert!(st.unwrap().success(), "remount {opt}");
    };
    remount("ro");
    assert!(d.client.system().await.unwrap().data.read_only);
    let req = abx_client::CreateSandbox { template: Some("mini".into()), ..Default::default() };
    let e = d.client.create_sandbox(&req).await.unwrap_err();
    assert_eq!(e.code(), Some("resource_exhausted"), "{e}");
    assert!(e.to_string().contains("is read-only") && e.to_string().contains("host filesystem"), "{e}");
    remount("rw");
    assert!(!d.client.system().await.unwrap().data.read_only);
    let id = d.client.create_sandbox(&req).await.unwrap().id;
    assert_eq!(d.sh(&id, "echo ok").await.0, "ok\n");
}
