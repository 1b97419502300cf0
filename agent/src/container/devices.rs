//! Device access control for cgroup v2: `linux.resources.devices` turned into an eBPF
//! program of type `BPF_PROG_TYPE_CGROUP_DEVICE`, attached to the container's cgroup.
//!
//! cgroup v2 has no `devices.allow` file: the kernel asks a BPF program on every open and
//! mknod of a device node. The program is a straight list of checks, one per rule, last rule
//! first, and the first rule that matches decides; nothing matching means deny. That gives
//! the rules the meaning they had in cgroup v1 and in runc: a later rule overrides an earlier
//! one. Like runc, the device nodes every container gets (null, zero, full, random, urandom,
//! tty, console, ptmx and the pty slaves) stay usable whatever the spec says.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType};

/// One device rule, ready to be compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Allow (true) or deny.
    pub allow: bool,
    /// `BPF_DEVCG_DEV_BLOCK`, `BPF_DEVCG_DEV_CHAR`, or None for any type.
    pub kind: Option<u32>,
    /// None = any major.
    pub major: Option<u32>,
    /// None = any minor.
    pub minor: Option<u32>,
    /// `BPF_DEVCG_ACC_*` bits.
    pub access: u32,
}

const DEV_BLOCK: u32 = 1;
const DEV_CHAR: u32 = 2;
const ACC_MKNOD: u32 = 1;
const ACC_READ: u32 = 2;
const ACC_WRITE: u32 = 4;
const ACC_ALL: u32 = ACC_MKNOD | ACC_READ | ACC_WRITE;

/// Character devices every container may use, as in runc: null, zero, full, random,
/// urandom, tty, console, ptmx, and every pty slave (major 136). Creating nodes (`m`) of any
/// device is allowed too, as in runc: the agent makes the spec's nodes from inside the
/// cgroup, and a node that exists is still only usable if a rule allows reading or writing.
const ALWAYS_ALLOWED: [(u32, Option<u32>); 9] = [
    (1, Some(3)),
    (1, Some(5)),
    (1, Some(7)),
    (1, Some(8)),
    (1, Some(9)),
    (5, Some(0)),
    (5, Some(1)),
    (5, Some(2)),
    (136, None),
];

/// The rules for a spec's `linux.resources.devices`, with the always-allowed devices last
/// (so they win). An unknown access letter or a negative number is a bad spec.
pub fn rules(spec_rules: &[LinuxDeviceCgroup]) -> Result<Vec<Rule>, String> {
    let mut rules = Vec::with_capacity(spec_rules.len() + ALWAYS_ALLOWED.len());
    for r in spec_rules {
        let kind = match r.typ() {
            None | Some(LinuxDeviceType::A) => None,
            Some(LinuxDeviceType::B) => Some(DEV_BLOCK),
            Some(LinuxDeviceType::C | LinuxDeviceType::U) => Some(DEV_CHAR),
            // Pipes are not device nodes: the kernel never asks about them.
            Some(LinuxDeviceType::P) => continue,
        };
        let number = |n: Option<i64>, what: &str| {
            match n {
            None | Some(-1) => Ok(None),
            Some(n) => u32::try_from(n).map(Some).map_err(|_| {
                format!("linux.resources.devices: {what} number {n} is not valid (use -1 or omit it for any)")
            }),
        }
        };
        let access = match r.access().as_deref() {
            None | Some("") => ACC_ALL,
            Some(letters) => letters.chars().try_fold(0, |bits, c| match c {
                'r' => Ok(bits | ACC_READ),
                'w' => Ok(bits | ACC_WRITE),
                'm' => Ok(bits | ACC_MKNOD),
                _ => Err(format!(
                    "linux.resources.devices: access {letters:?} has {c:?}; use only r, w and m"
                )),
            })?,
        };
        rules.push(Rule {
            allow: r.allow(),
            kind,
            major: number(r.major(), "major")?,
            minor: number(r.minor(), "minor")?,
            access,
        });
    }
    for kind in [DEV_CHAR, DEV_BLOCK] {
        rules.push(Rule {
            allow: true,
            kind: Some(kind),
            major: None,
            minor: None,
            access: ACC_MKNOD,
        });
    }
    for (major, minor) in ALWAYS_ALLOWED {
        rules.push(Rule {
            allow: true,
            kind: Some(DEV_CHAR),
            major: Some(major),
            minor,
            access: ACC_ALL,
        });
    }
    Ok(rules)
}

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    code: u8,
    /// dst in the low nibble, src in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

