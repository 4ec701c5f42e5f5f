//! A decoder's self-attention KV cache: one key and one value tensor per layer, kept
//! between steps where the decoder runs (host memory, or the GPU on CUDA profiles).
//!
//! Two layouts, one per kind of export:
//! - [`Layout::Growing`] (portable graphs): each step's `present.*` are the past plus the
//!   new positions; they replace the cache and are fed back as `past_key_values.*`.
//! - [`Layout::Static`] (CUDA-target graphs): buffers of a fixed length allocated once,
//!   bound as both `past_key_values.*` and `present.*`; GroupQueryAttention writes each
//!   step's positions into them in place. Rows are right-padded; their lengths live in
//!   the decoder state.

use blip2_core::io;
use ndarray::{ArrayD, Axis, IxDyn};
use ort::memory::{AllocationDevice, Allocator, MemoryInfo};
use ort::session::{IoBinding, RunOptions, Session, SessionOutputs};
use ort::value::{DynTensor, DynTensorValueType, DynValue, Tensor, TensorElementType, Value};

use crate::error::{ort_err, RuntimeError};

/// The shape of a decoder's cache: `[rows, heads, length, head_dim]` per layer and kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvSpec {
    pub layers: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// float16 tensors (else float32).
    pub fp16: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Replaced by `present.*` after every step.
    Growing,
    /// Fixed-length buffers written in place.
    Static { capacity: usize },
}

/// Where a join runs: the export's `kv_join` graph and the memory the decoder's cache
/// lives in (the outputs are bound there).
pub struct JoinOn<'a> {
    pub session: &'a mut Session,
    pub memory: &'a MemoryInfo<'static>,
}

pub struct KvCache {
    spec: KvSpec,
    layout: Layout,
    rows: usize,
    /// Key then value, per layer.
    layers: Vec<[DynValue; 2]>,
}

impl KvCache {
    /// An empty growing cache: zero-length host tensors, as the first step of a portable
    /// decoder takes them.
    pub fn empty(spec: KvSpec, rows: usize) -> Result<Self, RuntimeError> {
        let layers = (0..spec.layers)
            .map(|_| Ok([host_zeros(spec, rows, 0)?, host_zeros(spec, rows, 0)?]))
            .collect::<Result<_, RuntimeError>>()?;
        Ok(Self { spec, layout: Layout::Growing, rows, layers })
    }

    /// A static cache of `capacity` positions per row, allocated by `allocator` (on the
    /// device the decoder runs on). Its contents start undefined: the decoder only reads
    /// positions it wrote.
    pub fn allocate(
        spec: KvSpec,
        rows: usize,
        capacity: usize,
        allocator: &Allocator,
    ) -> Result<Self, RuntimeError> {
        let elem = if spec.fp16 { TensorElementType::Float16 } else { TensorElementType::Float32 };
        let shape = [rows, spec.heads, capacity, spec.head_dim];
        let mut layers = Vec::with_capacity(spec.layers);
        for _ in 0..spec.layers {
            let k = DynTensor::new(allocator, elem, shape)
                .map_err(ort_err("allocating the KV buffers"))?;
            let v = DynTensor::new(allocator, elem, shape)
                .map_err(ort_err("allocating the KV buffers"))?;
            layers.push([k.into_dyn(), v.into_dyn()]);
        }
        Ok(Self { spec, layout: Layout::Static { capacity }, rows, layers })
    }

    /// A static cache made of tensors already filled (`capacity` positions per row), key
    /// then value per layer; wherever they lie.
    pub fn from_tensors(
        spec: KvSpec,
        rows: usize,
        capacity: usize,
        layers: Vec<[DynValue; 2]>,
    ) -> Self {
        Self { spec, layout: Layout::Static { capacity }, rows, layers }
    }

    /// Layer `l`'s key and value tensors.
    pub fn layer(&self, l: usize) -> &[DynValue; 2] {
        &self.layers[l]
    }

