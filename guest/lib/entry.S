/*
 * entry.S - PVH entry, long-mode switch and CPU tables for pykvm test guests.
 *
 * Everything up to the iretq to CPL 3 runs at CPL 0, which kvm_pvm executes
 * in KVM's instruction emulator (~1 us per instruction), so this file keeps
 * the path short: the page tables, GDT, TSS (with its I/O bitmap) and IDT
 * are all *static data* whose address fields the linker fills in (see the
 * __*_lo/mid/hi symbols in guest.ld).  The boot path itself is ~30
 * instructions; nothing is zeroed (the loader zero-fills .bss).
 *
 * Boot flow (README.md has the long version):
 *   pvh_start32    32-bit protected mode, paging off, EBX = hvm_start_info.
 *                  Save EBX, CR3 = pml4, CR4.PAE, EFER.LME, CR0.PG|PE, lgdt,
 *                  far jump to 64-bit code.
 *   start64        segments, kernel stack, ltr, CPUID (TSC kHz), guest_early (no IDT),
 *                  lidt, call guest_early_idt, iretq to CPL 3 (IF=0, IOPL=3).
 *   user_start     CPL 3: guest_exit(main()).
 */

#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define USER_DS   0x18
#define USER_CS   0x20
#define TSS_SEL   0x28

#define MSR_EFER  0xc0000080
#define EFER_LME  (1 << 8)
#define CR0_PE    (1 << 0)
#define CR0_PG    (1 << 31)
#define CR4_PAE   (1 << 5)

/* Page-table entry bits. */
#define PTE_P     0x001
#define PTE_RW    0x002
#define PTE_US    0x004
#define PTE_PWT   0x008
#define PTE_PCD   0x010
#define PTE_PS    0x080

#define KSTACK_SIZE 16384
#define USTACK_SIZE 65536

/* ---- the PVH ELF note (Xen, XEN_ELFNOTE_PHYS32_ENTRY = 18) ------------------
 * namesz 4 ("Xen\0"), descsz 4, in a 4-byte aligned PT_NOTE (QEMU pads the
 * name to the segment's p_align).  QEMU 7.2 reads the descriptor of an ELF64
 * note as 8 bytes, so guest.ld puts 4 zero bytes (.pvh_note_pad) right
 * after the note, outside the PT_NOTE. */
	.section .note.Xen, "a", @note
	.balign 4
	.long 4f - 3f		/* namesz */
	.long 6f - 5f		/* descsz */
	.long 18		/* XEN_ELFNOTE_PHYS32_ENTRY */
3:	.asciz "Xen"
4:	.balign 4
5:	.long pvh_start32
6:	.balign 4

/* ---- 32-bit entry -------------------------------------------------------- */
	.section .text.entry, "ax"
	.code32
	.globl pvh_start32
	.type pvh_start32, @function
pvh_start32:
	/* No stack is needed (and none is valid yet): no push/call before start64. */
	movl %ebx, pvh_start_info_paddr
	movl $pml4, %eax
	movl %eax, %cr3
	movl $CR4_PAE, %eax
	movl %eax, %cr4
	movl $MSR_EFER, %ecx
	movl $EFER_LME, %eax
	xorl %edx, %edx
	wrmsr
	movl $(CR0_PG | CR0_PE), %eax	/* also clears CR0.TS/EM/AM/WP/CD/NW... */
	movl %eax, %cr0
	lgdt gdt_desc
	ljmp $KERNEL_CS, $start64
	.size pvh_start32, . - pvh_start32

/* ---- 64-bit, CPL 0 ------------------------------------------------------- */
	.code64
	.type start64, @function
start64:
	/* DS/ES/FS/GS null (unused in long mode).  Not KERNEL_DS: iretq to CPL 3
	 * nulls DPL-0 data selectors on hardware but kvm_pvm leaves them as
	 * they were, so null ones look the same to a VMM everywhere. */
	movl $KERNEL_DS, %eax
	movl %eax, %ss
	xorl %eax, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %fs
	movl %eax, %gs
	movq $kstack_top, %rsp
	movl $TSS_SEL, %eax
	ltr %ax
	/* The TSC frequency for time.c.  CPUID must run here, at CPL 0: at CPL 3
	 * kvm_pvm does not intercept it, so it returns the *host's* CPUID
	 * (measured: leaf 0x40000000 EAX = 0x40000001 at CPL 3 where KVM's guest
	 * CPUID says 0x40000010 at CPL 0). */
	movl $0x40000000, %eax
	xorl %ecx, %ecx
	cpuid
	cmpl $0x40000010, %eax
	jb 1f
	cmpl $0x4000ffff, %eax		/* not a hypervisor range: ignore */
	ja 1f
	movl $0x40000010, %eax
	xorl %ecx, %ecx
	cpuid
	movl %eax, cpuid_tsc_khz
