//! Loads a guest ELF image into guest memory.
//!
//! The image is validated first (so a bad image gets a precise one-line error)
//! and then loaded by linux-loader. The executable segments are remembered:
//! the RDTSC rewriter decodes them.

use crate::layout::IMAGE_MIN_ADDR;
use crate::memory::GuestMem;
use linux_loader::loader::{elf::Elf, KernelLoader};
use object::elf::{FileHeader64, PF_X, PT_LOAD};
use object::read::elf::{FileHeader, ProgramHeader};
use object::Endianness;
use std::io::Cursor;
use vm_memory::GuestAddress;

/// A loaded image.
#[derive(Debug, Clone)]
pub struct LoadedImage {
    pub entry: u64,
    /// Executable segments as (guest address, length in the file).
    pub code_segments: Vec<(u64, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("not an x86-64 ELF image: {0}")]
    NotElf(String),
    #[error("the image has no loadable segment")]
    NoSegments,
    #[error("the image loads at {addr:#x}, below the lowest allowed address {IMAGE_MIN_ADDR:#x}")]
    TooLow { addr: u64 },
    #[error("the image does not fit in guest memory: it needs {needed} bytes up to {end:#x}, but guest memory is {mem} bytes (try a larger --mem-mib)")]
    TooBig { end: u64, needed: u64, mem: u64 },
    #[error("the entry point {entry:#x} is not in an executable segment")]
    BadEntry { entry: u64 },
    #[error("loading the image: {0}")]
    Load(String),
}

/// Validates `image` against a guest memory of `mem_size` bytes and loads it.
pub fn load(mem: &GuestMem, mem_size: u64, image: &[u8]) -> Result<LoadedImage, LoadError> {
    let loaded = inspect(image, mem_size)?;
    Elf::load(mem, None, &mut Cursor::new(image), Some(GuestAddress(IMAGE_MIN_ADDR)))
        .map_err(|e| LoadError::Load(e.to_string()))?;
    Ok(loaded)
}

/// Checks the ELF headers and returns the entry point and code segments.
pub fn inspect(image: &[u8], mem_size: u64) -> Result<LoadedImage, LoadError> {
    // The ELF parser reads headers in place and needs them 8-byte aligned.
    let mut words = vec![0u64; image.len().div_ceil(8)];
    for (word, chunk) in words.iter_mut().zip(image.chunks(8)) {
        let mut bytes = [0u8; 8];
        bytes[..chunk.len()].copy_from_slice(chunk);
        *word = u64::from_ne_bytes(bytes);
    }
    // SAFETY: any u64 buffer is also a valid, 8-byte aligned u8 buffer of
    // 8× the length, and `words` outlives this borrow.
    let image = unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), image.len()) };
    let header = FileHeader64::<Endianness>::parse(image).map_err(|e| LoadError::NotElf(e.to_string()))?;
    let endian = header.endian().map_err(|e| LoadError::NotElf(e.to_string()))?;
    if header.e_machine(endian) != object::elf::EM_X86_64 || endian != Endianness::Little {
        return Err(LoadError::NotElf("not a little-endian x86-64 image".into()));
    }
    let phdrs = header.program_headers(endian, image).map_err(|e| LoadError::NotElf(e.to_string()))?;
    let entry = header.e_entry(endian);
    let mut code_segments = Vec::new();
    let mut any = false;
    let mut entry_ok = false;
    for ph in phdrs.iter().filter(|ph| ph.p_type(endian) == PT_LOAD) {
        any = true;
        let addr = ph.p_paddr(endian);
        let memsz = ph.p_memsz(endian);
        let filesz = ph.p_filesz(endian);
        let offset = ph.p_offset(endian);
        if addr < IMAGE_MIN_ADDR {
            return Err(LoadError::TooLow { addr });
        }
        let end =
            addr.checked_add(memsz).ok_or(LoadError::TooBig { end: u64::MAX, needed: u64::MAX, mem: mem_size })?;
        if end > mem_size {
            return Err(LoadError::TooBig { end, needed: end, mem: mem_size });
        }
        if offset.checked_add(filesz).is_none_or(|e| e > image.len() as u64) || filesz > memsz {
            return Err(LoadError::NotElf(format!("segment at {addr:#x} lies outside the file")));
        }
        if ph.p_flags(endian) & PF_X != 0 {
            code_segments.push((addr, filesz));
            entry_ok |= (addr..addr + filesz).contains(&entry);
        }
    }
    if !any {
        return Err(LoadError::NoSegments);
    }
    if !entry_ok {
        return Err(LoadError::BadEntry { entry });
    }
    Ok(LoadedImage { entry, code_segments })
}
