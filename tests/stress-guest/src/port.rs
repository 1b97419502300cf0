//! Port I/O: the serial console (COM1, written without setting the UART up: the VMM's
//! 16550 takes bytes at once), the i8042 reset line, and the time stamp counter.

use core::arch::asm;

const COM1: u16 = 0x3f8;
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Write `bytes` to the console with `rep outsb`: one VM exit carries up to a page.
pub fn console_write(bytes: &[u8]) {
    // SAFETY: `rep outsb` reads `rcx` bytes from `rsi`, which `bytes` covers; it writes
    // only to the port (no memory), and the direction flag is clear (the entry code clears
    // it and nothing sets it).
    unsafe {
        asm!(
            "rep outsb",
            inout("rsi") bytes.as_ptr() => _,
            inout("rcx") bytes.len() => _,
            in("dx") COM1,
            options(nostack, preserves_flags, readonly)
        );
    }
}

/// Ask the VMM to end the VM: the i8042 reset, as `reboot=k` does.
pub fn reset() -> ! {
    loop {
        // SAFETY: a port write; the VMM ends the VM on it.
        unsafe {
            asm!("out dx, al", in("dx") I8042_COMMAND, in("al") I8042_RESET, options(nomem, nostack, preserves_flags));
        }
    }
}

/// The time stamp counter.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc reads a counter; no memory, no side effects.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// A small formatter into a fixed buffer, for console lines.
pub struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    pub const fn new() -> Self {
        Self {
            buf: [0; 256],
            len: 0,
        }
    }

    /// What was formatted so far.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Print the line (with a newline) and clear it.
    pub fn emit(&mut self) {
        self.push(b"\n");
        console_write(&self.buf[..self.len]);
        self.len = 0;
    }

    fn push(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }
}

impl core::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}

/// Print one formatted line on the console.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        let mut line = $crate::port::Line::new();
        let _ = core::fmt::Write::write_fmt(&mut line, format_args!($($arg)*));
        line.emit();
    }};
}
