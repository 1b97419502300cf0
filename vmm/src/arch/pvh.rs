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
    /// The initrd does not fit in guest memory above the kernel image.
    #[error(
        "initrd {path} ({size} bytes) would be placed at {initrd_start:#x}..{initrd_end:#x}, \
         over the kernel image at {kernel_start:#x}..{kernel_end:#x} or the memory it uses \
         while booting (an initrd must start at {lowest_start:#x} or above; guest memory \
         ends at {mem_end:#x}); give the VM more memory (--memory) or use a smaller initrd"
    )]
    InitrdOverlapsKernel {
        path: PathBuf,
        size: u64,
        initrd_start: u64,
        initrd_end: u64,
        kernel_start: u64,
        kernel_end: u64,
        lowest_start: u64,
        mem_end: u64,
    },
    /// The initrd is larger than guest memory.
    #[error(
        "initrd {path} ({size} bytes) is larger than guest memory ({mem_end:#x} bytes); \
         give the VM more memory (--memory) or use a smaller initrd"
    )]
    InitrdPastMemory {
        path: PathBuf,
        size: u64,
        mem_end: u64,
    },
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
    /// First address past the kernel image: the highest end of its `PT_LOAD` segments
    /// (`p_paddr + p_memsz`), as linux-loader reports it.
    pub kernel_end: GuestAddress,
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
        PvhBootCapability::PvhEntryPresent(entry) => Ok(EntryPoint {
            pvh_entry: entry,
            kernel_end: GuestAddress(loaded.kernel_end),
        }),
        _ => Err(BootError::NoPvhEntry(kernel.into())),
    }
}

/// Load `initrd` at the top of guest memory (page aligned), above the kernel image that
/// ends at `kernel_end` (see [`EntryPoint::kernel_end`]). Returns (address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    initrd: &Path,
    kernel_end: GuestAddress,
) -> Result<(GuestAddress, u64), BootError> {
    let data = std::fs::read(initrd).map_err(|source| BootError::ReadInitrd {
        path: initrd.into(),
        source,
    })?;
    let size = data.len() as u64;
    let mem_end = mem.last_addr().raw_value() + 1;
    let start = initrd_start(initrd, size, mem_end, kernel_end.raw_value())?;
    mem.write_slice(&data, GuestAddress(start))
        .map_err(|e| BootError::Write {
            what: "initrd",
            reason: e.to_string(),
        })?;
    Ok((GuestAddress(start), size))
}

/// Where an initrd of `size` bytes goes: the highest page-aligned address at which it ends
/// by `mem_end`, provided it starts at or above `kernel_end` and above the low 16 MiB of
/// high memory (the kernel's early allocations).
fn initrd_start(path: &Path, size: u64, mem_end: u64, kernel_end: u64) -> Result<u64, BootError> {
    let start = mem_end
        .checked_sub(size)
        .ok_or_else(|| BootError::InitrdPastMemory {
            path: path.into(),
            size,
            mem_end,
        })?
        & !(PAGE_SIZE - 1);
    // The kernel's image, and the 16 MiB above its load address it may use before it has
    // read the memory map.
    let lowest_start = kernel_end.max(HIMEM_START + (16 << 20));
    if start < lowest_start {
        return Err(BootError::InitrdOverlapsKernel {
            path: path.into(),
            size,
            initrd_start: start,
            initrd_end: start.saturating_add(size),
            kernel_start: HIMEM_START,
            kernel_end,
            lowest_start,
            mem_end,
        });
    }
    Ok(start)
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

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn place(size: u64, mem_end: u64, kernel_end: u64) -> Result<u64, BootError> {
        initrd_start(Path::new("initrd.img"), size, mem_end, kernel_end)
    }

    #[test]
    fn an_initrd_goes_page_aligned_at_the_top_of_memory() {
        let start = place(10 * MIB + 123, 128 * MIB, HIMEM_START + 20 * MIB).unwrap();
        assert_eq!(start % PAGE_SIZE, 0);
        assert!(start + 10 * MIB + 123 <= 128 * MIB);
        assert!(128 * MIB - start < 10 * MIB + 123 + PAGE_SIZE);
    }

    #[test]
    fn an_initrd_that_would_overlap_a_large_kernel_is_refused_with_both_ranges() {
        // 64 MiB of memory, a 40 MiB kernel from 1 MiB (ends at 41 MiB), a 30 MiB initrd:
        // placed at the top it would start at 34 MiB, inside the kernel.
        let kernel_end = HIMEM_START + 40 * MIB;
        let err = place(30 * MIB, 64 * MIB, kernel_end).unwrap_err();
        match &err {
            BootError::InitrdOverlapsKernel {
                initrd_start,
                initrd_end,
                kernel_start,
                kernel_end: end,
                lowest_start,
                ..
            } => {
                assert_eq!(*initrd_start, 34 * MIB);
                assert_eq!(*initrd_end, 64 * MIB);
                assert_eq!(*kernel_start, HIMEM_START);
                assert_eq!(*end, kernel_end);
                assert_eq!(*lowest_start, kernel_end);
            }
            other => panic!("wrong error: {other}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("0x2200000..0x4000000"), "{msg}");
        assert!(msg.contains("0x100000..0x2900000"), "{msg}");
        assert!(
            msg.contains("--memory") && msg.contains("smaller initrd"),
            "{msg}"
        );
    }

    #[test]
    fn an_initrd_that_just_fits_above_the_kernel_is_accepted() {
        let kernel_end = HIMEM_START + 40 * MIB;
        assert_eq!(place(23 * MIB, 64 * MIB, kernel_end).unwrap(), 41 * MIB);
        assert!(place(23 * MIB + 1, 64 * MIB, kernel_end).is_err());
    }

    #[test]
    fn an_initrd_reaching_into_the_kernels_boot_memory_is_refused() {
        // A 2 MiB kernel, but the 16 MiB above 1 MiB stay the kernel's while it boots.
        let err = place(50 * MIB, 64 * MIB, HIMEM_START + 2 * MIB).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("0x100000..0x300000"), "{msg}");
        assert!(msg.contains("at 0x1100000 or above"), "{msg}");
    }

    #[test]
    fn an_initrd_larger_than_memory_is_refused() {
        let err = place(65 * MIB, 64 * MIB, HIMEM_START + MIB).unwrap_err();
        assert!(matches!(err, BootError::InitrdPastMemory { .. }), "{err}");
        assert!(err.to_string().contains("--memory"), "{err}");
    }

    #[test]
    fn load_initrd_writes_the_initrd_into_memory_above_the_kernel() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (64 * MIB) as usize)]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("initrd.img");
        std::fs::write(&path, vec![0xabu8; (8 * MIB) as usize]).unwrap();
        let (addr, size) = load_initrd(&mem, &path, GuestAddress(HIMEM_START + 4 * MIB)).unwrap();
        assert_eq!((addr.raw_value(), size), (56 * MIB, 8 * MIB));
        let mut byte = [0u8; 1];
        mem.read_slice(&mut byte, GuestAddress(63 * MIB)).unwrap();
        assert_eq!(byte, [0xab]);

        let err = load_initrd(&mem, &path, GuestAddress(60 * MIB)).unwrap_err();
        assert!(
            matches!(err, BootError::InitrdOverlapsKernel { .. }),
            "{err}"
        );
    }
}
