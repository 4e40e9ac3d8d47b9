//! What an exported model says about its training data: a name, or the image folders relative to
//! the run directory. Never an absolute path: a model file travels, and the paths of the machine
//! that trained it are nobody's business (the server shows provenance on `/v1/models`).

use std::path::{Component, Path, PathBuf};

/// `X: <x_dir>; Y: <y_dir>`, each relative to `run_dir`; a folder that cannot be resolved (it
/// is gone) is named by its last component.
pub fn dataset_label(x_dir: &Path, y_dir: &Path, run_dir: &Path) -> String {
    let show = |dir: &Path| {
        let relative = match (dir.canonicalize(), run_dir.canonicalize()) {
            (Ok(dir), Ok(run)) => relative_path(&dir, &run),
            _ => dir.file_name().map(PathBuf::from).unwrap_or_default(),
        };
        relative.display().to_string()
    };
    format!("X: {}; Y: {}", show(x_dir), show(y_dir))
}

/// `target` as seen from `base`; both absolute and without `.` or `..` (canonical).
fn relative_path(target: &Path, base: &Path) -> PathBuf {
    let (target, base): (Vec<Component>, Vec<Component>) =
        (target.components().collect(), base.components().collect());
    let shared = target.iter().zip(&base).take_while(|(a, b)| a == b).count();
    let mut path: PathBuf = base[shared..].iter().map(|_| Component::ParentDir).collect();
    path.extend(&target[shared..]);
    if path.as_os_str().is_empty() {
        path.push(".");
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_climb_to_the_shared_ancestor() {
        let rel = |t: &str, b: &str| relative_path(Path::new(t), Path::new(b));
        assert_eq!(rel("/w/data/flowers/trainA", "/w/runs/p2p"), Path::new("../../data/flowers/trainA"));
        assert_eq!(rel("/w/runs/p2p/data", "/w/runs/p2p"), Path::new("data"));
        assert_eq!(rel("/w/runs", "/w/runs/p2p"), Path::new(".."));
        assert_eq!(rel("/w", "/w"), Path::new("."));
    }

    #[test]
    fn labels_hold_no_absolute_path() {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["data/trainA", "data/trainB", "runs/mine"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        let label = dataset_label(
            &dir.path().join("data/trainA"),
            &dir.path().join("data/trainB"),
            &dir.path().join("runs/mine"),
        );
        assert_eq!(label, "X: ../../data/trainA; Y: ../../data/trainB");
        let gone = dataset_label(Path::new("/nowhere/trainA"), Path::new("/nowhere/trainB"), dir.path());
        assert_eq!(gone, "X: trainA; Y: trainB");
    }
}
