//! Readers of kernel files. Each returns typed readings, never heartbeat JSON.
pub mod cgroup;
pub mod memory;
pub mod model;
pub mod nvml;
pub mod procfs;

/// The whole of a small kernel-generated file (`/proc`, cgroup files). Unlike
/// `std::fs::read_to_string` it asks for no size hint (a `statx` and an `lseek` per file,
/// meaningless for these files), which matters at thousands of reads a second.
pub fn read_small(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let (mut buf, mut len) = (vec![0u8; 4096], 0);
    loop {
        if len == buf.len() {
            buf.resize(len * 2, 0);
        }
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
