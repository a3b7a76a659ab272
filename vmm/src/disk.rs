//! Block storage behind the virtio disk: a local raw image file (`--disk
//! PATH`, for unreplicated runs).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Where the disk's blocks live.
pub trait BlockBackend: Send {
    /// Size in bytes.
    fn size(&self) -> u64;
    fn read(&mut self, offset: u64, len: usize) -> std::io::Result<Vec<u8>>;
    fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()>;
    fn flush(&mut self) -> std::io::Result<()>;
}

/// A raw image file (e.g. made by `qemu-img create -f raw`).
pub struct FileBackend {
    file: File,
    size: u64,
}

impl FileBackend {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
        let size = file.metadata()?.len();
        if size < 512 {
            return Err(std::io::Error::other(format!(
                "a disk image must hold at least one 512-byte sector ({size} bytes)"
            )));
        }
        Ok(FileBackend { file, size })
    }
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&mut self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}
