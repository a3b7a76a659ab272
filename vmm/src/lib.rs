//! vmm: ftvmm's virtual machine monitor.
//!
//! Owns the KVM VM and its single vCPU ([`vm`]), guest memory and the boot
//! protocol ([`boot`]), the fixed CPUID model ([`cpuid`]), the MSR filter, the
//! image loader ([`loader`]) and RDTSC rewriter ([`rdtsc`]), the device models
//! ([`devices`]) and the disk's storage ([`disk`]), the virtual clock ([`clock`]), the run loop ([`run`]) that
//! takes external inputs live or from a log ([`inputs`]), the serial port's
//! outside world ([`console`]), the fault-tolerance roles and the output rule
//! ([`ft`]), the state digest ([`digest`]), and the `ftvmm` command line
//! ([`cli`]).
//!
//! Every path from the outside world into the guest goes through this crate:
//! there is no in-kernel irqchip, PIT or kvmclock, so that each input can be
//! recorded on the primary and replayed, at the same position, on the backup.

pub mod boot;
pub mod cli;
pub mod clock;
pub mod console;
pub mod cpuid;
pub mod devices;
pub mod digest;
pub mod disk;
pub mod ft;
pub mod inputs;
pub mod loader;
pub mod rdtsc;
pub mod run;
pub mod vm;
