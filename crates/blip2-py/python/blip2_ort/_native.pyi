"""Type stubs of the native module (re-exported by ``blip2_ort``)."""

import os
from typing import Any, List, Literal, Optional, Sequence, Tuple, TypedDict, Union

import numpy as np
import numpy.typing as npt

try:
    from PIL.Image import Image as _PILImage
except ImportError:  # Pillow is optional
    _PILImage = Any  # type: ignore[misc,assignment]

#: One image: a file path, encoded bytes (PNG, JPEG, GIF, WebP, BMP, TIFF), a Pillow
#: image, or a numpy uint8 array of shape (height, width, 3), RGB.
ImageLike = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, _PILImage, npt.NDArray[np.uint8]]
#: One image or a list of them.
Images = Union[ImageLike, Sequence[ImageLike]]

ORT_VERSION: str
__version__: str

class Generated(TypedDict, total=False):
    text: str
    token_ids: List[int]
    #: Present when num_return_sequences > 1: which of the image's sequences.
    sequence: int

class Match(TypedDict):
    text: str
    #: Image-text matching probability (the ITM head).
    itm: float
    #: Image-text contrastive score: the best cosine similarity over the image's queries.
    itc: float

class Model:
    """A BLIP-2 export loaded on ONNX Runtime.

    Args:
        model: an export folder (``blip2-ort export``), a Hugging Face checkpoint folder or a
            Hub id (exported once into ``~/.cache/blip2-ort/models`` and reused).
        ep: execution-provider profile: "cpu", "cuda", "cuda-graph", "tensorrt", or one of
            ``config``'s.
        config: a TOML file whose profiles are laid over the built-in ones
            (``$BLIP2_ORT_CONFIG`` when not given).
        threads: ONNX Runtime intra-op threads and image-decoding workers (default: ONNX
            Runtime's choice, and one worker per core). The first model of a process sets
            ONNX Runtime's shared thread pool.
        quiet: no download or export messages on stderr.

    Raises:
        FileNotFoundError: ``model`` or ``config`` does not exist.
        ValueError: a bad argument (named in the message): unknown ``ep``, bad ``threads``,
            a folder that is not a model.
        RuntimeError: ONNX Runtime cannot be loaded, or the export cannot be run.

    A captioning export has ``caption``, ``generate``, ``vqa`` and ``chat``; an image-text
    retrieval export (Salesforce/blip2-itm-vit-g) has ``embed_images``, ``embed_texts``
    and ``itm``. Every method releases the GIL while it decodes images and runs the
    model, so threads run in parallel; calls on one Model take turns.

    Generation settings (keyword arguments of ``caption``, ``generate``, ``vqa``,
    ``chat``), unset ones taken from the checkpoint's generation_config.json, then
    transformers' defaults: max_new_tokens (20), min_new_tokens (0), num_beams (1),
    length_penalty (1.0), early_stopping (False; True, False or "never"),
    repetition_penalty (1.0), no_repeat_ngram_size (0), do_sample (False),
    temperature (1.0), top_k (50), top_p (1.0), seed, num_return_sequences (1). A bad
    value raises ValueError naming it.

    Images are read as ``blip2-ort infer`` reads them: files and bytes are decoded by
    blip2-ort (JPEG exactly as Pillow decodes it) and turned upright by their EXIF
    orientation; Pillow images and arrays are taken as they are (as transformers takes
    them).
    """

    def __init__(
        self,
        model: Union[str, "os.PathLike[str]"],
        ep: str = "cpu",
        *,
        config: Optional[Union[str, "os.PathLike[str]"]] = None,
        threads: Optional[int] = None,
        quiet: bool = True,
    ) -> None: ...
    @property
    def kind(self) -> Literal["captioning", "retrieval"]:
        """"captioning" or "retrieval"."""
    @property
    def path(self) -> str:
        """The export folder the model was loaded from."""
    @property
    def ep(self) -> str:
        """The execution-provider profile's name."""
    def caption(
        self,
        images: Images,
        prompt: Optional[str] = None,
        *,
        batch_size: int = 8,
        max_new_tokens: Optional[int] = None,
        min_new_tokens: Optional[int] = None,
        num_beams: Optional[int] = None,
        length_penalty: Optional[float] = None,
        early_stopping: Optional[Union[bool, Literal["never"]]] = None,
        repetition_penalty: Optional[float] = None,
        no_repeat_ngram_size: Optional[int] = None,
        do_sample: Optional[bool] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        num_return_sequences: Optional[int] = None,
    ) -> Union[List[str], List[List[str]]]:
        """Captions of images, one per image in order (a list of
        ``num_return_sequences`` captions per image when that is above 1), each
        continuing ``prompt`` when given. ``batch_size`` images run together, as
        ``infer caption --batch-size``. As ``blip2-ort infer caption``.

        Raises:
            FileNotFoundError: an image file does not exist (named ``images[i]``).
            ValueError: an image that cannot be decoded, a prompt too long, a bad setting.
            RuntimeError: the model failed to run.
        """
    def generate(
        self,
        images: Images,
        prompts: Optional[Union[str, Sequence[str]]] = None,
        *,
        batch_size: int = 8,
        **generation: Any,
    ) -> List[Generated]:
        """``{"text", "token_ids"}`` for each image with its prompt (one string for all,
        or one per image), as ``infer --json`` prints them: ``token_ids`` are the new
        tokens (no prompt, no final eos), and with ``num_return_sequences`` above 1 each
        image has that many entries, numbered by ``"sequence"``."""
    def vqa(self, image: ImageLike, question: str, **generation: Any) -> Union[str, List[str]]:
        """The answer to ``question`` about ``image``, with the model's VQA template
        (``Question: {} Answer:``), as ``blip2-ort infer vqa``."""
    def chat(
        self,
        image: ImageLike,
        history: Sequence[Tuple[str, str]],
        question: str,
        **generation: Any,
    ) -> Union[str, List[str]]:
        """The answer to ``question`` about ``image`` after the earlier ``(question,
        answer)`` turns of ``history``, as ``blip2-ort infer chat`` answers its next line.
        The oldest turns that do not fit the model's context (with room for
        max_new_tokens) are left out, with a UserWarning."""
    def embed_images(self, images: Images, *, batch_size: int = 8) -> npt.NDArray[np.float32]:
        """Normalized query embeddings, float32 ``[images, num_query_tokens, dim]``, as
        ``blip2-ort infer embed-image``. Retrieval exports."""
    def embed_texts(self, texts: Union[str, Sequence[str]], *, batch_size: int = 8) -> npt.NDArray[np.float32]:
        """Normalized text embeddings, float32 ``[texts, dim]``, as ``blip2-ort infer
        embed-text``. Texts longer than the model's positions are cut (UserWarning).
        Retrieval exports."""
    def itm(self, image: ImageLike, texts: Union[str, Sequence[str]], *, batch_size: int = 8) -> List[Match]:
        """``{"text", "itm", "itc"}`` of ``image`` with each text, as ``blip2-ort infer
        itm --json``. Retrieval exports."""
    def _check_generation(self, **generation: Any) -> None: ...

def export(
    checkpoint: Union[str, "os.PathLike[str]"],
    out: Union[str, "os.PathLike[str]"],
    *,
    dtype: Literal["fp32", "fp16"] = "fp32",
    revision: Optional[str] = None,
    force: bool = False,
    max_context: Optional[int] = None,
    quantize: Optional[Literal["int8", "int4"]] = None,
    quantize_encoders: Optional[Literal["int8"]] = None,
    target: Literal["portable", "cuda"] = "portable",
    quiet: bool = True,
) -> str:
    """Exports a BLIP-2 checkpoint (folder or Hub id) to ONNX graphs in ``out``, as
    ``blip2-ort export``; returns ``out``. The folder is written whole or not at all;
    an existing export is replaced only with ``force=True`` (else ValueError)."""

def runtime_library() -> Optional[str]:
    """The ONNX Runtime library file this process loaded (None before the first model)."""

def _prefer_runtime_library(path: str) -> None: ...
def _runtime_library_name() -> str: ...
