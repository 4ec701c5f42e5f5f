//! A small ONNX model writer: the protobuf messages the exporter needs (ModelProto,
//! GraphProto, NodeProto, TensorProto, ValueInfoProto, AttributeProto), encoded by hand
//! with field numbers from onnx/onnx.proto.
//!
//! Weights are never materialised: an initializer carries a closure that streams its
//! bytes, and the writer computes every length prefix up front so the file is written
//! front to back in one pass. Large graphs put their weights in an external data file.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

use blip2_core::Dim;

/// ONNX TensorProto.DataType values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    F32 = 1,
    U8 = 2,
    I8 = 3,
    I32 = 6,
    I64 = 7,
    Bool = 9,
    F16 = 10,
}

impl Elem {
    pub fn name(self) -> &'static str {
        match self {
            Elem::F32 => "float32",
            Elem::U8 => "uint8",
            Elem::I8 => "int8",
            Elem::I32 => "int32",
            Elem::I64 => "int64",
            Elem::Bool => "bool",
            Elem::F16 => "float16",
        }
    }
    pub fn size(self) -> usize {
        match self {
            Elem::F32 | Elem::I32 => 4,
            Elem::I64 => 8,
            Elem::Bool | Elem::U8 | Elem::I8 => 1,
            Elem::F16 => 2,
        }
    }
}

pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
    Str(String),
    Tensor(Tensor),
}

/// A small tensor embedded in an attribute (Constant, ConstantOfShape).
pub struct Tensor {
    pub elem: Elem,
    pub dims: Vec<i64>,
    pub raw: Vec<u8>,
}

pub struct Node {
    pub name: String,
    pub op_type: String,
    pub domain: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attrs: Vec<(String, Attr)>,
}

pub struct ValueInfo {
    pub name: String,
    pub elem: Elem,
    pub dims: Vec<Dim>,
}

pub type StreamFn<'a> = Box<dyn Fn(&mut dyn Write) -> std::io::Result<()> + 'a>;

pub struct Initializer<'a> {
    pub name: String,
    pub elem: Elem,
    pub dims: Vec<i64>,
    pub doc: Option<String>,
    pub data: InitData<'a>,
}

pub enum InitData<'a> {
    Inline(Vec<u8>),
    /// `len` bytes produced by the closure, checked when written.
    Stream {
        len: u64,
        write: StreamFn<'a>,
    },
}

impl InitData<'_> {
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> u64 {
        match self {
            InitData::Inline(v) => v.len() as u64,
            InitData::Stream { len, .. } => *len,
        }
    }
}

pub struct Graph<'a> {
    pub name: String,
    pub nodes: Vec<Node>,
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
    pub initializers: Vec<Initializer<'a>>,
}

pub struct Model<'a> {
    pub graph: Graph<'a>,
    /// (domain, version); "" is the default ONNX domain.
    pub opsets: Vec<(String, i64)>,
    pub producer: String,
    pub metadata: Vec<(String, String)>,
}

/// IR version 8 is read by every ONNX Runtime since 1.10 and covers opset 17.
pub const IR_VERSION: i64 = 8;
pub const OPSET: i64 = 17;
/// Protobuf cannot hold messages over 2 GiB; stay well below it.
pub const INLINE_LIMIT: u64 = 1_900_000_000;
/// Offsets of tensors in the external data file are aligned so it can be memory-mapped.
const EXTERNAL_ALIGN: u64 = 4096;

