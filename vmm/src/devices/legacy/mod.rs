//! Port-I/O devices: the 16550 serial console and the i8042 reset line.

pub mod serial;

pub use serial::{ConsoleOutput, PanicWatch, SerialConsole};

/// Port of the i8042 command register; writing [`I8042_RESET`] there resets the machine.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// Port of the i8042 data register.
pub const I8042_DATA_PORT: u16 = 0x60;
/// The "pulse reset line" i8042 command the kernel uses with `reboot=k`.
pub const I8042_RESET: u8 = 0xfe;
