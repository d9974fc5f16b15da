/*
 * irq_stubs.S - interrupt stubs for vectors 32..63 and the IF trampolines (irq.h).
 *
 * Each stub is 16 bytes: push the vector, jump to irq_common, which saves
 * the caller-saved registers and calls irq_dispatch(vector) (irq.c) with a
 * 16-byte aligned stack, then returns with iretq.  Runs at CPL 0 (emulated
 * on kvm_pvm: kept short).
 */
	.text
	.balign 16
	.globl irq_stubs
	.type irq_stubs, @function
irq_stubs:
	.set .Lv, 32
	.rept 32
	.balign 16
	pushq $.Lv
	jmp irq_common
	.set .Lv, .Lv + 1
	.endr
	.balign 16
	.size irq_stubs, . - irq_stubs

	.type irq_common, @function
irq_common:
	/* The CPU aligned RSP to 16 and pushed 5 qwords; plus the vector: aligned. */
	pushq %rax
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	movq 72(%rsp), %rdi		/* the vector */
	subq $8, %rsp			/* 10 qwords pushed since the aligned point */
	cld
	call irq_dispatch
	addq $8, %rsp
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rax
	addq $8, %rsp			/* the vector */
	iretq
	.size irq_common, . - irq_common

/* Installed for a moment on vector 3 (#BP, DPL 3) by irq_enable/irq_disable:
 * int3 is a trap, the frame is RIP, CS, RFLAGS, RSP, SS. */
	.globl irq_if_on_stub, irq_if_off_stub
	.type irq_if_on_stub, @function
irq_if_on_stub:
	orq $0x200, 16(%rsp)
	iretq
	.size irq_if_on_stub, . - irq_if_on_stub
	.type irq_if_off_stub, @function
irq_if_off_stub:
	andq $~0x200, 16(%rsp)
	iretq
	.size irq_if_off_stub, . - irq_if_off_stub

	.section .note.GNU-stack, "", @progbits
