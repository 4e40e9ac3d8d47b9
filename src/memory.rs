//! How much memory this process may use: byte sizes as people write them, and the default
//! budget read from the container's cgroup limit or the machine's memory.

use anyhow::Context;

/// Parses `1.5GiB`, `800MB`, `512Mi`, `2G`, `1024k` or a plain byte count. Binary units (KiB,
/// Ki…) are powers of 1024, decimal ones (KB, K…) powers of 1000, as Kubernetes writes them.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 =
        number.parse().map_err(|_| format!("`{text}` is not a size such as 1.5GiB or 800MB"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().trim_end_matches('b') {
        "" => 1.0,
        "k" => 1e3,
        "m" => 1e6,
        "g" => 1e9,
        "t" => 1e12,
        "ki" => 1024.0,
        "mi" => 1024.0 * 1024.0,
        "gi" => 1024.0 * 1024.0 * 1024.0,
        "ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("unknown unit in `{text}`: use B, KB, MB, GB, KiB, MiB or GiB")),
    };
    let bytes = number * scale;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("`{text}` is not a usable memory size"));
    }
    Ok(bytes as u64)
}

/// 80 % of the cgroup memory limit when one is set (v2, else v1), otherwise 50 % of physical
/// memory: the rest is left for the model weights, the runtime and the kernel.
pub fn default_budget() -> anyhow::Result<u64> {
    if let Some(limit) = cgroup_limit() {
        return Ok(limit / 10 * 8);
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("cannot read /proc/meminfo")?;
    let total = physical_memory(&meminfo).context("no MemTotal in /proc/meminfo; set --memory-budget")?;
    Ok(total / 2)
}

/// Makes large buffers go straight to the kernel and back, so that the memory a request frees
/// is given back at once rather than kept by the allocator. The budget counts live buffers; with
/// glibc's default (a threshold that rises to 32 MiB as buffers are freed) freed activations
/// stay resident, fragment, and make the process's real peak exceed what is live.
pub fn return_large_buffers_to_the_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters; any value is valid for both.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
    }
}

/// The opposite trade, for training: every step frees and allocates again the same few hundred
/// activation-sized buffers, and with glibc's defaults many of them go back to the kernel and
/// return as fresh pages to fault in and zero (about a tenth of a training step's CPU time was
/// the kernel's). Buffers under 32 MiB (the largest threshold glibc takes) now come from the heap,
/// and the heap is never trimmed: the process keeps its peak, which training reaches every step.
pub fn keep_freed_buffers_for_reuse() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters; any value is valid for both.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn cgroup_limit() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let v2 = read("/sys/fs/cgroup/memory.max").and_then(|v| v.trim().parse::<u64>().ok());
    // cgroup v1 reports "no limit" as a huge number near i64::MAX.
    let v1 = read("/sys/fs/cgroup/memory/memory.limit_in_bytes")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&v| v < 1 << 60);
    v2.or(v1)
}

fn physical_memory(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_and_decimal_units() {
        assert_eq!(parse_bytes("1.5GiB"), Ok(1_610_612_736));
        assert_eq!(parse_bytes("800MB"), Ok(800_000_000));
        assert_eq!(parse_bytes("512Mi"), Ok(536_870_912));
        assert_eq!(parse_bytes("2G"), Ok(2_000_000_000));
        assert_eq!(parse_bytes("1073741824"), Ok(1 << 30));
        assert_eq!(parse_bytes(" 64 KiB "), Ok(65_536));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("1.5 parsecs").is_err());
        assert!(parse_bytes("0").is_err());
    }

    #[test]
    fn physical_memory_comes_from_memtotal() {
        let meminfo = "MemTotal:       24576000 kB\nMemFree:        1000 kB\n";
        assert_eq!(physical_memory(meminfo), Some(24_576_000 * 1024));
        assert_eq!(physical_memory("MemFree: 1 kB\n"), None);
        assert!(default_budget().unwrap() > 0);
    }
}
