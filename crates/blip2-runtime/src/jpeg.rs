//! JPEG decoding with libjpeg-turbo's decoder (the mozjpeg fork, built from source by
//! `mozjpeg-sys`), driven the way Pillow's `JpegDecode.c` drives it, so the pixels are the
//! ones `PIL.Image.open(path).convert("RGB")` gives:
//!
//! - libjpeg's defaults: ISLOW inverse DCT, fancy upsampling, its own guess of the file's
//!   colour space (JFIF, Adobe transform, component ids);
//! - one component decodes to `L`, three to RGB, four to CMYK, which Pillow always reads
//!   as Adobe-inverted (`CMYK;I`) and converts to RGB with its integer formula;
//! - a suspending data source: data that ends before the last scanline is a truncated
//!   file, refused as Pillow refuses it; libjpeg warnings (corrupt but decodable data) are
//!   ignored, as Pillow ignores them; libjpeg errors are refused.

use std::ffi::{c_int, c_long, CStr};
use std::mem;
use std::panic::{self, AssertUnwindSafe};

use image::{DynamicImage, GrayImage, RgbImage};
use mozjpeg_sys as j;

extern "C" {
    // libjpeg-turbo's own test of its SIMD inverse DCT: 1 when the library was built with
    // its SIMD code (nasm on x86) and this CPU runs it, 0 when built without (jsimd_none.c).
    // Defined in both builds. (mozjpeg-sys builds with NO_GETENV, so libjpeg-turbo's
    // JSIMD_FORCENONE and friends are not read.)
    fn jsimd_can_idct_islow() -> c_int;
}

/// Whether libjpeg-turbo decodes with its SIMD code here (inverse DCT, upsampling and
/// colour conversion: about 2x faster than its C code, the same pixels).
pub(crate) fn simd() -> bool {
    // SAFETY: takes nothing; reads the CPU's features once and caches them.
    unsafe { jsimd_can_idct_islow() != 0 }
}

/// Pillow's test for a JPEG file (`JpegImagePlugin._accept`).
pub(crate) fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\xff\xd8\xff")
}

#[derive(Debug)]
pub(crate) enum JpegError {
    /// The data ended before the image did.
    Truncated,
    /// libjpeg refused the data; its message.
    Broken(String),
    /// Something Pillow does not open either (a layer count or precision).
    Unsupported(String),
    TooLarge {
        width: u32,
        height: u32,
    },
    Empty {
        width: u32,
        height: u32,
    },
}

/// A decoded JPEG and the metadata Pillow keeps from the markers before the first scan.
pub(crate) struct Jpeg {
    pub image: DynamicImage,
    /// `info["exif"]`: the first APP1 `Exif\0\0` segment, later ones appended without
    /// their prefix (as JpegImagePlugin does).
    pub exif: Option<Vec<u8>>,
    /// `info["xmp"]`: the last APP1 XMP packet.
    pub xmp: Option<Vec<u8>>,
}

/// Raised through libjpeg's frames by `error_exit` (resume_unwind, so no panic message).
struct LibjpegFailure(String);

unsafe extern "C-unwind" fn error_exit(cinfo: &mut j::jpeg_common_struct) {
    let msg = message(cinfo);
    panic::resume_unwind(Box::new(LibjpegFailure(msg)));
}

unsafe extern "C-unwind" fn output_message(_cinfo: &mut j::jpeg_common_struct) {
    // Pillow silences libjpeg's warnings; so do we.
}

