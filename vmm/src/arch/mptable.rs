//! The Intel MultiProcessor table: how a kernel without ACPI learns its CPUs, its IOAPIC and
//! how legacy IRQs are wired. Written into the last KiB of base memory.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{IRQ_MAX, MAX_VCPUS, MPTABLE_ADDR};

/// Local APIC base address.
const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
/// IOAPIC base address.
const IO_APIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const MP_SPEC_REV: u8 = 4;
const BUS_ID_ISA: u8 = 0;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;

/// Errors building the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// More vCPUs than the table has room for.
    #[error("{0} vCPUs requested; the MP table supports at most {MAX_VCPUS}")]
    TooManyCpus(u8),
    /// The table does not fit in guest memory.
    #[error("cannot write the MP table into guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    let sum = bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    0u8.wrapping_sub(sum)
}

/// Build the floating pointer and configuration table for `num_cpus` CPUs whose local APIC
/// IDs are `0..num_cpus`, and return them as one byte image starting at `MPTABLE_ADDR`.
pub fn build(num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > MAX_VCPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus; // the first ID after the CPUs' local APICs
                              // Below 1 MiB: fits the MP table's 32-bit pointer.
    let table_addr = u32::try_from(MPTABLE_ADDR + 16).unwrap_or(u32::MAX);

    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x0600u32.to_le_bytes()); // CPU signature: family 6
        entries.extend_from_slice(&0x0201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, BUS_ID_ISA]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IO_APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    count += 1;
    for irq in 0..=u8::try_from(IRQ_MAX).unwrap_or(u8::MAX) {
        // Type, flags (conforming polarity/trigger), source bus, source IRQ, IOAPIC, pin.
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, BUS_ID_ISA, irq]);
        entries.extend_from_slice(&[ioapic_id, irq]);
        count += 1;
    }
    // LINT0 of every local APIC takes the PIC's ExtINT, LINT1 takes NMI.
    entries.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_EXTINT,
        0,
        0,
        BUS_ID_ISA,
        0,
        0xff,
        0,
    ]);
    entries.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_NMI,
        0,
        0,
        BUS_ID_ISA,
        0,
        0xff,
        1,
    ]);
    count += 2;

    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    // At most MAX_VCPUS processor entries and the fixed ones: far below 64 KiB.
    let table_len16 = u16::try_from(table_len).map_err(|_| MptableError::TooManyCpus(num_cpus))?;
    table.extend_from_slice(&table_len16.to_le_bytes());
    table.push(MP_SPEC_REV);
    table.push(0); // checksum, patched below
    table.extend_from_slice(b"BRIG    "); // OEM ID
    table.extend_from_slice(b"MICROVM     "); // product ID
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut image = Vec::with_capacity(16 + table.len());
    image.extend_from_slice(b"_MP_");
    image.extend_from_slice(&table_addr.to_le_bytes());
    image.push(1); // length in 16-byte units
    image.push(MP_SPEC_REV);
    image.push(0); // checksum, patched below
    image.extend_from_slice(&[0u8; 5]); // feature bytes: 0 = configuration table present
    image[10] = checksum(&image[..16]);
    image.extend_from_slice(&table);
    Ok(image)
}

/// Write the MP table for `num_cpus` CPUs into guest memory.
pub fn write<M: GuestMemory>(mem: &M, num_cpus: u8) -> Result<(), MptableError> {
    let image = build(num_cpus)?;
    mem.write_slice(&image, GuestAddress(MPTABLE_ADDR))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::BASE_MEM_END;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_hold_and_cpus_are_listed() {
        for cpus in [1u8, 2, 8, MAX_VCPUS] {
            let image = build(cpus).unwrap();
            assert_eq!(&image[..4], b"_MP_");
            assert_eq!(sum(&image[..16]), 0, "floating pointer checksum");
            let table = &image[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "configuration table checksum");
            let processors = table[44..].chunks(1).count();
            assert!(processors > 0);
            assert_eq!(table[44], ENTRY_PROCESSOR);
            assert_eq!(table[44 + 3] & CPU_BOOTPROCESSOR, CPU_BOOTPROCESSOR);
            // The whole image fits in the last KiB of base memory.
            assert!(MPTABLE_ADDR + image.len() as u64 <= BASE_MEM_END);
        }
    }

    #[test]
    fn zero_or_too_many_cpus_is_an_error() {
        assert!(build(0).is_err());
        assert!(build(MAX_VCPUS + 1).is_err());
    }
}
