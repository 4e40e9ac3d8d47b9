//! `losses.jsonl`: one line per step, appended as the run goes and cut back on resume.

use std::fs::File;
use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::durable::write_durably;
use super::trainer::StepLosses;

/// One line of the log.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LossRecord {
    pub step: u64,
    /// Counted from 0.
    pub epoch: usize,
    pub lr: f64,
    /// Training time so far, summed over resumed runs.
    pub seconds: f64,
    #[serde(flatten)]
    pub losses: StepLosses,
}

pub struct LossLog {
    file: File,
}

impl LossLog {
    /// Opens the log of a run that has done `steps_done` steps. Lines of later steps were written
    /// after the checkpoint the run resumes from, and will be written again: they are dropped
    /// first (atomically, so a crash now cannot cost the earlier lines).
    pub fn open(path: &Path, steps_done: u64) -> anyhow::Result<Self> {
        if let Ok(text) = std::fs::read_to_string(path) {
            let kept: String = text
                .lines()
                .filter(|l| serde_json::from_str::<LossRecord>(l).is_ok_and(|r| r.step <= steps_done))
                .flat_map(|l| [l, "\n"])
                .collect();
            if kept != text {
                write_durably(path, kept.as_bytes())
                    .with_context(|| format!("cannot rewrite {}", path.display()))?;
            }
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Self { file })
    }

    pub fn append(&mut self, record: &LossRecord) -> anyhow::Result<()> {
        writeln!(self.file, "{}", serde_json::to_string(record)?)?;
        Ok(())
    }

    /// Puts every appended line on disk.
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

/// Every logged step.
pub fn read_log(path: &Path) -> anyhow::Result<Vec<LossRecord>> {
    let file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut records = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        records.push(serde_json::from_str(&line?)?);
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(step: u64) -> LossRecord {
        LossRecord { step, epoch: 0, lr: 2e-4, seconds: step as f64, losses: StepLosses::default() }
    }

    #[test]
    fn reopening_drops_the_steps_after_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("losses.jsonl");
        let mut log = LossLog::open(&path, 0).unwrap();
        for step in 1..=5 {
            log.append(&record(step)).unwrap();
        }
        drop(log);
        let mut log = LossLog::open(&path, 3).unwrap();
        log.append(&record(4)).unwrap();
        let steps: Vec<u64> = read_log(&path).unwrap().iter().map(|r| r.step).collect();
        assert_eq!(steps, [1, 2, 3, 4]);
    }
}
