//! The RDTSC rewriter.
//!
//! RDTSC cannot be trapped through the KVM API (and on our nested hosts it
//! runs natively at CPL3 and inside KVM at CPL0), so its value would be a
//! host input the backup cannot reproduce. Before the guest runs, every RDTSC
//! in the image's executable segments — found by decoding them with iced-x86,
//! never by scanning for the bytes `0f 31` — is replaced by `in eax, 0xf6`,
//! the same length (2 bytes), which exits to the VMM at any CPL (CPL3 needs
//! IOPL 3, as ftvmm's guests have). The VMM knows the rewritten RIPs and
//! completes the read with RDTSC's exact semantics: EAX = low half, EDX =
//! high half (both zero-extended), flags untouched, value logged.
//!
//! What stays untrappable: RDTSC in code generated or loaded at run time,
//! RDTSC at CPL3 in a guest without IOPL 3 (the rewritten IN faults instead),
//! RDTSCP and RDPID (the CPUID model hides them, so well-behaved guests don't
//! use them), and code hidden from a linear decode (data in code, overlapping
//! instructions). The CPUID model also hides the invariant-TSC and
//! TSC-deadline features, steering guests to the PIT and RTC for timekeeping.

use crate::memory::GuestMem;
use iced_x86::{Decoder, DecoderOptions, Mnemonic};
use std::collections::HashSet;
use vm_memory::{Bytes, GuestAddress};

/// `in eax, imm8` with the TSC port.
const TSC_PORT_READ: [u8; 2] = [0xe5, crate::layout::TSC_PORT as u8];

/// Rewrites every RDTSC in `segments` (guest address, length) and returns
/// the RIPs of the replacement instructions.
pub fn rewrite(mem: &GuestMem, segments: &[(u64, u64)]) -> Result<HashSet<u64>, vm_memory::GuestMemoryError> {
    let mut sites = HashSet::new();
    for &(addr, len) in segments {
        let mut code = vec![0u8; len as usize];
        mem.read_slice(&mut code, GuestAddress(addr))?;
        for (ip, patch) in find_and_patch(&code, addr) {
            mem.write_slice(&patch.bytes, GuestAddress(ip))?;
            sites.insert(patch.site);
        }
    }
    Ok(sites)
}

struct Patch {
    bytes: Vec<u8>,
    /// RIP of the `in` that replaces the RDTSC.
    site: u64,
}

fn find_and_patch(code: &[u8], base: u64) -> Vec<(u64, Patch)> {
    let mut decoder = Decoder::with_ip(64, code, base, DecoderOptions::NONE);
    let mut patches = Vec::new();
    for insn in &mut decoder {
        if insn.mnemonic() != Mnemonic::Rdtsc {
            continue;
        }
        // Prefixed encodings are longer than 2 bytes: pad with NOPs in front.
        let len = insn.len();
        let mut bytes = vec![0x90; len - TSC_PORT_READ.len()];
        bytes.extend_from_slice(&TSC_PORT_READ);
        let site = insn.ip() + (len - TSC_PORT_READ.len()) as u64;
        patches.push((insn.ip(), Patch { bytes, site }));
    }
    patches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_rdtsc_but_not_lookalike_bytes() {
        // mov eax, 0x9090310f (contains 0f 31 as data); rdtsc; shl rdx,32; rdtsc with a
        // redundant prefix; ret
        let code = [
            0xb8, 0x0f, 0x31, 0x90, 0x90, // mov eax, imm32
            0x0f, 0x31, // rdtsc
            0x48, 0xc1, 0xe2, 0x20, // shl rdx, 32
            0x2e, 0x0f, 0x31, // cs rdtsc
            0xc3,
        ];
        let patches = find_and_patch(&code, 0x1000);
        assert_eq!(patches.len(), 2);
        assert_eq!(patches[0].0, 0x1005);
        assert_eq!(patches[0].1.bytes, vec![0xe5, 0xf6]);
        assert_eq!(patches[0].1.site, 0x1005);
        assert_eq!(patches[1].0, 0x100b);
        assert_eq!(patches[1].1.bytes, vec![0x90, 0xe5, 0xf6]);
        assert_eq!(patches[1].1.site, 0x100c);
    }

    #[test]
    fn the_replacement_decodes_as_a_port_read() {
        let mut decoder = Decoder::with_ip(64, &TSC_PORT_READ, 0, DecoderOptions::NONE);
        let insn = decoder.decode();
        assert_eq!(insn.mnemonic(), Mnemonic::In);
        assert_eq!(insn.len(), 2);
    }
}
