//! The 16550 UART on COM1 (port 0x3f8, IRQ 4): the guest console.
//!
//! Output goes to stdout, a file, or nowhere. The console is also where a guest kernel
//! panic shows up, so the writer watches complete lines for the panic banner: the VMM then
//! reports the guest's reset as a crash instead of a clean reboot.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// First port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of ports of a 16550.
pub const COM1_LEN: u16 = 8;
/// IRQ of COM1.
pub const COM1_IRQ: u32 = 4;

const PANIC_BANNER: &str = "Kernel panic - not syncing";
const LINE_MAX: usize = 512;

/// Raises the serial IRQ through an irqfd.
pub struct IrqEvent(pub EventFd);

impl Trigger for IrqEvent {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The first kernel panic line seen on the console, if any.
#[derive(Clone, Default)]
pub struct PanicWatch(Arc<Mutex<Option<String>>>);

impl PanicWatch {
    /// The panic line, if the guest kernel panicked.
    pub fn panic_line(&self) -> Option<String> {
        self.0.lock().ok().and_then(|p| p.clone())
    }
}

/// Console sink that forwards bytes and watches lines for a kernel panic.
pub struct ConsoleOutput {
    sink: Option<Box<dyn Write + Send>>,
    line: Vec<u8>,
    watch: PanicWatch,
}

impl ConsoleOutput {
    /// `sink` = None discards output (the panic watch still works).
    pub fn new(sink: Option<Box<dyn Write + Send>>, watch: PanicWatch) -> Self {
        Self {
            sink,
            line: Vec::with_capacity(LINE_MAX),
            watch,
        }
    }

    fn scan(&mut self, byte: u8) {
        if byte == b'\n' || self.line.len() >= LINE_MAX {
            let text = String::from_utf8_lossy(&self.line);
            if let Some(pos) = text.find(PANIC_BANNER) {
                if let Ok(mut slot) = self.watch.0.lock() {
                    if slot.is_none() {
                        *slot = Some(text[pos..].trim_end().to_string());
                    }
                }
            }
            self.line.clear();
        }
        if byte != b'\n' && byte != b'\r' {
            self.line.push(byte);
        }
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            self.scan(b);
        }
        if let Some(sink) = self.sink.as_mut() {
            // A console that cannot be written must not stop the guest.
            let _ = sink.write_all(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.sink.as_mut() {
            Some(s) => s.flush(),
            None => Ok(()),
        }
    }
}

/// COM1 as the vCPUs see it.
pub struct SerialConsole {
    uart: Serial<IrqEvent, vm_superio::serial::NoEvents, ConsoleOutput>,
}

impl SerialConsole {
    /// A UART that raises `irq` and writes to `out`.
    pub fn new(irq: EventFd, out: ConsoleOutput) -> Self {
        Self {
            uart: Serial::new(IrqEvent(irq), out),
        }
    }

    /// Guest read of register `offset`.
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// Guest write of register `offset`.
    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.uart.write(offset, value) {
            tracing::debug!("serial write failed: {e:?}");
        }
    }

    /// Guest write of `data` to register `offset` from one port I/O exit: a string
    /// instruction (`rep outsb`) may bring several bytes, and each is one write to the
    /// register, in order (not just the first).
    pub fn write_bytes(&mut self, offset: u8, data: &[u8]) {
        for &b in data {
            self.write(offset, b);
        }
    }

    /// Guest read of register `offset` into each byte of `data`, one read each (`rep insb`
    /// takes that many bytes from the receive buffer, not one byte that many times).
    pub fn read_bytes(&mut self, offset: u8, data: &mut [u8]) {
        for b in data {
            *b = self.read(offset);
        }
    }

    /// Flush buffered console output.
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_banner_is_caught_across_writes() {
        let watch = PanicWatch::default();
        let mut out = ConsoleOutput::new(None, watch.clone());
        out.write_all(b"[    1.0] Run /init as init process\r\n[ 1.2] Kernel pan")
            .unwrap();
        assert!(watch.panic_line().is_none());
        out.write_all(b"ic - not syncing: No working init found.\r\n")
            .unwrap();
        assert_eq!(
            watch.panic_line().as_deref(),
            Some("Kernel panic - not syncing: No working init found.")
        );
    }

    /// Transmit holding register, line control register and its divisor latch bit.
    const THR: u8 = 0;
    const LCR: u8 = 3;
    const LCR_DLAB: u8 = 0x80;

    /// A sink the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn console() -> (SerialConsole, Shared) {
        let sink = Shared::default();
        let out = ConsoleOutput::new(Some(Box::new(sink.clone())), PanicWatch::default());
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        (SerialConsole::new(irq, out), sink)
    }

    #[test]
    fn every_byte_of_a_string_write_reaches_the_console() {
        let (mut serial, sink) = console();
        serial.write_bytes(THR, b"one exit, ");
        serial.write_bytes(THR, b"many bytes\n");
        serial.write_bytes(THR, b"!");
        assert_eq!(
            sink.0.lock().unwrap().as_slice(),
            b"one exit, many bytes\n!"
        );
    }

    #[test]
    fn a_string_write_to_the_divisor_latch_is_not_output() {
        let (mut serial, sink) = console();
        serial.write(LCR, LCR_DLAB | 0x03);
        serial.write_bytes(THR, &[0x01, 0x00]);
        serial.write(LCR, 0x03);
        serial.write_bytes(THR, b"ok");
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"ok");
    }

    #[test]
    fn a_string_read_takes_one_byte_of_the_receive_buffer_each() {
        let (mut serial, _) = console();
        serial.uart.enqueue_raw_bytes(b"abc").unwrap();
        let mut got = [0u8; 2];
        serial.read_bytes(THR, &mut got);
        assert_eq!(&got, b"ab");
        let mut rest = [0u8; 1];
        serial.read_bytes(THR, &mut rest);
        assert_eq!(&rest, b"c");
    }

    #[test]
    fn long_lines_without_newline_stay_bounded() {
        let watch = PanicWatch::default();
        let mut out = ConsoleOutput::new(None, watch.clone());
        out.write_all(&vec![b'x'; 100_000]).unwrap();
        assert!(out.line.len() <= LINE_MAX);
        assert!(watch.panic_line().is_none());
    }
}
