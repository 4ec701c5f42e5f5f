//! EXIF orientation as `PIL.ImageOps.exif_transpose` finds and applies it (Pillow 13):
//! the Orientation tag (274) of the first IFD of the image's EXIF block (JPEG APP1, PNG
//! eXIf or a "Raw profile type exif" text chunk, WebP EXIF, or the TIFF file's own first
//! IFD), else a `tiff:Orientation` attribute or element in the image's XMP packet; values
//! 2 to 8 transpose the image, anything else leaves it as it is.

use image::DynamicImage;

/// The value of Orientation that changes nothing.
pub const UPRIGHT: u16 = 1;

/// Orientation from an EXIF block (a TIFF structure, with up to two `Exif\0\0` prefixes),
/// read as Pillow's `Exif.load` + `ImageFileDirectory_v2.load` read it: the first entry
/// for a tag wins, an entry whose data lies outside the block is skipped, a short block
/// keeps the entries read so far. `None` when the block has no Orientation entry,
/// `Some(None)` when it has one that is not an orientation value. (Where Pillow raises on
/// a block that is not TIFF at all, this gives `None`.)
pub fn from_exif(data: &[u8]) -> Option<Option<u16>> {
    let mut d = data;
    for _ in 0..2 {
        if let Some(rest) = d.strip_prefix(b"Exif\0\0") {
            d = rest;
        }
    }
    from_tiff(d)
}

/// Orientation in the first IFD of a TIFF structure (a TIFF file, or an EXIF block
/// without its prefix).
pub fn from_tiff(d: &[u8]) -> Option<Option<u16>> {
    let head = d.get(..8)?;
    let big = match &head[..4] {
        b"MM\x00\x2a" | b"MM\x2a\x00" => true,
        b"II\x2a\x00" | b"II\x00\x2a" => false,
        // BigTIFF (0x2b) holds no EXIF in practice; leave it alone.
        _ => return None,
    };
    let u16_at = |o: usize| -> Option<u16> {
        let b = d.get(o..o + 2)?;
        Some(if big { u16::from_be_bytes([b[0], b[1]]) } else { u16::from_le_bytes([b[0], b[1]]) })
    };
    let u32_at = |o: usize| -> Option<u32> {
        let b: [u8; 4] = d.get(o..o + 4)?.try_into().ok()?;
        Some(if big { u32::from_be_bytes(b) } else { u32::from_le_bytes(b) })
    };
    let ifd = u32_at(4)? as usize;
    let count = u16_at(ifd)? as usize;
    for i in 0..count {
        let e = ifd + 2 + i * 12;
        // A short directory ends the reading, keeping what was read (no earlier 274).
        let (tag, typ, n) = (u16_at(e)?, u16_at(e + 2)?, u32_at(e + 4)? as usize);
        if tag != 274 {
            continue;
        }
        let unit = match typ {
            1 | 2 | 6 | 7 => 1,
            3 | 8 => 2,
            4 | 9 | 11 | 13 => 4,
            5 | 10 | 12 | 16 => 8,
            // Pillow skips types it does not know and reads on.
            _ => continue,
        };
        let size = n.checked_mul(unit)?;
        let at = if size > 4 { u32_at(e + 8)? as usize } else { e + 8 };
        let Some(v) = d.get(at..at.checked_add(size)?) else {
            // Data outside the block: Pillow warns and skips the entry.
            continue;
        };
        if v.is_empty() {
            continue;
        }
        // The first entry for a tag wins; Orientation keeps its first value.
        return Some(value(typ, v, big));
    }
    None
}

