//! guest-rt: what every ftvmm guest shares.
//!
//! Owns the boot stub (`boot`), CPL3 interrupt dispatch, port I/O, the
//! console (virtio-console or COM1), the PIC/PIT helpers, the ftvmm
//! platform ports (exit, idle, exit point), the boot info and command
//! line, and the `mem*` symbols a freestanding Rust binary needs.
//!
//! Guests run at CPL3 with interrupts always enabled (see `boot`). Interrupts reach a guest only when it exits
//! to the VMM (port I/O, MMIO...): ftvmm injects them at guest-caused exits so
//! that the backup can inject them at the same point of execution. A guest
//! that wants to be interruptible while it computes calls [`exit_point`] now
//! and then; an idle guest calls [`wait_for_interrupt`].
#![no_std]

pub mod boot;
pub mod console;
pub mod hw;
mod mem;
#[cfg(feature = "net")]
pub mod net;
pub mod virtio;
pub mod virtio_blk;
pub mod virtio_console;
pub mod virtio_net;

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

pub use console::{print_bytes, print_str};

/// Port the guest writes its exit status to; ftvmm exits with that status.
pub const EXIT_PORT: u16 = 0xf4;
/// Port whose write means "halt until an interrupt" (HLT faults at CPL3);
/// a string read of two doublewords idles too and stores the virtual TSC
/// at wake-up ([`wait_for_interrupt_clock`]).
pub const IDLE_PORT: u16 = 0xf5;
/// Port whose 32-bit read returns the low half of the virtual TSC; ftvmm
/// rewrites each RDTSC in a guest image into `in eax, 0xf6` and completes it
/// with RDTSC's full semantics.
pub const TSC_PORT: u16 = 0xf6;
/// The POST diagnostic port, which ftvmm ignores: writing it is a cheap
/// guest-caused exit at which pending interrupts can be injected.
pub const EXIT_POINT_PORT: u16 = 0x80;

/// Status a guest exits with after an unexpected CPU exception.
pub const STATUS_EXCEPTION: u8 = 0xe0;
/// Status a guest exits with after a Rust panic.
pub const STATUS_PANIC: u8 = 0xe1;

/// What ftvmm passes in RDI at entry (see the VMM's boot module), at 0x6000.
///
/// Version 2 of the layout appends a table of virtio-mmio devices to the
/// original four words. A VMM that writes only the first four words leaves
/// the table as it found guest memory (zero, so `virtio_count` reads 0);
/// [`BootInfo::virtio_devices`] validates every slot so that a garbage table
/// yields no devices rather than bogus ones.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    pub magic: u64,
    pub mem_size: u64,
    pub cmdline_addr: u64,
    pub cmdline_len: u64,
    /// Number of valid entries of `virtio` (more than [`MAX_VIRTIO_SLOTS`]
    /// means "the first MAX_VIRTIO_SLOTS").
    pub virtio_count: u64,
    pub virtio: [VirtioSlot; MAX_VIRTIO_SLOTS],
}

/// Entries of the boot info's virtio device table.
pub const MAX_VIRTIO_SLOTS: usize = 4;

/// One virtio-mmio device of the VM, as the boot info describes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioSlot {
    /// Guest-physical address of its registers.
    pub mmio_base: u64,
    /// Size of its register window.
    pub mmio_size: u64,
    /// Virtio device id: 1 = network card, 2 = block device, 3 = console.
    pub device_id: u32,
    /// PIC line of its interrupt.
    pub irq: u32,
}

impl VirtioSlot {
    /// Whether the slot can describe a real device: its window lies in the
    /// 32-bit MMIO hole above guest memory (3 GiB..4 GiB, where ftvmm maps
    /// it), holds the registers and config space, and its IRQ is a PIC line.
    pub fn is_plausible(&self) -> bool {
        const HOLE: core::ops::Range<u64> = 0xc000_0000..0x1_0000_0000;
        HOLE.contains(&self.mmio_base)
            && self.mmio_base.is_multiple_of(0x1000)
            && (0x200..=0x1000_0000).contains(&self.mmio_size)
            && self.mmio_base + self.mmio_size <= HOLE.end
            && (1..=64).contains(&self.device_id)
            && self.irq < 16
            && self.irq != 2
    }
}

/// `b"FTVMBOOT"` as a little-endian u64.
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"FTVMBOOT");

static BOOT_INFO: AtomicUsize = AtomicUsize::new(0);

