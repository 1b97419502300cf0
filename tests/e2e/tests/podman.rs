//! podman with Brig as its OCI runtime (`podman --runtime brig`), through Debian's podman 4.3
//! and conmon, as a user runs it: run, exit codes, detached containers with exec, logs, stop
//! (SIGTERM, then SIGKILL after the timeout), kill, rm -f, and nothing left afterwards; and
//! `run -it` / `exec -it` with a terminal (`--console-socket`) that follows resizes.

use std::process::{Command, Output, Stdio};

use brig_e2e::podman::{Podman, IMAGE};
use brig_e2e::{dir_entries, processes_named, text};

#[test]
fn podman_runs_execs_stops_and_removes_containers_in_microvms() {
    let podman = Podman::new("podman");
    podman.import_busybox();
    let run = ["run", "--network", "none"];

    // Foreground runs: output and exit codes.
    let out = podman.ok(&[&run[..], &["--rm", IMAGE, "echo", "hi from brig"]].concat());
    assert_eq!(out, "hi from brig\n");
    let out = podman.run(&[&run[..], &["--rm", IMAGE, "sh", "-c", "exit 3"]].concat());
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let out = podman.run(&[&run[..], &["--rm", IMAGE, "uname", "-r"]].concat());
    let guest_kernel = text(&out.stdout);
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_ne!(
        guest_kernel.trim(),
        host_kernel.trim(),
        "it ran in a microVM"
    );

    // A detached container: ps, exec, logs, and stop where SIGTERM ends it.
    let script = "echo started; trap 'echo bye; exit 0' TERM; while true; do sleep 1; done";
    podman.ok(&[
        &run[..],
        &["-d", "--name", "web", IMAGE, "sh", "-c", script],
    ]
    .concat());
    let ps = podman.ok(&["ps", "--format", "{{.Names}} {{.Status}}"]);
    assert!(ps.contains("web Up"), "podman ps: {ps}");
    let out = podman.run(&["exec", "web", "sh", "-c", "echo in-exec; exit 5"]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "in-exec\n");
    // The process podman waits on and the microVM's VMM are in the container's cgroup, as
    // runc's processes would be: podman accounts and limits the whole microVM.
    let id = podman
        .ok(&["inspect", "--format", "{{.Id}}", "web"])
        .trim()
        .to_string();
    let pid = podman
        .ok(&["inspect", "--format", "{{.State.Pid}}", "web"])
        .trim()
        .to_string();
    let cgroup_of = |pid: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .unwrap_or_default()
            .trim()
            .trim_start_matches("0::")
            .to_string()
    };
    let cgroup = cgroup_of(&pid);
    assert!(
        cgroup.contains(&id),
        "the keeper {pid} is in {cgroup:?}, not the container's"
    );
    let vmms = processes_named("brig-vmm");
    assert!(!vmms.is_empty());
    for vmm in &vmms {
        assert_eq!(cgroup_of(&vmm.to_string()), cgroup, "VMM {vmm}");
    }
    podman.ok(&["stop", "-t", "20", "web"]);
    let cgroup_dir = std::path::Path::new("/sys/fs/cgroup").join(cgroup.trim_start_matches('/'));
    assert!(!cgroup_dir.exists(), "{} is left", cgroup_dir.display());
    assert_eq!(podman.exit_code("web"), "0", "the TERM trap's status");
    let logs = podman.ok(&["logs", "web"]);
    assert_eq!(logs, "started\nbye\n");

    // SIGTERM ignored (sleep as PID 1): SIGKILL after the timeout.
    podman.ok(&[
        &run[..],
        &["-d", "--name", "stubborn", IMAGE, "sleep", "300"],
    ]
    .concat());
    podman.ok(&["stop", "-t", "2", "stubborn"]);
    assert_eq!(podman.exit_code("stubborn"), "137");
    // kill, and rm -f of a running container.
    podman.ok(&[&run[..], &["-d", "--name", "killed", IMAGE, "sleep", "300"]].concat());
    podman.ok(&["kill", "killed"]);
    podman.ok(&["wait", "killed"]);
    assert_eq!(podman.exit_code("killed"), "137");
    podman.ok(&[
        &run[..],
        &["-d", "--name", "running", IMAGE, "sleep", "300"],
    ]
    .concat());
    podman.ok(&["rm", "-f", "web", "stubborn", "killed", "running"]);
    let ps = podman.ok(&["ps", "-a", "--format", "{{.Names}}"]);
    assert_eq!(ps, "", "containers left: {ps}");

    // Nothing of Brig's is left: no VMM, no record, no mount under its state root (which
    // it did use).
    assert!(
        podman.brig_root.join("sandboxes").is_dir(),
        "Brig's root was not used"
    );
    assert!(processes_named("brig-vmm").is_empty(), "a brig-vmm is left");
    assert!(
        dir_entries(&podman.brig_root.join("sandboxes")).is_empty(),
        "sandboxes left"
    );
    assert!(
        dir_entries(&podman.brig_root.join("containers")).is_empty(),
        "container records left"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = format!(" {}/", podman.brig_root.display());
    assert!(!mounts.contains(&root), "mounts left under{root}: {mounts}");
    let _ = std::fs::remove_dir_all(&podman.storage);
}

