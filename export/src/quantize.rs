//! Quantized weights for the exporter's graphs: blockwise weight-only integers for ONNX
//! Runtime's MatMulNBits (`--quantize int8|int4`), and int8 per output channel for
//! DynamicQuantizeMatMul (`--quantize-encoders int8`). Both stream from the checkpoint's
//! views a row at a time, like the float conversions in [`crate::checkpoint`].

use std::io::Write;

use crate::checkpoint::{decode_into, encode, write_transposed_raw, DType, TensorView};

/// Weight-only quantization of a `[N, K]` tensor for ONNX Runtime's MatMulNBits: each
/// row in blocks of `block` along K, symmetric, one f32 scale per block, values offset by
/// the operator's default zero point (2^(bits-1)); 4-bit values pack two to a byte, low
/// nibble first. A partial last block is padded with zeros.
pub struct Quantizer {
    pub bits: u32,
    pub block: usize,
}

impl Quantizer {
    pub fn blocks(&self, k: usize) -> usize {
        k.div_ceil(self.block)
    }
    /// Bytes of one quantized block.
    pub fn blob(&self) -> usize {
        self.block * self.bits as usize / 8
    }

    fn row_blocks(
        &self,
        t: &TensorView<'_>,
        n: usize,
        row: &mut [f32],
        mut f: impl FnMut(&[f32], f32),
    ) {
        let k = t.shape[1];
        decode_into(t.dtype, t.data, n * k, &mut row[..k]);
        row[k..].fill(0.0);
        let qmax = ((1u32 << (self.bits - 1)) - 1) as f32;
        for b in row.chunks(self.block) {
            let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            f(b, amax / qmax);
        }
    }

    /// The packed values, `[N, blocks, blob]` bytes.
    pub fn write_values(&self, t: &TensorView<'_>, w: &mut dyn Write) -> std::io::Result<()> {
        let (n_rows, k) = (t.shape[0], t.shape[1]);
        let mut row = vec![0f32; self.blocks(k) * self.block];
        let zp = 1i32 << (self.bits - 1);
        let top = (1i32 << self.bits) - 1;
        let mut out = Vec::with_capacity(row.len());
        for n in 0..n_rows {
            out.clear();
            self.row_blocks(t, n, &mut row, |b, scale| {
                let q = |v: f32| -> u8 {
                    let x = if scale > 0.0 { (v / scale).round() as i32 } else { 0 };
                    (x + zp).clamp(0, top) as u8
                };
                if self.bits == 8 {
                    out.extend(b.iter().map(|&v| q(v)));
                } else {
                    out.extend(b.chunks(2).map(|p| q(p[0]) | (q(p[1]) << 4)));
                }
            });
            w.write_all(&out)?;
        }
        Ok(())
    }

    /// The scales, `[N * blocks]` f32.
    pub fn write_scales(&self, t: &TensorView<'_>, w: &mut dyn Write) -> std::io::Result<()> {
        let (n_rows, k) = (t.shape[0], t.shape[1]);
        let mut row = vec![0f32; self.blocks(k) * self.block];
        let mut scales = Vec::with_capacity(self.blocks(k));
        for n in 0..n_rows {
            scales.clear();
            self.row_blocks(t, n, &mut row, |_, scale| scales.push(scale));
            let mut bytes = Vec::with_capacity(4 * scales.len());
            encode(&scales, DType::F32, &mut bytes);
            w.write_all(&bytes)?;
        }
        Ok(())
    }
}

/// Symmetric int8 quantization of a `[N, K]` tensor with one scale per row (output
/// channel), written transposed to `[K, N]` for DynamicQuantizeMatMul's B input:
/// `q = round(w / s)` with `s = max|row| / 127`, so values lie in [-127, 127].
pub struct ChannelQuantizer;