impl BootInfo {
    /// The boot info ftvmm passed, if it passed a valid one.
    pub fn get() -> Option<&'static BootInfo> {
        let ptr = BOOT_INFO.load(Ordering::Relaxed) as *const BootInfo;
        if ptr.is_null() {
            return None;
        }
        // SAFETY: guest_rt_start stored the pointer ftvmm passed after checking
        // its magic; the page is identity-mapped and never freed.
        let info = unsafe { &*ptr };
        Some(info)
    }

    /// The command line (`ftvmm --cmdline`), empty if there is none.
    pub fn cmdline(&self) -> &'static [u8] {
        if self.cmdline_addr == 0 || self.cmdline_len == 0 || self.cmdline_len > 4096 {
            return &[];
        }
        // SAFETY: ftvmm wrote cmdline_len bytes at cmdline_addr in identity-mapped
        // guest memory that nothing else writes.
        unsafe { core::slice::from_raw_parts(self.cmdline_addr as *const u8, self.cmdline_len as usize) }
    }

    /// Guest memory size in bytes.
    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    /// The plausible entries of the virtio device table, in table order
    /// (at most [`MAX_VIRTIO_SLOTS`]; implausible ones are skipped).
    pub fn virtio_devices(&self) -> impl Iterator<Item = VirtioSlot> + '_ {
        let count = self.virtio_count.min(MAX_VIRTIO_SLOTS as u64) as usize;
        self.virtio[..count].iter().copied().filter(VirtioSlot::is_plausible)
    }
}

/// The value of `key=N` on the command line, or `default`.
pub fn cmdline_u64(key: &str, default: u64) -> u64 {
    let Some(value) = cmdline_str(key) else {
        return default;
    };
    let mut n: u64 = 0;
    for &digit in value {
        if !digit.is_ascii_digit() {
            return default;
        }
        n = n.saturating_mul(10).saturating_add(u64::from(digit - b'0'));
    }
    n
}

/// The value of `key=VALUE` on the command line (words are separated by
/// spaces; the first occurrence wins), or None if the key is absent.
pub fn cmdline_str(key: &str) -> Option<&'static [u8]> {
    let info = BootInfo::get()?;
    info.cmdline()
        .split(|b| *b == b' ')
        .find_map(|word| word.strip_prefix(key.as_bytes()).and_then(|rest| rest.strip_prefix(b"=")))
}

/// End of the loaded image (code, data, bss and stacks); memory above it is free.
pub fn image_end() -> usize {
    extern "C" {
        static __image_end: u8;
    }
    // Only the address of the linker-defined symbol is taken, never its value.
    core::ptr::addr_of!(__image_end) as usize
}

extern "Rust" {
    fn guest_main() -> u8;
}

/// Defines the guest's entry point: `guest_rt::entry!(main)` with
/// `fn main() -> u8`, whose return value becomes ftvmm's exit status.
///
/// `guest_rt::entry!(main, cpl0_hook)` instead declares that the guest
/// defines `guest_cpl0_hook` itself (in assembly): code the boot stub calls at
/// CPL0 just before dropping to CPL3, the only CPL0 code a guest can have.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        core::arch::global_asm!(".global guest_cpl0_hook", "guest_cpl0_hook:", "ret");
        $crate::entry!($main, cpl0_hook);
    };
    ($main:path, cpl0_hook) => {
        #[no_mangle]
        fn guest_main() -> u8 {
            $main()
        }
    };
}

/// First Rust code, at CPL3; entered from the boot stub.
#[no_mangle]
extern "C" fn guest_rt_start(boot: *const BootInfo) -> ! {
    if !boot.is_null() {
        // SAFETY: ftvmm passes the address of a BootInfo in identity-mapped memory;
        // the magic check rejects anything else.
        let magic = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*boot).magic)) };
        if magic == BOOT_MAGIC {
            BOOT_INFO.store(boot as usize, Ordering::Relaxed);
        }
    }
    // SAFETY: guest_main is defined by the guest binary through `entry!`.
    let status = unsafe { guest_main() };
    exit(status)
}

/// Ends the VM with `status`.
pub fn exit(status: u8) -> ! {
    loop {
        hw::outb(EXIT_PORT, status);
    }
}

/// A cheap exit to the VMM, where a pending interrupt can be delivered.
#[inline]
pub fn exit_point() {
    hw::outb(EXIT_POINT_PORT, 0);
}

/// Idles until an interrupt has been handled (HLT faults at CPL3).
///
/// Interrupts are only delivered at exits, so there is no window between
/// the caller's last check of its condition and this exit in which one
/// could slip by unnoticed.
#[inline]
pub fn wait_for_interrupt() {
    hw::outb(IDLE_PORT, 0);
}

