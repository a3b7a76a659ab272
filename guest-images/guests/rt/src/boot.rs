//! The CPL0 boot stub: the only guest code that runs at CPL0.
//!
//! ftvmm enters `_start` in 64-bit mode at CPL0 with identity-mapped,
//! user-accessible paging and RDI pointing at the boot info. On the project's
//! machines CPL0 code is emulated instruction by instruction (about 1 µs each)
//! and cannot run SSE arithmetic, so this stub is a few dozen lines of
//! assembly: it loads our GDT (with DPL3 segments and a TSS whose I/O bitmap
//! opens every port to CPL3), fills the IDT with DPL3 trap gates whose target
//! is the CPL3 code segment, and `iretq`s to `guest_rt_start` at CPL3 with
//! interrupts enabled. From then on everything, interrupt handlers included,
//! runs natively at CPL3.
//!
//! Why these choices:
//! - IOPL stays 0 (software-nested KVM hosts force it to 0), so port I/O at
//!   CPL3 is granted by the TSS I/O bitmap, and CPL3 code never uses
//!   `cli`/`sti`: interrupts stay enabled at CPL3.
//! - Trap gates keep IF set in handlers, so the handler's `iretq` (which at
//!   CPL3 with IOPL 0 cannot restore IF) never leaves interrupts off. A
//!   handler can therefore be interrupted, but only at one of its own exits
//!   to the VMM, the only places ftvmm injects; code that makes no port or
//!   MMIO access is atomic with respect to interrupts.
//! - Nothing returns to CPL0 after boot (on software-nested hosts neither
//!   `int n` nor SYSCALL reaches a CPL0 handler of the guest). A guest that
//!   must run privileged instructions (RDMSR, RDTSC at CPL0) defines
//!   `guest_cpl0_hook`, a few lines of assembly the stub calls just before
//!   dropping to CPL3.
//! - Without a privilege change the CPU pushes the interrupt frame on the
//!   interrupted stack, so guests are built with `-C no-redzone`.

use core::arch::global_asm;

/// Selector of the DPL3 data segment (GDT entry 3, RPL 3).
pub const USER_DS: u16 = 0x1b;
/// Selector of the DPL3 64-bit code segment (GDT entry 4, RPL 3).
pub const USER_CS: u16 = 0x23;
/// Number of IDT vectors with a handler: the 32 exceptions and 16 PIC lines.
pub const HANDLED_VECTORS: usize = 48;

global_asm!(
    r#"
    .section .text.boot, "ax"
    .global _start
    .code64
_start:
    cli
    lea rsp, [rip + boot_stack_top]
    mov r15, rdi

    lgdt [rip + gdt_ptr]

    /* TSS descriptor: its base is only known after linking, so split it here. */
    lea rax, [rip + tss]
    lea rcx, [rip + gdt_tss]
    mov word ptr [rcx], 104 + 8192
    mov word ptr [rcx + 2], ax
    mov rdx, rax
    shr rdx, 16
    mov byte ptr [rcx + 4], dl
    mov byte ptr [rcx + 5], 0x89
    mov byte ptr [rcx + 6], 0
    shr rdx, 8
    mov byte ptr [rcx + 7], dl
    shr rdx, 8
    mov dword ptr [rcx + 8], edx
    mov dword ptr [rcx + 12], 0

    /* The I/O bitmap follows the TSS: all zero, every port open to CPL3;
       the byte after it is the required all-ones terminator. */
    mov word ptr [rax + 102], 104
    mov byte ptr [rax + 104 + 8192], 0xff
    mov ax, 0x28
    ltr ax

    /* IDT: trap gates, selector USER_CS, no IST, DPL3, present. */
    lea rsi, [rip + isr_table]
    lea rdi, [rip + idt]
    mov ecx, 48
2:
    mov rax, qword ptr [rsi]
    mov word ptr [rdi], ax
    mov word ptr [rdi + 2], 0x23
    mov byte ptr [rdi + 4], 0
    mov byte ptr [rdi + 5], 0xef
    shr rax, 16
    mov word ptr [rdi + 6], ax
    shr rax, 16
    mov dword ptr [rdi + 8], eax
    mov dword ptr [rdi + 12], 0
    add rsi, 8
    add rdi, 16
    dec ecx
    jnz 2b

    lidt [rip + idt_ptr]

    /* The guest's own CPL0 work, if it has any (see `guest_cpl0_hook`). */
    call guest_cpl0_hook

    /* Drop to CPL3 with interrupts enabled. The stack is entered as if by a
       call (RSP = 8 mod 16), as the ABI expects of a function's entry. */
    push 0x1b
    lea rax, [rip + user_stack_top - 8]
    push rax
    push 0x202
    push 0x23
    lea rax, [rip + guest_rt_start]
    push rax
    mov rdi, r15
    iretq

    /* Interrupt entry points, run at CPL3 on the interrupted stack. */
    .section .text, "ax"
    .macro isr_noerr n
isr_\n:
    push 0
    push \n
    jmp isr_common
    .endm
    .macro isr_err n
isr_\n:
    push \n
    jmp isr_common
    .endm

    isr_noerr 0
    isr_noerr 1
    isr_noerr 2
    isr_noerr 3
    isr_noerr 4
    isr_noerr 5
    isr_noerr 6
    isr_noerr 7
    isr_err 8
    isr_noerr 9
    isr_err 10
    isr_err 11
    isr_err 12
    isr_err 13
    isr_err 14
    isr_noerr 15
    isr_noerr 16
    isr_err 17
    isr_noerr 18
    isr_noerr 19
    isr_noerr 20
    isr_err 21
    isr_noerr 22
    isr_noerr 23
    isr_noerr 24
    isr_noerr 25
    isr_noerr 26
    isr_noerr 27
    isr_noerr 28
    isr_err 29
    isr_err 30
    isr_noerr 31
    isr_noerr 32
    isr_noerr 33
    isr_noerr 34
    isr_noerr 35
    isr_noerr 36
    isr_noerr 37
    isr_noerr 38
    isr_noerr 39
    isr_noerr 40
    isr_noerr 41
    isr_noerr 42
    isr_noerr 43
    isr_noerr 44
    isr_noerr 45
    isr_noerr 46
    isr_noerr 47

isr_common:
    /* Save what a Rust call may clobber, and the interrupted SSE/x87 state. */
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    mov rdi, qword ptr [rsp + 72]
    mov rsi, qword ptr [rsp + 80]
    lea rdx, [rsp + 88]
    push rbp
    mov rbp, rsp
    sub rsp, 512
    and rsp, -16
    fxsave64 [rsp]
    call guest_rt_interrupt
    fxrstor64 [rsp]
    mov rsp, rbp
    pop rbp
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    add rsp, 16
    iretq

    .section .rodata, "a"
    .balign 8
isr_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47
    .quad isr_\n
    .endr

    .section .data, "aw"
    .balign 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00cff2000000ffff
    .quad 0x00affa000000ffff
gdt_tss:
    .quad 0
    .quad 0
gdt_end:
    .balign 8
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
    .balign 8
idt_ptr:
    .word 48 * 16 - 1
    .quad idt

    .section .bss, "aw", @nobits
    .balign 16
tss:
    .space 104 + 8192 + 1
    .balign 16
idt:
    .space 48 * 16
    .balign 16
boot_stack:
    .space 4096
boot_stack_top:
    .balign 16
user_stack:
    .space 262144
user_stack_top:
"#
);
