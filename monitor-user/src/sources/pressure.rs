//! Pressure stall information of a worker's v2 cgroup (`cpu.pressure`, `memory.pressure`,
//! `io.pressure`): the cumulative time some, or all, of its tasks were stalled on the
//! resource. Every v2 cgroup has these files on a kernel built with PSI, hybrid hosts'
//! included; a kernel without them (or booted with `psi=0`) has none, and older kernels
//! print no `full` line for CPU.
use std::path::Path;

use crate::sources::KeptFiles;

/// The three resources, in the order `WorkerPressure` keeps them.
pub const RESOURCES: [&str; 3] = ["cpu", "memory", "io"];

/// One `*.pressure` file's cumulative stalled time, ns (the file counts µs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stall {
    /// At least one task stalled.
    pub some_ns: Option<u64>,
    /// Every non-idle task stalled at once; `None` where the kernel prints no such line.
    pub full_ns: Option<u64>,
}

/// A worker's stalls per resource, in `RESOURCES` order; `None` where the file is absent or
/// could not be read.
pub type WorkerPressure = [Option<Stall>; 3];

/// Reads the three files of the worker cgroup `dir` through `files`, kept open between
/// samples.
pub fn read(files: &mut KeptFiles, dir: &Path) -> WorkerPressure {
    RESOURCES.map(|resource| {
        let path = dir.join(format!("{resource}.pressure"));
        match files.read(&path) {
            Ok(text) => {
                let stall = parse(&text);
                (stall != Stall::default()).then_some(stall).or_else(|| {
                    log::debug!("{}: no some/full total in {text:?}", path.display());
                    None
                })
            }
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    log::debug!("{}: {e}", path.display());
                }
                None
            }
        }
    })
}

/// `some avg10=… avg60=… avg300=… total=<µs>` and the same for `full`.
fn parse(text: &str) -> Stall {
    let total = |kind: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(kind)?.strip_prefix(' ')?;
            rest.split_whitespace().find_map(|f| f.strip_prefix("total=")?.parse::<u64>().ok())
        })
    };
    Stall { some_ns: total("some").map(|us| us * 1000), full_ns: total("full").map(|us| us * 1000) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_some_and_full() {
        let text = "some avg10=1.19 avg60=1.20 avg300=2.08 total=3816388814\n\
                    full avg10=0.00 avg60=0.00 avg300=0.00 total=12\n";
        assert_eq!(parse(text), Stall { some_ns: Some(3_816_388_814_000), full_ns: Some(12_000) });
    }

    #[test]
    fn a_cpu_file_without_full_has_no_full() {
        let text = "some avg10=0.00 avg60=0.00 avg300=0.00 total=5\n";
        assert_eq!(parse(text), Stall { some_ns: Some(5_000), full_ns: None });
    }

    #[test]
    fn garbage_and_absent_files_are_none() {
        let dir = std::env::temp_dir().join(format!("hm-psi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cpu.pressure"), "nonsense total=x\n").unwrap();
        std::fs::write(dir.join("io.pressure"), "some avg10=0 avg60=0 avg300=0 total=7\n").unwrap();
        let read = read(&mut KeptFiles::default(), &dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(read, [None, None, Some(Stall { some_ns: Some(7_000), full_ns: None })]);
    }
}
