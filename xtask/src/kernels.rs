//! `cargo xtask test-kernels`: the kernel matrix. Fetches the newest Debian cloud kernel of
//! each suite (a private apt configuration under target/kernels/apt, packages downloaded and
//! unpacked, never installed), extracts each kernel's BTF, runs monitor-user's layout test
//! over them, then boots each kernel in qemu (TCG) with a small initramfs holding the daemon,
//! the loads and the guest checker (`tests/src/bin/hm-guest.rs`), and collects its results
//! from the serial console into a table and target/kernels/matrix.json.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::{json, Value};

/// A kernel row of the matrix: a name and the suites whose newest cloud kernel it is.
struct Suite {
    name: &'static str,
    suites: &'static [&'static str],
}

const SUITES: &[Suite] = &[
    Suite { name: "bullseye", suites: &["bullseye", "bullseye-security"] },
    Suite { name: "bookworm", suites: &["bookworm-security", "bookworm"] },
    Suite { name: "trixie", suites: &["trixie", "trixie-security"] },
    Suite { name: "trixie-backports", suites: &["trixie-backports"] },
    Suite { name: "sid", suites: &["sid"] },
];

const META: &str = "linux-image-cloud-amd64";
/// Lists older than this are refreshed (`--refresh` forces it).
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Size of the raw virtio disk each guest does its storage I/O on (the whole device is
/// written and read back).
const DISK_MIB: u64 = 32;
const HOST_PACKAGES: &[(&str, &str)] =
    &[("qemu-system-x86", "qemu-system-x86_64"), ("busybox-static", "busybox"), ("cpio", "cpio")];

pub struct Opts {
    pub only: Vec<String>,
    pub refresh: bool,
    pub jobs: usize,
    pub timeout: u64,
    pub quick: bool,
    pub fetch_only: bool,
    pub skip_layout: bool,
    /// A daemon binary to put in the guests instead of target/release/hive-monitor.
    pub daemon: Option<PathBuf>,
}

pub fn test_kernels(root: &Path, opts: Opts) -> Result<()> {
    let t_all = Instant::now();
    let dir = root.join("target/kernels");
    fs::create_dir_all(&dir)?;
    let suites: Vec<&Suite> =
        SUITES.iter().filter(|s| opts.only.is_empty() || opts.only.iter().any(|o| o == s.name)).collect();
    if suites.is_empty() {
        bail!("--only names none of {:?}", SUITES.iter().map(|s| s.name).collect::<Vec<_>>());
    }
    host_tools()?;

    // 1. Kernels.
    let t = Instant::now();
    let mirrors = Mirrors::from_host()?;
    let mut kernels = Vec::new();
    let mut downloaded = 0u64;
    for s in &suites {
        let (k, bytes) = fetch_kernel(&dir, &mirrors, s, opts.refresh)
            .with_context(|| format!("fetching the {} kernel", s.name))?;
        downloaded += bytes;
        kernels.push(k);
    }
    let t_fetch = t.elapsed();
    println!(
        "kernels: resolved {} in {:.1} s ({:.1} MB downloaded)",
        kernels.len(),
        t_fetch.as_secs_f64(),
        downloaded as f64 / 1e6
    );

    // 2. BTF, and the layout test over it.
    let t = Instant::now();
    let btf_dir = dir.join("btf");
    fs::create_dir_all(&btf_dir)?;
    for k in &kernels {
        extract_btf(k, &btf_dir).with_context(|| format!("extracting the BTF of {}", k.release))?;
    }
    if opts.fetch_only {
        for k in &kernels {
            println!("{:<17} {:<28} {}", k.suite, k.release, k.packages.join(" "));
        }
        return Ok(());
    }
    let layout = if opts.skip_layout {
        Layout { passed: 0, failed: 0, ok: true, note: "skipped (--skip-layout)".into() }
    } else {
        layout_test(root, &btf_dir)?
    };
    let t_btf = t.elapsed();

    // 3. The binaries for the guest.
    let t = Instant::now();
    crate::build(root)?;
    crate::run(Command::new(crate::cargo()).current_dir(root).args([
        "build",
        "--release",
        "--package",
        "hive-monitor-tests",
        "--bins",
    ]))?;
    let common = common_initramfs(root, &dir, opts.daemon.as_deref())?;
    let t_build = t.elapsed();

    // 4. Boot each kernel.
    let t = Instant::now();
    let results: Arc<Mutex<BTreeMap<usize, Boot>>> = Arc::default();
    let queue: Arc<Mutex<Vec<usize>>> = Arc::new(Mutex::new((0..kernels.len()).rev().collect()));
    let kernels = Arc::new(kernels);
    std::thread::scope(|scope| {
        for _ in 0..opts.jobs.max(1) {
            let (queue, results, kernels, common) =
                (queue.clone(), results.clone(), kernels.clone(), &common);
            let opts = &opts;
            scope.spawn(move || loop {
                let Some(i) = queue.lock().unwrap().pop() else { break };
                let k = &kernels[i];
                println!("kernels: booting {} ({})", k.suite, k.release);
                let boot = boot_retrying_a_hang(k, common, opts);
                println!(
                    "kernels: {} done in {:.1} s: {}",
                    k.suite,
                    boot.seconds,
                    if boot.passed() { "pass" } else { "FAIL" }
                );
                results.lock().unwrap().insert(i, boot);
            });
        }
    });
    let t_boot = t.elapsed();
    let results = std::mem::take(&mut *results.lock().unwrap());

    // 5. Report.
    report(&dir, &kernels, &results, &layout, [t_fetch, t_btf, t_build, t_boot, t_all.elapsed()])
}

// ---------------------------------------------------------------------------------------------
// Host tools.

fn host_tools() -> Result<()> {
    let missing: Vec<&str> = HOST_PACKAGES
        .iter()
        .filter(|(pkg, _)| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", pkg])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("kernels: installing {} on the host", missing.join(" "));
    let apt = |args: &[&str]| {
        crate::run(Command::new("apt-get").env("DEBIAN_FRONTEND", "noninteractive").args(args))
    };
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(&missing);
    if apt(&install).is_err() {
        apt(&["update", "-qq"])?;
        apt(&install)?;
    }
    for (pkg, exe) in HOST_PACKAGES {
        if !Command::new("sh").args(["-c", &format!("command -v {exe}")]).output()?.status.success() {
            bail!("{pkg} is installed but {exe} is not on PATH");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The Debian archive, through a private apt configuration.

/// The archive and security URIs and keyring of the host's own apt configuration.
struct Mirrors {
    main: String,
    security: String,
    keyring: String,
    /// The host's date checks and proxy settings (`Acquire::Check-Valid-Until` etc.), as
    /// `apt-config dump` prints them: a host whose archive is a dated snapshot turns the
    /// validity check off, and the private configuration must do the same.
    acquire: String,
}

impl Mirrors {
    fn from_host() -> Result<Self> {
        const FILE: &str = "/etc/apt/sources.list.d/debian.sources";
        let text = fs::read_to_string(FILE).with_context(|| format!("reading {FILE}"))?;
        let (mut main, mut security, mut keyring) = (None, None, None);
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(|v| v.trim().to_string()))
            };
            let (Some(uris), Some(suites)) = (field("URIs"), field("Suites")) else { continue };
            if field("Types").is_some_and(|t| !t.split_whitespace().any(|t| t == "deb")) {
                continue;
            }
            let uri = uris.split_whitespace().next().unwrap_or_default().trim_end_matches('/').to_string();
            if suites.split_whitespace().any(|s| s.ends_with("-security")) {
                security.get_or_insert(uri);
            } else {
                main.get_or_insert(uri);
            }
            if let Some(k) = field("Signed-By") {
                keyring.get_or_insert(k);
            }
        }
        let main = main.ok_or_else(|| anyhow!("{FILE} names no archive URI"))?;
        let dump = apt_output(Command::new("apt-config").arg("dump"))?;
        let acquire = dump
            .lines()
            .filter(|l| {
                let key = l.split_whitespace().next().unwrap_or("").to_ascii_lowercase();
                key == "acquire::check-valid-until"
                    || key == "acquire::check-date"
                    || key.starts_with("acquire::http::proxy")
                    || key.starts_with("acquire::https::proxy")
            })
            .map(|l| format!("{l}\n"))
            .collect();
        Ok(Self {
            acquire,
            security: security.ok_or_else(|| anyhow!("{FILE} names no security archive URI"))?,
            main,
            keyring: keyring.unwrap_or_else(|| "/usr/share/keyrings/debian-archive-keyring.gpg".into()),
        })
    }
}

/// A kernel fetched and unpacked.
struct Kernel {
    suite: &'static str,
    /// Debian package version of the image.
    version: String,
    /// `uname -r`.
    release: String,
    packages: Vec<String>,
    vmlinuz: PathBuf,
    config: PathBuf,
    modules: PathBuf,
    work: PathBuf,
}

/// apt-get/apt-cache with this suite's private configuration.
fn apt(conf: &Path, tool: &str) -> Command {
    let mut cmd = Command::new(tool);
    cmd.env("APT_CONFIG", conf).env("DEBIAN_FRONTEND", "noninteractive").env("LC_ALL", "C");
    cmd
}

fn apt_output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `Version` and `Depends` names of the candidate of `pkg`.
fn show(conf: &Path, pkg: &str) -> Result<(String, Vec<String>)> {
    let text = apt_output(apt(conf, "apt-cache").args(["show", "--no-all-versions", pkg]))?;
    let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()));
    let version = field("Version:").ok_or_else(|| anyhow!("no Version for {pkg}"))?;
    let depends = field("Depends:")
        .unwrap_or_default()
        .split(',')
        .flat_map(|alt| alt.split('|'))
        .filter_map(|d| d.split_whitespace().next().map(|n| n.split(':').next().unwrap_or(n).to_string()))
        .collect();
    Ok((version, depends))
}

