//! Which files a `translate` run reads and where each result goes, decided before any model is
//! loaded: the single-file form (`INPUT OUTPUT`), or files and folders into `--out-dir`. Runs
//! that would overwrite an input, or write two results to one name, are refused here, before
//! anything is written.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use image::ImageFormat;

use crate::engine::codec::OutputFormat;

/// One image to translate and the file its result goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub input: PathBuf,
    pub output: PathBuf,
}

/// An input that could not be used, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub input: PathBuf,
    pub reason: String,
}

/// What a run will do.
#[derive(Debug, Default)]
pub struct Plan {
    pub jobs: Vec<Job>,
    /// Folders that could not be listed.
    pub unlisted: Vec<Failure>,
    /// `Some(dir)` when results go into a folder; `None` in the single-file form.
    pub out_dir: Option<PathBuf>,
}

/// Reads the command line's paths: all inputs when `out_dir` is given, else exactly `INPUT
/// OUTPUT`. Creates `out_dir` if it is missing.
pub fn plan(paths: &[PathBuf], out_dir: Option<&Path>, format: OutputFormat) -> anyhow::Result<Plan> {
    match out_dir {
        Some(dir) => into_folder(paths, dir, format),
        None => single(paths, format),
    }
}

fn single(paths: &[PathBuf], format: OutputFormat) -> anyhow::Result<Plan> {
    let [input, output] = paths else {
        bail!(
            "several images or a folder need --out-dir DIR; a single image is translated with \
             `translate INPUT OUTPUT`"
        )
    };
    if input.is_dir() {
        bail!("{} is a folder: pass --out-dir DIR to translate the images in it", input.display());
    }
    if output.is_dir() {
        bail!("{} is a folder: to write the result into it, pass --out-dir {0}", output.display());
    }
    if entry(input) == entry(output) {
        bail!("refusing to overwrite the input {} with its result", input.display());
    }
    let named = ImageFormat::from_path(output).ok().filter(|f| f.reading_enabled());
    if named.is_some_and(|f| f.to_mime_type() != format.mime_type()) {
        tracing::warn!(
            output = %output.display(),
            format = format.extension(),
            "the result's format is not the one its extension names; --format chooses it"
        );
    }
    Ok(Plan { jobs: vec![Job { input: input.clone(), output: output.clone() }], ..Plan::default() })
}

