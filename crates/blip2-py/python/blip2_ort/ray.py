"""Callable classes for Ray Data's ``Dataset.map_batches``: one model per actor.

    import ray
    from blip2_ort.ray import Captioner

    ds = ray.data.read_binary_files("photos/", include_paths=True)
    ds = ds.map_batches(
        Captioner,
        fn_constructor_kwargs={"model": "exports/blip2-opt-2.7b", "prompt": "a photo of"},
        compute=ray.data.ActorPoolStrategy(size=4),
        num_cpus=1,
        batch_size=16,
    )
    ds.write_parquet("captions/")

Each class takes a batch (the numpy dict or pandas DataFrame formats) with an image column
and returns it with a column added. The images may be encoded bytes (``read_binary_files``
gives them as the ``bytes`` column: decoded by blip2-ort itself, EXIF orientation applied,
exactly as ``blip2-ort infer`` reads files) or uint8 RGB arrays (``read_images(...,
mode="RGB")`` gives them as the ``image`` column). See docs/scale-out.md.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ._native import Model

__all__ = ["Captioner", "Embedder"]


def _actor_cpus() -> Optional[int]:
    """The CPUs Ray gave this actor (at least 1), or None outside Ray: the model's threads."""
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:
        return None
    if not cpus:
        return None
    return max(1, int(cpus))


def _column(batch: Any, column: str, default: bool) -> list:
    """The images of a batch's column, as a list blip2_ort takes."""
    names = list(batch.keys())
    if column not in names and default and "bytes" in names:
        # read_binary_files names its column "bytes".
        column = "bytes"
    if column not in names:
        raise ValueError(
            f"column: the batch has no column {column!r} (columns: {', '.join(map(str, names))}); "
            "pass column= to the constructor (fn_constructor_kwargs)"
        )
    values = batch[column]
    if isinstance(values, np.ndarray) and values.dtype != object and values.ndim == 4:
        # Images of one size come as one [B, H, W, C] array.
        return list(values)
    if hasattr(values, "tolist") and not isinstance(values, np.ndarray):
        values = values.tolist()  # a pandas Series
    return list(values)


class Captioner:
    """Adds a caption column: ``Model(model, ep).caption(images, prompt, **generation)``.

    Args:
        model: export folder, checkpoint folder or Hub id (as ``blip2_ort.Model``), on
            storage every node sees, or copied to each node by a runtime env.
        ep: execution-provider profile: "cpu", "cuda", "tensorrt", ... (ask Ray for a GPU
            per actor with ``num_gpus=1`` in ``map_batches``).
        prompt: text the captions continue, e.g. "a photo of" (default: none).
        column: the image column (default "image"; a batch with only "bytes", as
            ``read_binary_files`` gives, is read from that).
        output_column: the column added (default "caption").
        threads: ONNX Runtime threads (default: the CPUs Ray gave the actor).
        batch_size: images per model run inside a batch (as ``infer --batch-size``).
        config: a TOML file of profiles laid over the built-in ones.
        **generation: max_new_tokens, num_beams, ... as ``Model.caption`` takes them.
    """

    def __init__(
        self,
        model: str,
        ep: str = "cpu",
        prompt: Optional[str] = None,
        *,
        column: str = "image",
        output_column: str = "caption",
        threads: Optional[int] = None,
        batch_size: int = 8,
        config: Optional[str] = None,
        **generation: Any,
    ) -> None:
        self.model = Model(model, ep, config=config, threads=threads or _actor_cpus())
        self.prompt = prompt
        self.column = column
        self.default_column = column == "image"
        self.output_column = output_column
        self.batch_size = batch_size
        self.generation = generation
        # A wrong model or a bad setting fails here, at actor start, not on a batch.
        self.model._check_generation(**generation)

    def __call__(self, batch: Any) -> Any:
        images = _column(batch, self.column, self.default_column)
        captions = self.model.caption(
            images, self.prompt, batch_size=self.batch_size, **self.generation
        )
        out = np.empty(len(captions), dtype=object)
        out[:] = captions
        batch[self.output_column] = out
        return batch


class Embedder:
    """Adds an embedding column: ``Model(model, ep).embed_images(images)``, one float32
    ``[num_query_tokens, dim]`` array per row (an image-text retrieval export such as
    Salesforce/blip2-itm-vit-g's).

    Args are those of :class:`Captioner` without prompt and generation settings;
    ``output_column`` defaults to "embedding".
    """

    def __init__(
        self,
        model: str,
        ep: str = "cpu",
        *,
        column: str = "image",
        output_column: str = "embedding",
        threads: Optional[int] = None,
        batch_size: int = 8,
        config: Optional[str] = None,
    ) -> None:
        self.model = Model(model, ep, config=config, threads=threads or _actor_cpus())
        if self.model.kind != "retrieval":
            raise ValueError(
                f"model: {self.model.path} is a {self.model.kind} export; Embedder needs an "
                "image-text retrieval export (e.g. of Salesforce/blip2-itm-vit-g)"
            )
        self.column = column
        self.default_column = column == "image"
        self.output_column = output_column
        self.batch_size = batch_size

    def __call__(self, batch: Any) -> Any:
        images = _column(batch, self.column, self.default_column)
        batch[self.output_column] = self.model.embed_images(images, batch_size=self.batch_size)
        return batch
