//! The product's own programs, run as processes: the relay sidecar and the operators'
//! commands.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::Context;
use tokio::process::{Child, Command};

/// A command line with only the given variables of ours (`OUTBOX__*`, `DATABASE_URL`, …).
fn command(bin: &Path, args: &[&str], env: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
    for (k, _) in std::env::vars() {
        if k.starts_with("OUTBOX_") || k == "DATABASE_URL" || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// `url` with its password replaced by `***`.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// Runs `bin args` to completion, printing the command and its output indented. Returns
/// the exit code and the output.
pub async fn run(
    bin: &Path,
    args: &[&str],
    env: &[(&str, String)],
    shown_env: &str,
) -> anyhow::Result<(Option<i32>, String)> {
    let name = bin
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .replace("-under-test", "");
    println!("  $ {shown_env}{name} {}", args.join(" "));
    let out = command(bin, args, env)
        .output()
        .await
        .with_context(|| format!("running {}", bin.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for line in text.lines() {
        println!("    {line}");
    }
    Ok((out.status.code(), text))
}

/// The relay, running as a sidecar process; its log goes to a file.
pub struct Sidecar {
    child: Child,
    /// Where its log goes.
    pub log: PathBuf,
}

impl Sidecar {
    /// Starts `bin run` with `env`, its output in `log`.
    pub fn start(bin: &Path, env: &[(&str, String)], log: PathBuf) -> anyhow::Result<Self> {
        let file = std::fs::File::create(&log)
            .with_context(|| format!("creating the relay log {}", log.display()))?;
        let child = command(bin, &["run"], env)
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self { child, log })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// True while it runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM (as the orchestrator would) and waits up to `grace` for it to drain and
    /// exit. Returns whether it exited 0.
    pub async fn stop(mut self, grace: Duration) -> anyhow::Result<bool> {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => Ok(status?.success()),
            Err(_) => {
                self.child.start_kill()?;
                Ok(false)
            }
        }
    }

    /// The last `n` lines of its log.
    pub fn tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}