1:
	call guest_early		/* no IDT: an exception here triple-faults */
	lidt idt_desc
	call guest_early_idt		/* exceptions now reach trap_entry */
	/* iretq frame for CPL 3.  RFLAGS: IF=0 (we poll), IOPL=3 (harmless; on
	 * kvm_pvm it does not stick at CPL 3, which is why the TSS has an I/O
	 * bitmap allowing every port), bit 1 always set. */
	pushq $(USER_DS | 3)
	pushq $ustack_top
	pushq $0x3002
	pushq $(USER_CS | 3)
	pushq $user_start
	iretq
	.size start64, . - start64

/* Weak default hooks: a guest defines its own to override them. */
	.weak guest_early
	.type guest_early, @function
guest_early:
	ret
	.size guest_early, . - guest_early
	.weak guest_early_idt
	.type guest_early_idt, @function
guest_early_idt:
	ret
	.size guest_early_idt, . - guest_early_idt

/* ---- 64-bit, CPL 3 ------------------------------------------------------- */
	.globl user_start
	.type user_start, @function
user_start:
	xorl %ebp, %ebp			/* end of frame-pointer chain */
	call main
	movl %eax, %edi
	call guest_exit
	.size user_start, . - user_start

/* ---- exception and interrupt stubs ----------------------------------------
 * 256 stubs of exactly 16 bytes each in one 4 KiB-aligned block, so the IDT
 * (static, below) can compute stub i's address as isr_stubs + 16 * i.
 * Each stub makes the frame uniform (error code or 0, then the vector) and
 * jumps to trap_entry. */

	.section .text.isr, "ax"
	.balign 4096
	.globl isr_stubs
	.type isr_stubs, @function
isr_stubs:
	.set .Lvec, 0
	.rept 256
	.balign 16
	.if !(.Lvec == 8 || (.Lvec >= 10 && .Lvec <= 14) || .Lvec == 17 || .Lvec == 21 || .Lvec == 29 || .Lvec == 30)
	pushq $0
	.endif
	.byte 0x68			/* pushq $imm32 (imm8 would sign-extend 128..255) */
	.long .Lvec
	jmp trap_entry
	.set .Lvec, .Lvec + 1
	.endr
	.balign 16
isr_stubs_end:
	.size isr_stubs, isr_stubs_end - isr_stubs

/*
 * Common entry.  Frame on the stack (struct trap_frame in trap.c, lowest
 * address first): r15 ... rax, vector, error, rip, cs, rflags, rsp, ss.
 * trap_report() prints the one-line report and returns what to do:
 *   0  re-execute: load a zero-limit IDT and iretq to the faulting context
 *      with every register restored.  The instruction faults again, the
 *      exception cannot be delivered (#GP, then #DF, cannot be delivered
 *      either) and the CPU triple-faults with RIP at the faulting
 *      instruction, where the VMM reports it.
 *   1  stop here: the event is not re-raised by re-execution (traps,
 *      aborts, interrupts): zero-limit IDT and ud2, so the triple fault
 *      happens in trap_stop with the registers of the handler.
 */
	.text
	.type trap_entry, @function
trap_entry:
	pushq %rax
	pushq %rbx
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %rbp
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	cld
	movq %rsp, %rdi			/* struct trap_frame * */
	movq %cr2, %rsi			/* read before anything can fault again */
	call trap_report		/* the stack is 16-byte aligned here */
	lidt idt_zero
	testl %eax, %eax
	jnz trap_stop
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rbp
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rbx
	popq %rax
	addq $16, %rsp			/* vector, error code */
	iretq
	.size trap_entry, . - trap_entry

	.globl trap_stop
	.type trap_stop, @function
trap_stop:
	ud2				/* no IDT: triple fault */
	jmp trap_stop
	.size trap_stop, . - trap_stop

/* ---- static CPU tables ------------------------------------------------------ */
	.section .data.pagetables, "aw"
	.balign 4096
	/* PML4 -> one PDPT -> 4 page directories of 2 MiB pages: identity map of
	 * 0..4 GiB, all user-accessible (U/S=1); 0xc0000000 and up (the virtio-
	 * MMIO windows at 0xd0000000, the APIC/IOAPIC at 0xfe000000..) uncached.
	 * Everything above 4 GiB is not present. */
	.globl pml4, pdpt, pd
	.type pml4, @object
	.size pml4, 4096
pml4:
	.quad pdpt + (PTE_P | PTE_RW | PTE_US)
	.fill 511, 8, 0
	.type pdpt, @object
	.size pdpt, 4096