// Opcodes used (classic eBPF encoding).
const LDX_MEM_W: u8 = 0x61; // dst = *(u32 *)(src + off)
const ALU32_AND_K: u8 = 0x54; // dst &= imm
const ALU32_RSH_K: u8 = 0x74; // dst >>= imm
const ALU64_MOV_K: u8 = 0xb7; // dst = imm
const ALU64_MOV_X: u8 = 0xbf; // dst = src
const JMP_JNE_K: u8 = 0x55; // if dst != imm: pc += off
const JMP_JNE_X: u8 = 0x5d; // if dst != src: pc += off
const JMP_EXIT: u8 = 0x95;

/// The program: registers r2 = device type, r3 = requested access, r4 = major,
/// r5 = minor (from `struct bpf_cgroup_dev_ctx` in r1); then one block per rule, last rule
/// first; each block jumps to the next when the device does not match and returns the
/// rule's verdict when it does; at the end, deny. A rule that matches every device ends
/// the program there.
pub fn compile(rules: &[Rule]) -> Vec<Insn> {
    let mut prog = vec![
        insn(LDX_MEM_W, 2, 1, 0, 0),
        insn(ALU32_AND_K, 2, 0, 0, 0xffff),
        insn(LDX_MEM_W, 3, 1, 0, 0),
        insn(ALU32_RSH_K, 3, 0, 0, 16),
        insn(LDX_MEM_W, 4, 1, 4, 0),
        insn(LDX_MEM_W, 5, 1, 8, 0),
    ];
    for rule in rules.iter().rev() {
        // Checks as (instructions, index of the jump within them); offsets filled below.
        let mut block: Vec<Insn> = Vec::new();
        let mut jumps = Vec::new();
        if let Some(kind) = rule.kind {
            jumps.push(block.len());
            block.push(insn(JMP_JNE_K, 2, 0, 0, kind as i32));
        }
        if rule.access != ACC_ALL {
            // Matches only when every requested access is one the rule names.
            block.push(insn(ALU64_MOV_X, 1, 3, 0, 0));
            block.push(insn(ALU32_AND_K, 1, 0, 0, rule.access as i32));
            jumps.push(block.len());
            block.push(insn(JMP_JNE_X, 1, 3, 0, 0));
        }
        if let Some(major) = rule.major {
            jumps.push(block.len());
            block.push(insn(JMP_JNE_K, 4, 0, 0, major as i32));
        }
        if let Some(minor) = rule.minor {
            jumps.push(block.len());
            block.push(insn(JMP_JNE_K, 5, 0, 0, minor as i32));
        }
        block.push(insn(ALU64_MOV_K, 0, 0, 0, i32::from(rule.allow)));
        block.push(insn(JMP_EXIT, 0, 0, 0, 0));
        let len = block.len();
        let matches_everything = jumps.is_empty();
        for j in jumps {
            // Relative to the next instruction: land just past this block.
            block[j].off = (len - j - 1) as i16;
        }
        prog.extend(block);
        if matches_everything {
            // Earlier rules can never be reached (the verifier refuses unreachable code).
            return prog;
        }
    }
    prog.push(insn(ALU64_MOV_K, 0, 0, 0, 0));
    prog.push(insn(JMP_EXIT, 0, 0, 0, 0));
    prog
}

const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_ATTACH: libc::c_int = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;

