//! Accepting joining backups on a background thread, one when the VM has
//! none (re-protection).

use logging_channel::{ChannelConfig, ChannelCounters, PrimaryLink, PrimaryListener};
use replay::Header;
use std::sync::mpsc::{self, Receiver, Sender};

/// Accepts joining backups on a background thread, one when asked.
pub struct Joiner {
    incoming: Receiver<PrimaryLink>,
    want: Sender<()>,
    pub addr: std::net::SocketAddr,
}

impl Joiner {
    /// Starts accepting on `listener`; a backup is accepted each time
    /// [`Joiner::want_one`] asks (the first one at once if `now`).
    /// A refused backup is counted in `config`'s counters.
    pub fn start(listener: PrimaryListener, header: Header, config: ChannelConfig, now: bool) -> Joiner {
        let (links, incoming) = mpsc::channel();
        let (want, wanted) = mpsc::channel::<()>();
        let addr = listener.local_addr();
        std::thread::spawn(move || {
            crate::seccomp::enter_or_exit(crate::seccomp::ThreadKind::Joiner);
            while wanted.recv().is_ok() {
                loop {
                    match listener.accept_joining(&header, &config) {
                        Ok(link) => {
                            if links.send(link).is_err() {
                                return;
                            }
                            break;
                        }
                        // A stranger or a mismatched backup: keep waiting.
                        Err(e) => {
                            eprintln!("ftvmm: primary: refused a joining backup: {e}");
                            ChannelCounters::add(&config.counters.peers_refused, 1);
                        }
                    }
                }
            }
        });
        let joiner = Joiner { incoming, want, addr };
        if now {
            joiner.want_one();
        }
        joiner
    }

    /// Accept the next joining backup.
    pub fn want_one(&self) {
        let _ = self.want.send(());
    }

    /// The backup that joined, if one did since the last call.
    pub fn joined(&self) -> Option<PrimaryLink> {
        self.incoming.try_recv().ok()
    }
}
