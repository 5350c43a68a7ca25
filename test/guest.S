/*
 * The test guest: runs in 64-bit long mode on identity-mapped page tables
 * that the snapshot holds, so KVM itself faults every page it touches
 * (the page tables and this code included) through the handler.
 *
 * In:  rsi = first guest-physical byte, rcx = length (a multiple of 8),
 *      rdx = where to store the result.
 * Out: rax = hash of the range, also stored at [rdx]; then an I/O exit on
 *      port 0x10. The hash mixes each qword with its address, so a page
 *      served at the wrong place changes it.
 */
	.text
	.code64
	.globl	guest_code_start, guest_code_end
guest_code_start:
	xorq	%rax, %rax
1:	rolq	$5, %rax
	xorq	(%rsi), %rax
	addq	%rsi, %rax
	addq	$8, %rsi
	subq	$8, %rcx
	jnz	1b
	movq	%rax, (%rdx)
	outb	%al, $0x10
	hlt
guest_code_end:
	.section .note.GNU-stack,"",@progbits