    /// Binds the cache as the step's `past_key_values.*`; a static cache is also bound
    /// as `present.*`, so the decoder writes into the same buffers; a growing cache's
    /// `present.*` are allocated on `memory`.
    pub fn bind(&mut self, binding: &mut IoBinding, memory: &MemoryInfo) -> Result<(), ort::Error> {
        for (l, kv) in self.layers.iter_mut().enumerate() {
            for (which, v) in kv.iter_mut().enumerate() {
                let (past, present) = names(l, which);
                binding.bind_input(past, &*v)?;
                match self.layout {
                    Layout::Static { .. } => binding.bind_output(present, &mut *v)?,
                    Layout::Growing => binding.bind_output_to_device(present, memory)?,
                }
            }
        }
        Ok(())
    }

    /// After a step of a growing cache: takes this step's `present.*` as the cache.
    pub fn take_present(&mut self, out: &mut SessionOutputs<'_>) -> Result<(), RuntimeError> {
        if self.layout != Layout::Growing {
            return Ok(());
        }
        for (l, kv) in self.layers.iter_mut().enumerate() {
            for (which, v) in kv.iter_mut().enumerate() {
                let (_, present) = names(l, which);
                *v = out.remove(present.as_str()).ok_or(RuntimeError::MissingOutput(present))?;
            }
        }
        Ok(())
    }

    /// Growing caches: new row `i` is old row `rows[i]`, by way of host memory (a cache
    /// on a GPU is copied over and back). Static caches reorder with
    /// [`KvCache::reorder_on_device`].
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<(), RuntimeError> {
        if self.layout != Layout::Growing {
            return Err(RuntimeError::Unsupported(
                "a static KV cache is reordered on the device, with kv_reorder".into(),
            ));
        }
        for kv in &mut self.layers {
            for v in kv.iter_mut() {
                *v = select_rows_of(v, rows, self.spec.fp16)?;
            }
        }
        self.rows = rows.len();
        Ok(())
    }

    /// New row `i` is old row `rows[i]`, gathered by the export's `kv_reorder` graph where
    /// the cache lies (`memory`, the decoder's cache memory): no host round trip for a
    /// cache on a GPU. Any layout: the graph takes any length.
    pub fn select_rows_on_device(
        &mut self,
        session: &mut Session,
        rows: &[usize],
        memory: &MemoryInfo,
    ) -> Result<(), RuntimeError> {
        let index = self.rows_input(rows)?;
        let mut binding =
            session.create_binding().map_err(ort_err("kv_reorder: creating an IO binding"))?;
        (|| -> Result<(), ort::Error> {
            binding.bind_input(io::ROWS, &index)?;
            for (l, kv) in self.layers.iter().enumerate() {
                for (which, v) in kv.iter().enumerate() {
                    let (past, present) = names(l, which);
                    binding.bind_input(past, v)?;
                    binding.bind_output_to_device(present, memory)?;
                }
            }
            Ok(())
        })()
        .map_err(ort_err("kv_reorder: binding inputs and outputs"))?;
        let mut out = session
            .run_binding_with_options(&binding, no_capture()?)
            .map_err(ort_err("kv_reorder"))?;
        for (l, kv) in self.layers.iter_mut().enumerate() {
            for (which, v) in kv.iter_mut().enumerate() {
                let (_, present) = names(l, which);
                *v = out.remove(present.as_str()).ok_or(RuntimeError::MissingOutput(present))?;
            }
        }
        self.rows = rows.len();
        Ok(())
    }

    /// Growing caches: appends `other`'s rows after these, both left-padded with zeros to
    /// the longer length (the rows' masks must mark the padding); where the cache lies
    /// with the export's `kv_join` graph (`on`), else through host memory.
    pub fn join(&mut self, other: KvCache, on: Option<JoinOn<'_>>) -> Result<(), RuntimeError> {
        if self.layout != Layout::Growing
            || other.layout != Layout::Growing
            || self.spec != other.spec
        {
            return Err(RuntimeError::Unsupported(
                "only growing KV caches of one model can be joined".into(),
            ));
        }
        match on {
            Some(on) => self.join_on_device(on, Some(other), 0, true, 0),
            None => self.join_padded(other, true),
        }
    }

