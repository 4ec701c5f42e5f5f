//! Ctrl-C, SIGTERM and SIGHUP: an export in progress removes its temporary folder, then
//! the process dies of the signal as it would have without a handler (so the shell sees
//! the usual status, 130 for Ctrl-C). kill -9 cannot be caught: the next export beside
//! the same output removes what such a run left.

#[cfg(unix)]
pub fn install() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
        return; // Without the handler an interrupted export is cleaned up by the next one.
    };
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            blip2_export::remove_partials();
            let _ = signal_hook::low_level::emulate_default_handler(sig);
            std::process::exit(128 + sig);
        }
    });
}

#[cfg(not(unix))]
pub fn install() {}
