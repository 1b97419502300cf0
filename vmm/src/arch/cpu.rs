//! vCPU state at the PVH entry point: 32-bit protected mode, flat segments, paging off,
//! `%rbx` pointing at `hvm_start_info`; plus CPUID, MSRs, FPU and local APIC setup.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{GDT_ADDR, IDT_ADDR, PVH_START_INFO_ADDR};

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A KVM vCPU ioctl failed.
    #[error("configuring vCPU {cpu}: {what} failed: {source}")]
    Kvm {
        cpu: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// Writing the GDT or IDT failed.
    #[error("cannot write the GDT/IDT into guest memory: {0}")]
    Tables(#[from] vm_memory::GuestMemoryError),
}

// GDT: null, 32-bit flat code, flat data, TSS. Flags+access in the usual descriptor layout.
const GDT: [u64; 4] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff), // code: present, DPL0, exec/read, 4 KiB granular, 32-bit
    gdt_entry(0xc093, 0, 0xfffff), // data: present, DPL0, read/write
    gdt_entry(0x008b, 0, 0xfffff), // TSS (busy)
];
/// The GDT's limit: its size in bytes less one (4 entries of 8 bytes).
#[allow(clippy::cast_possible_truncation)] // 31, computed at compile time
const GDT_LIMIT: u16 = (GDT.len() * 8 - 1) as u16;
const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | (((limit as u64 & 0x000f_0000) >> 16) << 48)
        | ((flags as u64 & 0xf0ff) << 40)
}

fn segment(entry: u64, selector: u16) -> kvm_segment {
    let granular = (entry >> 55) & 1;
    let raw_limit = ((entry >> 32) & 0x000f_0000) | (entry & 0xffff);
    let limit = if granular == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        // At most 20 bits shifted by 12, or'ed with 0xfff: 32 bits.
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Write the GDT and an empty IDT into guest memory (shared by all vCPUs).
pub fn write_descriptor_tables(mem: &GuestMemoryMmap) -> Result<(), CpuError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;
    Ok(())
}

// MSRs Linux expects a firmware to have set. MTRRdefType = enabled + write-back: without it
// all of guest RAM is uncached and the guest crawls.
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn kvm_err(cpu: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Kvm { cpu, what, source }
}

/// Configure vCPU `id` of `count` for the PVH entry at `entry`. `tsc_deadline` says whether
/// KVM emulates the TSC-deadline timer (KVM_CAP_TSC_DEADLINE_TIMER): KVM does not report
/// it in its supported CPUID, and without it the guest calibrates its local APIC timer
/// against the PIT at boot, which costs more than a second under nested virtualization.
pub fn configure(
    vcpu: &VcpuFd,
    id: u8,
    count: u8,
    entry: u64,
    base_cpuid: &CpuId,
    tsc_deadline: bool,
) -> Result<(), CpuError> {
    // CPUID: each vCPU reports its own APIC ID and the topology; we are a hypervisor guest.
    let mut cpuid = base_cpuid.clone();
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ecx |= 1 << 31; // hypervisor present
                if tsc_deadline {
                    e.ecx |= 1 << 24; // TSC-deadline timer
                }
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: more than one logical processor
                }
            }
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid)
        .map_err(kvm_err(id, "KVM_SET_CPUID2"))?;

    let msrs = Msrs::from_entries(&[
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        msr(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ])
    .map_err(|_| CpuError::Kvm {
        cpu: id,
        what: "building the MSR list",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    vcpu.set_msrs(&msrs).map_err(kvm_err(id, "KVM_SET_MSRS"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err(id, "KVM_SET_FPU"))?;

    // Local APIC: LINT0 takes the PIC's ExtINT, LINT1 NMI (as the MP table says).
    let mut lapic = vcpu.get_lapic().map_err(kvm_err(id, "KVM_GET_LAPIC"))?;
    set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic)
        .map_err(kvm_err(id, "KVM_SET_LAPIC"))?;

    // Only the boot vCPU gets the PVH entry state; the others wait for INIT/SIPI.
    if id == 0 {
        let mut sregs = vcpu.get_sregs().map_err(kvm_err(id, "KVM_GET_SREGS"))?;
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = GDT_LIMIT;
        sregs.idt.base = IDT_ADDR;
        sregs.idt.limit = 7;
        let code = segment(GDT[1], CODE_SELECTOR);
        let data = segment(GDT[2], DATA_SELECTOR);
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = segment(GDT[3], TSS_SELECTOR);
        sregs.cr0 = 0x1 | 0x10; // PE, ET
        sregs.cr4 = 0;
        sregs.efer = 0;
        vcpu.set_sregs(&sregs)
            .map_err(kvm_err(id, "KVM_SET_SREGS"))?;

        let regs = kvm_regs {
            rflags: 0x2,
            rip: entry,
            rbx: PVH_START_INFO_ADDR,
            ..Default::default()
        };
        vcpu.set_regs(&regs).map_err(kvm_err(id, "KVM_SET_REGS"))?;
    }
    Ok(())
}

fn msr(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

fn set_lvt_mode(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = regs[offset + i] as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_code_segment_decodes() {
        let cs = segment(GDT[1], CODE_SELECTOR);
        assert_eq!(cs.base, 0);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.type_, 0xb);
        assert_eq!((cs.present, cs.s, cs.db, cs.g, cs.l), (1, 1, 1, 1, 0));
        let tss = segment(GDT[3], TSS_SELECTOR);
        assert_eq!(tss.s, 0);
        assert_eq!(tss.type_, 0xb);
    }

    #[test]
    fn lvt_mode_keeps_other_bits() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0] = 0x30;
        regs[APIC_LVT0 + 2] = 0x01; // mask bit 16
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT0] as u8, 0x30);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x07);
        assert_eq!(regs[APIC_LVT0 + 2] as u8, 0x01);
    }
}