    /// Static caches of values computed once (Flan-T5's cross-attention keys and values,
    /// their length the encoder's): appends `other`'s rows after these, both right-padded
    /// with zeros to the longer length (the encoder mask marks the padding); where the
    /// cache lies with `kv_join` (`on`), else through host memory.
    pub fn join_right_padded(
        &mut self,
        other: KvCache,
        on: Option<JoinOn<'_>>,
    ) -> Result<(), RuntimeError> {
        if self.layout == Layout::Growing
            || other.layout == Layout::Growing
            || self.spec != other.spec
        {
            return Err(RuntimeError::Unsupported(
                "only fixed-length caches of one model can be joined right-padded".into(),
            ));
        }
        let len = self.capacity().max(other.capacity());
        match on {
            Some(on) => self.join_on_device(on, Some(other), 0, false, 0)?,
            None => self.join_padded(other, false)?,
        }
        self.layout = Layout::Static { capacity: len };
        Ok(())
    }

    fn join_padded(&mut self, other: KvCache, left: bool) -> Result<(), RuntimeError> {
        for (kv, okv) in self.layers.iter_mut().zip(other.layers) {
            for (v, o) in kv.iter_mut().zip(okv) {
                *v = if self.spec.fp16 {
                    join_padded::<half::f16>(v, &o, left)?
                } else {
                    join_padded::<f32>(v, &o, left)?
                };
            }
        }
        self.rows += other.rows;
        Ok(())
    }

    /// Growing caches: drops the first `n` positions of every row (positions that every
    /// row's mask has as padding); where the cache lies with `kv_join` (`on`), else
    /// through host memory.
    pub fn drop_front(&mut self, n: usize, on: Option<JoinOn<'_>>) -> Result<(), RuntimeError> {
        if n == 0 {
            return Ok(());
        }
        if self.layout != Layout::Growing {
            return Err(RuntimeError::Unsupported("a static KV cache keeps its positions".into()));
        }
        if let Some(on) = on {
            return self.join_on_device(on, None, n, true, 0);
        }
        for kv in &mut self.layers {
            for v in kv.iter_mut() {
                *v = if self.spec.fp16 {
                    slice_front::<half::f16>(v, n)?
                } else {
                    slice_front::<f32>(v, n)?
                };
            }
        }
        Ok(())
    }

    /// Positions per row of the cache's tensors (axis 2).
    fn positions(&self) -> Result<usize, RuntimeError> {
        let Some(kv) = self.layers.first() else { return Ok(0) };
        let t = kv[0].view().downcast::<DynTensorValueType>().map_err(ort_err("KV cache"))?;
        t.shape().get(2).map(|&l| l as usize).ok_or_else(|| {
            RuntimeError::Unsupported(format!("a KV cache tensor of shape {:?}", t.shape()))
        })
    }

    /// A static cache of `rows` rows and `capacity` positions of zeros, where `on.memory`
    /// says, made by the export's `kv_join` graph (buffers whose masked positions are
    /// still read must hold numbers).
    pub fn zeros_on_device(
        spec: KvSpec,
        rows: usize,
        capacity: usize,
        on: JoinOn<'_>,
    ) -> Result<Self, RuntimeError> {
        let mut cache = Self::empty(spec, 0)?;
        cache.join_on_device(on, Some(Self::empty(spec, rows)?), 0, false, capacity)?;
        cache.layout = Layout::Static { capacity };
        Ok(cache)
    }

