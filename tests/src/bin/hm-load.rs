//! Workloads with known shapes for the integration tests. Each runs for `secs` seconds.
//!
//!   hm-load busy THREADS SECS        THREADS threads spinning
//!   hm-load duty PCT PERIOD_MS SECS  one thread busy PCT % of every period, asleep the rest
//!   hm-load burst SECS               irregular busy bursts (5..200 ms) and pauses (5..300 ms)
//!   hm-load forker SECS              forks short-lived children that spin ~3 ms and exit
//!   hm-load sleep SECS               idle
//!   hm-load alloc MIB SECS           touches MIB mebibytes of anonymous memory, then idles
//!   hm-load rw FILE MIB SECS         write()s MIB MiB to FILE, read()s them back, then idles
//!   hm-load pipe MIB SECS            moves MIB MiB through a pipe between two threads, then idles
//!   hm-load coldread FILE MIB SECS   writes and syncs FILE, drops it from the page cache, read()s it
//!   hm-load mmapread FILE MIB SECS   the same, reading through a mapping (page faults)
//!   hm-load writesync FILE MIB SECS  write()s MIB MiB to FILE through the page cache, fsync()s
//!   hm-load direct FILE MIB SECS     writes MIB MiB to FILE with O_DIRECT, reads them back so
//!   hm-load forks COUNT FILE SECS    forks COUNT children one after another, each spinning ~1 ms,
//!                                    then writes FILE and idles
//!   hm-load pingpong MS              two threads pinned to CPU 0 pass a byte back and forth over
//!                                    two pipes for MS milliseconds, then print round trips/s
//!   hm-load children FILE MIB SECS   4 child processes each write+fsync MIB/4 MiB to FILE.N,
//!                                    read it back cold, and exit; the parent writes FILE.done
//!                                    and idles
//!
//! Arguments after these are ignored, so a test can add e.g. `--model NAME`.
use std::time::{Duration, Instant};

fn spin_for(d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        std::hint::spin_loop();
    }
}

fn arg(args: &[String], i: usize) -> u64 {
    args.get(i).and_then(|s| s.parse().ok()).unwrap_or_else(|| usage())
}

fn usage() -> ! {
    eprintln!(
        "usage: hm-load busy THREADS SECS | duty PCT PERIOD_MS SECS | burst SECS | forker SECS | sleep SECS"
    );
    std::process::exit(2)
}

/// Writes `len` bytes to `path` through the page cache and fsyncs them.
fn write_synced(path: &str, len: u64) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("create");
    let chunk = vec![5u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n]).expect("write");
        left -= n as u64;
    }
    f.sync_all().expect("fsync");
}

/// Drops `path` from the page cache and read()s it all.
fn read_cold(path: &str) {
    use std::{io::Read, os::fd::AsRawFd};
    let mut f = std::fs::File::open(path).expect("open");
    // SAFETY: a valid descriptor; DONTNEED drops the clean pages from the cache.
    assert_eq!(unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf).expect("read") > 0 {}
}

/// Writes `mib` MiB to `path` with O_DIRECT, then reads them back with O_DIRECT.
fn direct_io(path: &str, mib: u64) {
    use std::{
        io::{Read, Write},
        os::unix::fs::OpenOptionsExt,
    };
    const CHUNK: usize = 1 << 20;
    let layout = std::alloc::Layout::from_size_align(CHUNK, 4096).unwrap();
    // SAFETY: a non-zero size; freed below with the same layout.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!ptr.is_null());
    // SAFETY: `ptr` holds CHUNK initialised bytes, aligned for O_DIRECT.
    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, CHUNK) };
    buf.fill(9);
    let open = |write: bool| {
        std::fs::OpenOptions::new()
            .write(write)
            .read(!write)
            .create(write)
            .truncate(write)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .expect("open O_DIRECT")
    };
    let mut f = open(true);
    for _ in 0..mib {
        f.write_all(buf).expect("direct write");
    }
    drop(f);
    let mut f = open(false);
    while f.read(buf).expect("direct read") > 0 {}
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(ptr, layout) };
}

