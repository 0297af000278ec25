//! The unmodified `e2b` Python SDK (from PyPI) against the E2B facade of a test daemon's
//! TCP listener: tests/e2b/sdk_test.py, one section per area (lifecycle, commands, files,
//! pause, pty and watch, snapshots and forks, the async SDK).
//!
//! The SDK is installed once per machine into a virtualenv,
//! `/var/cache/agentbox/e2b-venv-<version>` (made under an flock; needs `python3 -m venv`,
//! Debian's python3-venv, and PyPI).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::Daemon;

/// The SDK version the facade is tested with.
const E2B_VERSION: &str = "2.63.0";

/// The virtualenv with the SDK, made on first use.
fn sdk_python() -> PathBuf {
    let cache = Path::new("/var/cache/agentbox");
    std::fs::create_dir_all(cache).unwrap();
    let venv = cache.join(format!("e2b-venv-{E2B_VERSION}"));
    let done = venv.join(".installed");
    let python = venv.join("bin/python");
    if done.exists() {
        return python;
    }
    let lock =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(cache.join("e2b-venv.lock")).unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
    if done.exists() {
        return python;
    }
    let _ = std::fs::remove_dir_all(&venv);
    let run = |cmd: &mut Command, what: &str| {
        let o = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            o.status.success(),
            "{what} failed ({}):\n{}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    };
    run(
        Command::new("python3").args(["-m", "venv"]).arg(&venv),
        "python3 -m venv (Debian: apt-get install python3-venv)",
    );
    run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check"])
            .arg(format!("e2b=={E2B_VERSION}")),
        "pip install e2b",
    );
    std::fs::write(&done, E2B_VERSION).unwrap();
    python
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2b/sdk_test.py")
}

#[tokio::test]
async fn e2b_python_sdk_works_against_the_facade() {
    let python = tokio::task::spawn_blocking(sdk_python).await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let tcp = format!("tcp:127.0.0.1:{port}");
    let d = Daemon::start_with(&["+--listen", &tcp]).await;
    d.template("mini").await;
    let o = d.cli(&["key", "create"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let key = String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").trim().to_string();
    let url = format!("http://127.0.0.1:{port}");

    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script())
            .env("E2B_API_URL", &url)
            .env("E2B_SANDBOX_URL", &url)
            .env("E2B_API_KEY", &key)
            .env("E2B_DOMAIN", "agentbox.invalid")
            .env_remove("E2B_DEBUG")
            .env_remove("E2B_ACCESS_TOKEN")
            .env("PYTHONUNBUFFERED", "1")
            .output()
            .unwrap()
    });
    let out =
        tokio::time::timeout(Duration::from_secs(300), out).await.expect("the SDK tests took over 5 minutes").unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("ALL PASSED"),
        "the e2b SDK tests failed ({}):\n{stdout}\n{stderr}\n--- daemon log ---\n{}",
        out.status,
        d.log()
    );
    println!("e2b SDK tests: {:.1}s", started.elapsed().as_secs_f64());
    // Every section killed its sandboxes.
    let mut left = d.client.list_sandboxes().await.unwrap();
    left.retain(|s| s.state != abx_client::SandboxState::Destroying);
    assert!(left.is_empty(), "sandboxes left behind: {:?}", left.iter().map(|s| &s.id).collect::<Vec<_>>());
}
