//! Graph building: a [`Builder`] that names nodes by path
//! (`/vision/layers.0/attn/qkv/MatMul`, output `{node}/output_0`), makes each constant
//! once (`/constants/INT64/[0, 0, -1]`), and takes weights straight from the checkpoint
//! under their checkpoint names. The blocks the graphs share are in [`crate::blocks`].

use std::collections::HashMap;

use blip2_core::Dim;

use crate::checkpoint::{write_converted, Checkpoint, DType, TensorView};
use crate::error::Result;
use crate::onnx::{Attr, Elem, Graph, InitData, Initializer, Node, ValueInfo};
use crate::quantize::{ChannelQuantizer, Quantizer};

/// ONNX Runtime's contrib operator domain (MatMulNBits, DynamicQuantizeMatMul).
pub const MS_DOMAIN: &str = "com.microsoft";

/// How a graph's projections (`x @ W^T` for a checkpoint `[out, in]` weight) keep their
/// weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Projection {
    /// In the graph's float type: MatMul on the transposed weight.
    #[default]
    Float,
    /// ONNX Runtime's MatMulNBits: `bits`-bit values in blocks of `block` along K
    /// (`--quantize`).
    NBits { bits: u32, block: usize },
    /// ONNX Runtime's DynamicQuantizeMatMul: int8 weights with one scale per output
    /// channel, activations quantized to int8 per call (`--quantize-encoders`).
    DynamicInt8,
    /// int8 weights with one scale per output channel, and each row of the activations
    /// quantized to int8 with its own scale, in standard operators around MatMulInteger
    /// (`--quantize-lm-activations`); the LM head keeps 8-bit MatMulNBits.
    RowInt8,
}

pub struct Builder<'a> {
    ck: &'a Checkpoint,
    /// Element type of this graph's weights and activations.
    float: Elem,
    /// How this graph's projections keep their weights.
    projection: Projection,
    nodes: Vec<Node>,
    inits: Vec<Initializer<'a>>,
    inputs: Vec<ValueInfo>,
    outputs: Vec<ValueInfo>,
    consts: HashMap<String, String>,
    weights: HashMap<String, String>,
    node_names: std::collections::HashSet<String>,
    /// Node outputs that are graph outputs: tensor name to output name.
    renames: HashMap<String, String>,
    pub weight_bytes: u64,
    /// Build for ONNX Runtime's CUDA provider (`--target cuda`): attention as
    /// com.microsoft MultiHeadAttention / GroupQueryAttention, and every layer norm of a
    /// residual sum fused into SkipLayerNormalization at [`Builder::finish`].
    fused: bool,
    /// Outputs of residual additions ([`Builder::residual`]), the fusion candidates.
    residuals: std::collections::HashSet<String>,
}

impl<'a> Builder<'a> {
    /// A graph in `float` with plain projections; see [`Builder::projection`] and
    /// [`Builder::fused`] for the others.
    pub fn new(ck: &'a Checkpoint, float: Elem) -> Self {
        Self {
            ck,
            float,
            projection: Projection::Float,
            nodes: Vec::new(),
            inits: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            consts: HashMap::new(),
            weights: HashMap::new(),
            node_names: Default::default(),
            renames: HashMap::new(),
            weight_bytes: 0,
            fused: false,
            residuals: Default::default(),
        }
    }

    /// The graph's projections keep their weights as `projection` says.
    pub fn with_projection(mut self, projection: Projection) -> Self {
        self.projection = projection;
        self
    }

    /// Builds with ONNX Runtime's fused CUDA operators (`--target cuda`).
    pub fn with_fused_operators(mut self, fused: bool) -> Self {
        self.fused = fused;
        self
    }

    /// The element type of the graph's weights and activations (at this point of it).
    pub fn float(&self) -> Elem {
        self.float
    }

    pub fn projection(&self) -> Projection {
        self.projection
    }

    pub fn fused(&self) -> bool {
        self.fused
    }