// --- protobuf primitives ------------------------------------------------------------

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(mut v: u64) -> u64 {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn key(out: &mut Vec<u8>, field: u32, wire: u32) {
    varint(out, ((field << 3) | wire) as u64);
}

fn int(out: &mut Vec<u8>, field: u32, v: i64) {
    key(out, field, 0);
    varint(out, v as u64);
}

fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    key(out, field, 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn float(out: &mut Vec<u8>, field: u32, v: f32) {
    key(out, field, 5);
    out.extend_from_slice(&v.to_le_bytes());
}

// --- messages -----------------------------------------------------------------------

fn tensor_meta(out: &mut Vec<u8>, name: &str, elem: Elem, dims: &[i64], doc: Option<&str>) {
    for &d in dims {
        int(out, 1, d);
    }
    int(out, 2, elem as i64);
    bytes(out, 8, name.as_bytes());
    if let Some(doc) = doc {
        bytes(out, 12, doc.as_bytes());
    }
}

fn encode_tensor(t: &Tensor, name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    tensor_meta(&mut out, name, t.elem, &t.dims, None);
    bytes(&mut out, 9, &t.raw);
    out
}

fn encode_attr(name: &str, a: &Attr) -> Vec<u8> {
    let mut out = Vec::new();
    bytes(&mut out, 1, name.as_bytes());
    match a {
        Attr::Float(f) => {
            float(&mut out, 2, *f);
            int(&mut out, 20, 1);
        }
        Attr::Int(i) => {
            int(&mut out, 3, *i);
            int(&mut out, 20, 2);
        }
        Attr::Str(s) => {
            bytes(&mut out, 4, s.as_bytes());
            int(&mut out, 20, 3);
        }
        Attr::Tensor(t) => {
            bytes(&mut out, 5, &encode_tensor(t, ""));
            int(&mut out, 20, 4);
        }
        Attr::Ints(v) => {
            for &i in v {
                int(&mut out, 8, i);
            }
            int(&mut out, 20, 7);
        }
    }
    out
}

fn encode_node(n: &Node) -> Vec<u8> {
    let mut out = Vec::new();
    for i in &n.inputs {
        bytes(&mut out, 1, i.as_bytes());
    }
    for o in &n.outputs {
        bytes(&mut out, 2, o.as_bytes());
    }
    bytes(&mut out, 3, n.name.as_bytes());
    bytes(&mut out, 4, n.op_type.as_bytes());
    for (name, a) in &n.attrs {
        bytes(&mut out, 5, &encode_attr(name, a));
    }
    if !n.domain.is_empty() {
        bytes(&mut out, 7, n.domain.as_bytes());
    }
    out
}

fn encode_value_info(v: &ValueInfo) -> Vec<u8> {
    let mut shape = Vec::new();
    for d in &v.dims {
        let mut dim = Vec::new();
        match d {
            Dim::Fixed(x) => int(&mut dim, 1, *x),
            Dim::Named(s) => bytes(&mut dim, 2, s.as_bytes()),
        }
        bytes(&mut shape, 1, &dim);
    }
    let mut tensor_type = Vec::new();
    int(&mut tensor_type, 1, v.elem as i64);
    bytes(&mut tensor_type, 2, &shape);
    let mut type_proto = Vec::new();
    bytes(&mut type_proto, 1, &tensor_type);
    let mut out = Vec::new();
    bytes(&mut out, 1, v.name.as_bytes());
    bytes(&mut out, 2, &type_proto);
    out
}

/// Where an initializer's bytes go: inline after its metadata, or at an offset of the
/// external data file.
enum Placement {
    Inline,
    External { offset: u64 },
}

/// Writes `model` to `path`. When the weights exceed what one protobuf can hold (or
/// `force_external` is set) they go to `external_name` beside the graph. Returns the
/// total bytes written.
pub fn write_model(
    model: &Model<'_>,
    path: &Path,
    external_name: &str,
    force_external: bool,
    progress: &mut dyn FnMut(u64),
) -> std::io::Result<u64> {
    let g = &model.graph;
    let weight_bytes: u64 = g.initializers.iter().map(|i| i.data.len()).sum();
    let external = force_external || weight_bytes > INLINE_LIMIT;

    // Place every initializer and encode its metadata.
    let mut metas = Vec::with_capacity(g.initializers.len());
    let mut offset = 0u64;
    for init in &g.initializers {
        let mut meta = Vec::new();
        tensor_meta(&mut meta, &init.name, init.elem, &init.dims, init.doc.as_deref());
        let placement = if external && matches!(init.data, InitData::Stream { .. }) {
            offset = offset.div_ceil(EXTERNAL_ALIGN) * EXTERNAL_ALIGN;
            let p = Placement::External { offset };
            for (k, v) in [
                ("location", external_name.to_string()),
                ("offset", offset.to_string()),
                ("length", init.data.len().to_string()),
            ] {
                let mut entry = Vec::new();
                bytes(&mut entry, 1, k.as_bytes());
                bytes(&mut entry, 2, v.as_bytes());
                bytes(&mut meta, 13, &entry);
            }
            int(&mut meta, 14, 1);
            offset += init.data.len();
            p
        } else {
            Placement::Inline
        };
        metas.push((meta, placement));
    }

    // The graph body: everything but the inline weight bytes is encoded in memory.
    let mut head = Vec::new();
    for n in &g.nodes {
        bytes(&mut head, 1, &encode_node(n));
    }
    bytes(&mut head, 2, g.name.as_bytes());
    let mut tail = Vec::new();
    for v in &g.inputs {
        bytes(&mut tail, 11, &encode_value_info(v));
    }
    for v in &g.outputs {
        bytes(&mut tail, 12, &encode_value_info(v));
    }
    let init_len = |meta: &[u8], p: &Placement, n: u64| -> u64 {
        match p {
            Placement::Inline => meta.len() as u64 + 1 + varint_len(n) + n,
            Placement::External { .. } => meta.len() as u64,
        }
    };
    let mut graph_len = head.len() as u64 + tail.len() as u64;
    for (init, (meta, p)) in g.initializers.iter().zip(&metas) {
        let l = init_len(meta, p, init.data.len());
        graph_len += 1 + varint_len(l) + l;
    }

    let mut model_head = Vec::new();
    int(&mut model_head, 1, IR_VERSION);
    bytes(&mut model_head, 2, model.producer.as_bytes());
    bytes(&mut model_head, 3, env!("CARGO_PKG_VERSION").as_bytes());
    key(&mut model_head, 7, 2);
    varint(&mut model_head, graph_len);
    let mut model_tail = Vec::new();
    for (domain, version) in &model.opsets {
        let mut o = Vec::new();
        bytes(&mut o, 1, domain.as_bytes());
        int(&mut o, 2, *version);
        bytes(&mut model_tail, 8, &o);
    }
    for (k, v) in &model.metadata {
        let mut entry = Vec::new();
        bytes(&mut entry, 1, k.as_bytes());
        bytes(&mut entry, 2, v.as_bytes());
        bytes(&mut model_tail, 14, &entry);
    }

    let mut w = PipedFile::create(path)?;
    w.write_all(&model_head)?;
    w.write_all(&head)?;
    let mut ext =
        if external { Some(PipedFile::create(&path.with_file_name(external_name))?) } else { None };
    let mut written = 0u64;
    for (init, (meta, p)) in g.initializers.iter().zip(&metas) {
        let n = init.data.len();
        let mut k = Vec::new();
        key(&mut k, 5, 2);
        varint(&mut k, init_len(meta, p, n));
        w.write_all(&k)?;
        w.write_all(meta)?;
        match p {
            Placement::Inline => {
                let mut k = Vec::new();
                key(&mut k, 9, 2);
                varint(&mut k, n);
                w.write_all(&k)?;
                write_data(&init.data, &init.name, &mut w)?;
            }
            Placement::External { offset } => {
                let e = ext.as_mut().expect("external file is open");
                let pos = e.position();
                if pos < *offset {
                    e.write_all(&vec![0u8; (offset - pos) as usize])?;
                }
                write_data(&init.data, &init.name, e)?;
            }
        }
        written += n;
        progress(n);
    }
    w.write_all(&tail)?;
    w.write_all(&model_tail)?;
    w.finish()?.sync_all()?;
    if let Some(e) = ext {
        e.finish()?.sync_all()?;
    }
    Ok(written)
}

/// A file written by a second thread: full buffers are handed over through a short
/// queue, so producing the bytes (converting, transposing, quantizing weights) and the
/// kernel's copying of them into the page cache run on two cores instead of taking turns.
/// (The copying is most of an export's time: about twice the producing. A second writer
/// thread, writing at offsets, measured more system time for no less wall time: writes to
/// one file take its inode lock in turn.)
struct PipedFile {
    buf: PageBuf,
    pos: u64,
    full: Option<SyncSender<PageBuf>>,
    empty: Receiver<PageBuf>,
    writer: Option<JoinHandle<std::io::Result<File>>>,
}

/// A page-aligned byte buffer of [`PipedFile::BUF`] bytes.
struct PageBuf {
    mem: Vec<u8>,
    start: usize,
    len: usize,
}

impl PageBuf {
    const PAGE: usize = 4096;

    fn new() -> Self {
        let mem = vec![0u8; PipedFile::BUF + Self::PAGE];
        let start = mem.as_ptr().align_offset(Self::PAGE);
        Self { mem, start, len: 0 }
    }
    fn bytes(&self) -> &[u8] {
        &self.mem[self.start..self.start + self.len]
    }
    fn room(&self) -> usize {
        PipedFile::BUF - self.len
    }
    fn push(&mut self, data: &[u8]) {
        let at = self.start + self.len;
        self.mem[at..at + data.len()].copy_from_slice(data);
        self.len += data.len();
    }
}

impl PipedFile {
    const BUF: usize = 256 << 10;

    fn create(path: &Path) -> std::io::Result<Self> {
        let mut file = File::create(path)?;
        // Four buffers queued, one being written, one being filled: 1.5 MB.
        let (full, queued) = sync_channel::<PageBuf>(4);
        let (recycle, empty) = channel::<PageBuf>();
        let writer = std::thread::Builder::new().name("export-writer".into()).spawn(move || {
            for mut b in queued {
                file.write_all(b.bytes())?;
                b.len = 0;
                let _ = recycle.send(b);
            }
            Ok(file)
        })?;
        Ok(Self { buf: PageBuf::new(), pos: 0, full: Some(full), empty, writer: Some(writer) })
    }

    /// Bytes written so far (the file's length once all is written).
    fn position(&self) -> u64 {
        self.pos
    }

    fn hand_over(&mut self) -> std::io::Result<()> {
        if self.buf.len == 0 {
            return Ok(());
        }
        let next = self.empty.try_recv().unwrap_or_else(|_| PageBuf::new());
        let b = std::mem::replace(&mut self.buf, next);
        let sent = self.full.as_ref().map(|f| f.send(b).is_ok()).unwrap_or(false);
        if sent {
            Ok(())
        } else {
            // The writer stopped: its error says why.
            Err(self.join().err().unwrap_or_else(|| std::io::Error::other("export writer stopped")))
        }
    }

    /// Closes the queue and waits for the writer: the file, or the error it met.
    fn join(&mut self) -> std::io::Result<File> {
        self.full = None;
        match self.writer.take() {
            Some(t) => {
                t.join().map_err(|_| std::io::Error::other("export writer thread panicked"))?
            }
            None => Err(std::io::Error::other("export writer already finished")),
        }
    }

    /// Writes what is buffered and returns the file once every byte is written.
    fn finish(mut self) -> std::io::Result<File> {
        self.hand_over()?;
        self.join()
    }
}

impl Write for PipedFile {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(self.buf.room());
        self.buf.push(&data[..n]);
        self.pos += n as u64;
        if self.buf.room() == 0 {
            self.hand_over()?;
        }
        Ok(n)
    }
    /// Hands the buffer to the writer thread (it reaches the file soon after).
    fn flush(&mut self) -> std::io::Result<()> {
        self.hand_over()
    }
}

/// Streams one initializer and checks it produced exactly the promised length, so a
/// shape bug can never yield a file whose length prefixes lie.
fn write_data(d: &InitData<'_>, name: &str, w: &mut dyn Write) -> std::io::Result<()> {
    match d {
        InitData::Inline(v) => w.write_all(v),
        InitData::Stream { len, write } => {
            let mut counter = Counting { inner: w, n: 0 };
            write(&mut counter)?;
            if counter.n != *len {
                return Err(std::io::Error::other(format!(
                    "initializer {name}: wrote {} bytes, expected {len}",
                    counter.n
                )));
            }
            Ok(())
        }
    }
}

struct Counting<'w> {
    inner: &'w mut dyn Write,
    n: u64,
}

impl Write for Counting<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