/// The first value of an entry, as an orientation when it equals an integer 2..=8 (Python
/// compares 6.0 and Fraction(6, 1) equal to 6); bytes and strings never match.
fn value(typ: u16, v: &[u8], big: bool) -> Option<u16> {
    let u16v = |b: &[u8]| {
        if big {
            u16::from_be_bytes([b[0], b[1]])
        } else {
            u16::from_le_bytes([b[0], b[1]])
        }
    };
    let u32v = |b: &[u8]| {
        let b: [u8; 4] = b[..4].try_into().unwrap();
        if big {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    };
    let u64v = |b: &[u8]| {
        let b: [u8; 8] = b[..8].try_into().unwrap();
        if big {
            u64::from_be_bytes(b)
        } else {
            u64::from_le_bytes(b)
        }
    };
    let x: f64 = match typ {
        3 => u16v(v) as f64,
        4 | 13 => u32v(v) as f64,
        6 => v[0] as i8 as f64,
        8 => u16v(v) as i16 as f64,
        9 => u32v(v) as i32 as f64,
        11 => f32::from_bits(u32v(v)) as f64,
        12 => f64::from_bits(u64v(v)),
        16 => u64v(v) as f64,
        5 | 10 => {
            let (num, den) = (u32v(v), u32v(&v[4..]));
            let (num, den) = if typ == 10 {
                (num as i32 as f64, den as i32 as f64)
            } else {
                (num as f64, den as f64)
            };
            if den == 0.0 {
                return None;
            }
            num / den
        }
        _ => return None,
    };
    (x.fract() == 0.0 && (2.0..=8.0).contains(&x)).then_some(x as u16)
}

/// Orientation from an XMP packet, Pillow's `tiff:Orientation(="|>)([0-9])`.
pub fn from_xmp(xmp: &[u8]) -> Option<u16> {
    const KEY: &[u8] = b"tiff:Orientation";
    let mut from = 0;
    while let Some(at) = find(&xmp[from..], KEY) {
        let rest = &xmp[from + at + KEY.len()..];
        let digit = match rest {
            [b'=', b'"', d, ..] | [b'>', d, ..] if d.is_ascii_digit() => Some(d - b'0'),
            _ => None,
        };
        if let Some(d) = digit {
            return Some(d as u16);
        }
        from += at + 1;
    }
    None
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Pillow's choice: the EXIF entry when the EXIF block has one (whatever its value),
/// else XMP's.
pub fn resolve(exif: Option<Option<u16>>, xmp: Option<&[u8]>) -> u16 {
    match exif {
        Some(v) => v,
        None => xmp.and_then(from_xmp),
    }
    .unwrap_or(UPRIGHT)
}

/// The image turned upright: Pillow's transposition for each orientation value.
pub fn apply(img: DynamicImage, orientation: u16) -> DynamicImage {
    match orientation {
        2 => img.fliph(),             // FLIP_LEFT_RIGHT
        3 => img.rotate180(),         // ROTATE_180
        4 => img.flipv(),             // FLIP_TOP_BOTTOM
        5 => img.rotate90().fliph(),  // TRANSPOSE: (x, y) <- (y, x)
        6 => img.rotate90(),          // ROTATE_270 counter-clockwise
        7 => img.rotate270().fliph(), // TRANSVERSE: (x, y) <- (w-1-y, h-1-x)
        8 => img.rotate270(),         // ROTATE_90 counter-clockwise
        _ => img,
    }
}

/// Where Pillow finds the EXIF block and XMP packet of a PNG: the last `eXIf` chunk (or a
/// `tEXt` chunk keyed `exif`), else a "Raw profile type exif" text chunk (hex, after three
/// header lines); XMP from a text chunk keyed `XML:com.adobe.xmp`. Chunks after the image
/// data count too. Compressed text chunks (zTXt, compressed iTXt) are not read.
pub fn png_orientation(bytes: &[u8]) -> u16 {
    let mut exif: Option<Vec<u8>> = None;
    let mut raw_profile: Option<Vec<u8>> = None;
    let mut xmp: Option<Vec<u8>> = None;
    let mut at = 8;
    while let Some(h) = bytes.get(at..at + 8) {
        let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let kind = &h[4..8];
        let Some(data) = bytes.get(at + 8..(at + 8).saturating_add(len)) else { break };
        match kind {
            b"eXIf" => exif = Some([b"Exif\0\0".as_slice(), data].concat()),
            b"tEXt" => {
                let (k, v) = split_nul(data);
                match k {
                    b"exif" => exif = Some(v.to_vec()),
                    b"Raw profile type exif" => raw_profile = Some(v.to_vec()),
                    b"XML:com.adobe.xmp" => xmp = Some(v.to_vec()),
                    _ => {}
                }
            }
            b"iTXt" => {
                // keyword \0 compressed-flag method language \0 translated-keyword \0 text
                let (k, r) = split_nul(data);
                if let [0, _, rest @ ..] = r {
                    let (_lang, r) = split_nul(rest);
                    let (_tk, v) = split_nul(r);
                    match k {
                        b"XML:com.adobe.xmp" => xmp = Some(v.to_vec()),
                        b"Raw profile type exif" => raw_profile = Some(v.to_vec()),
                        _ => {}
                    }
                }
            }
            b"IEND" => break,
            _ => {}
        }
        at += 12 + len;
    }
    let exif = exif.or_else(|| raw_profile.map(|r| raw_profile_exif(&r)));
    resolve(exif.as_deref().and_then(from_exif), xmp.as_deref())
}

/// ImageMagick's "Raw profile type exif": `\nexif\n  LENGTH\nHEX...`, the hex digits after
/// the third newline (Pillow drops the first three lines and ignores the length).
fn raw_profile_exif(text: &[u8]) -> Vec<u8> {
    let body: Vec<u8> = text.split(|&b| b == b'\n').skip(3).flatten().copied().collect();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    // Python's bytes.fromhex skips whitespace between pairs and refuses anything else.
    let digits: Vec<u8> = body.iter().copied().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(digits.len() / 2);
    for pair in digits.chunks(2) {
        match (pair.first().and_then(|&c| hex(c)), pair.get(1).and_then(|&c| hex(c))) {
            (Some(a), Some(b)) => out.push(a << 4 | b),
            _ => return Vec::new(),
        }
    }
    out
}

fn split_nul(d: &[u8]) -> (&[u8], &[u8]) {
    match d.iter().position(|&b| b == 0) {
        Some(i) => (&d[..i], &d[i + 1..]),
        None => (d, &[]),
    }
}

/// A WebP's EXIF and XMP chunks (the first of each), as libwebp's demuxer hands them to
/// Pillow.
pub fn webp_orientation(bytes: &[u8]) -> u16 {
    let (mut exif, mut xmp): (Option<&[u8]>, Option<&[u8]>) = (None, None);
    let mut at = 12;
    while let Some(h) = bytes.get(at..at + 8) {
        let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
        let Some(data) = bytes.get(at + 8..(at + 8).saturating_add(len)) else { break };
        match &h[..4] {
            b"EXIF" if exif.is_none() => exif = Some(data),
            b"XMP " if xmp.is_none() => xmp = Some(data),
            _ => {}
        }
        at += 8 + len + (len & 1);
    }
    resolve(exif.and_then(from_exif), xmp)
}
