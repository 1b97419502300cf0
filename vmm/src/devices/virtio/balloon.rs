//! virtio-balloon with free page reporting only (`VIRTIO_BALLOON_F_REPORTING`, virtio 1.2
//! §5.5.6.7): the guest hands the device ranges of its memory it has freed, and the device
//! gives the host memory behind them back (`MADV_DONTNEED` on the anonymous mapping; the
//! guest finds zeroed pages when it uses them again). An idle sandbox so returns what its
//! boot and its last spike touched. The balloon itself never inflates (`num_pages` stays 0);
//! buffers a driver posts on the inflate and deflate queues are returned untouched.
//!
//! Each reported range is guest input: it must be page aligned, non-empty and inside guest
//! RAM, or the chain is returned without anything discarded (and counted).

use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory as _};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    next_chain, notify_used, ActivateError, GuestMemory, IrqTrigger, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use crate::guest_warn::guest_warn;
use std::sync::Arc;

/// Virtio device ID of the memory balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;
/// Feature bit: the reporting queue exists and the driver reports free pages on it.
pub const VIRTIO_BALLOON_F_REPORTING: u64 = 1 << 5;

/// inflate, deflate, reporting (Linux fills at most 32 entries per report).
const QUEUE_SIZES: [u16; 3] = [16, 16, 32];
const REPORTING: usize = 2;
/// The page size of guest RAM and of its host mapping.
const PAGE: u64 = 4096;

/// Why a reported range was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// Not page aligned, empty, or not wholly inside guest RAM.
    #[error("a reported range of {len} bytes at {addr:#x} is not whole pages of guest RAM")]
    BadRange { addr: u64, len: u32 },
}

/// One range of guest RAM the guest reported free: the host address of its first byte and
/// its length, both page aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreeRange {
    /// Host virtual address.
    pub host: usize,
    /// Bytes.
    pub len: usize,
}

/// The ranges a reporting chain names, each checked: whole pages of one guest RAM region.
/// Any bad descriptor refuses the whole chain.
pub fn reported_ranges(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
) -> Result<Vec<FreeRange>, ReportError> {
    let mut ranges = Vec::new();
    for desc in chain {
        let (addr, len) = (desc.addr().0, desc.len());
        let bad = ReportError::BadRange { addr, len };
        if len == 0 || addr % PAGE != 0 || u64::from(len) % PAGE != 0 {
            return Err(bad);
        }
        let len_usize = usize::try_from(len).map_err(|_| bad)?;
        // One region holds the whole range (a slice cannot span two).
        let slice = mem
            .get_slice(GuestAddress(addr), len_usize)
            .map_err(|_| bad)?;
        ranges.push(FreeRange {
            host: slice.ptr_guard().as_ptr() as usize,
            len: len_usize,
        });
    }
    Ok(ranges)
}

