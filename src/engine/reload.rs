//! Rescans of the models folder while serving: `--models-watch` polls it, SIGHUP asks at once.
//!
//! A rescan compares the folder with what is routed to. A new file is loaded and warmed up on
//! every worker, then routed to; a file with new content (a new SHA-256) is loaded beside the
//! version it replaces, and routing switches in one step; a removed file's model takes no new
//! requests. Versions no longer routed to finish the requests that resolved to them and are
//! unloaded after the last one ([`super::versions`]). A file that fails to load changes nothing
//! that serves: it is logged, listed by `/v1/models` and counted, and tried again when its
//! content changes (or on SIGHUP).
//!
//! Polling reads a file only when its metadata (size, times, inode) changed since it was last
//! read, and loads it only when its SHA-256 differs from the version serving: touching a file
//! reloads nothing. SIGHUP reads every file and retries the ones that failed.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::catalog::{self, model_files};
use super::observer::ModelChange;
use super::versions::LoadFailure;
use super::Engine;

/// Why a rescan runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// The `--models-watch` interval: files that look unchanged are not read.
    Poll,
    /// SIGHUP: every file is read again and failed ones are retried.
    Signal,
}

/// What one rescan changed, by model name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rescan {
    pub added: Vec<String>,
    pub replaced: Vec<String>,
    pub removed: Vec<String>,
    pub failed: Vec<String>,
}

/// A file's metadata as last read: when it differs, the file may hold new content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<std::time::SystemTime>,
    /// Inode and change time: a file renamed into place, or rewritten with its old size and
    /// modification time restored, still looks different.
    #[cfg(unix)]
    identity: (u64, u64, i64, i64),
}

impl Fingerprint {
    fn of(metadata: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt;
        Self {
            len: metadata.len(),
            modified: metadata.modified().ok(),
            #[cfg(unix)]
            identity: (metadata.dev(), metadata.ino(), metadata.ctime(), metadata.ctime_nsec()),
        }
    }
}

/// Keeps an engine's models in step with a folder.
pub struct Reloader {
    engine: Arc<Engine>,
    dir: PathBuf,
    /// Each file's fingerprint when it was last read, by model name. Held through a rescan, so
    /// rescans never overlap.
    seen: tokio::sync::Mutex<HashMap<String, Fingerprint>>,
}

impl Reloader {
    /// A reloader for `engine`, whose models came from `dir`. Its first rescan reads every file
    /// (and reloads none whose content is what serves).
    pub fn new(engine: Arc<Engine>, dir: PathBuf) -> Self {
        Self { engine, dir, seen: Default::default() }
    }

    /// Brings the routed models in line with the folder; returns what changed. A folder that
    /// cannot be listed changes nothing.
    pub async fn rescan(&self, trigger: Trigger) -> Rescan {
        let mut seen = self.seen.lock().await;
        let mut rescan = Rescan::default();
        let dir = self.dir.clone();
        let files = match blocking(move || model_files(&dir)).await {
            Ok(files) => files,
            Err(error) => {
                tracing::error!(dir = %self.dir.display(), %error, "cannot list the models folder; nothing changed");
                return rescan;
            }
        };
        let present: BTreeMap<String, PathBuf> =
            files.into_iter().map(|path| (catalog::model_name(&path), path)).collect();

        for version in self.engine.models().iter().filter(|m| !present.contains_key(&m.info.name)) {
            let name = &version.info.name;
            drop(self.engine.route(name, None));
            tracing::info!(model = %name, sha256 = %version.info.sha256, "model removed; it finishes the requests it has");
            self.engine.observer().model_changed(name, ModelChange::Removed);
            rescan.removed.push(name.clone());
        }
        for failure in self.engine.load_failures().iter().filter(|f| !present.contains_key(&f.model)) {
            self.engine.set_load_failure(&failure.model, None);
        }
        seen.retain(|name, _| present.contains_key(name));

        for (name, path) in present {
            self.rescan_file(&mut seen, trigger, &name, &path, &mut rescan).await;
        }
        rescan
    }

