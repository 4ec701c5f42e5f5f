//! Types shared by the exporter and the runtime: the names of every graph input and
//! output ([`io`]) and the manifest ([`Manifest`]) that `blip2-ort export` writes next
//! to the graphs and `blip2-ort infer` reads, so the runtime never guesses.

pub mod hash;
pub mod io;
mod kinds;
mod manifest;
mod retrieval;

pub use kinds::*;
pub use manifest::*;
pub use retrieval::*;