#[expect(clippy::too_many_lines, reason = "one arm per load, each short: a table of what this binary can do")]
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str).unwrap_or_else(|| usage());
    match mode {
        "busy" => {
            let (threads, secs) = (arg(&args, 1), arg(&args, 2));
            let handles: Vec<_> = (0..threads)
                .map(|_| std::thread::spawn(move || spin_for(Duration::from_secs(secs))))
                .collect();
            handles.into_iter().for_each(|h| h.join().unwrap());
        }
        "duty" => {
            let (pct, period, secs) = (arg(&args, 1), arg(&args, 2), arg(&args, 3));
            let period = Duration::from_millis(period);
            let busy = period * pct as u32 / 100;
            let end = Instant::now() + Duration::from_secs(secs);
            let mut next = Instant::now();
            while next < end {
                spin_for(busy);
                next += period;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        }
        "burst" => {
            let end = Instant::now() + Duration::from_secs(arg(&args, 1));
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            let mut rand = |lo: u64, hi: u64| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                lo + x % (hi - lo)
            };
            while Instant::now() < end {
                spin_for(Duration::from_millis(rand(5, 200)));
                std::thread::sleep(Duration::from_millis(rand(5, 300)));
            }
        }
        "forker" => {
            let end = Instant::now() + Duration::from_secs(arg(&args, 1));
            while Instant::now() < end {
                // SAFETY: the child only spins and exits.
                match unsafe { libc::fork() } {
                    0 => {
                        spin_for(Duration::from_millis(3));
                        // SAFETY: _exit ends the forked child without running the parent's exit handlers.
                        unsafe { libc::_exit(0) };
                    }
                    // SAFETY: waits for the child just forked; a null status pointer is allowed.
                    pid if pid > 0 => unsafe {
                        libc::waitpid(pid, std::ptr::null_mut(), 0);
                    },
                    _ => std::thread::sleep(Duration::from_millis(10)),
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        "sleep" => std::thread::sleep(Duration::from_secs(arg(&args, 1))),
        "rw" => {
            use std::io::{Read, Write};
            let (path, mib) = (args.get(1).unwrap_or_else(|| usage()).clone(), arg(&args, 2));
            let chunk = vec![7u8; 1 << 20];
            let mut f = std::fs::File::create(&path).expect("create");
            for _ in 0..mib {
                f.write_all(&chunk).expect("write");
            }
            drop(f);
            let mut f = std::fs::File::open(&path).expect("open");
            let mut buf = vec![0u8; 1 << 20];
            while f.read(&mut buf).expect("read") > 0 {}
            std::thread::sleep(Duration::from_secs(arg(&args, 3)));
        }
        "pipe" => {
            let mib = arg(&args, 1);
            let mut fds = [0; 2];
            // SAFETY: fds has room for the two descriptors.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            let writer = std::thread::spawn(move || {
                let chunk = vec![1u8; 64 << 10];
                for _ in 0..mib * 16 {
                    let mut done = 0;
                    while done < chunk.len() {
                        // SAFETY: valid buffer and descriptor.
                        let n =
                            unsafe { libc::write(fds[1], chunk[done..].as_ptr().cast(), chunk.len() - done) };
                        assert!(n > 0);
                        done += n as usize;
                    }
                }
                // SAFETY: the write end from pipe() above, closed once, after the last write.
                unsafe { libc::close(fds[1]) };
            });
            let mut buf = vec![0u8; 64 << 10];
            // SAFETY: valid buffer and descriptor.
            while unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
            writer.join().unwrap();
            std::thread::sleep(Duration::from_secs(arg(&args, 2)));
        }
        mode @ ("coldread" | "mmapread") => {
            use std::{io::Write, os::fd::AsRawFd};
            let (path, mib) = (args.get(1).unwrap_or_else(|| usage()).clone(), arg(&args, 2));
            let len = (mib as usize) << 20;
            let mut f = std::fs::File::create(&path).expect("create");
            f.write_all(&vec![3u8; len]).expect("write");
            f.sync_all().expect("fsync");
            // SAFETY: a valid descriptor; DONTNEED drops the clean pages from the cache.
            assert_eq!(unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
            let f = std::fs::File::open(&path).expect("open");
            let mut sum = 0u64;
            if mode == "coldread" {
                use std::io::Read;
                let mut buf = vec![0u8; 1 << 20];
                let mut f = f;
                while let Ok(n) = f.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sum += u64::from(buf[0]);
                }
            } else {
                // SAFETY: a read-only private mapping of a file we own, unmapped below.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        len,
                        libc::PROT_READ,
                        libc::MAP_PRIVATE,
                        f.as_raw_fd(),
                        0,
                    )
                };
                assert_ne!(p, libc::MAP_FAILED);
                for off in (0..len).step_by(4096) {
                    // SAFETY: `off < len` and the mapping is `len` readable bytes of a file that long.
                    sum += u64::from(unsafe { *(p as *const u8).add(off) });
                }
                // SAFETY: unmaps exactly the mapping made above, no longer used.
                unsafe { libc::munmap(p, len) };
            }
            std::hint::black_box(sum);
            std::thread::sleep(Duration::from_secs(arg(&args, 3)));
        }
        "writesync" => {
            let (path, mib) = (args.get(1).unwrap_or_else(|| usage()).clone(), arg(&args, 2));
            write_synced(&path, mib << 20);
            std::thread::sleep(Duration::from_secs(arg(&args, 3)));
        }
        "direct" => {
            let (path, mib) = (args.get(1).unwrap_or_else(|| usage()).clone(), arg(&args, 2));
            direct_io(&path, mib);
            std::thread::sleep(Duration::from_secs(arg(&args, 3)));
        }
        "pingpong" => {
            let run_for = Duration::from_millis(arg(&args, 1));
            // On one CPU every round trip is two context switches, and the figure does not
            // depend on where the scheduler happens to put the threads.
            // SAFETY: a zeroed cpu_set_t is valid; CPU 0 always exists.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(0, &mut set);
                assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0);
            }
            let (mut there, mut back) = ([0; 2], [0; 2]);
            // SAFETY: each array has room for two descriptors.
            assert!(unsafe { libc::pipe(there.as_mut_ptr()) == 0 && libc::pipe(back.as_mut_ptr()) == 0 });
            let echo = std::thread::spawn(move || {
                let mut b = [0u8; 1];
                // SAFETY: valid buffer and descriptors; a closed write end ends the loop.
                while unsafe { libc::read(there[0], b.as_mut_ptr().cast(), 1) } == 1 {
                    // SAFETY: a valid one-byte buffer and the write end from pipe() above.
                    unsafe { libc::write(back[1], b.as_ptr().cast(), 1) };
                }
            });
            let (start, mut trips, mut b) = (Instant::now(), 0u64, [0u8; 1]);
            while start.elapsed() < run_for {
                // SAFETY: as above.
                unsafe {
                    libc::write(there[1], b.as_ptr().cast(), 1);
                    libc::read(back[0], b.as_mut_ptr().cast(), 1);
                }
                trips += 1;
            }
            let elapsed = start.elapsed().as_secs_f64();
            // SAFETY: the write end from pipe() above, closed once; it ends the echo thread's loop.
            unsafe { libc::close(there[1]) };
            echo.join().unwrap();
            println!("{:.0}", trips as f64 / elapsed);
        }
        "forks" => {
            let (count, path) = (arg(&args, 1), args.get(2).unwrap_or_else(|| usage()).clone());
            for _ in 0..count {
                // SAFETY: the child only spins and exits.
                match unsafe { libc::fork() } {
                    0 => {
                        spin_for(Duration::from_millis(1));
                        // SAFETY: _exit ends the forked child without running the parent's exit handlers.
                        unsafe { libc::_exit(0) }
                    }
                    // SAFETY: waits for the child just forked; a null status pointer is allowed.
                    pid if pid > 0 => unsafe {
                        libc::waitpid(pid, std::ptr::null_mut(), 0);
                    },
                    _ => panic!("fork failed"),
                }
            }
            std::fs::write(&path, b"").expect("marker");
            std::thread::sleep(Duration::from_secs(arg(&args, 3)));
        }
        "children" => {
            let (path, mib) = (args.get(1).unwrap_or_else(|| usage()).clone(), arg(&args, 2));
            let children: Vec<_> = (0..4)
                .map(|i| {
                    // SAFETY: the child only does file I/O and exits.
                    match unsafe { libc::fork() } {
                        0 => {
                            let file = format!("{path}.{i}");
                            write_synced(&file, (mib << 20) / 4);
                            read_cold(&file);
                            let _ = std::fs::remove_file(&file);
                            // SAFETY: _exit ends the forked child without running the parent's exit handlers.
                            unsafe { libc::_exit(0) }
                        }
                        pid if pid > 0 => pid,
                        _ => panic!("fork failed"),
                    }
                })
                .collect();
            for pid in children {
                let mut status = 0;
                // SAFETY: our own child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child failed");
            }
            std::fs::write(format!("{path}.done"), b"").expect("marker");
            std::thread::sleep(Duration::from_secs(arg(&args, 3)));
        }
        "alloc" => {
            let mut block = vec![0u8; (arg(&args, 1) as usize) << 20];
            for page in block.chunks_mut(4096) {
                page[0] = 1;
            }
            std::hint::black_box(&block);
            std::thread::sleep(Duration::from_secs(arg(&args, 2)));
        }
        _ => usage(),
    }
}
