//! Loop devices against the real kernel: an image file is attached with autoclear, an
//! ext4 filesystem on it is mounted and used, and unmounting detaches the device.
//! Needs root, /dev/loop-control and mkfs.ext4 (skipped otherwise).

use std::os::fd::AsFd;
use std::process::Command;

fn can_run() -> bool {
    rustix::process::geteuid().is_root()
        && std::path::Path::new("/dev/loop-control").exists()
        && Command::new("mkfs.ext4").arg("-V").output().is_ok()
}

fn attached(image: &std::path::Path) -> bool {
    let Ok(rd) = std::fs::read_dir("/sys/block") else { return false };
    rd.flatten().any(|e| {
        std::fs::read_to_string(e.path().join("loop/backing_file"))
            .is_ok_and(|b| std::path::Path::new(b.trim()) == image)
    })
}

#[test]
fn autoclear_loop_device_carries_a_filesystem_and_detaches_on_unmount() {
    if !can_run() {
        eprintln!("skipped: needs root, /dev/loop-control and mkfs.ext4");
        return;
    }
    let tmp = tempfile::Builder::new().prefix("abxsys-loop").tempdir().unwrap();
    let img = tmp.path().join("abxsys.img");
    std::fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
    let out = Command::new("mkfs.ext4").args(["-q", "-F", "-b", "4096"]).arg(&img).output().unwrap();
    assert!(out.status.success(), "mkfs: {}", String::from_utf8_lossy(&out.stderr));
    let backing = std::fs::OpenOptions::new().read(true).write(true).open(&img).unwrap();
    let opts = abx_sys::loopdev::LoopOptions { autoclear: true, direct_io: true, block_size: 4096, read_only: false };
    let dev = abx_sys::loopdev::attach(backing.as_fd(), "abxsys-test", opts).unwrap();
    drop(backing);
    assert!(attached(&img));
    let mnt = tmp.path().join("abxsys-mnt");
    std::fs::create_dir(&mnt).unwrap();
    rustix::mount::mount(dev.path(), &mnt, "ext4", rustix::mount::MountFlags::empty(), None).unwrap();
    drop(dev);
    std::fs::write(mnt.join("hello"), b"world").unwrap();
    assert_eq!(std::fs::read(mnt.join("hello")).unwrap(), b"world");
    assert!(attached(&img), "the mount keeps the device");
    rustix::mount::unmount(&mnt, rustix::mount::UnmountFlags::empty()).unwrap();
    for _ in 0..100 {
        if !attached(&img) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("loop device still attached after unmount");
}
