//! `brig-vmm`: Brig's virtual machine monitor.
//!
//! A small KVM VMM in the mould of Firecracker: it boots an uncompressed `vmlinux` through
//! PVH with an initramfs, gives the guest a 16550 console and virtio-mmio devices (vsock with
//! a Unix-socket backend), and exits when the guest resets.

// Guest values are narrowed by checked conversions, never by `as` (issue 8).
#![cfg_attr(not(test), warn(clippy::cast_possible_truncation))]

pub mod arch;
pub mod config;
pub mod confine;
pub mod console_file;
pub mod devices;
pub mod guest_warn;
pub mod pid_ns;
pub mod privileges;
pub mod seccomp;
pub mod vm;
pub mod vmm_log;
