//! Files inside sandboxes: every operation, users and permissions, and paths that try to
//! leave the sandbox.

use abx_client::{FileKind, Limits};

use crate::harness::Daemon;

#[tokio::test]
async fn file_operations_round_trip() {
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    let c = &d.client;
    let info = c.write_file(&id, "/home/user/dir/a.txt", b"hello".to_vec(), Some(0o640)).await.unwrap();
    assert_eq!((info.size, info.mode, info.uid), (5, 0o640, 1000), "owned by the default user");
    assert_eq!(c.read_file(&id, "/home/user/dir/a.txt").await.unwrap(), b"hello");
    assert_eq!(d.sh(&id, "cat /home/user/dir/a.txt").await.0, "hello", "visible to processes");
    c.mkdir(&id, "/home/user/dir/sub/deeper", true).await.unwrap();
    let list = c.list_dir(&id, "/home/user/dir", 1).await.unwrap();
    let names: Vec<_> = list.iter().map(|f| (f.name.as_str(), f.kind)).collect();
    assert_eq!(names, [("a.txt", FileKind::File), ("sub", FileKind::Dir)]);
    let st = c.rename(&id, "/home/user/dir/a.txt", "/home/user/dir/sub/b.txt").await.unwrap();
    assert_eq!(st.path, "/home/user/dir/sub/b.txt");
    assert_eq!(c.stat(&id, "/home/user/dir/a.txt").await.unwrap_err().code(), Some("not_found"));
    let e = c.remove(&id, "/home/user/dir", false).await.unwrap_err();
    assert_eq!(e.code(), Some("directory_not_empty"), "{e}");
    c.remove(&id, "/home/user/dir", true).await.unwrap();
    assert_eq!(c.stat(&id, "/home/user/dir").await.unwrap_err().code(), Some("not_found"));
    // Large content streams in both directions.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    c.write_file(&id, "/tmp/big", big.clone(), None).await.unwrap();
    assert_eq!(c.read_file(&id, "/tmp/big").await.unwrap(), big);
}

#[tokio::test]
async fn permissions_follow_the_acting_user() {
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    let root = d.client.with_file_user("root");
    root.write_file(&id, "/root/secret", b"x".to_vec(), Some(0o600)).await.unwrap();
    let e = d.client.read_file(&id, "/root/secret").await.unwrap_err();
    assert_eq!(e.code(), Some("permission_denied"), "{e}");
    let e = d.client.write_file(&id, "/etc/new", b"x".to_vec(), None).await.unwrap_err();
    assert_eq!(e.code(), Some("permission_denied"), "{e}");
    assert_eq!(root.read_file(&id, "/root/secret").await.unwrap(), b"x");
    assert_eq!(root.stat(&id, "/root/secret").await.unwrap().uid, 0);
    // The mode asked for is the mode a user's upload gets, setuid and setgid included
    // (writing the content cleared them after the chmod).
    let info = d.client.write_file(&id, "/tmp/tool", b"#!/bin/sh\n".to_vec(), Some(0o6755)).await.unwrap();
    assert_eq!((info.mode, info.uid), (0o6755, 1000), "{info:?}");
    assert_eq!(d.client.stat(&id, "/tmp/tool").await.unwrap().mode, 0o6755);
    // Never more than the user may: setuid on a file of root's that the user can write
    // (world-writable) is refused, as the user's own chmod is.
    root.write_file(&id, "/tmp/roots", b"x".to_vec(), Some(0o666)).await.unwrap();
    let e = d.client.write_file(&id, "/tmp/roots", b"y".to_vec(), Some(0o4777)).await.unwrap_err();
    assert_eq!(e.code(), Some("permission_denied"), "{e}");
    assert_eq!(root.stat(&id, "/tmp/roots").await.unwrap().mode & 0o7000, 0, "no setuid-root file");
}

#[tokio::test]
async fn paths_cannot_leave_the_sandbox() {
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    let root = d.client.with_file_user("root");
    let host_marker = d.root.join("escape-marker");
    // `..` beyond the root stays at the sandbox's root.
    root.write_file(&id, "/../../../../tmp/dots", b"in".to_vec(), None).await.unwrap();
    assert_eq!(d.sh(&id, "cat /tmp/dots").await.0, "in");
    // Symlinks pointing out of the sandbox resolve inside it.
    d.sh(&id, &format!("ln -s / /tmp/up; ln -s {} /tmp/marker", host_marker.display())).await;
    let hostname = root.read_file(&id, "/tmp/up/etc/hostname").await.unwrap();
    assert_eq!(hostname, d.sh(&id, "cat /etc/hostname").await.0.as_bytes(), "the sandbox's own /etc/hostname");
    // The host path does not exist in the sandbox, and no file is created through a
    // dangling symlink...
    assert_eq!(root.write_file(&id, "/tmp/marker", b"x".to_vec(), None).await.unwrap_err().code(), Some("not_found"));
    // ...and once the sandbox has such a file, writing through the link changes the
    // sandbox's file.
    root.write_file(&id, &host_marker.display().to_string(), b"".to_vec(), None).await.unwrap();
    root.write_file(&id, "/tmp/marker", b"x".to_vec(), None).await.unwrap();
    assert!(!host_marker.exists(), "a write through a symlink must not reach the host");
    assert_eq!(root.read_file(&id, &host_marker.display().to_string()).await.unwrap(), b"x");
    let e = d.client.read_file(&id, "relative/path").await.unwrap_err();
    assert_eq!(e.code(), Some("invalid_argument"), "{e}");
}

