//! Image-text retrieval on an export of a `Blip2ForImageTextRetrieval` checkpoint
//! (Salesforce/blip2-itm-vit-g): image and text embeddings (ITC) and the image-text
//! matching head (ITM), as transformers computes them.
//!
//! Each image goes through the vision encoder once; its features feed both the
//! image-embedding graph and the ITM graph, so [`RetrievalModel::image_features`] is the
//! step to keep when scoring one image against many texts.

use std::path::{Path, PathBuf};

use blip2_core::{io, RetrievalManifest};
use image::DynamicImage;
use ndarray::{Array2, Array3, Array4, ArrayView1, ArrayView2, Axis};
use ort::session::Session;
use ort::value::{DynValue, Tensor};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::error::RuntimeError;
use crate::model::{to_f32, GraphKind, SessionFactory};
use crate::preprocess::{self, ImageLimits};

fn ort_err(what: impl Into<String>) -> impl FnOnce(ort::Error) -> RuntimeError {
    let what = what.into();
    move |source| RuntimeError::Ort { what, source }
}

/// Vision-encoder output of a batch of images `[B, 1 + patches, D]`, in the encoder's
/// dtype, to be fed to the image-embedding and ITM graphs.
#[derive(Debug, Clone)]
pub enum ImageFeatures {
    F32(Array3<f32>),
    F16(Array3<half::f16>),
}

impl ImageFeatures {
    pub fn len(&self) -> usize {
        match self {
            ImageFeatures::F32(a) => a.shape()[0],
            ImageFeatures::F16(a) => a.shape()[0],
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Image `i`'s features repeated `n` times along the batch.
    pub fn repeat(&self, i: usize, n: usize) -> ImageFeatures {
        fn rep<T: Clone>(a: &Array3<T>, i: usize, n: usize) -> Array3<T> {
            let row = a.index_axis(Axis(0), i);
            let views = vec![row.insert_axis(Axis(0)); n];
            ndarray::concatenate(Axis(0), &views).expect("equal shapes")
        }
        match self {
            ImageFeatures::F32(a) => ImageFeatures::F32(rep(a, i, n)),
            ImageFeatures::F16(a) => ImageFeatures::F16(rep(a, i, n)),
        }
    }
    /// The features of the images `rows` picks, `(features, row)` each, stacked in that
    /// order: for ITM over pairs whose images came from different batches.
    pub fn gather(rows: &[(&ImageFeatures, usize)]) -> Result<ImageFeatures, RuntimeError> {
        fn cat<T: Clone>(v: Vec<ndarray::ArrayView3<'_, T>>) -> Result<Array3<T>, RuntimeError> {
            ndarray::concatenate(Axis(0), &v)
                .map_err(|e| RuntimeError::Input(format!("image features of unequal shapes: {e}")))
        }
        fn row<T: Clone>(a: &Array3<T>, i: usize) -> Array3<T> {
            a.slice(ndarray::s![i..i + 1, .., ..]).to_owned()
        }
        match rows.first() {
            None => Err(RuntimeError::Input("no image features to gather".into())),
            Some((ImageFeatures::F32(_), _)) => {
                let mut v = Vec::with_capacity(rows.len());
                for (f, i) in rows {
                    let ImageFeatures::F32(a) = f else {
                        return Err(RuntimeError::Input("image features of mixed dtypes".into()));
                    };
                    v.push(row(a, *i));
                }
                Ok(ImageFeatures::F32(cat(v.iter().map(|a| a.view()).collect())?))
            }
            Some((ImageFeatures::F16(_), _)) => {
                let mut v = Vec::with_capacity(rows.len());
                for (f, i) in rows {
                    let ImageFeatures::F16(a) = f else {
                        return Err(RuntimeError::Input("image features of mixed dtypes".into()));
                    };
                    v.push(row(a, *i));
                }
                Ok(ImageFeatures::F16(cat(v.iter().map(|a| a.view()).collect())?))
            }
        }
    }
    /// The features as f32 (tests, comparisons).
    pub fn to_f32(&self) -> Array3<f32> {
        match self {
            ImageFeatures::F32(a) => a.clone(),
            ImageFeatures::F16(a) => a.mapv(|x| x.to_f32()),
        }
    }
    fn value(&self) -> Result<DynValue, RuntimeError> {
        Ok(match self {
            ImageFeatures::F32(a) => {
                Tensor::from_array(a.clone()).map_err(ort_err(io::IMAGE_FEATURES))?.into_dyn()
            }
            ImageFeatures::F16(a) => {
                Tensor::from_array(a.clone()).map_err(ort_err(io::IMAGE_FEATURES))?.into_dyn()
            }
        })
    }
}

/// Token ids of a batch of texts, right-padded as BERT's tokenizer pads them.
#[derive(Debug, Clone, PartialEq)]
pub struct TextBatch {
    pub ids: Array2<i64>,
    pub mask: Array2<i64>,
    /// Which texts were cut to the model's `max_length` tokens.
    pub truncated: Vec<bool>,
}

impl TextBatch {
    /// Token rows (each `[CLS] text [SEP]`) right-padded with `pad_token_id` into one batch.
    pub fn from_rows(rows: &[TokenRow], pad_token_id: i64) -> TextBatch {
        let len = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
        let mut ids = Array2::from_elem((rows.len(), len), pad_token_id);
        let mut mask = Array2::zeros((rows.len(), len));
        for (r, row) in rows.iter().enumerate() {
            for (c, &id) in row.ids.iter().enumerate() {
                ids[[r, c]] = id;
                mask[[r, c]] = 1;
            }
        }
        TextBatch { ids, mask, truncated: rows.iter().map(|r| r.truncated).collect() }
    }
}

/// One text's token ids, unpadded.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRow {
    pub ids: Vec<i64>,
    /// Whether the text was cut to the model's `max_length` tokens.
    pub truncated: bool,
}

/// The tokenizer of a retrieval export, apart from the sessions: cheap to clone and
/// usable from any thread (a server tokenizes each request where it arrives, so that a
/// bad text fails only its own request).
#[derive(Clone)]
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    text: blip2_core::RetrievalText,
}

