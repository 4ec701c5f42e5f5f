//! Reading a written graph back, and the checks the exporter holds its CUDA-target
//! graphs to.
//!
//! [`read_graph`] decodes the parts of an ONNX file a check needs (nodes, graph inputs
//! and outputs, initializer names), never the weights. [`host_read_violations`] finds
//! the inputs that ONNX Runtime's CUDA kernels read in host memory but that the graph
//! computes on the device: each such value is copied to the host in the middle of a run
//! (a MemcpyToHost node and a stream sync), and a session with CUDA graph capture on
//! refuses the graph outright.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use crate::onnx::{Graph, Node};

/// The inputs that ONNX Runtime's CUDA kernels declare as host memory
/// (`InputMemoryType(OrtMemTypeCPUInput, i)` in their kernel registrations), as
/// (op type, domain, input indices), for the operators and opsets a BLIP-2 export can
/// hold. Taken from ONNX Runtime's sources: `onnxruntime/core/providers/cuda/**` and
/// `onnxruntime/contrib_ops/cuda/**` (main branch of early 2026, release 1.25; the
/// 1.31.1 sources were not at hand, and kernels only ever gain such inputs with new
/// opsets). Operators not listed read every input on the device.
pub const CUDA_HOST_INPUTS: &[(&str, &str, &[usize])] = &[
    ("TopK", "", &[1]),
    ("Reshape", "", &[1]),
    ("Expand", "", &[1]),
    ("Squeeze", "", &[1]),
    ("Unsqueeze", "", &[1]),
    ("Slice", "", &[1, 2, 3, 4]),
    ("Pad", "", &[1, 2, 3]),
    ("Range", "", &[0, 1, 2]),
    ("Tile", "", &[1]),
    ("ConstantOfShape", "", &[0]),
    ("CumSum", "", &[1]),
    ("Split", "", &[1]),
    ("Trilu", "", &[1]),
    ("OneHot", "", &[1, 2]),
    ("Resize", "", &[1, 2, 3]),
    ("Upsample", "", &[1]),
    ("Dropout", "", &[1, 2]),
    ("NonMaxSuppression", "", &[2, 3, 4]),
    ("MatMulInteger", "", &[2, 3]),
    // Reduce operators take their axes as an input from opset 18 (ReduceSum from 13).
    ("ReduceSum", "", &[1]),
    ("ReduceMean", "", &[1]),
    ("ReduceMax", "", &[1]),
    ("ReduceMin", "", &[1]),
    ("ReduceProd", "", &[1]),
    ("ReduceSumSquare", "", &[1]),
    ("ReduceLogSum", "", &[1]),
    ("ReduceLogSumExp", "", &[1]),
    ("ReduceL1", "", &[1]),
    ("ReduceL2", "", &[1]),
    ("GroupQueryAttention", "com.microsoft", &[6]),
    ("DecoderMaskedMultiHeadAttention", "com.microsoft", &[7, 8]),
    ("DecoderMaskedSelfAttention", "com.microsoft", &[6, 7]),
    ("MultiHeadAttention", "com.microsoft", &[8]),
    ("Attention", "com.microsoft", &[6]),
    ("SparseAttention", "com.microsoft", &[7]),
    ("RelativePositionBias", "com.microsoft", &[1, 2]),
    ("Trilu", "com.microsoft", &[1]),
];

/// The input indices of `node` that ONNX Runtime's CUDA kernel reads in host memory.
pub fn host_inputs(node: &Node) -> &'static [usize] {
    let domain = if node.domain == "ai.onnx" { "" } else { node.domain.as_str() };
    CUDA_HOST_INPUTS
        .iter()
        .find(|(op, d, _)| *op == node.op_type && *d == domain)
        .map_or(&[], |(_, _, idx)| idx)
}

/// An input that a CUDA kernel reads on the host but that does not arrive there by
/// itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostReadViolation {
    /// The reading node's name and op type.
    pub node: String,
    pub op_type: String,
    /// Its input index and the value's name.
    pub index: usize,
    pub value: String,
    pub why: &'static str,
}

impl std::fmt::Display for HostReadViolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}) input {} `{}`: {}",
            self.node, self.op_type, self.index, self.value, self.why
        )
    }
}

