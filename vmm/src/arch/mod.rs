//! x86_64 boot: guest memory layout, the PVH start info, the MP table and the vCPU
//! registers the PVH entry point expects.

pub mod cpu;
pub mod layout;
pub mod mptable;
pub mod pvh;
