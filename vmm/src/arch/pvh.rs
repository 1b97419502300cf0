//! Loading the kernel and initrd and writing the PVH boot information.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use super::layout::*;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const PAGE_SIZE: u64 = 4096;

/// Errors loading the guest kernel and its boot data.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened.
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The kernel is not an ELF `vmlinux` we can load.
    #[error("kernel {path} is not a loadable x86_64 ELF vmlinux ({reason}); pass the uncompressed vmlinux, not a bzImage")]
    BadKernel { path: PathBuf, reason: String },
    /// The kernel has no PVH entry point.
    #[error(
        "kernel {0} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); build it with CONFIG_PVH=y"
    )]
    NoPvhEntry(PathBuf),
    /// The initrd could not be read.
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The initrd does not fit in guest memory next to the kernel.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory; give the VM more memory")]
    InitrdTooBig { path: PathBuf, size: u64 },
    /// The command line is too long.
    #[error("kernel command line is {0} bytes; the limit is {CMDLINE_MAX_SIZE}")]
    CmdlineTooLong(usize),
    /// Writing boot data into guest memory failed.
    #[error("cannot write {what} into guest memory: {reason}")]
    Write { what: &'static str, reason: String },
}

/// Where the loaded kernel starts executing.
#[derive(Debug, Clone, Copy)]
pub struct EntryPoint {
    /// The PVH 32-bit entry address.
    pub pvh_entry: GuestAddress,
}

/// Load `kernel` (an ELF vmlinux with a PVH note) into `mem`.
pub fn load_kernel(mem: &GuestMemoryMmap, kernel: &Path) -> Result<EntryPoint, BootError> {
    let mut file = File::open(kernel).map_err(|source| BootError::OpenKernel {
        path: kernel.into(),
        source,
    })?;
    let loaded = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(|e| {
        BootError::BadKernel {
            path: kernel.into(),
            reason: e.to_string(),
        }
    })?;
    match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => Ok(EntryPoint { pvh_entry: entry }),
        _ => Err(BootError::NoPvhEntry(kernel.into())),
    }
}

/// Load `initrd` at the top of guest memory (page aligned). Returns (address, size).
pub fn load_initrd(mem: &GuestMemoryMmap, initrd: &Path) -> Result<(GuestAddress, u64), BootError> {
    let data = std::fs::read(initrd).map_err(|source| BootError::ReadInitrd {
        path: initrd.into(),
        source,
    })?;
    let size = data.len() as u64;
    let mem_end = mem.last_addr().raw_value() + 1;
    let too_big = || BootError::InitrdTooBig {
        path: initrd.into(),
        size,
    };
    let start = mem_end.checked_sub(size).ok_or_else(too_big)? & !(PAGE_SIZE - 1);
    // Leave the low 16 MiB (kernel image and early allocations) alone.
    if start < HIMEM_START + (16 << 20) {
        return Err(too_big());
    }
    mem.write_slice(&data, GuestAddress(start))
        .map_err(|e| BootError::Write {
            what: "initrd",
            reason: e.to_string(),
        })?;
    Ok((GuestAddress(start), size))
}

/// Write the NUL-terminated command line.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| BootError::Write {
            what: "command line",
            reason: e.to_string(),
        })
}

/// Write `hvm_start_info`, the memory map and the initrd module entry.
pub fn write_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<(GuestAddress, u64)>,
) -> Result<(), BootError> {
    let mem_end = mem.last_addr().raw_value() + 1;
    let memmap = [
        hvm_memmap_table_entry {
            addr: 0,
            size: MPTABLE_ADDR,
            type_: E820_RAM,
            reserved: 0,
        },
        hvm_memmap_table_entry {
            addr: MPTABLE_ADDR,
            size: BASE_MEM_END - MPTABLE_ADDR,
            type_: E820_RESERVED,
            reserved: 0,
        },
        hvm_memmap_table_entry {
            addr: HIMEM_START,
            size: mem_end - HIMEM_START,
            type_: E820_RAM,
            reserved: 0,
        },
    ];
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: u32::try_from(memmap.len()).unwrap_or(u32::MAX),
        ..Default::default()
    };
    let mut params;
    if let Some((addr, size)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
        params = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_START_INFO_ADDR));
        let module = hvm_modlist_entry {
            paddr: addr.raw_value(),
            size,
            ..Default::default()
        };
        params.set_modules::<hvm_modlist_entry>(&[module], GuestAddress(PVH_MODLIST_ADDR));
    } else {
        params = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_START_INFO_ADDR));
    }
    params.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(PVH_MEMMAP_ADDR));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem).map_err(|e| {
        BootError::Write {
            what: "PVH start info",
            reason: e.to_string(),
        }
    })
}