/// Every host-read input of `g` whose value ONNX Runtime would have to copy from the
/// device. Allowed are graph inputs fed straight in (and read nowhere on the device,
/// or ONNX Runtime copies them there and back) and values derived only from
/// initializers, Constant nodes and Shape / Size outputs, which ONNX Runtime computes
/// on the host.
pub fn host_read_violations(g: &Graph) -> Vec<HostReadViolation> {
    let producer: HashMap<&str, &Node> =
        g.nodes.iter().flat_map(|n| n.outputs.iter().map(move |o| (o.as_str(), n))).collect();
    let inputs: HashSet<&str> = g.inputs.iter().map(|i| i.name.as_str()).collect();
    let inits: HashSet<&str> = g.initializers.iter().map(|i| i.name.as_str()).collect();
    // Every place a value is read: (node, input index).
    let mut reads: HashMap<&str, Vec<(&Node, usize)>> = HashMap::new();
    for n in &g.nodes {
        for (i, v) in n.inputs.iter().enumerate() {
            reads.entry(v.as_str()).or_default().push((n, i));
        }
    }
    let mut memo: HashMap<String, bool> = HashMap::new();
    let mut out = Vec::new();
    for n in &g.nodes {
        for &i in host_inputs(n) {
            let Some(v) = n.inputs.get(i).filter(|v| !v.is_empty()) else { continue };
            let why = if inits.contains(v.as_str()) {
                None
            } else if inputs.contains(v.as_str()) {
                let on_device = reads[v.as_str()].iter().any(|(m, j)| !host_inputs(m).contains(j));
                on_device.then_some(
                    "a graph input that is also read on the device, so ONNX Runtime copies it",
                )
            } else if host_derived(v, &producer, &inits, &mut memo) {
                None
            } else {
                Some("computed on the device: feed it from a graph input of its own")
            };
            if let Some(why) = why {
                out.push(HostReadViolation {
                    node: n.name.clone(),
                    op_type: n.op_type.clone(),
                    index: i,
                    value: v.clone(),
                    why,
                });
            }
        }
    }
    out
}

/// Whether `v` is computed from initializers, Constant nodes and Shape / Size outputs
/// alone (graph inputs excluded: a node that reads one runs on the device).
fn host_derived(
    v: &str,
    producer: &HashMap<&str, &Node>,
    inits: &HashSet<&str>,
    memo: &mut HashMap<String, bool>,
) -> bool {
    if inits.contains(v) {
        return true;
    }
    if let Some(&known) = memo.get(v) {
        return known;
    }
    let ok = match producer.get(v) {
        None => false,
        Some(n) => match n.op_type.as_str() {
            "Shape" | "Size" | "Constant" if n.domain.is_empty() => true,
            _ => n
                .inputs
                .iter()
                .filter(|i| !i.is_empty())
                .all(|i| host_derived(i, producer, inits, memo)),
        },
    };
    memo.insert(v.to_string(), ok);
    ok
}

/// Why a graph file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{path}: cannot read: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: not an ONNX model ({what})")]
    Malformed { path: String, what: &'static str },
}

/// The structure of the ONNX model in `path`: its graph's nodes (name, op type, domain,
/// inputs, outputs; attributes are not read), inputs, outputs (names only: element
/// types and dims are left as float32 and empty) and initializer names (no data).
pub fn read_graph(path: &Path) -> Result<Graph<'static>, ReadError> {
    let bytes = std::fs::read(path)
        .map_err(|source| ReadError::Io { path: path.display().to_string(), source })?;
    let bad = |what| ReadError::Malformed { path: path.display().to_string(), what };
    let graph = fields(&bytes)
        .map_err(bad)?
        .into_iter()
        .find_map(|(f, Field::Bytes(b))| (f == 7).then_some(b))
        .ok_or(bad("no graph"))?;
    decode_graph(graph).map_err(bad)
}

enum Field<'a> {
    Bytes(&'a [u8]),
}

/// The length-delimited fields of one protobuf message, in order (numbers skipped: no
/// check reads one).
fn fields(mut b: &[u8]) -> Result<Vec<(u32, Field<'_>)>, &'static str> {
    fn varint(b: &mut &[u8]) -> Result<u64, &'static str> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first().ok_or("truncated varint")?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long")
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let field = (key >> 3) as u32;
        match key & 7 {
            0 => {
                varint(&mut b)?;
            }
            1 => b = b.get(8..).ok_or("truncated fixed64")?,
            5 => b = b.get(4..).ok_or("truncated fixed32")?,
            2 => {
                let len = varint(&mut b)? as usize;
                let (v, rest) =
                    (b.get(..len).ok_or("truncated field")?, b.get(len..).unwrap_or_default());
                b = rest;
                out.push((field, Field::Bytes(v)));
            }
            _ => return Err("unknown wire type"),
        }
    }
    Ok(out)
}

fn text(v: &[u8]) -> Result<String, &'static str> {
    String::from_utf8(v.to_vec()).map_err(|_| "a name that is not UTF-8")
}

/// The string field `field` of a message (the first one), or "".
fn name_of(msg: &[u8], field: u32) -> Result<String, &'static str> {
    for (f, v) in fields(msg)? {
        let Field::Bytes(b) = v;
        if f == field {
            return text(b);
        }
    }
    Ok(String::new())
}

