//! A static test program copied into container root filesystems by the end-to-end tests
//! (busybox has no vsock client): for each domain number given, it tries
//! `socket(domain, SOCK_STREAM, 0)` and prints `DOMAIN ok` or `DOMAIN errno N`. The word
//! `io_uring` tries `io_uring_setup(2)` instead (a ring makes sockets without `socket(2)`)
//! and prints `io_uring ok` or `io_uring errno N`.

fn main() {
    for arg in std::env::args().skip(1) {
        if arg == "io_uring" {
            probe_io_uring();
            continue;
        }
        let Ok(domain) = arg.parse::<i32>() else {
            println!("{arg} not-a-number");
            continue;
        };
        // SAFETY: socket(2) with integer arguments; the fd it may return is closed below.
        let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM, 0) };
        if fd < 0 {
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            println!("{domain} errno {errno}");
        } else {
            // SAFETY: fd was just returned to us and is not used again.
            unsafe { libc::close(fd) };
            println!("{domain} ok");
        }
    }
}

fn probe_io_uring() {
    // struct io_uring_params is 120 bytes; all zero asks for the defaults.
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup reads and writes the 120-byte params buffer it is given.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        println!("io_uring errno {errno}");
    } else {
        // SAFETY: fd was just returned to us and is not used again.
        unsafe { libc::close(fd as i32) };
        println!("io_uring ok");
    }
}