    /// The export's `kv_join` graph: drops the first `drop` positions of these rows, then
    /// appends `other`'s rows, both padded with zeros on the left (`left`) or the right
    /// to the longer length (at least `at_least`); the result lies where `on.memory`
    /// says (the decoder's cache memory), so a cache on a GPU never goes through the host.
    fn join_on_device(
        &mut self,
        on: JoinOn<'_>,
        other: Option<KvCache>,
        drop: usize,
        left: bool,
        at_least: usize,
    ) -> Result<(), RuntimeError> {
        let have = self.positions()?;
        if drop > have {
            return Err(RuntimeError::Unsupported(format!(
                "kv_join: dropping {drop} positions of a cache of {have}"
            )));
        }
        let kept = have - drop;
        let joining = match &other {
            Some(o) => o.positions()?,
            None => kept,
        };
        let len = kept.max(joining).max(at_least);
        // ONNX Pad's pads: [begin of each axis..., end of each axis...]; only positions pad.
        let pads_for = |l: usize| {
            let mut p = [0i64; 8];
            p[if left { 2 } else { 6 }] = (len - l) as i64;
            Tensor::from_array(ndarray::Array1::from_vec(p.to_vec())).map_err(ort_err("pads"))
        };
        let (pads, joining_pads) = (pads_for(kept)?, pads_for(joining)?);
        let drop_input = Tensor::from_array(ndarray::Array1::from_vec(vec![drop as i64]))
            .map_err(ort_err(io::DROP_POSITIONS))?;
        // No newcomer: zero rows of the kept length.
        let none = match &other {
            Some(_) => None,
            None => Some(host_zeros(self.spec, 0, kept)?),
        };
        let session = on.session;
        let mut binding =
            session.create_binding().map_err(ort_err("kv_join: creating an IO binding"))?;
        (|| -> Result<(), ort::Error> {
            binding.bind_input(io::DROP_POSITIONS, &drop_input)?;
            binding.bind_input(io::PADS, &pads)?;
            binding.bind_input(io::JOINING_PADS, &joining_pads)?;
            for (l, kv) in self.layers.iter().enumerate() {
                for (which, v) in kv.iter().enumerate() {
                    let (past, present) = names(l, which);
                    binding.bind_input(past, v)?;
                    let joining_name =
                        if which == 0 { io::joining_key(l) } else { io::joining_value(l) };
                    let joining = other.as_ref().map(|o| &o.layers[l][which]).or(none.as_ref());
                    if let Some(j) = joining {
                        binding.bind_input(joining_name, j)?;
                    }
                    binding.bind_output_to_device(present, on.memory)?;
                }
            }
            Ok(())
        })()
        .map_err(ort_err("kv_join: binding inputs and outputs"))?;
        let mut out = session
            .run_binding_with_options(&binding, no_capture()?)
            .map_err(ort_err("kv_join"))?;
        for (l, kv) in self.layers.iter_mut().enumerate() {
            for (which, v) in kv.iter_mut().enumerate() {
                let (_, present) = names(l, which);
                *v = out.remove(present.as_str()).ok_or(RuntimeError::MissingOutput(present))?;
            }
        }
        self.rows += other.map_or(0, |o| o.rows);
        Ok(())
    }

    /// Static caches: new row `i` is old row `rows[i]`, gathered on the device by the
    /// export's `kv_reorder` graph into a second set of buffers, which then become the
    /// cache (the old set is kept in `spare` for the next reorder of the same shape).
    pub fn reorder_on_device(
        &mut self,
        session: &mut Session,
        rows: &[usize],
        spare: &mut Option<KvCache>,
        allocator: &Allocator,
    ) -> Result<(), RuntimeError> {
        let mut target = match spare.take() {
            Some(s) if s.rows == rows.len() => s,
            _ => Self::allocate(self.spec, rows.len(), self.capacity(), allocator)?,
        };
        self.gather_into(session, rows, &mut target)?;
        let old = std::mem::replace(self, target);
        *spare = Some(old);
        Ok(())
    }

