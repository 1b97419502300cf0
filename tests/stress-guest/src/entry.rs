//! From the PVH entry (32-bit protected mode, paging off, `%ebx` = the `hvm_start_info`'s
//! physical address) to Rust: identity-map the first 4 GiB with 2 MiB pages (RAM and the
//! virtio-mmio windows at 0xd000_0000 both lie there), enable SSE (`core` uses it), switch
//! to long mode and call `stress_main(start_info)`.

core::arch::global_asm!(
    r#"
    .section .note.Xen, "a"
    .balign 4
    .long 4                     /* name size: "Xen\0" */
    .long 4                     /* descriptor size */
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start
    .balign 4

    .section .bss
    .balign 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pds:    .skip 4 * 4096
stack:  .skip 64 * 1024
stack_top:

    .section .rodata
    .balign 8
gdt:
    .quad 0                     /* null */
    .quad 0x00af9a000000ffff    /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff    /* 0x10: data */
gdt_end:
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

    .section .text.pvh, "ax"
    .code32
    .global pvh_start
pvh_start:
    cli
    cld
    mov $pml4, %edi
    mov $pdpt, %eax
    or $3, %eax
    mov %eax, (%edi)
    /* four page directories, one per GiB */
    mov $pdpt, %edi
    mov $pds, %eax
    or $3, %eax
    mov $4, %ecx
1:
    mov %eax, (%edi)
    add $8, %edi
    add $4096, %eax
    loop 1b
    /* 2048 entries of 2 MiB: present, writable, large */
    mov $pds, %edi
    xor %ecx, %ecx
2:
    mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax
    mov %eax, (%edi,%ecx,8)
    inc %ecx
    cmp $2048, %ecx
    jb 2b

    mov $pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x620, %eax             /* PAE, OSFXSR, OSXMMEXCPT */
    mov %eax, %cr4
    mov $0xc0000080, %ecx       /* EFER */
    rdmsr
    or $0x100, %eax             /* LME */
    wrmsr
    mov %cr0, %eax
    and $0xfffffffb, %eax       /* no EM: SSE instructions run */
    or $0x80000002, %eax        /* PG, MP */
    mov %eax, %cr0
    lgdt gdt_ptr
    ljmp $0x08, $long_mode

    .code64
long_mode:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov $stack_top, %rsp
    mov %ebx, %edi
    call stress_main
3:
    hlt
    jmp 3b
"#,
    options(att_syntax)
);