impl TextTokenizer {
    /// Reads `tokenizer_file` of a retrieval export.
    pub fn load(dir: &Path, manifest: &RetrievalManifest) -> Result<Self, RuntimeError> {
        let path = dir.join(&manifest.tokenizer_file);
        let mut tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| RuntimeError::Tokenizer { path: path.clone(), message: e.to_string() })?;
        // Longer texts are cut to the Q-Former's position table, as the processor does
        // with truncation=True; padding is done per batch.
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: manifest.text.max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| RuntimeError::Tokenizer { path: path.clone(), message: e.to_string() })?;
        tokenizer.with_padding(None);
        Ok(Self { tokenizer, text: manifest.text.clone() })
    }

    pub fn pad_token_id(&self) -> i64 {
        self.text.pad_token_id
    }

    /// Token ids as transformers' processor gives them for retrieval: `[CLS] text [SEP]`
    /// (no image tokens: with `image_token_index` set the processor prepends them and the
    /// model strips them again), at most `max_length`.
    pub fn encode(&self, text: &str) -> Result<TokenRow, RuntimeError> {
        let t = &self.text;
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| RuntimeError::Input(format!("{text:?}: cannot tokenize: {e}")))?;
        let ids: Vec<i64> = enc.get_ids().iter().map(|&x| x as i64).collect();
        if let Some(&bad) = ids.iter().find(|&&x| x < 0 || x as usize >= t.vocab_size) {
            let piece = self.tokenizer.id_to_token(bad as u32).unwrap_or_default();
            return Err(RuntimeError::Input(format!(
                "{text:?}: token {piece:?} (id {bad}) is outside the Q-Former's vocabulary of {}",
                t.vocab_size
            )));
        }
        if ids.is_empty() {
            return Err(RuntimeError::Input(format!("{text:?}: the tokenizer gave no tokens")));
        }
        Ok(TokenRow { ids, truncated: !enc.get_overflowing().is_empty() })
    }

    /// [`Self::encode`] for each text, padded into one batch.
    pub fn tokenize(&self, texts: &[String]) -> Result<TextBatch, RuntimeError> {
        let rows = texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                self.encode(t).map_err(|e| RuntimeError::Input(format!("text {}: {e}", i + 1)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TextBatch::from_rows(&rows, self.text.pad_token_id))
    }
}