/// The `BPF_PROG_LOAD` part of `union bpf_attr` (fields up to `expected_attach_type`).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The `BPF_PROG_ATTACH` part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

/// Loads the program for `rules` and attaches it to the cgroup directory `cgroup`.
/// The attachment lives as long as the cgroup; the program's descriptor is closed here.
pub fn apply(cgroup: &Path, rules: &[Rule]) -> Result<(), String> {
    let prog = compile(rules);
    let license = c"Apache-2.0";
    let mut log = vec![0u8; 64 * 1024];
    let mut name = [0u8; 16];
    name[..11].copy_from_slice(b"brig_device");
    let load = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: prog.len() as u32,
        insns: prog.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name: name,
        expected_attach_type: BPF_CGROUP_DEVICE,
        ..Default::default()
    };
    // SAFETY: `load` is a valid BPF_PROG_LOAD attribute whose pointers (instructions,
    // license, log buffer) point at live buffers of the stated sizes for the whole call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &load as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>(),
        )
    };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        let verifier =
            String::from_utf8_lossy(&log[..log.iter().position(|b| *b == 0).unwrap_or(0)])
                .into_owned();
        return Err(format!(
            "cannot load the device filter ({err}); the guest kernel needs CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF{}",
            if verifier.is_empty() { String::new() } else { format!("; verifier: {verifier}") }
        ));
    }
    // SAFETY: the kernel just returned this new descriptor; nothing else owns it.
    let prog_fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let dir = std::fs::File::open(cgroup)
        .map_err(|e| format!("cannot open {}: {e}", cgroup.display()))?;
    let attach = ProgAttachAttr {
        target_fd: dir.as_raw_fd() as u32,
        attach_bpf_fd: prog_fd.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        ..Default::default()
    };
    // SAFETY: `attach` is a valid BPF_PROG_ATTACH attribute naming two open descriptors.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_ATTACH,
            &attach as *const ProgAttachAttr,
            std::mem::size_of::<ProgAttachAttr>(),
        )
    };
    if rc < 0 {
        return Err(format!(
            "cannot attach the device filter to {}: {}",
            cgroup.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::LinuxDeviceCgroupBuilder;

    /// What the compiled program answers for one request, run by a tiny interpreter of the
    /// instructions `compile` emits (so the jump arithmetic is tested, not just the rules).
    fn verdict(prog: &[Insn], kind: u32, access: u32, major: u32, minor: u32) -> u64 {
        let ctx = [(access << 16) | kind, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        loop {
            let i = prog[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            pc += 1;
            match i.code {
                LDX_MEM_W => r[dst] = u64::from(ctx[i.off as usize / 4]),
                ALU32_AND_K => r[dst] = u64::from(r[dst] as u32 & i.imm as u32),
                ALU32_RSH_K => r[dst] = u64::from((r[dst] as u32) >> i.imm),
                ALU64_MOV_K => r[dst] = i.imm as u64,
                ALU64_MOV_X => r[dst] = r[src],
                JMP_JNE_K if r[dst] != i.imm as u64 => pc += i.off as usize,
                JMP_JNE_X if r[dst] != r[src] => pc += i.off as usize,
                JMP_JNE_K | JMP_JNE_X => {}
                JMP_EXIT => return r[0],
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
    }

    fn rule(
        allow: bool,
        typ: LinuxDeviceType,
        major: Option<i64>,
        minor: Option<i64>,
        access: &str,
    ) -> LinuxDeviceCgroup {
        let mut b = LinuxDeviceCgroupBuilder::default()
            .allow(allow)
            .typ(typ)
            .access(access);
        if let Some(m) = major {
            b = b.major(m);
        }
        if let Some(m) = minor {
            b = b.minor(m);
        }
        b.build().unwrap()
    }

    #[test]
    fn deny_all_keeps_the_standard_devices_and_denies_the_rest() {
        let prog = compile(&rules(&[rule(false, LinuxDeviceType::A, None, None, "rwm")]).unwrap());
        let rw = ACC_READ | ACC_WRITE;
        assert_eq!(verdict(&prog, DEV_CHAR, rw, 1, 3), 1, "/dev/null");
        assert_eq!(verdict(&prog, DEV_CHAR, rw, 136, 7), 1, "a pty slave");
        assert_eq!(verdict(&prog, DEV_CHAR, rw, 1, 1), 0, "/dev/mem");
        assert_eq!(verdict(&prog, DEV_CHAR, ACC_WRITE, 4, 64), 0, "ttyS0");
        assert_eq!(
            verdict(&prog, DEV_BLOCK, ACC_READ, 1, 3),
            0,
            "block 1:3 is not /dev/null"
        );
        assert_eq!(
            verdict(&prog, DEV_BLOCK, ACC_MKNOD, 8, 0),
            1,
            "making a node is allowed"
        );
        assert_eq!(
            verdict(&prog, DEV_BLOCK, ACC_MKNOD | ACC_READ, 8, 0),
            0,
            "opening it is not"
        );
    }

    #[test]
    fn a_later_rule_overrides_an_earlier_one_and_access_must_be_covered() {
        let prog = compile(
            &rules(&[
                rule(false, LinuxDeviceType::A, None, None, "rwm"),
                rule(true, LinuxDeviceType::C, Some(4), Some(64), "rw"),
                rule(true, LinuxDeviceType::B, Some(8), None, "r"),
            ])
            .unwrap(),
        );
        assert_eq!(verdict(&prog, DEV_CHAR, ACC_READ | ACC_WRITE, 4, 64), 1);
        assert_eq!(
            verdict(&prog, DEV_CHAR, ACC_MKNOD, 4, 65),
            1,
            "making any node is allowed"
        );
        assert_eq!(verdict(&prog, DEV_CHAR, ACC_READ, 4, 65), 0);
        assert_eq!(
            verdict(&prog, DEV_BLOCK, ACC_READ, 8, 17),
            1,
            "any minor of major 8"
        );
        assert_eq!(
            verdict(&prog, DEV_BLOCK, ACC_READ | ACC_WRITE, 8, 17),
            0,
            "w was not granted"
        );
        let prog = compile(
            &rules(&[
                rule(true, LinuxDeviceType::C, Some(4), None, "rwm"),
                rule(false, LinuxDeviceType::C, Some(4), Some(64), "rwm"),
            ])
            .unwrap(),
        );
        assert_eq!(
            verdict(&prog, DEV_CHAR, ACC_READ, 4, 64),
            0,
            "the later deny wins"
        );
        assert_eq!(verdict(&prog, DEV_CHAR, ACC_READ, 4, 65), 1);
    }

    #[test]
    fn a_rule_for_every_device_ends_the_program() {
        let rules = rules(&[
            rule(true, LinuxDeviceType::C, Some(4), Some(64), "rw"),
            rule(false, LinuxDeviceType::A, None, None, "rwm"),
        ])
        .unwrap();
        let prog = compile(&rules);
        // The deny-all block (verdict, exit) is the last one: nothing after it.
        assert_eq!(
            &prog[prog.len() - 2..],
            &[insn(ALU64_MOV_K, 0, 0, 0, 0), insn(JMP_EXIT, 0, 0, 0, 0)]
        );
        assert_eq!(
            prog,
            compile(&rules[1..]),
            "a rule before deny-all can never decide"
        );
        assert_eq!(
            verdict(&prog, DEV_CHAR, ACC_WRITE, 4, 64),
            0,
            "the later deny-all wins"
        );
    }

    #[test]
    fn bad_access_letters_and_numbers_are_named() {
        let err = rules(&[rule(true, LinuxDeviceType::C, Some(1), Some(3), "rx")]).unwrap_err();
        assert!(err.contains("\"rx\"") && err.contains("'x'"), "{err}");
        let err = rules(&[rule(true, LinuxDeviceType::C, Some(-5), None, "r")]).unwrap_err();
        assert!(err.contains("-5"), "{err}");
    }
}
