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

use crate::harness::{Daemon, python_venv};

/// The SDK version the facade is tested with.
const E2B_VERSION: &str = "2.63.0";

/// The virtualenv with the SDK, made on first use.
fn sdk_python() -> PathBuf {
    python_venv(&format!("e2b-venv-{E2B_VERSION}"), &format!("e2b=={E2B_VERSION}"))
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2b/sdk_test.py")
}

#[tokio::test]
async fn e2b_python_sdk_works_against_the_facade() {
    let python = tokio::task::spawn_blocking(sdk_python).await.unwrap();
    let mut cmd = Command::new(python);
    cmd.arg(script()).env("PYTHONUNBUFFERED", "1");
    run_sdk_script(cmd, "e2b SDK").await;
}

/// Runs an SDK test script against a daemon with a TCP listener and a key (its URL and key
/// in the e2b variables) and checks that it passed and left no sandbox behind.
pub(crate) async fn run_sdk_script(mut cmd: Command, what: &'static str) {
    let (d, url, key) = Daemon::start_tcp().await;
    d.template("mini").await;
    let started = Instant::now();
    // The SDKs (Python and JS) read E2B_API_URL (control plane) and E2B_SANDBOX_URL (envd,
    // with E2b-Sandbox-Id/-Port headers).
    cmd.env("E2B_API_URL", &url)
        .env("E2B_SANDBOX_URL", &url)
        .env("E2B_API_KEY", &key)
        .env("E2B_DOMAIN", "agentbox.invalid")
        .env_remove("E2B_DEBUG")
        .env_remove("E2B_ACCESS_TOKEN");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap());
    let out = tokio::time::timeout(Duration::from_secs(300), out)
        .await
        .unwrap_or_else(|_| panic!("the {what} tests took over 5 minutes"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("ALL PASSED"),
        "the {what} tests failed ({}):\n{stdout}\n{stderr}\n--- daemon log ---\n{}",
        out.status,
        d.log()
    );
    println!("{what} tests: {:.1}s", started.elapsed().as_secs_f64());
    // Every section killed its sandboxes.
    let mut left = d.client.list_sandboxes().await.unwrap();
    left.retain(|s| s.state != abx_client::SandboxState::Destroying);
    assert!(left.is_empty(), "sandboxes left behind: {:?}", left.iter().map(|s| &s.id).collect::<Vec<_>>());
}

/// Guards that `commands.run` delivers every byte of a large output (15 MB) with its exit
/// code: it used to start every command in the background and attach, so output beyond
/// the agent's 1 MiB buffer was lost, or a slow reader was dropped ("the sandbox went away
/// before the process exited"). tests/e2b/output_test.py.
#[tokio::test]
async fn e2b_commands_deliver_all_of_a_large_output() {
    let python = tokio::task::spawn_blocking(sdk_python).await.unwrap();
    let mut cmd = Command::new(python);
    cmd.arg(script().with_file_name("output_test.py")).env("PYTHONUNBUFFERED", "1");
    run_sdk_script(cmd, "e2b large output").await;
}
