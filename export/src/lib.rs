//! BLIP-2 exporter.