/// Give the host memory behind `range` back.
fn discard(range: FreeRange) -> std::io::Result<()> {
    // SAFETY: `reported_ranges` checked that the range is whole pages inside guest RAM, an
    // anonymous private mapping that stays mapped while the VM runs; MADV_DONTNEED only
    // drops its pages (the guest, which freed them, sees zeros next time), never the mapping.
    if unsafe {
        libc::madvise(
            range.host as *mut libc::c_void,
            range.len,
            libc::MADV_DONTNEED,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// What the device did, for tests and logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BalloonCounts {
    /// Bytes given back to the host.
    pub discarded: u64,
    /// Reports refused (a bad range in them).
    pub refused: u64,
}

struct Active {
    mem: GuestMemory,
    queues: Vec<Queue>,
    irq: Arc<IrqTrigger>,
}

/// The device.
pub struct Balloon {
    queue_evts: Vec<EventFd>,
    wake_evt: EventFd,
    active: Option<Active>,
    counts: BalloonCounts,
}

impl Balloon {
    /// A balloon that only takes free page reports.
    pub fn new() -> std::io::Result<Self> {
        let make = || EventFd::new(EFD_NONBLOCK);
        Ok(Self {
            queue_evts: vec![make()?, make()?, make()?],
            wake_evt: make()?,
            active: None,
            counts: BalloonCounts::default(),
        })
    }

    /// What it did so far.
    pub fn counts(&self) -> BalloonCounts {
        self.counts
    }

    /// Serve every queue: reports are discarded, anything else is returned as it came.
    fn serve(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        for (index, q) in active.queues.iter_mut().enumerate() {
            let mut used_any = false;
            loop {
                let chain = match next_chain(q, &active.mem) {
                    Ok(Some(chain)) => chain,
                    Ok(None) => break,
                    Err(e) => {
                        guest_warn!("virtio-balloon: queue {index} is unusable: {e}");
                        break;
                    }
                };
                let head = chain.head_index();
                if index == REPORTING {
                    match reported_ranges(&active.mem, chain) {
                        Ok(ranges) => {
                            for range in ranges {
                                match discard(range) {
                                    Ok(()) => self.counts.discarded += range.len as u64,
                                    Err(e) => guest_warn!("virtio-balloon: madvise: {e}"),
                                }
                            }
                        }
                        Err(e) => {
                            self.counts.refused += 1;
                            guest_warn!("virtio-balloon: free page report refused: {e}");
                        }
                    }
                }
                if let Err(e) = q.add_used(&active.mem, head, 0) {
                    guest_warn!("virtio-balloon: cannot return a buffer: {e}");
                    break;
                }
                used_any = true;
            }
            if used_any {
                notify_used(q, &active.mem, &active.irq, "virtio-balloon");
            }
        }
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_REPORTING
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// `num_pages` (le32, the target: always 0, never inflate) and `actual` (le32, the
    /// driver's to write; its writes are ignored).
    fn config_space(&self) -> Vec<u8> {
        vec![0; 8]
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        irq: Arc<IrqTrigger>,
        acked_features: u64,
    ) -> Result<(), ActivateError> {
        ActivateError::unless_version_1(acked_features)?;
        // Without reporting the driver sets up two queues and the device has nothing to do.
        let want = if acked_features & VIRTIO_BALLOON_F_REPORTING != 0 {
            QUEUE_SIZES.len()
        } else {
            REPORTING
        };
        if queues.len() < want {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want,
            });
        }
        for (i, q) in queues.iter().enumerate().take(want) {
            if !q.is_valid(&mem) {
                return Err(ActivateError::InvalidQueue(i));
            }
        }
        let queues = queues.into_iter().take(want).collect();
        self.active = Some(Active { mem, queues, irq });
        // Served on the device's thread, never here on the vCPU that activated it.
        let _ = self.wake_evt.write(1);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

impl MutEventSubscriber for Balloon {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in self
            .queue_evts
            .iter()
            .chain(std::iter::once(&self.wake_evt))
            .map(AsRawFd::as_raw_fd)
        {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                guest_warn!("virtio-balloon: cannot register with the event loop: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        for evt in self
            .queue_evts
            .iter()
            .chain(std::iter::once(&self.wake_evt))
        {
            if evt.as_raw_fd() == fd {
                let _ = evt.read();
            }
        }
        self.serve();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestMemoryMmap};

    const MEM: usize = 8 << 20;

    /// A balloon activated with reporting, over `mem`, and the mock reporting queue.
    fn active(mem: &GuestMemory) -> (Balloon, MockSplitQueue<'_, GuestMemory>) {
        let mock = MockSplitQueue::create(mem, GuestAddress(0x1000), 32);
        let mut queues = Vec::new();
        for i in 0..3u64 {
            let q = MockSplitQueue::create(mem, GuestAddress(0x10000 * (i + 1)), 32);
            queues.push(q.create_queue::<Queue>().unwrap());
        }
        queues[REPORTING] = mock.create_queue().unwrap();
        let mut b = Balloon::new().unwrap();
        let irq = Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        b.activate(
            mem.clone(),
            queues,
            irq,
            VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_REPORTING,
        )
        .unwrap();
        (b, mock)
    }

    fn report(mock: &MockSplitQueue<'_, GuestMemory>, ranges: &[(u64, u32)]) {
        let descs: Vec<RawDescriptor> = ranges
            .iter()
            .enumerate()
            .map(|(i, (addr, len))| {
                let next = if i + 1 < ranges.len() { 1 } else { 0 };
                RawDescriptor::from(SplitDescriptor::new(*addr, *len, 2 | next, i as u16 + 1))
            })
            .collect();
        mock.build_desc_chain(&descs).unwrap();
    }

    #[test]
    fn reported_pages_read_back_as_zeros_and_the_rest_is_kept() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        let (mut b, mock) = active(&mem);
        let fill = vec![0xabu8; 6 * PAGE as usize];
        mem.write_slice(&fill, GuestAddress(0x200000)).unwrap();
        report(
            &mock,
            &[(0x200000, 2 * PAGE as u32), (0x204000, PAGE as u32)],
        );
        b.serve();
        let mut back = vec![0u8; 6 * PAGE as usize];
        mem.read_slice(&mut back, GuestAddress(0x200000)).unwrap();
        let page = PAGE as usize;
        assert!(
            back[..2 * page].iter().all(|b| *b == 0),
            "first two pages discarded"
        );
        assert!(
            back[2 * page..4 * page].iter().all(|b| *b == 0xab),
            "pages 3-4 kept"
        );
        assert!(
            back[4 * page..5 * page].iter().all(|b| *b == 0),
            "page 5 discarded"
        );
        assert!(back[5 * page..].iter().all(|b| *b == 0xab), "page 6 kept");
        assert_eq!(
            b.counts(),
            BalloonCounts {
                discarded: 3 * PAGE,
                refused: 0
            }
        );
        // The chain came back.
        let used_idx: u16 = mem.read_obj(mock.used_addr().unchecked_add(2)).unwrap();
        assert_eq!(used_idx, 1);
    }

    #[test]
    fn a_bad_range_refuses_the_whole_report_and_discards_nothing() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        let (mut b, mock) = active(&mem);
        mem.write_slice(&[0xcd; 4096], GuestAddress(0x300000))
            .unwrap();
        for bad in [
            (0x300001, 4096),          // unaligned address
            (0x300000, 100),           // partial page
            (0x300000, 0),             // empty
            (MEM as u64 - 4096, 8192), // past the end of RAM
            (!4095, 4096),             // far outside
        ] {
            report(&mock, &[(0x300000, 4096), bad]);
            b.serve();
        }
        let mut back = [0u8; 4096];
        mem.read_slice(&mut back, GuestAddress(0x300000)).unwrap();
        assert!(
            back.iter().all(|b| *b == 0xcd),
            "nothing of a refused report discarded"
        );
        assert_eq!(
            b.counts(),
            BalloonCounts {
                discarded: 0,
                refused: 5
            }
        );
        let used_idx: u16 = mem.read_obj(mock.used_addr().unchecked_add(2)).unwrap();
        assert_eq!(used_idx, 5, "every refused chain still came back");
    }
}