    /// Builds part of the graph in another float type and projection mode (the
    /// Q-Former's fp32 layers end in a projection in the language model's type, never
    /// quantized), the graph's own restored after.
    pub fn scoped<T>(
        &mut self,
        float: Elem,
        projection: Projection,
        build: impl FnOnce(&mut Self) -> T,
    ) -> T {
        let saved = (
            std::mem::replace(&mut self.float, float),
            std::mem::replace(&mut self.projection, projection),
        );
        let out = build(self);
        (self.float, self.projection) = saved;
        out
    }

    /// `a + b` where one side is the residual stream: a LayerNormalization reading the
    /// sum becomes one SkipLayerNormalization in fused graphs (see [`Builder::finish`]).
    pub fn residual(&mut self, path: &str, a: &str, b: &str) -> String {
        let out = self.op(path, "Add", &[a, b], vec![]);
        self.residuals.insert(out.clone());
        out
    }

    pub fn input(&mut self, name: &str, elem: Elem, dims: Vec<Dim>) -> String {
        self.inputs.push(ValueInfo { name: name.into(), elem, dims });
        name.into()
    }

    /// An input with a default value: an initializer of the same name, which a caller's
    /// feed replaces (ONNX IR >= 4).
    pub fn input_with_default(
        &mut self,
        name: &str,
        elem: Elem,
        dims: Vec<i64>,
        raw: Vec<u8>,
    ) -> String {
        let shape = dims.iter().map(|&d| Dim::Fixed(d)).collect();
        self.inputs.push(ValueInfo { name: name.into(), elem, dims: shape });
        self.inits.push(Initializer {
            name: name.into(),
            elem,
            dims,
            doc: None,
            data: InitData::Inline(raw),
        });
        name.into()
    }

    /// Exposes `tensor` as the graph output `name`.
    ///
    /// The node that makes `tensor` is given `name` as its output (at [`Builder::finish`]),
    /// so no Identity copies it: for the KV cache that copy was ~5% of a decode step.
    /// A graph input, or a tensor already exposed under another name, goes through an
    /// Identity node instead.
    pub fn output(&mut self, tensor: &str, name: &str, elem: Elem, dims: Vec<Dim>) {
        self.outputs.push(ValueInfo { name: name.into(), elem, dims });
        let made_by_node = self.nodes.iter().any(|n| n.outputs.iter().any(|o| o == tensor));
        if made_by_node && !self.renames.contains_key(tensor) {
            self.renames.insert(tensor.into(), name.into());
            return;
        }
        self.nodes.push(Node {
            name: format!("/outputs/{name}/Identity"),
            op_type: "Identity".into(),
            domain: String::new(),
            inputs: vec![tensor.into()],
            outputs: vec![name.into()],
            attrs: Vec::new(),
        });
    }

    /// Adds node `path` and returns its single output, `{path}/output_0`.
    pub fn op(
        &mut self,
        path: &str,
        op: &str,
        inputs: &[&str],
        attrs: Vec<(&str, Attr)>,
    ) -> String {
        self.op_n(path, op, inputs, attrs, 1).pop().expect("one output")
    }