pub struct RetrievalModel {
    pub manifest: RetrievalManifest,
    pub dir: PathBuf,
    pub limits: ImageLimits,
    vision: Session,
    image_embedding: Session,
    text_embedding: Session,
    itm: Session,
    tokenizer: TextTokenizer,
    /// Whether the vision encoder returns fp16 features.
    vision_fp16: bool,
    /// Called with the pixel values before each run of the vision encoder (tests: a
    /// failing model).
    #[cfg(any(test, feature = "test-support"))]
    before_run: Option<Box<crate::model::RunHook>>,
}

impl RetrievalModel {
    /// Opens the four graphs of a retrieval export. Sessions are asked for as the vision
    /// encoder and (the three Q-Former graphs) as the Q-Former, so profiles place them
    /// as they place a captioning export's.
    pub fn load(dir: &Path, factory: &mut SessionFactory<'_>) -> Result<Self, RuntimeError> {
        let manifest = RetrievalManifest::load(dir)?;
        let g = &manifest.graphs;
        let mut open = |kind: GraphKind, info: &blip2_core::GraphInfo| {
            let s = crate::model::open_graph(dir, &info.file, kind, factory)?;
            crate::model::check_graph_io(dir, info, &s)?;
            Ok::<_, RuntimeError>(s)
        };
        let vision = open(GraphKind::VisionEncoder, &g.vision_encoder)?;
        let image_embedding = open(GraphKind::QFormer, &g.image_embedding)?;
        let text_embedding = open(GraphKind::QFormer, &g.text_embedding)?;
        let itm = open(GraphKind::QFormer, &g.itm)?;
        let vision_fp16 = g
            .vision_encoder
            .outputs
            .iter()
            .any(|t| t.name == io::IMAGE_FEATURES && t.dtype == "float16");

        let tokenizer = TextTokenizer::load(dir, &manifest)?;
        Ok(Self {
            manifest,
            dir: dir.into(),
            limits: ImageLimits::default(),
            vision,
            image_embedding,
            text_embedding,
            itm,
            tokenizer,
            vision_fp16,
            #[cfg(any(test, feature = "test-support"))]
            before_run: None,
        })
    }

