//! ftvmm's fixed CPU model: the CPUID table every guest sees, identical on
//! every host.
//!
//! The model is built from constants, never copied from the host, so a guest
//! recorded on one machine replays on another. It is a baseline x86-64 CPU
//! (SSE2, CMPXCHG16B, LAHF/SAHF, NX, SYSCALL) and nothing through which the guest could observe host
//! nondeterminism:
//! - no RDRAND (leaf 1 ECX[30]) and no RDSEED (leaf 7 EBX[18]): random numbers
//!   would be inputs we cannot log;
//! - no RDTSCP (0x8000_0001 EDX[27]), no TSC_ADJUST, no TSC-deadline timer, no
//!   invariant-TSC bit (0x8000_0007 EDX[8]) and no TSC frequency leaves: the
//!   guest reads time with RDTSC (which ftvmm rewrites into an exit), the PIT
//!   or the CMOS RTC, never through an untrappable path;
//! - no local APIC or x2APIC (the VMM emulates an 8259 PIC pair instead), no
//!   MONITOR/MWAIT, no performance counters (leaf 0xA absent), no APERF/MPERF;
//! - no XSAVE/AVX (max basic leaf 7, no leaf 0xD): the FPU state is the legacy
//!   FXSAVE area, which the state digest covers exactly;
//! - the hypervisor bit is set, but leaf 0x4000_0000 answers "ftvmm" with no
//!   features: no kvmclock, steal time, async page faults or PV EOI;
//! - one logical processor, APIC ID 0, 36 physical address bits, 48 virtual.
//!
//! The host must support every feature the model advertises; if it does not,
//! ftvmm refuses to start rather than run a different CPU.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// (leaf, subleaf, eax, ebx, ecx, edx)
type Leaf = (u32, u32, u32, u32, u32, u32);

const fn bits(list: &[u32]) -> u32 {
    let mut value = 0;
    let mut i = 0;
    while i < list.len() {
        value |= 1 << list[i];
        i += 1;
    }
    value
}

fn text(s: &[u8; 12]) -> (u32, u32, u32) {
    let word = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    (word(0), word(4), word(8))
}

/// Leaf 1 ECX: CMPXCHG16B, hypervisor. Nothing beyond the x86-64 baseline:
/// it is what every KVM host can offer (software-nested ones included) and
/// what code built for the x86_64 targets assumes.
const LEAF1_ECX: u32 = bits(&[13, 31]);
/// Leaf 1 EDX: FPU, DE, PSE, TSC, MSR, PAE, CX8, SEP, PGE, CMOV, PAT, PSE36,
/// CLFSH, MMX, FXSR, SSE, SSE2.
const LEAF1_EDX: u32 = bits(&[0, 2, 3, 4, 5, 6, 8, 11, 13, 15, 16, 17, 19, 23, 24, 25, 26]);
/// 0x8000_0001 ECX: LAHF/SAHF in 64-bit mode.
const EXT1_ECX: u32 = bits(&[0]);
/// 0x8000_0001 EDX: SYSCALL, NX, long mode.
const EXT1_EDX: u32 = bits(&[11, 20, 29]);

/// The model's leaves.
fn leaves() -> Vec<Leaf> {
    let (v0, v1, v2) = text(b"GenuineIntel");
    let (h0, h1, h2) = text(b"ftvmmftvmmft");
    let brand = *b"ftvmm deterministic x86-64 CPU\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
    let brand_leaf = |n: u32| -> Leaf {
        let at = |i: usize| {
            let o = (n as usize) * 16 + i * 4;
            u32::from_le_bytes([brand[o], brand[o + 1], brand[o + 2], brand[o + 3]])
        };
        (0x8000_0002 + n, 0, at(0), at(1), at(2), at(3))
    };
    // Family 6, model 0x3a, stepping 9: an Ivy Bridge signature, so guests
    // that key quirks off family/model see a CPU with exactly these features.
    let signature = (0x3 << 16) | (0x6 << 8) | (0xa << 4) | 0x9;
    vec![
        (0, 0, 7, v0, v2, v1),
        (1, 0, signature, (1 << 16) | (8 << 8), LEAF1_ECX, LEAF1_EDX),
        (7, 0, 0, 0, 0, 0),
        (0x4000_0000, 0, 0x4000_0000, h0, h1, h2),
        (0x8000_0000, 0, 0x8000_0008, 0, 0, 0),
        (0x8000_0001, 0, 0, 0, EXT1_ECX, EXT1_EDX),
        brand_leaf(0),
        brand_leaf(1),
        brand_leaf(2),
        (0x8000_0007, 0, 0, 0, 0, 0),
        (0x8000_0008, 0, (48 << 8) | 36, 0, 0, 0),
    ]
}

