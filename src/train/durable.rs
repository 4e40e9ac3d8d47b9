//! Files of a run directory that must survive a crash or a power cut: each is written to a
//! synced temporary file, renamed over its name, and the directory is synced so that the rename
//! itself is on disk.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::model::file::write_atomically;

/// Replaces `path` with `bytes`: afterwards it holds either the old or the new content, never a
/// mix, and the new one is durable once this returns.
pub fn write_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomically(path, bytes)?;
    sync_parent(path)
}

/// Like [`write_durably`], but first keeps the current content of `path` (if any) as
/// `previous`: there is a complete file under one of the two names at every moment, and `path`
/// always holds the old content until the new one has replaced it.
pub fn write_durably_keeping_previous(path: &Path, previous: &Path, bytes: &[u8]) -> io::Result<()> {
    if path.exists() {
        // A second name for the current file, swapped in atomically over the older `previous`.
        let link = sibling_temporary(previous);
        let _ = std::fs::remove_file(&link);
        if std::fs::hard_link(path, &link).is_err() {
            std::fs::copy(path, &link)?;
        }
        std::fs::rename(&link, previous)?;
    }
    write_durably(path, bytes)
}

fn sibling_temporary(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    path.with_file_name(format!(".{name}.link-{}", std::process::id()))
}

/// Syncs the directory holding `path`, which makes a rename into it durable.
fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_previous_content_under_its_own_name() {
        let dir = tempfile::tempdir().unwrap();
        let (path, previous) = (dir.path().join("state"), dir.path().join("state.prev"));
        write_durably_keeping_previous(&path, &previous, b"one").unwrap();
        assert!(!previous.exists(), "nothing to keep before the first write");
        write_durably_keeping_previous(&path, &previous, b"two").unwrap();
        write_durably_keeping_previous(&path, &previous, b"three").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"three");
        assert_eq!(std::fs::read(&previous).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "no temporary file left behind: {names:?}");
    }
}
