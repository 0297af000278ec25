//! The command-line client: docker-like habits, exit codes, copying files.

use crate::harness::Daemon;

fn text(o: &std::process::Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[tokio::test]
async fn run_streams_output_and_returns_the_exit_code() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let o = d.cli(&[
        "run",
        "-T",
        "mini",
        "--memory",
        "128M",
        "--pids",
        "100",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 42",
    ]);
    assert_eq!(o.status.code(), Some(42));
    assert_eq!(text(&o), ("out\n".into(), "err\n".into()));
    let o = d.cli(&["run", "-T", "mini", "--", "no-such-command"]);
    assert_eq!(o.status.code(), Some(127));
    assert!(text(&o).1.contains("command not found: no-such-command"), "{:?}", text(&o));
    let o = d.cli(&["run", "-T", "mini", "--memory", "12X", "--", "true"]);
    assert_eq!(o.status.code(), Some(2), "bad flag values are usage errors");
    assert!(text(&o).1.contains("12X"));
    assert!(d.client.list_sandboxes().await.unwrap().is_empty(), "run destroys its sandbox");
}

#[tokio::test]
async fn create_exec_ls_inspect_rm() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let o = d.cli(&["create", "-T", "mini", "--name", "worker-1", "-e", "A=1", "--timeout", "10m"]);
    assert!(o.status.success(), "{:?}", text(&o));
    let id = text(&o).0.trim().to_string();
    assert_eq!(id.len(), 12);
    let o = d.cli(&["exec", "worker-1", "-u", "root", "--", "sh", "-c", "echo $A $(id -u)"]);
    assert_eq!(text(&o).0, "1 0\n");
    assert_eq!(text(&d.cli(&["ls", "-q"])).0.trim(), id);
    assert!(text(&d.cli(&["ls"])).0.contains("worker-1"));
    let inspected: serde_json::Value = serde_json::from_str(&text(&d.cli(&["inspect", &id])).0).unwrap();
    assert_eq!(inspected[0]["name"], "worker-1");
    assert_eq!(inspected[0]["env"]["A"], "1");
    let o = d.cli(&["rm", &id]);
    assert!(!o.status.success(), "rm without -f refuses a running sandbox");
    assert!(text(&o).1.contains("rm -f"), "{:?}", text(&o));
    assert!(d.cli(&["rm", "-f", &id]).status.success());
    assert!(text(&d.cli(&["ls", "-q"])).0.trim().is_empty());
    let o = d.cli(&["exec", &id, "--", "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(text(&o).1.contains("not found"));
}

#[tokio::test]
async fn cp_copies_files_and_directories_both_ways() {
    let d = Daemon::start().await;
    d.template("mini").await;
    let id = text(&d.cli(&["create", "-T", "mini"])).0.trim().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("nested")).unwrap();
    std::fs::write(src.join("nested/file.txt"), "content").unwrap();
    std::fs::write(tmp.path().join("single"), "one file").unwrap();
    let sandbox = |p: &str| format!("{id}:{p}");
    assert!(
        d.cli(&["cp", tmp.path().join("single").to_str().unwrap(), &sandbox("/home/user/single")]).status.success()
    );
    assert!(d.cli(&["cp", src.to_str().unwrap(), &sandbox("/home/user/tree")]).status.success());
    assert_eq!(d.sh(&id, "cat /home/user/single /home/user/tree/nested/file.txt").await.0, "one filecontent");
    let back = tmp.path().join("back");
    let o = d.cli(&["cp", &sandbox("/home/user/tree"), back.to_str().unwrap()]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(std::fs::read_to_string(back.join("nested/file.txt")).unwrap(), "content");
    assert!(
        d.cli(&["cp", &sandbox("/home/user/single"), tmp.path().join("single-back").to_str().unwrap()])
            .status
            .success()
    );
    assert_eq!(std::fs::read_to_string(tmp.path().join("single-back")).unwrap(), "one file");
    let o = d.cli(&["cp", "-u", "root", tmp.path().join("single").to_str().unwrap(), &sandbox("/etc/")]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(d.sh(&id, "cat /etc/single").await.0, "one file");
}

#[tokio::test]
async fn templates_and_system_from_the_cli() {
    let d = Daemon::start().await;
    assert!(d.cli(&["template", "build", "mini"]).status.success());
    let ls = text(&d.cli(&["template", "ls"])).0;
    assert!(ls.contains("mini"), "{ls}");
    let sys: serde_json::Value = serde_json::from_str(&text(&d.cli(&["system"])).0).unwrap();
    assert_eq!(sys["prefix"], d.prefix);
    let o = d.cli(&["template", "rm", "nosuch"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(d.cli(&["template", "rm", "mini"]).status.success());
    assert!(!text(&d.cli(&["template", "ls"])).0.contains("mini"));
}