    #[cfg(any(test, feature = "test-support"))]
    /// Calls `f` with the pixel values before each run of the vision encoder.
    pub fn before_each_run(
        &mut self,
        f: impl FnMut(ndarray::ArrayView4<'_, f32>) + Send + Sync + 'static,
    ) {
        self.before_run = Some(Box::new(f));
    }

    pub fn load_image(&self, path: &Path) -> Result<DynamicImage, RuntimeError> {
        Ok(preprocess::load_image(path, &self.limits)?)
    }

    /// Pixel values `[B, 3, H, W]` of images, as transformers' BlipImageProcessor makes them.
    pub fn pixels(&self, images: &[DynamicImage]) -> Result<Array4<f32>, RuntimeError> {
        Ok(preprocess::preprocess_batch(images, &self.manifest.image)?)
    }

    /// The vision encoder on pixel values: one pass per image, for ITC and ITM alike.
    pub fn image_features(&mut self, pixels: Array4<f32>) -> Result<ImageFeatures, RuntimeError> {
        #[cfg(any(test, feature = "test-support"))]
        if let Some(f) = &mut self.before_run {
            f(pixels.view());
        }
        let px = Tensor::from_array(pixels).map_err(ort_err(io::PIXEL_VALUES))?;
        let out = self
            .vision
            .run(ort::inputs![io::PIXEL_VALUES => px])
            .map_err(ort_err("vision encoder"))?;
        let v = out
            .get(io::IMAGE_FEATURES)
            .ok_or_else(|| RuntimeError::MissingOutput(io::IMAGE_FEATURES.into()))?;
        let feats = if self.vision_fp16 {
            let a = v.try_extract_array::<half::f16>().map_err(ort_err("image_features"))?;
            ImageFeatures::F16(
                a.to_owned()
                    .into_dimensionality()
                    .map_err(|e| RuntimeError::Input(format!("image_features: {e}")))?,
            )
        } else {
            let a = v.try_extract_array::<f32>().map_err(ort_err("image_features"))?;
            ImageFeatures::F32(
                a.to_owned()
                    .into_dimensionality()
                    .map_err(|e| RuntimeError::Input(format!("image_features: {e}")))?,
            )
        };
        Ok(feats)
    }

    /// Normalized query embeddings `[B, num_query_tokens, dim]` of images' features.
    pub fn embed_image_features(
        &mut self,
        feats: &ImageFeatures,
    ) -> Result<Array3<f32>, RuntimeError> {
        let out = self
            .image_embedding
            .run(ort::inputs![io::IMAGE_FEATURES => feats.value()?])
            .map_err(ort_err("image embedding"))?;
        let v = out
            .get(io::IMAGE_EMBEDDINGS)
            .ok_or_else(|| RuntimeError::MissingOutput(io::IMAGE_EMBEDDINGS.into()))?;
        to_f32(v)?
            .into_dimensionality()
            .map_err(|e| RuntimeError::Input(format!("image_embeddings: {e}")))
    }

    /// Vision encoder then image embedding: `[B, num_query_tokens, dim]`.
    pub fn embed_images(&mut self, images: &[DynamicImage]) -> Result<Array3<f32>, RuntimeError> {
        let px = self.pixels(images)?;
        let feats = self.image_features(px)?;
        self.embed_image_features(&feats)
    }

    /// Token ids as transformers' processor gives them for retrieval (see
    /// [`TextTokenizer::encode`]), right-padded with the pad id.
    pub fn tokenize(&self, texts: &[String]) -> Result<TextBatch, RuntimeError> {
        self.tokenizer.tokenize(texts)
    }

    /// The export's tokenizer, to tokenize apart from the sessions.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// Pixel values `[B, 3, H, W]` of images preprocessed one by one (`[3, H, W]` each).
    pub fn stack_pixels(images: &[&Array3<f32>]) -> Result<Array4<f32>, RuntimeError> {
        let views: Vec<_> = images.iter().map(|a| a.view().insert_axis(Axis(0))).collect();
        ndarray::concatenate(Axis(0), &views)
            .map_err(|e| RuntimeError::Input(format!("pixel values of unequal shapes: {e}")))
    }

    /// Normalized text embeddings `[T, dim]` of a tokenized batch.
    pub fn embed_text_batch(&mut self, batch: &TextBatch) -> Result<Array2<f32>, RuntimeError> {
        let out = self
            .text_embedding
            .run(ort::inputs![
                io::INPUT_IDS => Tensor::from_array(batch.ids.clone()).map_err(ort_err(io::INPUT_IDS))?,
                io::ATTENTION_MASK => Tensor::from_array(batch.mask.clone()).map_err(ort_err(io::ATTENTION_MASK))?,
            ])
            .map_err(ort_err("text embedding"))?;
        let v = out
            .get(io::TEXT_EMBEDDINGS)
            .ok_or_else(|| RuntimeError::MissingOutput(io::TEXT_EMBEDDINGS.into()))?;
        to_f32(v)?
            .into_dimensionality()
            .map_err(|e| RuntimeError::Input(format!("text_embeddings: {e}")))
    }

    /// Normalized text embeddings `[T, dim]`.
    pub fn embed_texts(&mut self, texts: &[String]) -> Result<Array2<f32>, RuntimeError> {
        let batch = self.tokenize(texts)?;
        self.embed_text_batch(&batch)
    }

    /// ITM logits `[T, 2]` of image `image` of `feats` with each text of `batch`.
    pub fn itm_logits(
        &mut self,
        feats: &ImageFeatures,
        image: usize,
        batch: &TextBatch,
    ) -> Result<Array2<f32>, RuntimeError> {
        let n = batch.ids.shape()[0];
        self.run_itm(&feats.repeat(image, n), batch)
    }

    /// The ITM graph on row b of `feats` with text b of `batch`: logits `[B, 2]`.
    fn run_itm(
        &mut self,
        feats: &ImageFeatures,
        batch: &TextBatch,
    ) -> Result<Array2<f32>, RuntimeError> {
        let out = self
            .itm
            .run(ort::inputs![
                io::IMAGE_FEATURES => feats.value()?,
                io::INPUT_IDS => Tensor::from_array(batch.ids.clone()).map_err(ort_err(io::INPUT_IDS))?,
                io::ATTENTION_MASK => Tensor::from_array(batch.mask.clone()).map_err(ort_err(io::ATTENTION_MASK))?,
            ])
            .map_err(ort_err("ITM"))?;
        let v = out
            .get(io::ITM_LOGITS)
            .ok_or_else(|| RuntimeError::MissingOutput(io::ITM_LOGITS.into()))?;
        to_f32(v)?
            .into_dimensionality()
            .map_err(|e| RuntimeError::Input(format!("itm_logits: {e}")))
    }

    /// ITM match probabilities of pairs: row b of `feats` with text b of `batch`.
    pub fn itm_pairs(
        &mut self,
        feats: &ImageFeatures,
        batch: &TextBatch,
    ) -> Result<Vec<f32>, RuntimeError> {
        if feats.len() != batch.ids.shape()[0] {
            return Err(RuntimeError::Input(format!(
                "ITM pairs: {} images but {} texts",
                feats.len(),
                batch.ids.shape()[0]
            )));
        }
        let logits = self.run_itm(feats, batch)?;
        Ok(logits.outer_iter().map(|l| match_probability(l[0], l[1])).collect())
    }

    /// ITM match probabilities of image `image` of `feats` with each text of `batch`.
    pub fn itm(
        &mut self,
        feats: &ImageFeatures,
        image: usize,
        batch: &TextBatch,
    ) -> Result<Vec<f32>, RuntimeError> {
        let logits = self.itm_logits(feats, image, batch)?;
        Ok(logits.outer_iter().map(|l| match_probability(l[0], l[1])).collect())
    }
}

/// The ITM head's match probability: the second entry of the softmax of its two logits.
pub fn match_probability(no: f32, yes: f32) -> f32 {
    let m = no.max(yes);
    let (a, b) = ((no - m).exp(), (yes - m).exp());
    b / (a + b)
}

/// The ITC score of an image (its normalized query embeddings `[Q, dim]`) and a text (its
/// normalized embedding `[dim]`): the largest cosine similarity over the queries.
pub fn itc(image: ArrayView2<'_, f32>, text: ArrayView1<'_, f32>) -> f32 {
    image.dot(&text).fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr1, arr2};

    #[test]
    fn match_probability_is_the_softmax_second_entry() {
        // softmax([0, ln 3]) = [1/4, 3/4]
        assert!((match_probability(0.0, 3f32.ln()) - 0.75).abs() < 1e-7);
        // Large logits do not overflow: softmax([1000, 1001])[1] = 1 / (1 + e^-1).
        let p = match_probability(1000.0, 1001.0);
        assert!((p - 1.0 / (1.0 + (-1f32).exp())).abs() < 1e-6, "{p}");
        assert_eq!(match_probability(5.0, 5.0), 0.5);
    }

    #[test]
    fn itc_is_the_best_query() {
        let image = arr2(&[[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]]);
        assert!((itc(image.view(), arr1(&[0.0, 1.0]).view()) - 0.8).abs() < 1e-7);
        assert!((itc(image.view(), arr1(&[0.0, -1.0]).view()) - 1.0).abs() < 1e-7);
    }
}