/// Resolves, downloads (unless cached) and unpacks the newest cloud kernel of `s`. Returns it
/// and the bytes downloaded.
fn fetch_kernel(dir: &Path, m: &Mirrors, s: &Suite, refresh: bool) -> Result<(Kernel, u64)> {
    let aptdir = dir.join("apt").join(s.name);
    for d in [
        "lists/partial",
        "cache/archives/partial",
        "etc/apt.conf.d",
        "etc/preferences.d",
        "etc/sources.list.d",
    ] {
        fs::create_dir_all(aptdir.join(d))?;
    }
    let status = aptdir.join("status");
    if !status.exists() {
        fs::write(&status, "")?;
    }
    let sources: String = s
        .suites
        .iter()
        .map(|suite| {
            let uri = if suite.ends_with("-security") { &m.security } else { &m.main };
            format!("deb [signed-by={}] {uri} {suite} main\n", m.keyring)
        })
        .collect();
    let sources_file = aptdir.join("etc/sources.list");
    let changed = fs::read_to_string(&sources_file).ok().as_deref() != Some(&sources);
    fs::write(&sources_file, &sources)?;
    let conf = aptdir.join("apt.conf");
    let d = aptdir.display();
    // Read instead of the host's configuration (APT_CONFIG is read before Dir::Etc::Parts, so
    // the host's apt.conf.d is not read at all).
    fs::write(
        &conf,
        format!(
            "Dir::Etc \"{d}/etc\";\nDir::Etc::Main \"/dev/null\";\nDir::Etc::Parts \"{d}/etc/apt.conf.d\";\n\
             Dir::Etc::SourceList \"{d}/etc/sources.list\";\nDir::Etc::SourceParts \"{d}/etc/sources.list.d\";\n\
             Dir::Etc::Preferences \"{d}/etc/preferences\";\nDir::Etc::PreferencesParts \"{d}/etc/preferences.d\";\n\
             Dir::State \"{d}\";\nDir::State::Lists \"{d}/lists\";\nDir::State::status \"{d}/status\";\n\
             Dir::Cache \"{d}/cache\";\nAPT::Architecture \"amd64\";\nAPT::Architectures {{ \"amd64\"; }};\n\
             Acquire::Languages \"none\";\nAPT::Sandbox::User \"root\";\n{}",
            m.acquire
        ),
    )?;
    let stamp = aptdir.join("updated");
    let stale = fs::metadata(&stamp)
        .and_then(|m| m.modified())
        .map(|t| SystemTime::now().duration_since(t).unwrap_or_default() > LISTS_MAX_AGE)
        .unwrap_or(true);
    let updated = refresh || changed || stale;
    if updated {
        println!("kernels: apt-get update ({})", s.suites.join(" "));
        let out = apt(&conf, "apt-get").args(["update", "-qq"]).output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || err.contains("W: ") || err.contains("E: ") {
            bail!("apt-get update for {} failed: {}", s.name, err.trim());
        }
        fs::write(&stamp, "")?;
    }

    // The metapackage → linux-image-<release> → the packages of that release it needs;
    // resolved again only when the lists changed.
    let resolved = aptdir.join("resolved.json");
    let cached: Option<(String, String, BTreeMap<String, String>)> =
        if updated { None } else { fs::read(&resolved).ok().and_then(|b| serde_json::from_slice(&b).ok()) };
    let (image, release, packages) = match cached {
        Some(c) => c,
        None => {
            let r = resolve(&conf)?;
            fs::write(&resolved, serde_json::to_vec(&r)?)?;
            r
        }
    };
    let version = packages[&image].clone();

    let debs = dir.join("debs");
    fs::create_dir_all(&debs)?;
    let mut bytes = 0;
    let mut files = Vec::new();
    for (p, v) in &packages {
        let file = debs.join(format!("{p}_{}_amd64.deb", v.replace(':', "%3a")));
        if !file.exists() {
            println!("kernels: downloading {p} {v}");
            crate::run(apt(&conf, "apt-get").current_dir(&debs).args([
                "download",
                "-qq",
                &format!("{p}={v}"),
            ]))?;
            if !file.exists() {
                bail!("apt-get download {p}={v} left no {}", file.display());
            }
            bytes += fs::metadata(&file)?.len();
        }
        files.push(file);
    }

    let work = dir.join(s.name);
    let tree = work.join("root");
    let stamp = work.join("unpacked");
    let want = format!("{release} {version}\n");
    if fs::read_to_string(&stamp).ok().as_deref() != Some(&want) {
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(&tree)?;
        for f in &files {
            crate::run(Command::new("dpkg-deb").arg("-x").arg(f).arg(&tree))?;
        }
        fs::write(&stamp, &want)?;
    }
    let find = |candidates: &[String]| -> Result<PathBuf> {
        candidates
            .iter()
            .map(|c| tree.join(c))
            .find(|p| p.exists())
            .ok_or_else(|| anyhow!("none of {candidates:?} in {}", tree.display()))
    };
    let r = &release;
    Ok((
        Kernel {
            suite: s.name,
            vmlinuz: find(&[format!("boot/vmlinuz-{r}"), format!("usr/lib/modules/{r}/vmlinuz")])?,
            config: find(&[
                format!("boot/config-{r}"),
                format!("usr/lib/modules/{r}/config"),
                format!("lib/modules/{r}/config"),
            ])?,
            modules: find(&[format!("lib/modules/{r}"), format!("usr/lib/modules/{r}")])?,
            version,
            packages: packages.keys().cloned().collect(),
            release: release.clone(),
            work,
        },
        bytes,
    ))
}

