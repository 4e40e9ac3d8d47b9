//! One run per directory. The lock is an advisory file lock (flock on Unix), which the operating
//! system releases when its process ends however it ends, so a crashed run never blocks the next;
//! the file holds the holder's pid for the message a second run gets.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::Path;

use anyhow::{bail, Context};
use fs4::{FileExt, TryLockError};

pub const LOCK_FILE: &str = "cycletrain.lock";

/// Held for as long as the run writes to its directory.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

impl RunLock {
    /// Locks `run_dir` for this process, or says which process holds it.
    pub fn acquire(run_dir: &Path) -> anyhow::Result<Self> {
        let path = run_dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        match FileExt::try_lock(&file) {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim().parse::<u32>() {
                    Ok(pid) => format!("cycletrain pid {pid}"),
                    Err(_) => "another cycletrain".to_string(),
                };
                bail!(
                    "{} is in use by {holder}; one run per directory (lock file {})",
                    run_dir.display(),
                    path.display()
                );
            }
            Err(TryLockError::Error(err)) => {
                return Err(err).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_refuses_a_second_holder_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let lock = RunLock::acquire(dir.path()).unwrap();
        // flock locks belong to the open file description: a second open conflicts in-process too.
        let err = RunLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&format!("in use by cycletrain pid {}", std::process::id())), "{err}");
        drop(lock);
        RunLock::acquire(dir.path()).unwrap();
    }
}