/// The features the model requires of the host, as (leaf, register name, mask).
fn required() -> [(u32, &'static str, u32); 4] {
    [
        (1, "ecx", LEAF1_ECX & !(1 << 31)),
        (1, "edx", LEAF1_EDX),
        (0x8000_0001, "ecx", EXT1_ECX),
        (0x8000_0001, "edx", EXT1_EDX),
    ]
}

/// Why the fixed CPU model cannot be given to the guest here.
#[derive(Debug, thiserror::Error)]
pub enum CpuModelError {
    #[error("this host's KVM lacks features of ftvmm's fixed CPU model: {}", .0.join(", "))]
    Missing(Vec<String>),
    #[error("building the CPUID table: {0}")]
    Table(String),
}

/// Builds the CPUID table, checking the host's KVM can provide every feature.
pub fn model(host_supported: &CpuId) -> Result<CpuId, CpuModelError> {
    let host = host_supported.as_slice();
    let mut missing = Vec::new();
    for (leaf, reg, mask) in required() {
        let entry = host.iter().find(|e| e.function == leaf && e.index == 0);
        let have = entry.map_or(0, |e| if reg == "ecx" { e.ecx } else { e.edx });
        if have & mask != mask {
            missing.push(format!("cpuid {leaf:#x}.{reg} bits {:#x}", mask & !have));
        }
    }
    if !missing.is_empty() {
        return Err(CpuModelError::Missing(missing));
    }
    let entries: Vec<kvm_cpuid_entry2> = leaves()
        .into_iter()
        .map(|(function, index, eax, ebx, ecx, edx)| kvm_cpuid_entry2 {
            function,
            index,
            flags: if function == 7 { KVM_CPUID_FLAG_SIGNIFCANT_INDEX } else { 0 },
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        })
        .collect();
    CpuId::from_entries(&entries).map_err(|e| CpuModelError::Table(format!("{e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32) -> Leaf {
        leaves().into_iter().find(|l| l.0 == function).expect("leaf present")
    }

    #[test]
    fn hides_nondeterministic_features() {
        let (_, _, _, _, ecx1, edx1) = leaf(1);
        assert_eq!(ecx1 & (1 << 30), 0, "RDRAND hidden");
        assert_eq!(ecx1 & (1 << 24), 0, "TSC deadline hidden");
        assert_eq!(ecx1 & (1 << 21), 0, "x2APIC hidden");
        assert_eq!(edx1 & (1 << 9), 0, "APIC hidden");
        assert_ne!(edx1 & (1 << 4), 0, "TSC present: RDTSC is rewritten, not hidden");
        let (_, _, _, ebx7, _, _) = leaf(7);
        assert_eq!(ebx7 & (1 << 18), 0, "RDSEED hidden");
        let (_, _, _, _, _, edx_ext) = leaf(0x8000_0001);
        assert_eq!(edx_ext & (1 << 27), 0, "RDTSCP hidden");
        assert_eq!(leaf(0x8000_0007).5 & (1 << 8), 0, "invariant TSC hidden");
        let (_, _, max, sig0, sig1, sig2) = leaf(0x4000_0000);
        assert_eq!(max, 0x4000_0000, "no paravirtual feature leaves");
        assert_ne!((sig0, sig1, sig2), text(b"KVMKVMKVM\0\0\0"));
        assert!(leaves().iter().all(|l| l.0 != 0x4000_0001), "no KVM feature leaf");
    }

    #[test]
    fn brand_string_is_readable() {
        let mut brand = Vec::new();
        for n in 0..3 {
            let l = leaf(0x8000_0002 + n);
            for r in [l.2, l.3, l.4, l.5] {
                brand.extend_from_slice(&r.to_le_bytes());
            }
        }
        assert!(brand.starts_with(b"ftvmm deterministic x86-64 CPU\0"));
    }
}