    pub fn op_n(
        &mut self,
        path: &str,
        op: &str,
        inputs: &[&str],
        attrs: Vec<(&str, Attr)>,
        n: usize,
    ) -> Vec<String> {
        // Node names are graph paths and must be unique; a clash is a builder bug.
        assert!(self.node_names.insert(path.to_string()), "duplicate node name {path}");
        let outputs: Vec<String> = (0..n).map(|i| format!("{path}/output_{i}")).collect();
        self.nodes.push(Node {
            name: path.into(),
            op_type: op.into(),
            domain: String::new(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: outputs.clone(),
            attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        });
        outputs
    }

    pub(crate) fn constant(
        &mut self,
        key: String,
        elem: Elem,
        dims: Vec<i64>,
        raw: Vec<u8>,
    ) -> String {
        if let Some(name) = self.consts.get(&key) {
            return name.clone();
        }
        self.inits.push(Initializer {
            name: key.clone(),
            elem,
            dims,
            doc: None,
            data: InitData::Inline(raw),
        });
        self.consts.insert(key.clone(), key.clone());
        key
    }

    /// A 1-D int64 constant.
    pub fn ints(&mut self, v: &[i64]) -> String {
        let raw = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.constant(format!("/constants/INT64/{v:?}"), Elem::I64, vec![v.len() as i64], raw)
    }

    /// A 1-D int64 lookup table under a descriptive name.
    pub fn int_table(&mut self, key: &str, v: &[i64]) -> String {
        let raw = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.constant(key.to_string(), Elem::I64, vec![v.len() as i64], raw)
    }

    /// A scalar int64 constant.
    pub fn int(&mut self, v: i64) -> String {
        self.constant(format!("/constants/INT64/{v}"), Elem::I64, vec![], v.to_le_bytes().to_vec())
    }

    /// A scalar constant of the graph's float type.
    pub fn scalar(&mut self, v: f32) -> String {
        let elem = self.float;
        self.scalar_of(v, elem)
    }

    pub fn scalar_of(&mut self, v: f32, elem: Elem) -> String {
        let (tag, raw) = match elem {
            Elem::F16 => ("FLOAT16", half::f16::from_f32(v).to_le_bytes().to_vec()),
            _ => ("FLOAT", v.to_le_bytes().to_vec()),
        };
        self.constant(format!("/constants/{tag}/{v:e}"), elem, vec![], raw)
    }

    /// The most negative finite value of the graph's float type, for masked scores.
    pub fn mask_value(&mut self) -> String {
        match self.float {
            Elem::F16 => self.scalar(-65504.0),
            _ => self.scalar(f32::MIN),
        }
    }

    /// A weight from the checkpoint in the graph's float type.
    pub fn weight(&mut self, name: &str, shape: &[usize]) -> Result<String> {
        let elem = self.float;
        self.weight_of(name, shape, false, elem)
    }

    /// A `[out, in]` Linear weight stored transposed, `[in, out]`, for MatMul.
    pub fn weight_t(&mut self, name: &str, shape: &[usize]) -> Result<String> {
        let elem = self.float;
        self.weight_of(name, shape, true, elem)
    }

    pub fn weight_of(
        &mut self,
        name: &str,
        shape: &[usize],
        transpose: bool,
        elem: Elem,
    ) -> Result<String> {
        let key = format!("{name}{}", if transpose { "#T" } else { "" });
        if let Some(n) = self.weights.get(&key) {
            return Ok(n.clone());
        }
        let t = self.ck.get_shaped(name, shape)?;
        let to = match elem {
            Elem::F16 => DType::F16,
            Elem::F32 => DType::F32,
            other => unreachable!("weights are float, not {other:?}"),
        };
        let mut dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        if transpose {
            dims.reverse();
        }
        let len = (t.numel() * to.size()) as u64;
        // The initializer keeps the checkpoint's name; a transposed copy says so.
        let doc = transpose.then(|| {
            "transposed from the checkpoint's [out, in] to [in, out] for MatMul".to_string()
        });
        self.derived(name, name, elem, dims, doc, len, move |t, w| {
            write_converted(t, to, transpose, w)
        })?;
        self.weights.insert(key, name.into());
        Ok(name.into())
    }

    /// Adds initializer `init` whose `len` bytes `write` makes from checkpoint tensor
    /// `source` when the model is written; the tensor's mapped pages are released after.
    #[allow(clippy::too_many_arguments)]
    fn derived(
        &mut self,
        init: &str,
        source: &str,
        elem: Elem,
        dims: Vec<i64>,
        doc: Option<String>,
        len: u64,
        write: impl Fn(&TensorView<'a>, &mut dyn std::io::Write) -> std::io::Result<()> + 'a,
    ) -> Result<()> {
        let t = self.ck.get(source)?;
        let ck = self.ck;
        let source = source.to_string();
        let write = Box::new(move |w: &mut dyn std::io::Write| {
            write(&t, w)?;
            ck.release(&source);
            Ok(())
        });
        self.weight_bytes += len;
        self.inits.push(Initializer {
            name: init.into(),
            elem,
            dims,
            doc,
            data: InitData::Stream { len, write },
        });
        Ok(())
    }

    /// Puts the node added last in the com.microsoft (ONNX Runtime contrib) domain.
    pub fn mark_ms_domain(&mut self) {
        self.nodes.last_mut().expect("a node was added").domain = MS_DOMAIN.into();
    }

    /// Adds a com.microsoft (ONNX Runtime contrib) node; the model then imports that domain.
    pub fn ms_op(
        &mut self,
        path: &str,
        op: &str,
        inputs: &[&str],
        attrs: Vec<(&str, Attr)>,
    ) -> String {
        let out = self.op(path, op, inputs, attrs);
        self.nodes.last_mut().expect("just added").domain = MS_DOMAIN.into();
        out
    }

    /// `x @ W^T` for a checkpoint `[N, K]` weight with ONNX Runtime's MatMulNBits
    /// (com.microsoft): the weight stored quantized in its checkpoint layout, activations
    /// quantized to int8 inside the kernel (accuracy_level 4) for speed.
    ///
    /// ```text
    ///   x ──MatMulNBits(W_q [N, blocks, blob], scales [N*blocks]) ─▶ [.., N]
    /// ```
    pub fn matmul_nbits(
        &mut self,
        path: &str,
        x: &str,
        name: &str,
        n: usize,
        k: usize,
    ) -> Result<String> {
        let (bits, block) = match self.projection {
            Projection::NBits { bits, block } => (bits, block),
            // The LM head of a row-int8 graph.
            Projection::RowInt8 => blip2_core::Quantization::Int8.bits_block(),
            _ => unreachable!("MatMulNBits in a graph without it"),
        };
        self.ck.get_shaped(name, &[n, k])?;
        let q = Quantizer { bits, block };
        let blocks = q.blocks(k);
        let values = format!("{name}.quantized");
        let scales = format!("{name}.scales");
        let doc = Some(format!("{bits}-bit blocks of {block} of {name}, for MatMulNBits"));
        let dims = vec![n as i64, blocks as i64, q.blob() as i64];
        let len = (n * blocks * q.blob()) as u64;
        self.derived(&values, name, Elem::U8, dims, doc, len, move |t, w| {
            Quantizer { bits, block }.write_values(t, w)
        })?;
        let len = (n * blocks * 4) as u64;
        self.derived(
            &scales,
            name,
            Elem::F32,
            vec![(n * blocks) as i64],
            None,
            len,
            move |t, w| Quantizer { bits, block }.write_scales(t, w),
        )?;
        let attrs = vec![
            ("K", Attr::Int(k as i64)),
            ("N", Attr::Int(n as i64)),
            ("bits", Attr::Int(bits as i64)),
            ("block_size", Attr::Int(block as i64)),
            ("accuracy_level", Attr::Int(4)),
        ];
        Ok(self.ms_op(path, "MatMulNBits", &[x, &values, &scales], attrs))
    }

    /// A checkpoint `[N, K]` weight as int8 `[K, N]` (transposed) with one f32 scale per
    /// output channel: the names of the two initializers, values then scales.
    fn channel_int8_weights(&mut self, name: &str, n: usize, k: usize) -> Result<(String, String)> {
        self.ck.get_shaped(name, &[n, k])?;
        let values = format!("{name}.int8");
        let scales = format!("{name}.channel_scales");
        let doc =
            Some(format!("{name} transposed to [in, out], int8 with one scale per output channel"));
        self.derived(
            &values,
            name,
            Elem::I8,
            vec![k as i64, n as i64],
            doc,
            (n * k) as u64,
            ChannelQuantizer::write_values,
        )?;
        self.derived(&scales, name, Elem::F32, vec![n as i64], None, (n * 4) as u64, |t, w| {
            let bytes: Vec<u8> =
                ChannelQuantizer::scales(t).iter().flat_map(|v| v.to_le_bytes()).collect();
            w.write_all(&bytes)
        })?;
        Ok((values, scales))
    }

    /// `x @ W^T (+ bias)` for a checkpoint `[N, K]` weight with ONNX Runtime's
    /// DynamicQuantizeMatMul (com.microsoft): the weight stored as int8 `[K, N]` with one
    /// scale per output channel; at run time the kernel quantizes `x` to uint8 with one
    /// scale and zero point for the whole tensor and multiplies in integers (the CPU's
    /// int8 dot-product instructions), then rescales to fp32 and adds the bias.
    ///
    /// ```text
    ///   x ──DynamicQuantizeMatMul(W_q [K, N] int8, scales [N], bias [N]) ─▶ [.., N]
    /// ```
    pub fn matmul_dynamic_int8(
        &mut self,
        path: &str,
        x: &str,
        name: &str,
        n: usize,
        k: usize,
        bias: Option<&str>,
    ) -> Result<String> {
        let (values, scales) = self.channel_int8_weights(name, n, k)?;
        // Inputs: A, B, b_scale, b_zero_point (absent: symmetric), bias.
        let mut inputs = vec![x, values.as_str(), scales.as_str()];
        if let Some(bias) = bias {
            inputs.extend(["", bias]);
        }
        Ok(self.ms_op(path, "DynamicQuantizeMatMul", &inputs, vec![]))
    }

    /// `x @ W^T (+ bias)` for a checkpoint `[N, K]` weight with int8 activations that
    /// keep rows apart: each row of `x` (over its last axis) gets its own scale
    /// `s = max|x| / 127` and is quantized to uint8 around zero point 128, MatMulInteger
    /// multiplies it by the int8 `[K, N]` weight (the weights of
    /// [`Builder::matmul_dynamic_int8`]) on the CPU's int8 dot-product instructions,
    /// and the int32 result is scaled back by the row's and the column's scales. A row's
    /// result depends on that row alone, whatever it is batched with.
    ///
    /// ```text
    ///   x ─Abs─ReduceMax(last axis)─Max(eps)─Div(127)─▶ s            [.., 1]
    ///   x ─Div(s)─Add(128.5)─Cast(uint8)─MatMulInteger(W_q, 128)─Cast(f32)─Mul(s)─Mul(scales)(─Add(b))─▶
    /// ```
    pub fn matmul_row_int8(
        &mut self,
        path: &str,
        x: &str,
        name: &str,
        n: usize,
        k: usize,
        bias: Option<&str>,
    ) -> Result<String> {
        let (values, scales) = self.channel_int8_weights(name, n, k)?;
        let abs = self.op(&format!("{path}/Abs"), "Abs", &[x], vec![]);
        let max = self.op(
            &format!("{path}/ReduceMax"),
            "ReduceMax",
            &[&abs],
            vec![("axes", Attr::Ints(vec![-1])), ("keepdims", Attr::Int(1))],
        );
        // A row of zeros keeps a finite scale (its values quantize to 0 all the same).
        let eps = self.scalar_of(1e-12, Elem::F32);
        let max = self.op(&format!("{path}/Max"), "Max", &[&max, &eps], vec![]);
        let c127 = self.scalar_of(127.0, Elem::F32);
        let s = self.op(&format!("{path}/Div_scale"), "Div", &[&max, &c127], vec![]);
        let xs = self.op(&format!("{path}/Div"), "Div", &[x, &s], vec![]);
        // + 128 to the zero point, + 0.5 so that the Cast's truncation rounds.
        let c128 = self.scalar_of(128.5, Elem::F32);
        let shifted = self.op(&format!("{path}/Add_zero_point"), "Add", &[&xs, &c128], vec![]);
        let xq = self.op(
            &format!("{path}/Cast"),
            "Cast",
            &[&shifted],
            vec![("to", Attr::Int(Elem::U8 as i64))],
        );
        let zp = self.constant("/constants/UINT8/128".into(), Elem::U8, vec![], vec![128]);
        let yi = self.op(
            &format!("{path}/MatMulInteger"),
            "MatMulInteger",
            &[&xq, &values, &zp],
            vec![],
        );
        let yf = self.op(
            &format!("{path}/Cast_float"),
            "Cast",
            &[&yi],
            vec![("to", Attr::Int(Elem::F32 as i64))],
        );
        let y = self.op(&format!("{path}/Mul_row"), "Mul", &[&yf, &s], vec![]);
        let y = self.op(&format!("{path}/Mul_channel"), "Mul", &[&y, &scales], vec![]);
        Ok(match bias {
            Some(b) => self.op(&format!("{path}/Add"), "Add", &[&y, b], vec![]),
            None => y,
        })
    }

    pub fn has(&self, name: &str) -> bool {
        self.ck.contains(name)
    }

    pub fn checkpoint(&self) -> &'a Checkpoint {
        self.ck
    }

    pub fn finish(mut self, name: &str) -> Graph<'a> {
        if self.fused {
            self.fuse_skip_layer_norms();
        }
        for n in &mut self.nodes {
            for t in n.inputs.iter_mut().chain(n.outputs.iter_mut()) {
                if let Some(out) = self.renames.get(t.as_str()) {
                    *t = out.clone();
                }
            }
        }
        Graph {
            name: name.into(),
            nodes: self.nodes,
            inputs: self.inputs,
            outputs: self.outputs,
            initializers: self.inits,
        }
    }

