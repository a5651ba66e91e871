//! The standard `process_*` metrics and `kbs_proxy_build_info`, as the Prometheus clients of
//! other languages export them, read from `/proc` at scrape time (Linux; elsewhere the process
//! metrics are left out).

use std::sync::OnceLock;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

/// Encodes the process's metrics on scrape.
#[derive(Debug)]
pub(crate) struct ProcessCollector;

/// What `/proc` says about this process.
#[derive(Debug, Default, PartialEq)]
struct Process {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    open_fds: u64,
    max_fds: u64,
    start_time_seconds: f64,
}

impl Process {
    fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The boot time does not change: /proc/stat (all CPUs' counters) is read once.
        static BOOT_TIME: OnceLock<Option<u64>> = OnceLock::new();
        let boot_time = (*BOOT_TIME.get_or_init(|| {
            std::fs::read_to_string("/proc/stat")
                .ok()?
                .lines()
                .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<u64>().ok())
        }))?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        let max_fds = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        parse_stat(
            &stat,
            rustix::param::clock_ticks_per_second(),
            rustix::param::page_size() as u64,
            boot_time,
        )
        .map(|p| Process { open_fds, max_fds, ..p })
    }
}

/// The CPU time, memory and start time in a `/proc/<pid>/stat` line (proc(5)).
fn parse_stat(stat: &str, ticks_per_second: u64, page_size: u64, boot_time: u64) -> Option<Process> {
    // The command name is in parentheses and may hold spaces: the fields follow the last `)`.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    // Numbered as in proc(5), whose field 3 (the state) is fields[0] here.
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    let ticks = ticks_per_second.max(1) as f64;
    Some(Process {
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)? * page_size,
        start_time_seconds: boot_time as f64 + field(22)? as f64 / ticks,
        ..Process::default()
    })
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut info = encoder.encode_descriptor(
            "kbs_proxy_build",
            "The proxy's version (value 1)",
            None,
            MetricType::Info,
        )?;
        info.encode_info(&[("version", env!("CARGO_PKG_VERSION"))])?;
        let Some(p) = Process::read() else { return Ok(()) };
        let mut cpu = encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent, seconds",
            None,
            MetricType::Counter,
        )?;
        cpu.encode_counter::<NoLabelSet, _, u64>(&p.cpu_seconds, None)?;
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size, bytes",
                p.resident_bytes as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size, bytes",
                p.virtual_bytes as f64,
            ),
            ("process_open_fds", "Open file descriptors", p.open_fds as f64),
            ("process_max_fds", "Limit on open file descriptors", p.max_fds as f64),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch, seconds",
                p.start_time_seconds,
            ),
        ] {
            encoder
                .encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&value)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_stat_line_whose_name_has_spaces_and_parentheses() {
        let stat = "4242 (kbs (proxy) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 3 0 \
                    12000 104857600 2560 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        let p = parse_stat(stat, 100, 4096, 1_700_000_000).unwrap();
        assert_eq!(p.cpu_seconds, 3.0);
        assert_eq!(p.virtual_bytes, 104_857_600);
        assert_eq!(p.resident_bytes, 2560 * 4096);
        assert_eq!(p.start_time_seconds, 1_700_000_120.0);
        assert!(parse_stat("garbage", 100, 4096, 0).is_none());
    }

    #[test]
    fn reads_this_process() {
        let p = Process::read().expect("/proc is there on Linux");
        assert!(p.resident_bytes > 0 && p.open_fds > 0 && p.max_fds >= p.open_fds);
    }
}