#[tokio::test]
async fn archives_copy_directory_trees() {
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    d.sh(&id, "mkdir -p /tmp/t/a && echo one > /tmp/t/a/1 && echo two > /tmp/t/2 && chmod 751 /tmp/t/a").await;
    let mut s = d.client.download_archive(&id, "/tmp/t").await.unwrap();
    let mut tar = Vec::new();
    while let Some(chunk) = futures_util::StreamExt::next(&mut s).await {
        tar.extend_from_slice(&chunk.unwrap());
    }
    let mut names: Vec<String> = tar::Archive::new(tar.as_slice())
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string().trim_end_matches('/').to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["t", "t/2", "t/a", "t/a/1"]);
    d.client.upload_archive(&id, "/home/user/copy", tar).await.unwrap();
    assert_eq!(
        d.sh(&id, "cat /home/user/copy/t/a/1 /home/user/copy/t/2; stat -c %a /home/user/copy/t/a").await.0,
        "one\ntwo\n751\n"
    );
    // A FIFO in an upload is made as a FIFO (it was an empty regular file); a device node
    // stops the extraction with an error naming it.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Fifo);
    h.set_mode(0o640);
    h.set_size(0);
    b.append_data(&mut h, "q/pipe", std::io::empty()).unwrap();
    d.client.upload_archive(&id, "/tmp/up", b.into_inner().unwrap()).await.unwrap();
    assert_eq!(d.sh(&id, "stat -c '%F %a' /tmp/up/q/pipe").await.0, "fifo 640\n");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Char);
    h.set_mode(0o666);
    h.set_size(0);
    b.append_data(&mut h, "null", std::io::empty()).unwrap();
    let e = d.client.upload_archive(&id, "/tmp/up", b.into_inner().unwrap()).await.unwrap_err();
    assert!(e.to_string().contains("device node"), "{e}");
}

/// Guards that a directory download failing before its first byte (a file in it the
/// user cannot read) answers 403 naming the file, where the connection used to be cut
/// with an empty reply.
#[tokio::test]
async fn an_unreadable_file_in_a_downloaded_directory_is_a_clear_error() {
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    let root = d.client.with_file_user("root");
    root.write_file(&id, "/tmp/m2/secret", b"s\n".to_vec(), Some(0o600)).await.unwrap();
    let e = match d.client.download_archive(&id, "/tmp/m2").await {
        Ok(_) => panic!("an archive of a directory with an unreadable file"),
        Err(e) => e,
    };
    assert_eq!(e.code(), Some("permission_denied"), "{e}");
    assert!(e.to_string().contains("/tmp/m2/secret"), "{e}");
    // The acting user may read it all.
    let mut s = root.download_archive(&id, "/tmp/m2").await.unwrap();
    let mut tar = Vec::new();
    while let Some(chunk) = futures_util::StreamExt::next(&mut s).await {
        tar.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(tar::Archive::new(tar.as_slice()).entries().unwrap().count(), 2);
}

/// Guards that an upload the daemon refuses before reading all of it gets the daemon's
/// answer. Before, the daemon answered and closed the connection while the client was still
/// sending, and the client saw "error writing a body to connection: Broken pipe" instead:
/// for a path the user may not write, for an unknown sandbox and for one removed during
/// the upload.
#[tokio::test]
async fn a_refused_upload_gets_its_answer_not_a_broken_pipe() {
    let d = Daemon::start().await;
    let id = d.mini(Limits::default()).await;
    let big = vec![7u8; 32 << 20];
    let e = d.client.write_file(&id, "/etc/new", big.clone(), None).await.unwrap_err();
    assert_eq!(e.code(), Some("permission_denied"), "{e:?}");
    let e = d.client.write_file("0123456789ab", "/tmp/x", big.clone(), None).await.unwrap_err();
    assert_eq!(e.code(), Some("not_found"), "{e:?}");
    // Removed while the body streams in.
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(1);
    let body = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    let (c, id2) = (d.client.clone(), id.clone());
    let upload = tokio::spawn(async move { c.write_file_stream(&id2, "/tmp/big", body, None).await });
    for _ in 0..4 {
        tx.send(Ok(vec![1u8; 1 << 20])).await.unwrap();
    }
    // The file exists once the agent has begun writing it.
    for _ in 0..200 {
        if d.sh(&id, "test -e /tmp/big && echo yes").await.0.trim() == "yes" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    d.client.delete_sandbox(&id, true).await.unwrap();
    for _ in 0..32 {
        if tx.send(Ok(vec![1u8; 1 << 20])).await.is_err() {
            break;
        }
    }
    drop(tx);
    let e = upload.await.unwrap().unwrap_err();
    assert!(matches!(e.code(), Some("conflict" | "not_found")), "{e:?}");
}