pdpt:
	.quad pd + 0x0000 + (PTE_P | PTE_RW | PTE_US)
	.quad pd + 0x1000 + (PTE_P | PTE_RW | PTE_US)
	.quad pd + 0x2000 + (PTE_P | PTE_RW | PTE_US)
	.quad pd + 0x3000 + (PTE_P | PTE_RW | PTE_US)
	.fill 508, 8, 0
	.type pd, @object
	.size pd, 4 * 4096
pd:
	.set .Li, 0
	.rept 2048
	.if .Li < 1536
	.quad (.Li << 21) + (PTE_P | PTE_RW | PTE_US | PTE_PS)
	.else
	.quad (.Li << 21) + (PTE_P | PTE_RW | PTE_US | PTE_PS | PTE_PWT | PTE_PCD)
	.endif
	.set .Li, .Li + 1
	.endr

	/* The IDT: 256 interrupt gates (IF cleared on entry), DPL 0 except
	 * vector 3 (#BP, DPL 3, so that int3 at CPL 3 reports as #BP). */
	.balign 4096
	.globl idt
	.type idt, @object
	.size idt, 256 * 16
idt:
	.set .Lvec, 0
	.rept 256
	.word __isr_lo + 16 * .Lvec	/* offset 0..15: stubs don't cross 64 KiB */
	.word KERNEL_CS
	.byte 0				/* IST: none */
	.if .Lvec == 3
	.byte 0xee			/* present, DPL 3, 64-bit interrupt gate */
	.else
	.byte 0x8e			/* present, DPL 0, 64-bit interrupt gate */
	.endif
	.word __isr_mid			/* offset 16..31 */
	.long __isr_hi			/* offset 32..63 */
	.long 0
	.set .Lvec, .Lvec + 1
	.endr
idt_end:

	/* GDT: null, kernel code64, kernel data, user data, user code64 (the
	 * SYSRET order), 16-byte TSS descriptor. */
	.balign 16
	.type gdt, @object
	.size gdt, gdt_end - gdt
gdt:
	.quad 0
	.quad 0x00af9a000000ffff	/* 0x08 code64, DPL 0 */
	.quad 0x00cf92000000ffff	/* 0x10 data, DPL 0 */
	.quad 0x00cff2000000ffff	/* 0x18 data, DPL 3 */
	.quad 0x00affa000000ffff	/* 0x20 code64, DPL 3 */
	/* 0x28 TSS: limit, base 0..15, base 16..23, type 0x89 (present, 64-bit
	 * available TSS), limit 16..19 + flags (byte granular), base 24..31,
	 * base 32..63, reserved. */
	.word tss_end - tss - 1
	.word __tss_lo
	.byte __tss_b2
	.byte 0x89
	.byte 0
	.byte __tss_b3
	.long __tss_hi
	.long 0
gdt_end:

	.balign 8
	.word 0, 0, 0
gdt_desc:				/* limit, base: 32-bit lgdt reads 6 bytes */
	.word gdt_end - gdt - 1
	.quad gdt
	.word 0, 0, 0
idt_desc:
	.word idt_end - idt - 1
	.quad idt
	.word 0, 0, 0
idt_zero:				/* limit 0: no vector can be delivered */
	.word 0
	.quad 0

	/* 64-bit TSS: only RSP0 (the stack for events from CPL 3) and the I/O
	 * permission bitmap matter.  The bitmap allows all 65536 ports: 8192 zero
	 * bytes plus the terminating 0xff byte, inside the TSS limit. */
	.balign 16
	.globl tss
	.type tss, @object
	.size tss, tss_end - tss
tss:
	.long 0
	.quad kstack_top		/* rsp0 */
	.quad 0, 0			/* rsp1, rsp2 */
	.quad 0
	.fill 7, 8, 0			/* ist1..7: unused */
	.quad 0
	.word 0
	.word tss_iopb - tss		/* I/O map base */
tss_iopb:
	.fill 8192, 1, 0
	.byte 0xff
tss_end:

	.balign 8
	.globl pvh_start_info_paddr
pvh_start_info_paddr:
	.quad 0				/* EBX at entry; the high half stays 0 */
	.globl cpuid_tsc_khz
cpuid_tsc_khz:
	.long 0				/* CPUID 0x40000010 EAX, read at CPL 0; 0 = none */

/* ---- stacks (.bss: zero-filled by the loader, never cleared here) ----------- */
	.section .bss.stacks, "aw", @nobits
	.balign 4096
	.globl kstack_bottom, kstack_top, ustack_bottom, ustack_top
kstack_bottom:
	.skip KSTACK_SIZE
kstack_top:
ustack_bottom:
	.skip USTACK_SIZE
ustack_top:

	.section .note.GNU-stack, "", @progbits