/// (image package, kernel release, package → version) of the candidate cloud kernel.
fn resolve(conf: &Path) -> Result<(String, String, BTreeMap<String, String>)> {
    let (_, meta_deps) = show(conf, META)?;
    let image = meta_deps
        .iter()
        .find(|d| d.starts_with("linux-image-") && d.as_str() != META)
        .ok_or_else(|| anyhow!("{META} depends on no linux-image-* package: {meta_deps:?}"))?
        .clone();
    let release = image.trim_start_matches("linux-image-").to_string();
    let mut todo = vec![image.clone()];
    let mut packages: BTreeMap<String, String> = BTreeMap::new();
    while let Some(p) = todo.pop() {
        if packages.contains_key(&p) {
            continue;
        }
        let (version, deps) = show(conf, &p)?;
        // From 7.x the image is empty: its linux-binary-*, linux-modules-* and linux-base-*
        // of the same release hold the kernel, the modules and the config.
        todo.extend(deps.into_iter().filter(|d| d.starts_with("linux-") && d.ends_with(&release)));
        packages.insert(p, version);
    }
    Ok((image, release, packages))
}

// ---------------------------------------------------------------------------------------------
// BTF.

/// Compression magics and their decompressors, as Linux's scripts/extract-vmlinux tries them.
const MAGICS: &[(&[u8], &[&str])] = &[
    (b"\x1f\x8b\x08", &["gzip", "-dc"]),
    (b"\xfd7zXZ\x00", &["xz", "-dc"]),
    (b"BZh", &["bzip2", "-dc"]),
    (b"\x5d\x00\x00\x00", &["xz", "-dc", "--format=lzma"]),
    (b"\x89LZO", &["lzop", "-dc"]),
    (b"\x02\x21\x4c\x18", &["lz4", "-dc"]),
    (b"\x28\xb5\x2f\xfd", &["zstd", "-dc"]),
];