fn decode_graph(b: &[u8]) -> Result<Graph<'static>, &'static str> {
    use crate::onnx::{Elem, InitData, Initializer, ValueInfo};
    let value = |msg: &[u8]| -> Result<ValueInfo, &'static str> {
        Ok(ValueInfo { name: name_of(msg, 1)?, elem: Elem::F32, dims: Vec::new() })
    };
    let mut g = Graph {
        name: String::new(),
        nodes: Vec::new(),
        inputs: Vec::new(),
        outputs: Vec::new(),
        initializers: Vec::new(),
    };
    for (f, v) in fields(b)? {
        let Field::Bytes(msg) = v;
        match f {
            1 => {
                let mut n = Node {
                    name: String::new(),
                    op_type: String::new(),
                    domain: String::new(),
                    inputs: Vec::new(),
                    outputs: Vec::new(),
                    attrs: Vec::new(),
                };
                for (nf, nv) in fields(msg)? {
                    let Field::Bytes(s) = nv;
                    match nf {
                        1 => n.inputs.push(text(s)?),
                        2 => n.outputs.push(text(s)?),
                        3 => n.name = text(s)?,
                        4 => n.op_type = text(s)?,
                        7 => n.domain = text(s)?,
                        _ => {}
                    }
                }
                g.nodes.push(n);
            }
            2 => g.name = text(msg)?,
            5 => g.initializers.push(Initializer {
                name: name_of(msg, 8)?,
                elem: Elem::F32,
                dims: Vec::new(),
                doc: None,
                data: InitData::Inline(Vec::new()),
            }),
            11 => g.inputs.push(value(msg)?),
            12 => g.outputs.push(value(msg)?),
            _ => {}
        }
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{Elem, InitData, Initializer, ValueInfo};

    fn node(op: &str, domain: &str, inputs: &[&str], output: &str) -> Node {
        Node {
            name: format!("/{op}"),
            op_type: op.into(),
            domain: domain.into(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: vec![output.into()],
            attrs: Vec::new(),
        }
    }

    fn graph(nodes: Vec<Node>, inputs: &[&str], inits: &[&str]) -> Graph<'static> {
        let value = |n: &&str| ValueInfo { name: n.to_string(), elem: Elem::I64, dims: vec![] };
        Graph {
            name: "g".into(),
            nodes,
            inputs: inputs.iter().map(value).collect(),
            outputs: Vec::new(),
            initializers: inits
                .iter()
                .map(|n| Initializer {
                    name: n.to_string(),
                    elem: Elem::I64,
                    dims: vec![],
                    doc: None,
                    data: InitData::Inline(Vec::new()),
                })
                .collect(),
        }
    }

    #[test]
    fn a_host_read_input_computed_on_the_device_is_found() {
        // TopK's K from an Unsqueeze of a graph input: ONNX Runtime keeps the Unsqueeze
        // on CUDA and copies its output to the host.
        let g = graph(
            vec![
                node("Unsqueeze", "", &["top_k", "axes"], "k"),
                node("TopK", "", &["x", "k"], "top"),
            ],
            &["x", "top_k"],
            &["axes"],
        );
        let v = host_read_violations(&g);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!((v[0].op_type.as_str(), v[0].index, v[0].value.as_str()), ("TopK", 1, "k"));
        // Fed straight in, it is fine; so are values from shapes and constants.
        let g = graph(
            vec![
                node("TopK", "", &["x", "top_k"], "top"),
                node("Shape", "", &["x"], "s"),
                node("Gather", "", &["s", "i"], "d"),
                node("Concat", "", &["d", "c"], "shape"),
                node("Reshape", "", &["x", "shape"], "y"),
                node("Constant", "", &[], "r"),
                node("Range", "", &["zero", "r", "one"], "z"),
            ],
            &["x", "top_k"],
            &["i", "c", "zero", "one"],
        );
        assert_eq!(host_read_violations(&g), []);
        // A Range bound from a device sum of a graph input, and a host-read graph input
        // that a device kernel reads too.
        let g = graph(
            vec![
                node("Add", "", &["p", "one"], "t"),
                node("Range", "", &["zero", "t", "one"], "z"),
                node("GroupQueryAttention", "com.microsoft", &["q", "", "", "", "", "", "n"], "a"),
                node("Cast", "", &["n"], "nf"),
            ],
            &["p", "q", "n"],
            &["zero", "one"],
        );
        let v: Vec<(String, usize)> =
            host_read_violations(&g).into_iter().map(|v| (v.op_type, v.index)).collect();
        assert_eq!(v, [("Range".to_string(), 1), ("GroupQueryAttention".to_string(), 6)]);
    }
}
