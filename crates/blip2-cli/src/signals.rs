//! Ctrl-C, SIGTERM and SIGHUP: an export in progress removes its temporary folder, then
//! the process dies of the signal as it would have without a handler (so the shell sees
//! the usual status, 130 for Ctrl-C). kill -9 cannot be caught: the next export beside
//! the same output removes what such a run left.

//!
//! `serve` closes the handle once its model is ready: from then on the server's own
//! handler stops it gracefully.

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
        if let Some(sig) = signals.forever().next() {
            blip2_export::remove_partials();
            let _ = signal_hook::low_level::emulate_default_handler(sig);
            std::process::exit(128 + sig);
        }
    });
    Some(handle)
}

#[cfg(not(unix))]
pub fn install() -> Option<Handle> {
    None
}