/// Feeds `input` to `cmd` and returns what it printed, whatever its exit status (a
/// decompressor complains about the bytes after the stream, having written the stream).
fn filter(cmd: &[&str], input: &[u8]) -> Option<Vec<u8>> {
    let mut child = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdin = child.stdin.take()?;
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let mut out = Vec::new();
    let _ = child.stdout.take()?.read_to_end(&mut out);
    let _ = child.wait();
    let _ = writer.join();
    Some(out)
}

/// The ELF vmlinux inside a bzImage: the first compressed stream, at any of its magic's
/// offsets, that decompresses to an ELF file.
fn extract_vmlinux(vmlinuz: &[u8]) -> Result<Vec<u8>> {
    for (magic, cmd) in MAGICS {
        let mut from = 0;
        while let Some(pos) = vmlinuz[from..].windows(magic.len()).position(|w| w == *magic) {
            let at = from + pos;
            if let Some(out) = filter(cmd, &vmlinuz[at..]) {
                if out.starts_with(b"\x7fELF") {
                    return Ok(out);
                }
            }
            from = at + 1;
        }
    }
    bail!("no compressed ELF image found")
}

fn extract_btf(k: &Kernel, btf_dir: &Path) -> Result<()> {
    let out = btf_dir.join(format!("{}.btf", k.release));
    if out.exists() {
        return Ok(());
    }
    let vmlinux = extract_vmlinux(&fs::read(&k.vmlinuz)?)?;
    let tmp = k.work.join("vmlinux");
    fs::write(&tmp, vmlinux)?;
    let part = out.with_extension("btf.part");
    crate::run(Command::new("objcopy").args(["-O", "binary", "--only-section=.BTF"]).arg(&tmp).arg(&part))?;
    fs::remove_file(&tmp)?;
    // BTF magic 0xeB9F, little endian.
    if !fs::read(&part)?.starts_with(&[0x9f, 0xeb]) {
        bail!("{}: the .BTF section is missing or not BTF", k.vmlinuz.display());
    }
    fs::rename(&part, &out)?;
    Ok(())
}

/// `cargo test -p monitor-user --lib layout` over the extracted BTF files.
struct Layout {
    passed: u64,
    failed: u64,
    ok: bool,
    note: String,
}

