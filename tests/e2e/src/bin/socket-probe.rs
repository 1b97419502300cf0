//! A static test program copied into container root filesystems by the end-to-end tests
//! (busybox has no vsock client): for each domain number given, it tries
//! `socket(domain, SOCK_STREAM, 0)` and prints `DOMAIN ok` or `DOMAIN errno N`.

fn main() {
    for arg in std::env::args().skip(1) {
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
