//! Ctrl-C, SIGTERM and SIGHUP: an export in progress removes its temporary folder, then
//! the process dies of the signal as it would have without a handler (so the shell sees
//! the usual status, 130 for Ctrl-C). kill -9 cannot be caught: the next export beside
//! the same output removes what such a run left.
//!
//! An export that is already complete in its folder when the signal comes is not undone:
//! `export` then reports it and exits 0 (the signal came after the work was done), and a
//! command that goes on after an export (`infer`'s first run) ends by the signal once the
//! export is in place ([`export_reported`]). So an export that ends by a signal never
//! printed success and never left a folder with a manifest, and one that printed success
//! left the complete export.
//!
//! `serve` closes the handle once its model is ready: from then on the server's own
//! handler stops it gracefully.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// Set while the handler deals with a signal it may end the process for.
static HANDLING: AtomicBool = AtomicBool::new(false);
/// The last signal received (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

#[cfg(unix)]
pub type Handle = signal_hook::iterator::Handle;
#[cfg(not(unix))]
pub struct Handle;
#[cfg(not(unix))]
impl Handle {
    pub fn close(&self) {}
}

#[cfg(unix)]
pub fn install() -> Option<Handle> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
        return None; // Without the handler an interrupted export is cleaned up by the next one.
    };
    let handle = signals.handle();
    std::thread::spawn(move || {
        for sig in signals.forever() {
            HANDLING.store(true, Ordering::SeqCst);
            SIGNAL.store(sig, Ordering::SeqCst);
            match blip2_export::interrupt() {
                blip2_export::Interrupt::Stop => die(sig),
                // An export is complete in its folder: its command reports it and ends.
                blip2_export::Interrupt::Finish => HANDLING.store(false, Ordering::SeqCst),
            }
        }
    });
    Some(handle)
}

#[cfg(not(unix))]
pub fn install() -> Option<Handle> {
    None
}

/// Ends the process by `sig`, as its default action would.
#[cfg(unix)]
fn die(sig: i32) -> ! {
    let _ = signal_hook::low_level::emulate_default_handler(sig);
    std::process::exit(128 + sig);
}

/// Called once an export that a command goes on from has been put in place: if a signal
/// came meanwhile (after the export was complete), the process ends by it now.
pub fn export_reported() {
    if blip2_export::acknowledge() {
        #[cfg(unix)]
        die(SIGNAL.load(Ordering::SeqCst));
    }
}

/// Before a command reports a failure: if the failure comes from a signal being handled
/// (an interrupted export fails as its folder is removed), waits for the handler to end
/// the process, so that it ends by the signal and says nothing more.
pub fn wait_if_interrupted() {
    while HANDLING.load(Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