fn layout_test(root: &Path, btf_dir: &Path) -> Result<Layout> {
    println!("kernels: cargo test -p monitor-user --lib layout (HIVE_MONITOR_BTF_DIR={})", btf_dir.display());
    let out = Command::new(crate::cargo())
        .current_dir(root)
        .env("HIVE_MONITOR_BTF_DIR", btf_dir)
        .args(["test", "--package", "monitor-user", "--lib", "layout"])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot start cargo test")?;
    let text = String::from_utf8_lossy(&out.stdout);
    print!("{text}");
    let (mut passed, mut failed) = (0, 0);
    for l in text.lines().filter(|l| l.starts_with("test result:")) {
        let words: Vec<&str> = l.split_whitespace().collect();
        for (i, w) in words.iter().enumerate().skip(1) {
            let n = words[i - 1].parse::<u64>().unwrap_or(0);
            match w.trim_end_matches(';') {
                "passed" => passed += n,
                "failed" => failed += n,
                _ => {}
            }
        }
    }
    let ok = out.status.success();
    let note = if !ok {
        format!("cargo test failed ({})", out.status)
    } else if passed == 0 {
        "no layout test ran (0 tests matched)".into()
    } else {
        String::new()
    };
    Ok(Layout { passed, failed, ok, note })
}

// ---------------------------------------------------------------------------------------------
// Initramfs.

const INIT: &str = r#"#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
ip link set lo up
for m in $(cat /modules.load 2>/dev/null); do
    insmod "/modules/$m" || echo "HM-INFO insmod $m failed"
done
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 0.2; done
echo "HM-BOOT $(uname -r) $(cut -d' ' -f1 /proc/uptime)"
/bin/hm-guest --disk /dev/vda --disk-mib @DISK_MIB@ @QUICK@
echo "HM-EXIT $?"
poweroff -f
"#;

/// The part of every guest's initramfs that does not depend on the kernel: busybox, the
/// daemon, the loads, the checker and their shared libraries, as a newc cpio archive.
fn common_initramfs(root: &Path, dir: &Path, daemon: Option<&Path>) -> Result<PathBuf> {
    let stage = dir.join("initramfs/common");
    let _ = fs::remove_dir_all(&stage);
    for d in ["bin", "dev", "proc", "sys", "tmp", "run", "modules", "etc"] {
        fs::create_dir_all(stage.join(d))?;
    }
    let busybox = which("busybox")?;
    fs::copy(&busybox, stage.join("bin/busybox"))?;
    std::os::unix::fs::symlink("busybox", stage.join("bin/sh"))?;
    let release = root.join("target/release");
    let mut libs = BTreeSet::new();
    for exe in ["hive-monitor", "hm-guest", "hm-load"] {
        let src = match daemon {
            Some(d) if exe == "hive-monitor" => d.to_path_buf(),
            _ => release.join(exe),
        };
        fs::copy(&src, stage.join("bin").join(exe)).with_context(|| format!("copying {}", src.display()))?;
        libs.extend(shared_libraries(&src)?);
    }
    for lib in libs {
        let to = stage.join(lib.strip_prefix("/").unwrap_or(&lib));
        fs::create_dir_all(to.parent().expect("a library has a directory"))?;
        fs::copy(&lib, &to).with_context(|| format!("copying {}", lib.display()))?;
    }
    let out = dir.join("initramfs/common.cpio");
    cpio(&stage, &out)?;
    Ok(out)
}

fn which(exe: &str) -> Result<PathBuf> {
    let out = Command::new("sh").args(["-c", &format!("command -v {exe}")]).output()?;
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if p.is_empty() {
        bail!("{exe} not found");
    }
    Ok(fs::canonicalize(p)?)
}

/// The libraries `ldd` resolves for `exe`, the dynamic loader included.
fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(exe).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for l in text.lines() {
        let path = match l.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => l.split_whitespace().next().filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

fn cpio(stage: &Path, out: &Path) -> Result<()> {
    let file = fs::File::create(out)?;
    let status = Command::new("sh")
        .current_dir(stage)
        .args(["-c", "find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet"])
        .stdout(file)
        .status()?;
    if !status.success() {
        bail!("cpio of {} failed", stage.display());
    }
    Ok(())
}

/// Whether `CONFIG_<name>` is built in (`y`), a module (`m`) or absent.
fn config_value(config: &str, name: &str) -> Option<char> {
    config.lines().find_map(|l| l.strip_prefix(&format!("CONFIG_{name}="))?.chars().next())
}

/// Decompressed module file contents.
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    let raw = fs::read(path)?;
    let name = path.to_string_lossy();
    let cmd: Option<&[&str]> = if name.ends_with(".xz") {
        Some(&["xz", "-dc"])
    } else if name.ends_with(".zst") {
        Some(&["zstd", "-dc"])
    } else if name.ends_with(".gz") {
        Some(&["gzip", "-dc"])
    } else {
        None
    };
    match cmd {
        Some(cmd) => filter(cmd, &raw)
            .filter(|o| o.starts_with(b"\x7fELF"))
            .ok_or_else(|| anyhow!("cannot decompress {name}")),
        None => Ok(raw),
    }
}

