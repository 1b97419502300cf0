//! Guest physical memory layout of a Brig microVM.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)            0x0000_0520  IDT (empty)
//! 0x0000_6000  PVH hvm_start_info         0x0000_6100  initrd module entry
//! 0x0000_7000  PVH memory map (e820)      0x0002_0000  kernel command line
//! 0x0009_fc00  MP floating pointer + MP configuration table (last KiB of base memory)
//! 0x0010_0000  kernel (ELF physical addresses), then free memory; initrd at the top of RAM
//! 0xd000_0000  virtio-mmio devices, 4 KiB each, IRQ 5 and up
//! ```

/// Where the GDT lives.
pub const GDT_ADDR: u64 = 0x500;
/// Where the (empty) IDT lives.
pub const IDT_ADDR: u64 = 0x520;
/// `hvm_start_info` for the PVH entry point; passed to the kernel in `%rbx`.
pub const PVH_START_INFO_ADDR: u64 = 0x6000;
/// The PVH module list (one entry: the initrd).
pub const PVH_MODLIST_ADDR: u64 = 0x6100;
/// The PVH memory map.
pub const PVH_MEMMAP_ADDR: u64 = 0x7000;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line we write (the kernel's own limit is 2048 on x86).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the MP table: the last KiB of base memory, where Linux looks for it.
pub const MPTABLE_ADDR: u64 = 0x9fc00;
/// End of base memory (start of the legacy VGA/BIOS hole).
pub const BASE_MEM_END: u64 = 0xa0000;
/// Start of high memory, where the kernel is loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// First virtio-mmio device window.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const MMIO_SIZE: u64 = 0x1000;
/// First IRQ (GSI) handed to virtio-mmio devices; 4 is the serial port.
pub const MMIO_IRQ_BASE: u32 = 5;
/// Highest IRQ the IOAPIC has.
pub const IRQ_MAX: u32 = 23;
/// KVM's TSS (three pages) and identity map page, just below 4 GiB, out of RAM's way.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// See [`KVM_TSS_ADDR`].
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// Smallest guest memory we accept, in MiB.
pub const MEM_MIN_MIB: u64 = 64;
/// Largest guest memory we accept, in MiB: RAM must end below the MMIO window.
pub const MEM_MAX_MIB: u64 = MMIO_BASE >> 20;
/// Largest number of vCPUs (bounded by the MP table's room in the last KiB of base memory).
pub const MAX_VCPUS: u8 = 32;