    /// Loads `path` when its content is neither what serves nor what last failed (unless
    /// `trigger` forces a retry).
    async fn rescan_file(
        &self,
        seen: &mut HashMap<String, Fingerprint>,
        trigger: Trigger,
        name: &str,
        path: &Path,
        rescan: &mut Rescan,
    ) {
        let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let owned = path.to_path_buf();
        // The fingerprint is taken before the read: a write during the read shows next time.
        let fingerprint = match blocking(move || std::fs::metadata(owned)).await {
            Ok(metadata) => Fingerprint::of(&metadata),
            // Gone since it was listed: the next rescan removes its model.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return,
            Err(error) => return self.fail(name, &file_name, None, error.to_string(), rescan),
        };
        if trigger == Trigger::Poll && seen.get(name) == Some(&fingerprint) {
            return;
        }
        seen.insert(name.to_string(), fingerprint);
        let owned = path.to_path_buf();
        let read = blocking(move || {
            let bytes = std::fs::read(owned)?;
            let digest = catalog::sha256_hex(&bytes);
            Ok((bytes, digest))
        });
        let (bytes, digest) = match read.await {
            Ok(read) => read,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return,
            Err(error) => return self.fail(name, &file_name, None, error.to_string(), rescan),
        };
        let serving = self.engine.model(name);
        if serving.as_ref().is_some_and(|v| v.info.sha256 == digest) {
            // The content that serves (back again, perhaps): whatever failed since is moot.
            self.engine.set_load_failure(name, None);
            return;
        }
        let failed_before = self.engine.load_failure(name).and_then(|f| f.sha256);
        if trigger == Trigger::Poll && failed_before.as_deref() == Some(digest.as_str()) {
            return;
        }
        let (owned, sha256) = (path.to_path_buf(), digest.clone());
        let parsed =
            blocking(move || catalog::parse_model(&owned, &bytes, sha256).map_err(std::io::Error::other))
                .await;
        let prepared = match parsed {
            Ok((info, file)) => self.engine.prepare(info, file).await,
            Err(error) => Err(error.to_string()),
        };
        let version = match prepared {
            Ok(version) => version,
            Err(error) => return self.fail(name, &file_name, Some(digest), error, rescan),
        };
        self.engine.set_load_failure(name, None);
        match self.engine.route(name, Some(version)) {
            Some(old) => {
                tracing::info!(
                    model = %name, old_sha256 = %old.info.sha256, sha256 = %digest,
                    "model replaced; the old version finishes the requests it has"
                );
                self.engine.observer().model_changed(name, ModelChange::Replaced);
                rescan.replaced.push(name.to_string());
            }
            None => {
                tracing::info!(model = %name, sha256 = %digest, "model added");
                self.engine.observer().model_changed(name, ModelChange::Added);
                rescan.added.push(name.to_string());
            }
        }
    }

    fn fail(&self, name: &str, file: &str, sha256: Option<String>, error: String, rescan: &mut Rescan) {
        let serving = self.engine.model(name).map(|v| v.info.sha256.clone());
        tracing::error!(
            model = %name,
            file,
            sha256 = sha256.as_deref().unwrap_or("unreadable"),
            serving_sha256 = serving.as_deref().unwrap_or("none"),
            %error,
            "model file failed to load; what served before still serves"
        );
        self.engine.set_load_failure(name, Some(LoadFailure::new(name, file, sha256, error)));
        self.engine.observer().model_load_failed(name);
        rescan.failed.push(name.to_string());
    }
}

/// Rescans on every SIGHUP and, with `interval`, that often; ends when the engine shuts down.
/// `hangups` must be listening before the server announces itself: SIGHUP's default action
/// would end the process.
pub async fn watch(reloader: Arc<Reloader>, interval: Option<Duration>, mut hangups: Hangups) {
    let mut ticks = interval.map(|period| {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks
    });
    loop {
        let poll = async {
            match ticks.as_mut() {
                Some(ticks) => ticks.tick().await,
                None => std::future::pending().await,
            }
        };
        let trigger = tokio::select! {
            _ = hangups.next() => Trigger::Signal,
            _ = poll => Trigger::Poll,
        };
        if reloader.engine.is_shutting_down() {
            return;
        }
        if trigger == Trigger::Signal {
            tracing::info!(dir = %reloader.dir.display(), "SIGHUP received: rescanning the models folder");
        }
        let rescan = reloader.rescan(trigger).await;
        tracing::debug!(?rescan, "models folder rescanned");
    }
}

/// SIGHUPs received (none where there are no signals).
pub struct Hangups {
    #[cfg(unix)]
    signal: tokio::signal::unix::Signal,
}

impl Hangups {
    /// Starts listening; from now on SIGHUP no longer ends the process.
    pub fn listen() -> std::io::Result<Self> {
        #[cfg(unix)]
        return Ok(Self { signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())? });
        #[cfg(not(unix))]
        Ok(Self {})
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        if self.signal.recv().await.is_some() {
            return;
        }
        std::future::pending::<()>().await
    }
}

/// Runs file work on the blocking pool (reading and hashing a model file takes a while).
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| Err(std::io::Error::other(e)))
}
