//! Test helpers for the services: run a service binary on a settings file and read how it
//! ended. In: the binary's path (`CARGO_BIN_EXE_*`), settings text, extra environment. Out:
//! the exit code and the last line of stderr, which is where a refused start says why.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// How a service process ended.
pub struct Exit {
    pub code: Option<i32>,
    pub last_line: String,
    pub stderr: String,
}

/// Runs `binary --config <file with settings>` with only `env` (plus PATH) set, and waits up
/// to `timeout` for it to exit; a process still running then is killed and reported as such.
pub fn run_with_settings(binary: &str, settings: &str, env: &[(&str, &str)], timeout: Duration) -> Exit {
    let mut file = new_settings_file();
    file.1.write_all(settings.as_bytes()).expect("write settings");
    let mut child = Command::new(binary)
        .arg("--config")
        .arg(&file.0)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn service binary");
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            child.kill().expect("kill");
            child.wait().expect("reap");
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr piped"), &mut stderr).expect("read stderr");
    let _ = std::fs::remove_file(&file.0);
    Exit {
        code: status.and_then(|s| s.code()),
        last_line: stderr
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or_default()
            .to_owned(),
        stderr,
    }
}

fn new_settings_file() -> (std::path::PathBuf, std::fs::File) {
    let dir = std::env::temp_dir();
    let path = dir.join(format!(
        "tollgate-settings-{}-{}.toml",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos()
    ));
    let file = std::fs::File::create(&path).expect("create settings file");
    (path, file)
}

/// A service binary of this workspace, from the build the running test belongs to
/// (`target/<profile>/<name>`, beside the test's own `deps/` directory). Tests in the
/// `tollgate-tests` crate run other packages' binaries this way; cargo builds every
/// workspace binary for `cargo test --workspace`, and `scripts/stack test` builds them first.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (`cargo build --release`; scripts/stack test does)",
        path.display()
    );
    path
}