/// Runs argv[1:] on a new terminal of 30x100, prints all it writes there; once it has
/// printed "30 100" twice, makes the terminal 40x120 and sends a line each second until
/// "40 120" shows up twice (or 60 s pass), then ends its input.
const ON_A_TERMINAL: &str = r#"
import fcntl, os, pty, select, struct, sys, termios, time
def size(fd, rows, cols):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
pid, fd = pty.fork()
if pid == 0:
    size(0, 30, 100)
    os.execvp(sys.argv[1], sys.argv[1:])
out, resized, deadline, last = b"", False, time.time() + 180, 0
while time.time() < deadline:
    r, _, _ = select.select([fd], [], [], 0.2)
    if r:
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        out += data
    if not resized and out.count(b"30 100") >= 2:
        size(fd, 40, 120)
        resized, deadline = True, time.time() + 60
    if resized and time.time() - last > 1:
        last = time.time()
        os.write(fd, b"again\n" if out.count(b"40 120") < 2 else b"\x04")
_, status = os.waitpid(pid, 0)
sys.stdout.write(out.decode(errors="replace"))
sys.exit(os.waitstatus_to_exitcode(status))
"#;

#[test]
fn podman_run_and_exec_with_a_terminal_that_follows_resizes() {
    let podman = Podman::new("podman-tty");
    podman.import_busybox();
    // The container's shell prints its terminal and size, and the size again after each line
    // it reads, until its input ends: the first size is the one the user's terminal had.
    let script = "tty; stty size; stty size; while read x; do stty size; done; echo done";
    let on_a_terminal = |args: &[&str]| {
        Command::new("python3")
            .arg("-c")
            .arg(ON_A_TERMINAL)
            .args(podman.argv(args))
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let check = |what: &str, out: &Output| {
        let seen = text(&out.stdout);
        assert!(
            out.status.success(),
            "{what}: {seen}\n{}",
            text(&out.stderr)
        );
        assert!(seen.contains("/dev/pts/"), "{what}: no terminal: {seen}");
        assert!(seen.contains("30 100"), "{what}: the first size: {seen}");
        assert!(
            seen.contains("40 120"),
            "{what}: the resize did not arrive: {seen}"
        );
        assert!(seen.contains("done"), "{what}: {seen}");
    };
    let run = on_a_terminal(&[
        "run",
        "-it",
        "--rm",
        "--network",
        "none",
        IMAGE,
        "sh",
        "-c",
        script,
    ]);
    check("podman run -it", &run);

    podman.detached("box", &["sleep", "300"]);
    let exec = on_a_terminal(&["exec", "-it", "box", "sh", "-c", script]);
    podman.ok(&["rm", "-f", "box"]);
    check("podman exec -it", &exec);
    assert!(processes_named("brig-vmm").is_empty(), "a brig-vmm is left");
    let _ = std::fs::remove_dir_all(&podman.storage);
}

#[test]
fn podman_pauses_unpauses_and_updates_a_container() {
    let podman = Podman::new("podman-pause");
    podman.import_busybox();
    podman.detached(
        "box",
        &[
            "sh",
            "-c",
            // Renamed into place: a reader never meets the file between its truncation and
            // its write (busybox's date has no %N; seconds and a counter tell ticks apart).
            "i=0; while true; do i=$((i+1)); echo \"$(date +%s) $i\" > /tmp/.tick; mv /tmp/.tick /tmp/tick; sleep 0.2; done",
        ],
    );
    let tick = || podman.ok(&["exec", "box", "cat", "/tmp/tick"]);
    podman.ok(&["pause", "box"]);
    let status = podman.ok(&["ps", "-a", "--format", "{{.Names}} {{.Status}}"]);
    let state = podman.ok(&["inspect", "--format", "{{.State.Status}}", "box"]);

    podman.ok(&["unpause", "box"]);
    let before = tick();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let after = tick();
    // podman update sends the new limits to `brig update --resources FILE` as OCI JSON,
    // with a swap limit the guest (which has no swap) holds by nature.
    let update = podman.run(&["update", "--memory", "64m", "--cpus", "0.5", "box"]);
    let limits = podman.run(&[
        "exec",
        "box",
        "cat",
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/cpu.max",
    ]);
    podman.ok(&["rm", "-f", "box"]);
    let _ = std::fs::remove_dir_all(&podman.storage);

    assert!(status.contains("box Paused"), "podman ps: {status}");
    assert_eq!(state.trim(), "paused");
    assert_ne!(before, after, "the container did not run on after unpause");
    assert!(
        update.status.success(),
        "podman update: {}",
        text(&update.stderr)
    );
    assert_eq!(
        text(&limits.stdout),
        "67108864\n50000 100000\n",
        "{}",
        text(&limits.stderr)
    );
    assert!(processes_named("brig-vmm").is_empty(), "a brig-vmm is left");
}

/// A free TCP port on the host, as the kernel picks one.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[test]
fn podmans_own_networks_reach_containers_in_microvms_and_leave_nothing() {
    let podman = Podman::new("podman-net");
    podman.import_busybox();
    let namespaces_before = dir_entries(std::path::Path::new("/run/netns"));
    // A page, served by busybox httpd in the background of a shell that ends on SIGTERM.
    let serve = |page: &str| {
        format!(
            "mkdir -p /www && echo {page} > /www/index.html && httpd -p 80 -h /www && \
             trap 'exit 0' TERM && while true; do sleep 1; done"
        )
    };

    // podman's default network (netavark's bridge `podman`), a published port: the guest has
    // the address podman gave the container, and the host reaches its page on both.
    let port = free_port();
    let published = format!("{port}:80");
    podman.ok(&[
        "run",
        "-d",
        "--name",
        "web",
        "-p",
        &published,
        IMAGE,
        "sh",
        "-c",
        &serve("hello-from-the-default-network"),
    ]);
    let ip = podman
        .ok(&[
            "inspect",
            "--format",
            "{{.NetworkSettings.IPAddress}}",
            "web",
        ])
        .trim()
        .to_string();
    let guest = podman.ok(&["exec", "web", "ip", "-4", "-o", "addr", "show", "eth0"]);
    let on_port = brig_e2e::net::http_get(
        &format!("127.0.0.1:{port}"),
        std::time::Duration::from_secs(60),
    );
    let on_ip = brig_e2e::net::http_get(&format!("{ip}:80"), std::time::Duration::from_secs(30));

    // A network of the user's: a second container finds the first by name through podman's
    // DNS (aardvark-dns on the network's gateway).
    podman.ok(&["network", "create", "brignet"]);
    podman.ok(&[
        "run",
        "-d",
        "--name",
        "named",
        "--network",
        "brignet",
        IMAGE,
        "sh",
        "-c",
        &serve("hello-by-name"),
    ]);
    let by_name = podman.run(&[
        "run",
        "--rm",
        "--network",
        "brignet",
        IMAGE,
        "sh",
        "-c",
        // The DNS server may come up after the client: a few tries. (busybox's `wget -T`
        // crashes, with runc as well.)
        "for i in 1 2 3 4 5 6 7 8 9 10; do wget -q -O - http://named/ && exit 0; sleep 2; done; \
         nslookup named; exit 1",
    ]);

    podman.ok(&["rm", "-f", "web", "named"]);
    podman.ok(&["network", "rm", "brignet"]);
    let namespaces_after = dir_entries(std::path::Path::new("/run/netns"));
    let _ = std::fs::remove_dir_all(&podman.storage);

    assert!(
        guest.contains(&format!("inet {ip}/")),
        "the guest's eth0 has not podman's address {ip}: {guest}"
    );
    assert_eq!(on_port, "hello-from-the-default-network");
    assert_eq!(on_ip, "hello-from-the-default-network");
    assert!(
        by_name.status.success(),
        "a container on brignet did not reach `named`: {}{}",
        text(&by_name.stdout),
        text(&by_name.stderr)
    );
    assert_eq!(text(&by_name.stdout).trim(), "hello-by-name");
    assert!(processes_named("brig-vmm").is_empty(), "a brig-vmm is left");
    assert_eq!(
        namespaces_after, namespaces_before,
        "network namespaces left"
    );
}
