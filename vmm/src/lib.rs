//! vmm: ftvmm's virtual machine monitor.
//!
//! Every path from the outside world into the guest goes through this crate:
//! there is no in-kernel irqchip, PIT or kvmclock, so that each input can be
//! recorded on the primary and replayed, at the same position, on the backup.
//!
//! How it is put together (Firecracker's `src/vmm` is the model):
//! - [`cli`] parses the command line into a [`config::VmConfig`] (only
//!   `main.rs` uses it);
//! - [`builder`] turns a configuration into a ready [`run::Vmm`]: the disk,
//!   the serial endpoint, the log or the peer, the machine, the image;
//! - [`run`] is the run loop, mechanism only: exit dispatch to the devices,
//!   input delivery at positions, syncs, snapshots, digest checks; it asks
//!   the FT role through [`run::RoleHooks`] and knows no role;
//! - [`layout`] is the platform's table of addresses, ports and IRQs;
//! - [`vm`] is the KVM VM and its single vCPU, [`boot`] the boot protocol,
//!   [`cpuid`] the fixed CPU model, [`loader`] and [`rdtsc`] the image loader
//!   and RDTSC rewriter, [`clock`] the virtual clock;
//! - [`memory`] is guest memory and its dirty log, below everything that
//!   uses it; [`mac`] MAC addresses;
//! - [`devices`] are the device models, the virtio ones on one virtio-mmio
//!   transport (they import nothing above [`memory`] and [`layout`]);
//!   [`host`] holds their outside ends: the disk's storage, the serial
//!   port's console, the host's TAP device;
//! - [`inputs`] are the external inputs, live or from a log ([`log_io`]:
//!   where the log goes and comes from); [`output`] where the outputs go
//!   (the regimes' trait, the direct one); [`ft`] fault tolerance: the
//!   role, failover and arbitration, join, repair, the output gate and the
//!   held and suppressed regimes, the host NIC's pairing;
//!   [`arbiter`] go-live arbitration; [`digest`] the state digest;
//!   [`snapshot`] the state snapshot format (files and live state
//!   transfer); [`error`] what ends a run; [`status`] the `ftvmm status`
//!   command (a client of another process's metrics server);
//!   [`privileges`] `--run-as`, giving up root once the VM is built;
//!   [`seccomp`] the system calls each kind of thread may make after it.
//!
//! No module imports one that imports it back, no top-level module (a
//! folder counts as one) reaches one that reaches it back: `ft` uses `run`,
//! never the reverse (`tests/module_graph.rs` checks it, that the devices
//! reach nothing above them, and that only `ft` looks inside the role).

pub mod arbiter;
pub mod boot;
pub mod builder;
pub mod check;
pub mod cli;
pub mod clock;
pub mod config;
pub mod cpuid;
pub mod devices;
pub mod digest;
pub mod error;
pub mod ft;
pub mod host;
pub mod inputs;
pub mod kick;
pub mod layout;
pub mod loader;
pub mod log_io;
pub mod mac;
pub mod memory;
pub mod metrics;
pub mod output;
pub mod privileges;
pub mod rdtsc;
pub mod run;
pub mod seccomp;
pub mod snapshot;
pub mod status;
pub mod vm;
pub mod watch;