/// `depends=` of a module's .modinfo.
fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    ko.split(|b| *b == 0)
        .find(|s| s.starts_with(key))
        .map(|s| {
            String::from_utf8_lossy(&s[key.len()..])
                .split(',')
                .filter(|d| !d.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The modules the guest needs for its disk (virtio_pci, virtio_blk when they are not built
/// in) with their dependencies, decompressed into `stage/modules`, and their load order.
fn kernel_modules(k: &Kernel, stage: &Path) -> Result<Vec<String>> {
    let config = fs::read_to_string(&k.config)?;
    let mut wanted = Vec::new();
    for (opt, module) in [("VIRTIO_PCI", "virtio_pci"), ("VIRTIO_BLK", "virtio_blk")] {
        match config_value(&config, opt) {
            Some('y') => {}
            Some('m') => wanted.push(module.to_string()),
            other => bail!("{}: CONFIG_{opt} is {other:?}", k.release),
        }
    }
    // Module name (dashes as underscores) → file, over the whole modules tree.
    let mut files = BTreeMap::new();
    let mut stack = vec![k.modules.clone()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)?.flatten() {
            let p = e.path();
            if e.file_type()?.is_dir() {
                stack.push(p);
            } else if let Some(name) = p.file_name().and_then(|n| n.to_str()) {
                if let Some(stem) = name.split(".ko").next().filter(|_| name.contains(".ko")) {
                    files.insert(stem.replace('-', "_"), p.clone());
                }
            }
        }
    }
    // Depth first, dependencies before dependants.
    fn visit(
        name: &str,
        files: &BTreeMap<String, PathBuf>,
        stage: &Path,
        order: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> Result<()> {
        let name = name.replace('-', "_");
        if !seen.insert(name.clone()) {
            return Ok(());
        }
        // Not a module file: built in.
        let Some(path) = files.get(&name) else { return Ok(()) };
        let ko = module_bytes(path)?;
        for dep in module_depends(&ko) {
            visit(&dep, files, stage, order, seen)?;
        }
        let file = format!("{name}.ko");
        fs::write(stage.join("modules").join(&file), ko)?;
        order.push(file);
        Ok(())
    }
    let (mut order, mut seen) = (Vec::new(), BTreeSet::new());
    for m in &wanted {
        if !files.contains_key(m) {
            bail!("{}: {m} is a module but no {m}.ko* is under {}", k.release, k.modules.display());
        }
        visit(m, &files, stage, &mut order, &mut seen)?;
    }
    Ok(order)
}

// ---------------------------------------------------------------------------------------------
// Booting.

#[derive(Default)]
struct Boot {
    rows: Vec<Value>,
    seconds: f64,
    /// Seconds from qemu's start to the init's first line.
    boot_seconds: Option<f64>,
    modules: Vec<String>,
    error: Option<String>,
    /// Why an earlier attempt was thrown away: the emulated guest hung before its init ran.
    retried: Option<String>,
}

impl Boot {
    fn failed(e: String) -> Self {
        Self { error: Some(e), ..Default::default() }
    }

    fn passed(&self) -> bool {
        self.error.is_none() && !self.rows.is_empty() && self.rows.iter().all(|r| r["pass"] == true)
    }
}

/// A guest normally reaches its init in under 15 s of emulation; one that has printed nothing
/// by this time has hung in the emulator or the kernel's own start, before any code of ours ran.
const INIT_DEADLINE: Duration = Duration::from_secs(150);

/// Boots `k`, and boots it once more if the first guest hung before its init ran: that hang
/// (seen once in CI, under TCG, with an empty console) says nothing about the monitor, and a
/// failure after the init started is never retried.
fn boot_retrying_a_hang(k: &Kernel, common: &Path, opts: &Opts) -> Boot {
    let attempt = || boot(k, common, opts).unwrap_or_else(|e| Boot::failed(format!("{e:#}")));
    let first = attempt();
    if first.error.is_none() || first.boot_seconds.is_some() {
        return first;
    }
    let why = first.error.unwrap_or_default();
    println!("kernels: {} hung before its init ({why}); booting it once more", k.suite);
    let mut second = attempt();
    second.seconds += first.seconds;
    second.retried = Some(why);
    second
}

fn boot(k: &Kernel, common: &Path, opts: &Opts) -> Result<Boot> {
    let stage = k.work.join("initramfs");
    let _ = fs::remove_dir_all(&stage);
    fs::create_dir_all(stage.join("modules"))?;
    let modules = kernel_modules(k, &stage)?;
    fs::write(stage.join("modules.load"), modules.join("\n"))?;
    let init = INIT
        .replace("@DISK_MIB@", &DISK_MIB.to_string())
        .replace("@QUICK@", if opts.quick { "--quick" } else { "" });
    fs::write(stage.join("init"), init)?;
    fs::set_permissions(stage.join("init"), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let own = k.work.join("own.cpio");
    cpio(&stage, &own)?;
    // The kernel unpacks concatenated archives in turn.
    let initrd = k.work.join("initrd.cpio");
    let mut out = fs::File::create(&initrd)?;
    out.write_all(&fs::read(common)?)?;
    out.write_all(&fs::read(&own)?)?;
    drop(out);
    let disk = k.work.join("disk.img");
    fs::File::create(&disk)?.set_len(DISK_MIB * 1024 * 1024)?;

    let log_path = k.work.join("serial.log");
    let mut log = fs::File::create(&log_path)?;
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg,thread=multi", "-cpu", "max", "-m", "2048", "-smp", "2", "-nic", "none"])
        .args(["-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(&k.vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=raw", disk.display()))
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start qemu-system-x86_64")?;
    let stdout = child.stdout.take().expect("stdout");
    let lines: Arc<Mutex<Vec<(f64, String)>>> = Arc::default();
    let l = lines.clone();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        while r.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let line = String::from_utf8_lossy(&buf).trim_end_matches(['\r', '\n']).to_string();
            l.lock().unwrap().push((started.elapsed().as_secs_f64(), line));
            buf.clear();
        }
    });
    let (status, timed_out) = wait_for_guest(&mut child, &lines, started, opts)?;
    let _ = reader.join();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let seconds = started.elapsed().as_secs_f64();
    let lines = std::mem::take(&mut *lines.lock().unwrap());
    for (t, line) in &lines {
        writeln!(log, "[{t:8.3}] {line}")?;
    }
    let mut b = Boot { seconds, modules, ..Default::default() };
    let mut done = false;
    for (t, line) in &lines {
        // A kernel message can land on the same console line before our marker.
        if let Some(i) = line.find("HM-RESULT ") {
            match serde_json::from_str::<Value>(&line[i + 10..]) {
                Ok(v) => b.rows.push(v),
                Err(e) => b.rows.push(json!({"check": "parse", "figure": "", "pass": false,
                    "note": format!("unparsable result line ({e}): {}", &line[i..])})),
            }
        } else if line.contains("HM-BOOT ") {
            b.boot_seconds.get_or_insert(*t);
        } else if line.contains("HM-DONE") {
            done = true;
        }
    }
    if !done {
        let tail: Vec<&str> = lines.iter().rev().take(15).map(|(_, l)| l.as_str()).collect::<Vec<_>>();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        b.error = Some(format!(
            "{} before the checker finished (qemu {status:?}{}); serial tail: {}",
            match timed_out {
                Some(s) if b.boot_seconds.is_none() => format!("no init after {s} s"),
                Some(s) => format!("timed out after {s} s"),
                None => "guest stopped".into(),
            },
            if stderr.trim().is_empty() { String::new() } else { format!(", stderr: {}", stderr.trim()) },
            tail.join(" | ")
        ));
    }
    Ok(b)
}

/// Waits for qemu to end, killing it at the deadline, or early when the guest has not reached
/// its init in time. Returns qemu's status and, when it was killed, after how many seconds.
fn wait_for_guest(
    child: &mut std::process::Child,
    lines: &Mutex<Vec<(f64, String)>>,
    started: Instant,
    opts: &Opts,
) -> Result<(Option<std::process::ExitStatus>, Option<u64>)> {
    let deadline = started + Duration::from_secs(opts.timeout);
    let init_deadline = started + INIT_DEADLINE.min(Duration::from_secs(opts.timeout));
    let (mut timed_out, mut reached_init) = (None, false);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        let now = Instant::now();
        if !reached_init && now > init_deadline {
            reached_init = lines.lock().unwrap().iter().any(|(_, l)| l.contains("HM-BOOT "));
        }
        let hung = now > init_deadline && !reached_init;
        if now > deadline || hung {
            timed_out = Some(if hung { INIT_DEADLINE.as_secs() } else { opts.timeout });
            let _ = child.kill();
            break child.wait().ok();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    Ok((status, timed_out))
}

// ---------------------------------------------------------------------------------------------
// Report.

fn fmt_num(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// One line of the per-check table.
fn row([kernel, check, figure, monitor, reference, error, bound, source, pass]: [&str; 9], note: &str) {
    println!(
        "{kernel:<29} {check:<23} {figure:<29} {monitor:>13} {reference:>13} {error:>9} {bound:>6} {source:<6} {pass:<4}  {note}"
    );
}

fn report(
    dir: &Path,
    kernels: &[Kernel],
    results: &BTreeMap<usize, Boot>,
    layout: &Layout,
    [fetch, btf, build, boots, total]: [Duration; 5],
) -> Result<()> {
    println!();
    row(["kernel", "check", "figure", "monitor", "reference", "error", "bound", "source", "pass"], "note");
    let mut out_kernels = Vec::new();
    let (mut passed, mut failed) = (0, 0);
    for (i, k) in kernels.iter().enumerate() {
        let b = &results[&i];
        let name = format!("{} {}", k.suite, k.release.split('-').next().unwrap_or(&k.release));
        if let Some(e) = &b.error {
            row([&name, "boot", "", "-", "-", "-", "-", "-", "FAIL"], e);
        }
        if let Some(why) = &b.retried {
            row(
                [&name, "boot retried", "", "-", "-", "-", "-", "-", "-"],
                &format!("first boot thrown away: {why}"),
            );
        }
        for r in &b.rows {
            let unit = r["unit"].as_str().unwrap_or("");
            let error = r["error"].as_f64().map_or("-".into(), |e| format!("{e:.3}{unit}"));
            let bound = r["bound"].as_f64().map_or("-".into(), |e| format!("{e:.3}"));
            row(
                [
                    &name,
                    r["check"].as_str().unwrap_or(""),
                    r["figure"].as_str().unwrap_or(""),
                    &fmt_num(&r["monitor"]),
                    &fmt_num(&r["reference"]),
                    &error,
                    &bound,
                    r["source"].as_str().filter(|s| !s.is_empty()).unwrap_or("-"),
                    if r["pass"] == true { "ok" } else { "FAIL" },
                ],
                r["note"].as_str().unwrap_or(""),
            );
        }
        if b.passed() {
            passed += 1;
        } else {
            failed += 1;
        }
        out_kernels.push(json!({
            "suite": k.suite, "release": k.release, "version": k.version, "packages": k.packages,
            "modules_loaded": b.modules, "seconds": b.seconds, "boot_to_init_seconds": b.boot_seconds,
            "retried": b.retried,
            "error": b.error, "pass": b.passed(), "checks": b.rows,
            "serial_log": k.work.join("serial.log"),
        }));
    }

    // The kernel × check grid.
    let mut checks: Vec<String> = Vec::new();
    for b in results.values() {
        for r in &b.rows {
            let c = r["check"].as_str().unwrap_or("").to_string();
            if !checks.contains(&c) {
                checks.push(c);
            }
        }
    }
    println!();
    print!("{:<42} {:<6}", "kernel", "layout");
    for c in &checks {
        print!(" {c:<w$}", w = c.len().max(4));
    }
    println!();
    for (i, k) in kernels.iter().enumerate() {
        let b = &results[&i];
        let layout = match (layout.ok, layout.passed) {
            (false, _) => "FAIL",
            (true, 0) if layout.note.starts_with("skipped") => "skip",
            (true, 0) => "none",
            (true, _) => "ok",
        };
        print!("{:<42} {:<6}", format!("{} {}", k.suite, k.release), layout);
        for c in &checks {
            let rows: Vec<&Value> = b.rows.iter().filter(|r| r["check"] == c.as_str()).collect();
            let cell = if rows.is_empty() {
                "-"
            } else if rows.iter().all(|r| r["pass"] == true) {
                "ok"
            } else {
                "FAIL"
            };
            print!(" {cell:<w$}", w = c.len().max(4));
        }
        println!("{}", if b.error.is_some() { "  (did not finish)" } else { "" });
    }
    let host = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("host {}: through the normal tests (cargo xtask test), not booted here", host.trim());
    println!(
        "layout test over {} BTF files: {} passed, {} failed{}",
        kernels.len(),
        layout.passed,
        layout.failed,
        if layout.note.is_empty() { String::new() } else { format!(" ({})", layout.note) }
    );
    println!(
        "timings: fetch {:.1} s, BTF + layout test {:.1} s, build {:.1} s, boots {:.1} s ({}), total {:.1} s",
        fetch.as_secs_f64(),
        btf.as_secs_f64(),
        build.as_secs_f64(),
        boots.as_secs_f64(),
        kernels
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{} {:.0} s", k.suite, results[&i].seconds))
            .collect::<Vec<_>>()
            .join(", "),
        total.as_secs_f64()
    );
    let report = dir.join("matrix.json");
    fs::write(
        &report,
        serde_json::to_string_pretty(&json!({
            "host_release": host.trim(),
            "layout_test": {"passed": layout.passed, "failed": layout.failed, "ok": layout.ok, "note": layout.note},
            "kernels": out_kernels,
            "seconds": {"fetch": fetch.as_secs_f64(), "btf_and_layout": btf.as_secs_f64(),
                        "build": build.as_secs_f64(), "boots": boots.as_secs_f64(), "total": total.as_secs_f64()},
        }))?,
    )?;
    println!("matrix written to {}", report.display());
    println!("kernels: {passed} passed, {failed} failed");
    if failed > 0 || !layout.ok {
        bail!("the kernel matrix failed");
    }
    Ok(())
}