    /// Static caches: writes row `rows[i]` of this cache into row `i` of `target` (a
    /// static cache of the same model and capacity with `rows.len()` rows), on the
    /// device, with the export's `kv_reorder` graph.
    pub fn gather_into(
        &self,
        session: &mut Session,
        rows: &[usize],
        target: &mut KvCache,
    ) -> Result<(), RuntimeError> {
        if target.rows != rows.len()
            || target.spec != self.spec
            || target.capacity() != self.capacity()
            || self.capacity() == 0
        {
            return Err(RuntimeError::Unsupported(
                "kv_reorder: the target buffers do not match the cache".into(),
            ));
        }
        let index = self.rows_input(rows)?;
        let mut binding =
            session.create_binding().map_err(ort_err("kv_reorder: creating an IO binding"))?;
        (|| -> Result<(), ort::Error> {
            binding.bind_input(io::ROWS, &index)?;
            for (l, (src, dst)) in self.layers.iter().zip(target.layers.iter_mut()).enumerate() {
                for which in 0..2 {
                    let (past, present) = names(l, which);
                    binding.bind_input(past, &src[which])?;
                    binding.bind_output(present, &mut dst[which])?;
                }
            }
            Ok(())
        })()
        .map_err(ort_err("kv_reorder: binding inputs and outputs"))?;
        // Never captured as a CUDA graph: its buffers change from call to call.
        session.run_binding_with_options(&binding, no_capture()?).map_err(ort_err("kv_reorder"))?;
        Ok(())
    }

    /// Static caches: writes row `rows[i]` of this cache into row `start + i` of
    /// `target` (a static cache of the same model and capacity, or this one), on the
    /// device, with the export's `kv_reorder` graph writing into a view of `target`'s
    /// rows: a newcomer's rows taking free rows of a running batch, a beam copied into a
    /// free row. Nothing else of `target` is touched. Within one cache the rows read and
    /// the rows written must differ.
    pub fn copy_rows_into(
        &self,
        session: &mut Session,
        rows: &[usize],
        target: &KvCache,
        start: usize,
    ) -> Result<(), RuntimeError> {
        if target.spec != self.spec
            || target.capacity() != self.capacity()
            || self.capacity() == 0
            || start + rows.len() > target.rows
        {
            return Err(RuntimeError::Unsupported(format!(
                "kv_reorder: {} rows of capacity {} do not fit rows {start}.. of {} rows of capacity {}",
                rows.len(),
                self.capacity(),
                target.rows,
                target.capacity()
            )));
        }
        let index = self.rows_input(rows)?;
        if rows.is_empty() {
            return Ok(());
        }
        let mut binding =
            session.create_binding().map_err(ort_err("kv_reorder: creating an IO binding"))?;
        binding.bind_input(io::ROWS, &index).map_err(ort_err("kv_reorder: binding rows"))?;
        for (l, (src, dst)) in self.layers.iter().zip(target.layers.iter()).enumerate() {
            for which in 0..2 {
                let (past, present) = names(l, which);
                binding
                    .bind_input(past, &src[which])
                    .map_err(ort_err("kv_reorder: binding the rows to copy"))?;
                rows_view(&dst[which], self.spec, target.rows, start, rows.len())?
                    .bind(&mut binding, &present)?;
            }
        }
        // Never captured as a CUDA graph: its buffers change from call to call.
        session.run_binding_with_options(&binding, no_capture()?).map_err(ort_err("kv_reorder"))?;
        Ok(())
    }

    /// `kv_reorder`'s `rows` input for `rows` of this cache, each checked to exist.
    fn rows_input(&self, rows: &[usize]) -> Result<Tensor<i64>, RuntimeError> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.rows) {
            return Err(RuntimeError::Input(format!(
                "kv_reorder: row {bad} of a cache with {} rows",
                self.rows
            )));
        }
        Tensor::from_array(ndarray::Array1::from_iter(rows.iter().map(|&r| r as i64)))
            .map_err(ort_err("rows"))
    }

    /// Rows of the cache (its first axis).
    pub fn rows(&self) -> usize {
        self.rows
    }

    #[cfg(any(test, feature = "test-support"))]
    /// Where each buffer's data lies, key then value per layer (tests: a static cache
    /// keeps its addresses).
    pub fn addresses(&self) -> Vec<usize> {
        self.layers
            .iter()
            .flatten()
            .map(|v| v.view().downcast::<DynTensorValueType>().map_or(0, |t| t.data_ptr() as usize))
            .collect()
    }

    /// Positions per row of a static cache (0 for a growing one).
    pub fn capacity(&self) -> usize {
        match self.layout {
            Layout::Static { capacity } => capacity,
            Layout::Growing => 0,
        }
    }
}