impl ChannelQuantizer {
    /// One scale per row, `max|row| / 127` (1 for an all-zero row, which then stays zero).
    pub fn scales(t: &TensorView<'_>) -> Vec<f32> {
        let (n_rows, k) = (t.shape[0], t.shape[1]);
        let mut row = vec![0f32; k];
        (0..n_rows)
            .map(|n| {
                decode_into(t.dtype, t.data, n * k, &mut row);
                let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                if amax > 0.0 {
                    amax / 127.0
                } else {
                    1.0
                }
            })
            .collect()
    }

    /// The quantized values, `[K, N]` int8.
    pub fn write_values(t: &TensorView<'_>, w: &mut dyn Write) -> std::io::Result<()> {
        let (n_rows, k) = (t.shape[0], t.shape[1]);
        let mut row = vec![0f32; k];
        let mut q = Vec::with_capacity(n_rows * k);
        for (n, s) in Self::scales(t).into_iter().enumerate() {
            decode_into(t.dtype, t.data, n * k, &mut row);
            q.extend(row.iter().map(|&v| (v / s).round().clamp(-127.0, 127.0) as i8 as u8));
        }
        write_transposed_raw::<1>(&q, n_rows, k, &mut |b| w.write_all(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(dtype: DType, shape: &'a [usize], data: &'a [u8]) -> TensorView<'a> {
        TensorView { dtype, shape, data }
    }

    fn f32s(bytes: &[u8]) -> Vec<f32> {
        bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    #[test]
    fn matmul_nbits_packing_is_what_the_operator_reads() {
        // One row, K = 6, blocks of 4: the second block is partial and padded with zeros.
        // 4 bits: scale = max|block| / 7, value q = round(w / scale) + 8, two values a
        // byte, the first in the low nibble (hand-computed below).
        let vals = [7.0f32, -7.0, 3.5, 0.0, 2.0, 0.5];
        let data: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = view(DType::F32, &[1, 6], &data);
        let q4 = Quantizer { bits: 4, block: 4 };
        let (mut values, mut scales) = (Vec::new(), Vec::new());
        q4.write_values(&t, &mut values).unwrap();
        q4.write_scales(&t, &mut scales).unwrap();
        // Block 0: 7 -> 15, -7 -> 1, 3.5 -> 4 + 8 = 12, 0 -> 8. Block 1 (scale 2/7):
        // 2 -> 7 + 8 = 15, 0.5 -> round(1.75) + 8 = 10, padding -> 8, 8.
        assert_eq!(values, vec![0x1F, 0x8C, 0xAF, 0x88]);
        assert_eq!(f32s(&scales), vec![1.0, 2.0 / 7.0]);
        // 8 bits: scale = max|block| / 127, zero point 128, one value a byte.
        let vals = [127.0f32, -127.0, 64.0, 0.0];
        let data: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = view(DType::F32, &[1, 4], &data);
        let q8 = Quantizer { bits: 8, block: 4 };
        let (mut values, mut scales) = (Vec::new(), Vec::new());
        q8.write_values(&t, &mut values).unwrap();
        q8.write_scales(&t, &mut scales).unwrap();
        assert_eq!(values, vec![255, 1, 192, 128]);
        assert_eq!(f32s(&scales), vec![1.0]);
    }

    #[test]
    fn channel_quantizer_transposes_and_scales_per_row() {
        // Rows [out channels] of a [2, 3] weight; the second row is all zero.
        let vals = [1.0f32, -0.5, 0.25, 0.0, 0.0, 0.0];
        let data: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = view(DType::F32, &[2, 3], &data);
        assert_eq!(ChannelQuantizer::scales(&t), vec![1.0 / 127.0, 1.0]);
        let mut out = Vec::new();
        ChannelQuantizer::write_values(&t, &mut out).unwrap();
        let got: Vec<i8> = out.iter().map(|&b| b as i8).collect();
        // [K=3, N=2]: column 0 is row 0 quantized, column 1 is zeros.
        assert_eq!(got, vec![127, 0, -64, 0, 32, 0]);
    }
}