    /// Fuses each residual Add whose sum a LayerNormalization reads into one
    /// com.microsoft SkipLayerNormalization, put where the Add was; the sum itself comes
    /// out as its fourth output when anything else reads it.
    ///
    /// ```text
    ///   a, b ──Add──▶ sum ──LayerNormalization(γ, β) ─▶ y
    ///   a, b ──SkipLayerNormalization(γ, β) ─▶ y, (mean), (inv_std), sum
    /// ```
    fn fuse_skip_layer_norms(&mut self) {
        let mut readers: HashMap<String, usize> = HashMap::new();
        for n in &self.nodes {
            for i in &n.inputs {
                *readers.entry(i.clone()).or_default() += 1;
            }
        }
        let mut fused: Vec<(usize, usize)> = Vec::new();
        for (ln_at, ln) in self.nodes.iter().enumerate() {
            if ln.op_type != "LayerNormalization" || !self.residuals.contains(&ln.inputs[0]) {
                continue;
            }
            let add_at = self
                .nodes
                .iter()
                .position(|n| n.outputs[0] == ln.inputs[0])
                .expect("the residual's node");
            if fused.iter().any(|&(a, _)| a == add_at) {
                continue;
            }
            fused.push((add_at, ln_at));
        }
        for &(add_at, ln_at) in &fused {
            let (add, ln) = (&self.nodes[add_at], &self.nodes[ln_at]);
            let sum = add.outputs[0].clone();
            let sum_read =
                readers.get(&sum).copied().unwrap_or(0) > 1 || self.renames.contains_key(&sum);
            let epsilon = ln
                .attrs
                .iter()
                .find_map(|(k, v)| match v {
                    Attr::Float(e) if k == "epsilon" => Some(*e),
                    _ => None,
                })
                .unwrap_or(1e-5);
            let node = Node {
                name: ln.name.replace("LayerNormalization", "SkipLayerNormalization"),
                op_type: "SkipLayerNormalization".into(),
                domain: MS_DOMAIN.into(),
                inputs: vec![
                    add.inputs[0].clone(),
                    add.inputs[1].clone(),
                    ln.inputs[1].clone(),
                    ln.inputs[2].clone(),
                ],
                outputs: if sum_read {
                    vec![ln.outputs[0].clone(), String::new(), String::new(), sum]
                } else {
                    vec![ln.outputs[0].clone()]
                },
                attrs: vec![("epsilon".into(), Attr::Float(epsilon))],
            };
            self.nodes[add_at] = node;
        }
        let mut drop: Vec<usize> = fused.iter().map(|&(_, ln)| ln).collect();
        drop.sort_unstable();
        for at in drop.into_iter().rev() {
            self.nodes.remove(at);
        }
    }

    /// Casts `x` to `to` (no node when `from == to`).
    pub fn cast(&mut self, path: &str, x: &str, from: Elem, to: Elem) -> String {
        if from == to {
            return x.into();
        }
        self.op(path, "Cast", &[x], vec![("to", Attr::Int(to as i64))])
    }
}