/// Like [`wait_for_interrupt`], and returns the virtual TSC at wake-up
/// (what an RDTSC right after it would read, once the interrupt has been
/// handled): the same exit answers both, so a loop that wants the time
/// after idling does not pay a clock exit for it.
///
/// A string read of two doublewords (`rep insd`): KVM stores the answer in
/// memory as it completes the exit, which costs no register ioctls (an
/// answer in EDX would take three more vCPU ioctls, each a vcpu_load on a
/// nested host).
#[inline]
pub fn wait_for_interrupt_clock() -> u64 {
    let mut tsc: u64 = 0;
    // SAFETY: `rep insd` with RCX = 2 writes 8 bytes at RDI, which points at
    // `tsc` (the direction flag is clear, as the ABI guarantees); the port
    // read is an exit to ftvmm, which idles the vCPU and answers the TSC.
    unsafe {
        core::arch::asm!("rep insd", in("dx") IDLE_PORT, inout("rdi") &mut tsc as *mut u64 => _,
            inout("rcx") 2u64 => _, options(nostack, preserves_flags))
    }
    tsc
}

/// Handler for a PIC line, called at CPL3. It can itself be interrupted,
/// but only at its own exits to the VMM (port I/O), by a line of higher
/// priority until it returns (the PIC holds lower ones until the EOI).
pub type IrqHandler = fn(irq: u8);

static IRQ_HANDLERS: [AtomicUsize; 16] = [const { AtomicUsize::new(0) }; 16];
static IRQS_TAKEN: AtomicU64 = AtomicU64::new(0);

/// How many PIC interrupts the guest has taken so far. An idle loop
/// snapshots it before it looks for work and idles only if it is unchanged
/// just before [`wait_for_interrupt`], so that work an interrupt brought in
/// between is never slept on.
pub fn irq_count() -> u64 {
    IRQS_TAKEN.load(Ordering::Acquire)
}

/// Installs `handler` for PIC line `irq` (0..16).
pub fn set_irq_handler(irq: u8, handler: IrqHandler) {
    if let Some(slot) = IRQ_HANDLERS.get(usize::from(irq)) {
        slot.store(handler as usize, Ordering::Release);
    }
}

/// The interrupted context as the CPU pushed it.
#[repr(C)]
pub struct InterruptFrame {
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// Common interrupt entry (from `isr_common`), at CPL3.
#[no_mangle]
extern "C" fn guest_rt_interrupt(vector: u64, error: u64, frame: &InterruptFrame) {
    if vector < 32 {
        console::print_fmt(format_args!("guest exception {} (error {:#x}) at rip {:#x}\n", vector, error, frame.rip));
        exit(STATUS_EXCEPTION);
    }
    let irq = (vector - u64::from(hw::PIC_VECTOR_BASE)) as u8;
    IRQS_TAKEN.fetch_add(1, Ordering::AcqRel);
    let handler = IRQ_HANDLERS.get(usize::from(irq)).map(|slot| slot.load(Ordering::Acquire)).unwrap_or(0);
    if handler != 0 {
        // SAFETY: only set_irq_handler stores into IRQ_HANDLERS, always a valid IrqHandler.
        let handler: IrqHandler = unsafe { core::mem::transmute::<usize, IrqHandler>(handler) };
        handler(irq);
    }
    if !hw::pic_auto_eoi() {
        hw::pic_eoi(irq);
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    console::print_fmt(format_args!("guest panic: {}\n", info));
    exit(STATUS_PANIC)
}

/// A static that hands out one `&'static mut` to its contents: how drivers
/// and guests get large, fixed, heap-free storage (rings, DMA buffers, socket
/// buffers) without `static mut`. Place it in a `static`; an all-zero value
/// lands in .bss and costs nothing in the image.
pub struct Static<T> {
    taken: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the contents are reachable only through the single `&mut` that
// `take` hands out, so sharing the `Static` itself between contexts is fine
// whenever moving a T between them is.
unsafe impl<T: Send> Sync for Static<T> {}

impl<T> Static<T> {
    pub const fn new(value: T) -> Self {
        Static { taken: AtomicBool::new(false), value: UnsafeCell::new(value) }
    }

    /// The contents, the first time only; None afterwards.
    // A `&mut` from a `&` is sound here: the flag hands it out once.
    #[allow(clippy::mut_from_ref)]
    pub fn take(&'static self) -> Option<&'static mut T> {
        if self.taken.swap(true, Ordering::AcqRel) {
            return None;
        }
        // SAFETY: the flag guarantees this is the only reference ever made to
        // the contents, and the static lives forever.
        Some(unsafe { &mut *self.value.get() })
    }
}

/// FNV-1a, 64 bit: the guests' checksum of what they observed.
#[derive(Clone, Copy)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn bytes(&mut self, data: &[u8]) {
        for &b in data {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
}