fn into_folder(paths: &[PathBuf], out_dir: &Path, format: OutputFormat) -> anyhow::Result<Plan> {
    let mut plan = Plan { out_dir: Some(out_dir.to_path_buf()), ..Plan::default() };
    let mut inputs = Vec::new();
    for path in paths {
        if path.is_dir() {
            match list_images(path) {
                Ok(images) => inputs.extend(images),
                Err(err) => plan
                    .unlisted
                    .push(Failure { input: path.clone(), reason: format!("cannot list the folder: {err}") }),
            }
        } else {
            // Named on the command line: tried whatever its name, sniffed by content.
            inputs.push(path.clone());
        }
    }
    // The same file reached twice (a folder and a file in it, say) is translated once.
    let mut seen = HashSet::new();
    inputs.retain(|input| seen.insert(entry(input)));

    std::fs::create_dir_all(out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    let mut named = Vec::new();
    for input in inputs {
        let Some(stem) = input.file_stem() else {
            plan.unlisted.push(Failure { input, reason: "not a file name".into() });
            continue;
        };
        let mut name = stem.to_os_string();
        name.push(".");
        name.push(format.extension());
        named.push((input, name));
    }
    let mut by_name: BTreeMap<&OsStr, Vec<&Path>> = BTreeMap::new();
    for (input, name) in &named {
        by_name.entry(name).or_default().push(input);
    }
    refuse_shared_names(&by_name, out_dir)?;
    // In input order: results come out folder by folder, file by file, as listed.
    for (input, name) in named {
        let output = out_dir.join(name);
        if seen.contains(&entry(&output)) {
            bail!(
                "refusing to overwrite the input {} with the result of {}: choose another --out-dir \
                 (or --format)",
                output.display(),
                input.display()
            );
        }
        plan.jobs.push(Job { input, output });
    }
    Ok(plan)
}

/// Refuses a run in which two inputs would write the same result file (`a.png` and `a.jpg`, or
/// `a.png` from two folders).
fn refuse_shared_names(by_name: &BTreeMap<&OsStr, Vec<&Path>>, out_dir: &Path) -> anyhow::Result<()> {
    let shared: Vec<String> = by_name
        .iter()
        .filter(|(_, inputs)| inputs.len() > 1)
        .map(|(name, inputs)| {
            let inputs: Vec<String> = inputs.iter().map(|i| i.display().to_string()).collect();
            format!("  {} ← {}", out_dir.join(name).display(), inputs.join(", "))
        })
        .collect();
    if !shared.is_empty() {
        bail!(
            "results keep their input's name, and these inputs share one:\n{}\nrename them, or \
             translate them into separate --out-dir folders",
            shared.join("\n")
        );
    }
    Ok(())
}

/// The image files directly in `folder` (subfolders are not entered), by name: visible files
/// whose extension names a format this build decodes.
fn list_images(folder: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut images = Vec::new();
    let mut skipped = 0usize;
    for item in std::fs::read_dir(folder)? {
        let path = item?.path();
        let hidden = path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
        let image_name = ImageFormat::from_path(&path).is_ok_and(|f| f.reading_enabled());
        // `is_file` follows symbolic links, so linked images count.
        if !hidden && image_name && path.is_file() {
            images.push(path);
        } else {
            skipped += 1;
        }
    }
    if skipped > 0 {
        tracing::info!(
            folder = %folder.display(),
            skipped,
            "left out entries that are not image files (subfolders are not entered)"
        );
    }
    images.sort();
    Ok(images)
}

/// The directory entry a path names: its folder resolved (links, `..`) plus its file name. A
/// result is written by renaming over its entry, so two paths clash exactly when their entries
/// are equal. Paths whose folder does not exist are kept as given.
fn entry(path: &Path) -> PathBuf {
    let (Some(name), parent) = (path.file_name(), path.parent()) else { return path.to_path_buf() };
    let parent = match parent {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    parent.canonicalize().map_or_else(|_| path.to_path_buf(), |p| p.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        std::fs::write(path, b"x").unwrap();
    }

    #[test]
    fn folders_give_their_image_files_and_results_keep_the_stem() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        std::fs::create_dir_all(input.join("sub")).unwrap();
        for name in ["b.JPG", "a.png", "c.webp", "notes.txt", ".hidden.png", "sub/d.png"] {
            touch(&input.join(name));
        }
        let extra = dir.path().join("extra.data");
        touch(&extra);
        let out = dir.path().join("out");
        let paths = [input.clone(), extra.clone(), input.join("a.png")];
        let plan = plan(&paths, Some(&out), OutputFormat::Webp).unwrap();
        let jobs: Vec<(PathBuf, PathBuf)> = plan.jobs.into_iter().map(|j| (j.input, j.output)).collect();
        assert_eq!(
            jobs,
            [
                (input.join("a.png"), out.join("a.webp")),
                (input.join("b.JPG"), out.join("b.webp")),
                (input.join("c.webp"), out.join("c.webp")),
                (extra, out.join("extra.webp")),
            ]
        );
        assert!(out.is_dir() && plan.unlisted.is_empty());
    }

    #[test]
    fn two_inputs_for_one_result_name_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (dir.path().join("one"), dir.path().join("two"));
        for folder in [&one, &two] {
            std::fs::create_dir(folder).unwrap();
        }
        touch(&one.join("a.png"));
        touch(&two.join("a.jpg"));
        let err = plan(&[one, two], Some(&dir.path().join("out")), OutputFormat::Png).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("a.png ← ") && text.contains("one/a.png") && text.contains("two/a.jpg"),
            "{text}"
        );
    }

    #[test]
    fn results_never_replace_inputs() {
        let dir = tempfile::tempdir().unwrap();
        touch(&dir.path().join("a.png"));
        let err = plan(&[dir.path().to_path_buf()], Some(dir.path()), OutputFormat::Png).unwrap_err();
        assert!(err.to_string().contains("refusing to overwrite the input"), "{err}");
        // Another format writes beside the inputs.
        assert_eq!(
            plan(&[dir.path().to_path_buf()], Some(dir.path()), OutputFormat::Jpeg).unwrap().jobs.len(),
            1
        );

        let input = dir.path().join("a.png");
        let same = dir.path().join(".").join("a.png");
        let err = plan(&[input, same], None, OutputFormat::Png).unwrap_err();
        assert!(err.to_string().contains("refusing to overwrite the input"), "{err}");
    }

    #[test]
    fn the_single_file_form_takes_exactly_an_input_and_an_output() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.png"), dir.path().join("b.png"));
        touch(&a);
        let plan_ = plan(&[a.clone(), b.clone()], None, OutputFormat::Png).unwrap();
        assert_eq!(plan_.jobs, [Job { input: a.clone(), output: b.clone() }]);
        assert!(plan_.out_dir.is_none());
        for paths in [vec![a.clone()], vec![a.clone(), b.clone(), b.clone()]] {
            let err = plan(&paths, None, OutputFormat::Png).unwrap_err();
            assert!(err.to_string().contains("need --out-dir"), "{err}");
        }
        let err = plan(&[a, dir.path().to_path_buf()], None, OutputFormat::Png).unwrap_err();
        assert!(err.to_string().contains("is a folder"), "{err}");
    }
}