/// libjpeg's text for the current message code.
unsafe fn message(cinfo: &mut j::jpeg_common_struct) -> String {
    let err = cinfo.err;
    let Some(format) = (*err).format_message else {
        return format!("libjpeg error {}", (*err).msg_code);
    };
    // format_message writes up to JMSG_LENGTH_MAX (200) bytes into the buffer it is given;
    // the binding types it as a shared 80-byte array, so call it through a raw pointer.
    let mut buf = [0u8; 256];
    let format: unsafe extern "C-unwind" fn(&mut j::jpeg_common_struct, *mut u8) =
        mem::transmute(format);
    format(cinfo, buf.as_mut_ptr());
    CStr::from_bytes_until_nul(&buf).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

// A suspending source over bytes that are all there from the start: when libjpeg asks for
// more, there is none, so it suspends, which is how Pillow's decoder meets a short file.
unsafe extern "C-unwind" fn init_source(_cinfo: &mut j::jpeg_decompress_struct) {}

unsafe extern "C-unwind" fn fill_input_buffer(
    _cinfo: &mut j::jpeg_decompress_struct,
) -> j::boolean {
    0
}

unsafe extern "C-unwind" fn skip_input_data(
    cinfo: &mut j::jpeg_decompress_struct,
    num_bytes: c_long,
) {
    let src = &mut *cinfo.src;
    if num_bytes <= 0 {
        return;
    }
    let n = (num_bytes as usize).min(src.bytes_in_buffer);
    src.next_input_byte = src.next_input_byte.add(n);
    src.bytes_in_buffer -= n;
    // Skipping past the end leaves nothing, so the next read suspends: truncated.
}

unsafe extern "C-unwind" fn term_source(_cinfo: &mut j::jpeg_decompress_struct) {}

const JPEG_SUSPENDED: c_int = 0;
const JPEG_HEADER_TABLES_ONLY: c_int = 2;
const APP1: c_int = 0xE1;
const EXIF_PREFIX: &[u8] = b"Exif\0\0";
const XMP_PREFIX: &[u8] = b"http://ns.adobe.com/xap/1.0/\0";

/// libjpeg's state, destroyed on drop whatever happened.
struct Decompress {
    cinfo: Box<j::jpeg_decompress_struct>,
    // Referenced by cinfo; boxed so they do not move.
    _err: Box<j::jpeg_error_mgr>,
    _src: Box<j::jpeg_source_mgr>,
}

impl Drop for Decompress {
    fn drop(&mut self) {
        // jpeg_destroy_decompress only frees memory and never calls error_exit.
        unsafe { j::jpeg_destroy_decompress(&mut self.cinfo) };
    }
}

/// Decodes a JPEG as Pillow does. Images over `max_pixels` are refused from the header.
/// With `min_side`, libjpeg scales the image down in its inverse DCT by the largest of 8,
/// 4 and 2 that leaves both sides at least `min_side` pixels ([`scale_denom`]): Pillow's
/// pixels in draft mode, not those of its full decode.
pub(crate) fn decode(
    bytes: &[u8],
    max_pixels: u64,
    min_side: Option<u32>,
) -> Result<Jpeg, JpegError> {
    unsafe {
        let mut err: Box<j::jpeg_error_mgr> = Box::new(mem::zeroed());
        j::jpeg_std_error(&mut err);
        err.error_exit = Some(error_exit);
        err.output_message = Some(output_message);
        let mut src: Box<j::jpeg_source_mgr> = Box::new(mem::zeroed());
        src.next_input_byte = bytes.as_ptr();
        src.bytes_in_buffer = bytes.len();
        src.init_source = Some(init_source);
        src.fill_input_buffer = Some(fill_input_buffer);
        src.skip_input_data = Some(skip_input_data);
        src.resync_to_restart = Some(j::jpeg_resync_to_restart);
        src.term_source = Some(term_source);
        let mut cinfo: Box<j::jpeg_decompress_struct> = Box::new(mem::zeroed());
        cinfo.common.err = &mut *err;
        let created =
            panic::catch_unwind(AssertUnwindSafe(|| j::jpeg_create_decompress(&mut *cinfo)));
        if let Err(e) = created {
            return Err(JpegError::Broken(failure_text(e)));
        }
        cinfo.src = &mut *src;
        let mut d = Decompress { cinfo, _err: err, _src: src };
        match panic::catch_unwind(AssertUnwindSafe(|| run(&mut d.cinfo, max_pixels, min_side))) {
            Ok(r) => r,
            Err(e) => Err(JpegError::Broken(failure_text(e))),
        }
    }
}

fn failure_text(e: Box<dyn std::any::Any + Send>) -> String {
    match e.downcast::<LibjpegFailure>() {
        Ok(f) => f.0,
        // Anything else unwinding through here is a bug, not bad data: let it go on.
        Err(other) => panic::resume_unwind(other),
    }
}

/// The largest of libjpeg's DCT scalings 1/8, 1/4, 1/2 that keeps both sides at least
/// `min_side`; 1 when none does. Pillow's `draft(mode, (min_side, min_side))` picks the
/// same (the largest of 8, 4, 2, 1 not above `min(width // min_side, height // min_side)`),
/// so the pixels are those of `Image.open(path)` after that `draft` call.
pub(crate) fn scale_denom(width: u32, height: u32, min_side: u32) -> u32 {
    let fits = (width / min_side.max(1)).min(height / min_side.max(1));
    [8, 4, 2].into_iter().find(|&d| fits >= d).unwrap_or(1)
}

unsafe fn run(
    cinfo: &mut j::jpeg_decompress_struct,
    max_pixels: u64,
    min_side: Option<u32>,
) -> Result<Jpeg, JpegError> {
    j::jpeg_save_markers(cinfo, APP1, 0xFFFF);
    // Pillow skips tables-only datastreams until an image header.
    let mut status = j::jpeg_read_header(cinfo, 0);
    while status == JPEG_HEADER_TABLES_ONLY {
        status = j::jpeg_read_header(cinfo, 0);
    }
    if status == JPEG_SUSPENDED {
        return Err(JpegError::Truncated);
    }
    let (width, height) = (cinfo.image_width, cinfo.image_height);
    let pixels = width as u64 * height as u64;
    if pixels > max_pixels {
        return Err(JpegError::TooLarge { width, height });
    }
    if pixels == 0 {
        return Err(JpegError::Empty { width, height });
    }
    let (exif, xmp) = markers(cinfo);
    // JpegImagePlugin picks the mode from the layer count alone.
    let comps = cinfo.num_components;
    cinfo.out_color_space = match comps {
        1 => j::J_COLOR_SPACE::JCS_GRAYSCALE,
        3 => j::J_COLOR_SPACE::JCS_RGB,
        4 => j::J_COLOR_SPACE::JCS_CMYK,
        n => return Err(JpegError::Unsupported(format!("cannot handle {n}-layer images"))),
    };
    // libjpeg's defaults, stated: these are what make the pixels Pillow's.
    cinfo.dct_method = j::J_DCT_METHOD::JDCT_ISLOW;
    cinfo.do_fancy_upsampling = 1;
    if let Some(min_side) = min_side {
        cinfo.scale_num = 1;
        cinfo.scale_denom = scale_denom(width, height, min_side);
    }
    if j::jpeg_start_decompress(cinfo) == 0 {
        return Err(JpegError::Truncated);
    }
    let (w, h, n) = (
        cinfo.output_width as usize,
        cinfo.output_height as usize,
        cinfo.output_components as usize,
    );
    let mut data = vec![0u8; w * h * n];
    while (cinfo.output_scanline as usize) < h {
        let row = cinfo.output_scanline as usize;
        let mut line = data[row * w * n..].as_mut_ptr();
        if j::jpeg_read_scanlines(cinfo, &mut line, 1) != 1 {
            return Err(JpegError::Truncated);
        }
    }
    // Pillow does not require the end of the file once every line is in (a missing EOI
    // marker is fine), so the outcome of finishing does not matter.
    j::jpeg_finish_decompress(cinfo);
    let (w32, h32) = (w as u32, h as u32);
    let image = match n {
        1 => DynamicImage::ImageLuma8(GrayImage::from_raw(w32, h32, data).expect("sized above")),
        3 => DynamicImage::ImageRgb8(RgbImage::from_raw(w32, h32, data).expect("sized above")),
        _ => DynamicImage::ImageRgb8(
            RgbImage::from_raw(w32, h32, inverted_cmyk_to_rgb(&data)).expect("sized"),
        ),
    };
    Ok(Jpeg { image, exif, xmp })
}

/// The APP1 segments read before the first scan, as JpegImagePlugin keeps them.
unsafe fn markers(cinfo: &j::jpeg_decompress_struct) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    let (mut exif, mut xmp): (Option<Vec<u8>>, Option<Vec<u8>>) = (None, None);
    let mut m = cinfo.marker_list;
    while !m.is_null() {
        let mk = &*m;
        let data = if mk.data.is_null() {
            &[][..]
        } else {
            std::slice::from_raw_parts(mk.data, mk.data_length as usize)
        };
        if mk.marker as c_int == APP1 {
            if data.starts_with(EXIF_PREFIX) {
                match &mut exif {
                    Some(e) => e.extend_from_slice(&data[EXIF_PREFIX.len()..]),
                    None => exif = Some(data.to_vec()),
                }
            } else if data.starts_with(XMP_PREFIX) {
                xmp = Some(data[XMP_PREFIX.len()..].to_vec());
            }
        }
        m = mk.next;
    }
    (exif, xmp)
}

/// Pillow's `CMYK;I` unpacking (each sample inverted) followed by its `cmyk2rgb`
/// (Convert.c): `nk = 255 - k; c' = clip(nk - nk * c / 255)`, the division being its
/// rounded shift `MULDIV255`.
pub(crate) fn inverted_cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    fn muldiv255(a: i32, b: i32) -> i32 {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    }
    let mut out = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        let [c, m, y, k] = [px[0], px[1], px[2], px[3]].map(|v| 255 - v as i32);
        let nk = 255 - k;
        for v in [c, m, y] {
            out.push((nk - muldiv255(v, nk)).clamp(0, 255) as u8);
        }
    }
    out
}