/// A view of rows `start..start + n` of one static KV buffer `[rows, heads, capacity,
/// head_dim]` (rows are the outermost axis, so they lie in one block), for binding as an
/// output; it borrows the buffer's memory without a lifetime: the caller keeps the
/// buffer alive while a binding holds the view.
enum RowsView {
    F16(ort::value::TensorRefMut<'static, half::f16>),
    F32(ort::value::TensorRefMut<'static, f32>),
}

impl RowsView {
    /// Binds the view as the output `name` (the binding keeps the view's value alive).
    fn bind(self, binding: &mut IoBinding, name: &str) -> Result<(), RuntimeError> {
        match self {
            RowsView::F16(v) => binding.bind_output(name, v),
            RowsView::F32(v) => binding.bind_output(name, v),
        }
        .map_err(ort_err(format!("kv_reorder: binding {name}")))
    }
}

fn rows_view(
    buffer: &DynValue,
    spec: KvSpec,
    rows: usize,
    start: usize,
    n: usize,
) -> Result<RowsView, RuntimeError> {
    let tensor = buffer.view().downcast::<DynTensorValueType>().map_err(ort_err("a KV buffer"))?;
    let dims: Vec<i64> = tensor.shape().iter().copied().collect();
    if dims.len() != 4 || dims[0] as usize != rows {
        return Err(RuntimeError::Unsupported(format!("a KV buffer of shape {dims:?}")));
    }
    let row_elems = (dims[1] * dims[2] * dims[3]) as usize;
    let shape = ort::value::Shape::new([n as i64, dims[1], dims[2], dims[3]]);
    let info = tensor.memory_info().clone();
    let base = tensor.data_ptr() as *mut u8;
    // SAFETY: rows `start..start + n` lie inside the buffer (checked against its shape by
    // the caller), and the caller keeps the buffer alive while the view is bound.
    unsafe {
        if spec.fp16 {
            let data = base.add(start * row_elems * 2).cast();
            ort::value::TensorRefMut::from_raw(info, data, shape).map(RowsView::F16)
        } else {
            let data = base.add(start * row_elems * 4).cast();
            ort::value::TensorRefMut::from_raw(info, data, shape).map(RowsView::F32)
        }
    }
    .map_err(ort_err("a view of KV rows"))
}

/// Run options that keep ONNX Runtime from capturing or replaying a CUDA graph for the
/// run (`gpu_graph_id` -1): for runs whose inputs or buffers change from call to call, on
/// sessions that may have CUDA graphs on. Other providers ignore the entry.
pub(crate) fn no_capture() -> Result<&'static RunOptions, RuntimeError> {
    static OPTIONS: std::sync::OnceLock<Result<RunOptions, String>> = std::sync::OnceLock::new();
    OPTIONS
        .get_or_init(|| {
            let mut o = RunOptions::new().map_err(|e| e.to_string())?;
            o.set(GPU_GRAPH_ID, "-1").map_err(|e| e.to_string())?;
            Ok(o)
        })
        .as_ref()
        .map_err(|e| RuntimeError::Unsupported(format!("creating run options: {e}")))
}

/// ONNX Runtime's run option naming the CUDA graph a run captures or replays.
pub(crate) const GPU_GRAPH_ID: &str = "gpu_graph_id";

fn names(layer: usize, which: usize) -> (String, String) {
    if which == 0 {
        (io::past_key(layer), io::present_key(layer))
    } else {
        (io::past_value(layer), io::present_value(layer))
    }
}

fn host_zeros(spec: KvSpec, rows: usize, len: usize) -> Result<DynValue, RuntimeError> {
    let shape = IxDyn(&[rows, spec.heads, len, spec.head_dim]);
    Ok(if spec.fp16 {
        Tensor::from_array(ArrayD::<half::f16>::from_elem(shape, half::f16::ZERO))
            .map_err(ort_err("past_key_values"))?
            .into_dyn()
    } else {
        Tensor::from_array(ArrayD::<f32>::zeros(shape))
            .map_err(ort_err("past_key_values"))?
            .into_dyn()
    })
}

/// A host copy of tensor `t` when it lies on a device, else None (read it in place);
/// `what` names it in errors.
pub(crate) fn host_copy(
    t: &Value<DynTensorValueType>,
    what: &str,
) -> Result<Option<DynTensor>, RuntimeError> {
    if t.memory_info().is_cpu_accessible() {
        return Ok(None);
    }
    t.to(AllocationDevice::CPU, 0)
        .map(Some)
        .map_err(ort_err(format!("copying the {what} to the host")))
}

/// A host copy of `v` when it lies on a device, else None.
fn on_host(v: &DynValue) -> Result<Option<DynValue>, RuntimeError> {
    let tensor = v.view().downcast::<DynTensorValueType>().map_err(ort_err("KV cache"))?;
    Ok(host_copy(&tensor, "KV cache")?.map(DynTensor::into_dyn))
}

/// `a` and `b` (`[rows, heads, len, head_dim]`) one after the other along the rows, the
/// shorter left-padded with zeros along `len`, as a host tensor.
fn join_padded<T>(a: &DynValue, b: &DynValue, left: bool) -> Result<DynValue, RuntimeError>
where
    T: ort::value::PrimitiveTensorElementType + Clone + std::fmt::Debug + Default + 'static,
{
    let (ha, hb) = (on_host(a)?, on_host(b)?);
    let a = ha.as_ref().unwrap_or(a).try_extract_array::<T>().map_err(ort_err("KV cache"))?;
    let b = hb.as_ref().unwrap_or(b).try_extract_array::<T>().map_err(ort_err("KV cache"))?;
    let (la, lb) = (a.shape()[2], b.shape()[2]);
    let len = la.max(lb);
    let mut shape = a.shape().to_vec();
    shape[0] += b.shape()[0];
    shape[2] = len;
    let mut out = ArrayD::<T>::from_elem(IxDyn(&shape), T::default());
    let ra = a.shape()[0];
    let at = |l: usize| if left { len - l..len } else { 0..l };
    out.slice_each_axis_mut(|ax| match ax.axis.index() {
        0 => ndarray::Slice::from(..ra),
        2 => ndarray::Slice::from(at(la)),
        _ => ndarray::Slice::from(..),
    })
    .assign(&a);
    out.slice_each_axis_mut(|ax| match ax.axis.index() {
        0 => ndarray::Slice::from(ra..),
        2 => ndarray::Slice::from(at(lb)),
        _ => ndarray::Slice::from(..),
    })
    .assign(&b);
    Ok(Tensor::from_array(out).map_err(ort_err("KV cache"))?.into_dyn())
}

/// `v` without its first `n` positions (axis 2), as a host tensor.
fn slice_front<T>(v: &DynValue, n: usize) -> Result<DynValue, RuntimeError>
where
    T: ort::value::PrimitiveTensorElementType + Clone + std::fmt::Debug + 'static,
{
    let host = on_host(v)?;
    let a = host.as_ref().unwrap_or(v).try_extract_array::<T>().map_err(ort_err("KV cache"))?;
    let kept = a.slice_axis(Axis(2), ndarray::Slice::from(n..)).to_owned();
    Ok(Tensor::from_array(kept).map_err(ort_err("KV cache"))?.into_dyn())
}

/// Rows `rows` of a `[rows, ...]` tensor (fp16 or f32), as a host tensor.
pub(crate) fn select_rows_of(
    v: &DynValue,
    rows: &[usize],
    fp16: bool,
) -> Result<DynValue, RuntimeError> {
    if fp16 {
        select::<half::f16>(v, rows)
    } else {
        select::<f32>(v, rows)
    }
}

fn select<T>(v: &DynValue, rows: &[usize]) -> Result<DynValue, RuntimeError>
where
    T: ort::value::PrimitiveTensorElementType + Clone + std::fmt::Debug + 'static,
{
    let host = on_host(v)?;
    let v = host.as_ref().unwrap_or(v);
    let a = v.try_extract_array::<T>().map_err(ort_err("KV cache"))?;
    let picked = a.select(Axis(0), rows);
    Ok(Tensor::from_array(picked).map_err(ort_err("KV cache"))?.into_dyn())
}
