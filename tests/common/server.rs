//! A real `cycleserve` process on an ephemeral port, for HTTP tests.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    /// Every JSON log line the server has written so far.
    logs: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Server {
    /// Starts `cycleserve` on port 0 with `models_dir` and `extra` flags; returns once it listens.
    pub fn start(models_dir: &Path, extra: &[&str]) -> Self {
        Self::start_with_env(models_dir, extra, &[])
    }

    /// [`Server::start`] with environment variables set for the server.
    pub fn start_with_env(models_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cycleserve"))
            .args(["--host", "127.0.0.1", "--port", "0", "--log-format", "json", "--device", "cpu"])
            .arg("--models-dir")
            .arg(models_dir)
            .args(extra)
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let parsed: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                if parsed["fields"]["message"] == "listening" {
                    let addr: SocketAddr = parsed["fields"]["address"].as_str().unwrap().parse().unwrap();
                    let _ = tx.send(addr);
                }
                kept.lock().unwrap().push(parsed);
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(60)).expect("server did not start listening");
        Self { child, addr, logs }
    }

    /// The server's log lines so far (JSON objects; `fields.message` is the message).
    pub fn logs(&self) -> Vec<serde_json::Value> {
        self.logs.lock().unwrap().clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A field of the server's /proc status, in bytes (VmRSS, VmHWM…).
    pub fn status_bytes(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    }

    /// Resets the server's peak RSS (VmHWM) to its current RSS, so that a later reading shows
    /// how far what came after raised it.
    pub fn reset_peak(&self) {
        std::fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5").unwrap();
    }

    /// Waits until `/readyz` answers 200.
    pub async fn ready(self) -> Self {
        let client = reqwest::Client::new();
        for _ in 0..600 {
            if let Ok(r) = client.get(self.url("/readyz")).send().await {
                if r.status() == 200 {
                    return self;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server never became ready");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
