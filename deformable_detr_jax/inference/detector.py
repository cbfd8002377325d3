"""`Detector`: a model plus its pre/post-processing, compiled once per shape bucket.

    detector = Detector.from_pretrained("SenseTime/deformable-detr")  # hub id, folder or file
    detections = detector(["cats.jpg", pil_image], threshold=0.5)  # one Detections per image
    detector.draw("cats.jpg", detections[0]).save("cats_detected.png")

Pipeline per call (transformers' `DeformableDetrImageProcessor` + model +
`post_process_object_detection`, see DESIGN.md "Data flow"): every image is loaded and checked
first (a bad one raises `ImageError` naming its index and path before any compute), resized, and
assigned its own shape bucket: the resized height and width each rounded up to the processor's
`buckets`. Images are grouped by bucket and batched within it (chunks of `batch_size`, then powers
of two, so each bucket needs at most 1 + log2(batch_size) programs); each (batch, height, width)
is compiled once by `jax.jit` and cached. Host pre-processing of the next chunk overlaps the
device work of the previous one (JAX dispatches asynchronously). Post-processing: sigmoid, top-k
over queries x classes, threshold, boxes (x0, y0, x1, y1) in pixels of the input image.

Buckets and exactness. Padding is invisible: the model runs with `padding_invariant=True`
(`DeformableDetrForObjectDetection.__call__`), which zeroes the padding before every backbone
convolution that mixes neighbours (Swin: pads and shifts its windows per image), strides the
masks exactly and keeps padded positions out of the GroupNorm statistics and of two-stage
proposals. Each image's detections therefore equal transformers' on that image alone, unpadded,
whatever bucket or batch it runs in (tested at the float32 rounding level, about 1e-6). `padding_invariant=False` computes what transformers
computes for a padded batch instead, where padding near the bottom/right border leaks into the
features (with random full-size weights: scores move by up to 0.009 in the default buckets and
0.025 on a 1333 x 1333 canvas; BENCHMARKS.md "Inference"). Without buckets (`buckets=None`) an
image is not padded at all and the two settings agree.

Cold starts. Programs are compiled once per machine, not once per process: `Detector` turns on
JAX's persistent compilation cache (`compile_cache.py`; `compile_cache=None` or
`DEFORMABLE_DETR_JAX_COMPILE_CACHE=off` opts out), so a new process's first call traces the
model and reads the compiled program back. `warmup(sizes)` prepares the programs of given image
sizes before the first call (e.g. while a notebook loads its images).

bfloat16 (`dtype=jnp.bfloat16`): the `nnx.Param`s and the pixel values are cast to bfloat16; the
frozen batch-norm statistics (`nnx.BatchStat`) stay float32 so that `rsqrt(var + eps)` keeps its
precision (it is folded into a scale and cast to the activations' dtype anyway); the deformable
attention core accumulates in float32; logits and boxes are returned as float32.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import pathlib
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
from flax import nnx

from deformable_detr_jax.compile_cache import enable_compile_cache
from deformable_detr_jax.config import DeformableDetrConfig
from deformable_detr_jax.inference.detections import Detections, draw_detections
from deformable_detr_jax.modeling import DeformableDetrForObjectDetection
from deformable_detr_jax.processing.image_processor import (
    CONFIG_NAME,
    MIN_SIDE,
    ImageError,
    ImageLike,
    ImageProcessor,
    as_image_list,
    describe_image,
)
from deformable_detr_jax.processing.postprocessing import post_process_object_detection

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _outputs(params, rest, pixel_values, pixel_mask, *, graphdef, dtype, padding_invariant):
    """`(bs, height, width, 3)` float32, `(bs, height, width)` bool -> logits, boxes (float32)."""
    model = nnx.merge(graphdef, params, rest)
    out = model(pixel_values.astype(dtype), pixel_mask, padding_invariant=padding_invariant)
    return out.logits.astype(jnp.float32), out.pred_boxes.astype(jnp.float32)


# One program per (shapes, graphdef, dtype, padding_invariant): module-level so that every
# `Detector` of the same architecture shares `jax.jit`'s cache; only logits and boxes leave the
# device (XLA drops the rest of the outputs).
_forward = jax.jit(_outputs, static_argnames=("graphdef", "dtype", "padding_invariant"))


@functools.partial(jax.jit, static_argnames=("dtype",))
def _cast_floating(tree, *, dtype):
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def _resolve_dtype(dtype: Any) -> jnp.dtype:
    if dtype is None:
        return jnp.dtype(jnp.float32)
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} (or None), got {dtype!r}")
    return jnp.dtype(_DTYPES[name])


def default_buckets(processor: ImageProcessor, step: int = 128) -> ImageProcessor:
    """`processor.with_buckets(step)` plus the resize target's `shortest_edge` as a bucket of its
    own: most photos resize to exactly that many pixels on their short side (800 by default), so
    800 x 1216 pads to 800 x 1280 rather than 896 x 1280. Without resizing: no buckets."""
    if not processor.do_resize:
        return processor
    bucketed = processor.with_buckets(step)
    extra = {processor.size["shortest_edge"]} if "shortest_edge" in processor.size else set()
    return dataclasses.replace(bucketed, buckets=tuple(sorted(set(bucketed.buckets) | extra)))


def _with_buckets(processor: ImageProcessor, buckets: Any) -> ImageProcessor:
    """`buckets`: "auto" (the processor's, else 128-step), an int step, sizes, or None (off).

    Padding is always on (a `do_pad=False` setting is overridden): the model needs one size per
    batch, and the mask hides the padding; an image alone without buckets is not padded at all.
    """
    if not processor.do_pad:
        processor = dataclasses.replace(processor, do_pad=True)
    if isinstance(buckets, str):
        if buckets != "auto":
            raise ValueError(f'buckets must be "auto", an int step, sizes or None, got {buckets!r}')
        if processor.buckets is not None or processor.pad_size is not None:
            return processor
        return default_buckets(processor)
    if buckets is None:
        return dataclasses.replace(processor, buckets=None)
    if isinstance(buckets, (int, np.integer)) and not isinstance(buckets, bool):
        return default_buckets(processor, int(buckets))
    return dataclasses.replace(processor, buckets=tuple(int(b) for b in buckets))


def _default_processor(where: pathlib.Path) -> ImageProcessor:
    """The default settings, for a model without `preprocessor_config.json` (a warning names
    them for a weights file, which never comes with its processor settings)."""
    processor = ImageProcessor()
    if where.is_dir():
        return processor
    warnings.warn(
        f"{os.fspath(where)} is a weights file without {CONFIG_NAME}: using the default "
        f"pre-processing (resize to {processor.size}, rescale by 1/255, normalise with "
        f"mean {processor.image_mean} and std {processor.image_std}); pass "
        "processor=ImageProcessor(...) or a model folder for other settings",
        stacklevel=3,
    )
    return processor


def _chunk_sizes(count: int, batch_size: int) -> list[int]:
    """`count` images in chunks of `batch_size`, the rest in decreasing powers of two (no padding
    images, and at most 1 + log2(batch_size) distinct batch sizes)."""
    sizes = [batch_size] * (count // batch_size)
    rest = count % batch_size
    while rest:
        sizes.append(1 << (rest.bit_length() - 1))
        rest -= sizes[-1]
    return sizes


def _capture(fn):
    """`fn` returning its `ImageError` / `TypeError` instead of raising it (for `pool.map`)."""

    def call(*args):
        try:
            return fn(*args)
        except (ImageError, TypeError) as err:
            return err

    return call


@dataclasses.dataclass
class _Prepared:
    """One loaded and checked input image and where it goes."""

    index: int  # position in the call
    name: str  # "image {index} ('{path}')" for errors
    array: np.ndarray | None  # [height, width, 3] as loaded; dropped once pre-processed
    size: tuple[int, int]  # (height, width) of the input image
    bucket: tuple[int, int]  # padded (height, width)


class Detector:
    """Deformable DETR inference: images in, `Detections` out.

    Args:
      model: a `DeformableDetrForObjectDetection` (its weights are split off once and kept).
      processor: pre-processing settings; `ImageProcessor()` (transformers' defaults) when None.
      dtype: `jnp.float32` (default) or `jnp.bfloat16` compute.
      buckets: padded sizes. `"auto"`: the processor's `buckets` (or its fixed `pad_size`), else
        `default_buckets(processor)`: multiples of 128 up to the longest edge, plus the shortest
        edge (800): photos pad by at most 127 pixels per side, usually only along the long one.
        An int: `default_buckets` with that step. A sequence: those side lengths. `None`: no
        buckets, every image padded to its own size (exact transformers parity, one program per
        distinct resized size). The bucket does not change the detections (`padding_invariant`).
      batch_size: largest batch sent to the device at once.
      top_k: (query, class) pairs kept per image before the threshold, as transformers.
      workers: threads that read and pre-process images (at most the number of CPUs).
      padding_invariant: True (default): padding does not change any image's outputs, which
        equal those of the image alone, unpadded (see the module docstring). False: what
        transformers computes for a padded batch (padding leaks in near the border).
      compile_cache: JAX's persistent compilation cache, so that a new process reuses the
        programs an earlier one compiled (`deformable_detr_jax.compile_cache`). `"auto"`
        (default): `$DEFORMABLE_DETR_JAX_COMPILE_CACHE` (`off` turns it off), else
        `$XDG_CACHE_HOME/deformable_detr_jax/xla` (`~/.cache/...`); a directory; or None: this
        detector turns no cache on. Process-wide; a cache JAX already uses is kept.

    `compiled_shapes` lists the (batch, height, width) programs used so far: a stream of images
    compiles at most one program per (bucket, batch size) pair, never one per image size.
    """

    def __init__(
        self,
        model: DeformableDetrForObjectDetection,
        processor: ImageProcessor | None = None,
        *,
        dtype: Any = None,
        buckets: Any = "auto",
        batch_size: int = 4,
        top_k: int = 100,
        workers: int = 4,
        padding_invariant: bool = True,
        compile_cache: str | os.PathLike | None = "auto",
    ):
        if not isinstance(model, DeformableDetrForObjectDetection):
            raise TypeError(
                f"model must be a DeformableDetrForObjectDetection, got {type(model).__name__}"
            )
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        self.config: DeformableDetrConfig = model.config
        self.processor = _with_buckets(processor or ImageProcessor(), buckets)
        self.dtype = _resolve_dtype(dtype)
        self.batch_size = int(batch_size)
        self.top_k = int(top_k)
        if not isinstance(padding_invariant, bool):
            raise TypeError(f"padding_invariant must be True or False, got {padding_invariant!r}")
        self.padding_invariant = padding_invariant
        self.id2label = self.config.id2label_dict

        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        self._graphdef = graphdef
        # Parameters in the compute dtype (one program for the whole tree, not one per shape);
        # BatchStat (frozen batch norm) and the rng state stay as they are.
        floating = [x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
        if any(x.dtype != self.dtype for x in floating):
            params = _cast_floating(params, dtype=self.dtype)
        self._params = params
        self._rest = rest
        self._shapes: dict[tuple[int, int, int], None] = {}
        self._workers = max(1, min(workers, os.cpu_count() or 1))
        self.compile_cache = enable_compile_cache(compile_cache)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype: Any = None,
        processor: ImageProcessor | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        **kwargs: Any,
    ) -> Detector:
        """From a Hugging Face hub id (`"SenseTime/deformable-detr"`, downloaded once into
        huggingface_hub's cache), a folder saved by this package (`checkpoint.save_pretrained`:
        orbax weights + config.json), a hub-style folder (config.json + model.safetensors |
        pytorch_model.bin) or a single weights file (`.safetensors`, `.bin`, fundamentalvision
        `.pth`: the architecture read off the weights). An existing local path wins over a hub
        id of the same name (`convert.hub.resolve_model`).

        The processor comes from the folder's `preprocessor_config.json` when present, else
        `ImageProcessor()` defaults (for a single file with a warning that says so);
        `processor=` overrides both. `revision` (branch, tag or commit), `cache_dir` and `token`
        apply to hub ids (the token defaults to `HF_TOKEN`, else the `hf auth login` file;
        `HF_HUB_OFFLINE=1` loads from the cache only). `kwargs` go to `Detector` (`buckets`,
        `batch_size`, `top_k`, `workers`, `padding_invariant`, `compile_cache`).

        Raises:
          FileNotFoundError: no such path, and not a hub id.
          HubError: a hub id that cannot be resolved (one line naming it and what to do).
          CheckpointError: a folder without weights, or weights that cannot be read.
        """
        # imported here: orbax and the converter are needed only by this constructor
        from deformable_detr_jax.checkpoint import is_pretrained_folder, load_pretrained
        from deformable_detr_jax.convert import (
            load_pytorch_checkpoint,
            read_processor,
            resolve_model,
        )

        where = resolve_model(path, revision=revision, cache_dir=cache_dir, token=token)
        if where.is_dir() and is_pretrained_folder(where):  # ours: config.json + orbax params/
            model = load_pretrained(where)
        else:  # hub-style folder (config.json + model.safetensors | pytorch_model.bin) or a file
            model = load_pytorch_checkpoint(where)
        if processor is None:
            processor = read_processor(where) or _default_processor(where)
        return cls(model, processor, dtype=dtype, **kwargs)

    # ------------------------------------------------------------------ compiled forward

    @property
    def compiled_shapes(self) -> tuple[tuple[int, int, int], ...]:
        """(batch, height, width) of every program this detector has run, in order of first use.

        Programs are cached by `jax.jit` on the shapes and on the model structure, so detectors
        of the same architecture and dtype share them (a second detector compiles nothing new).
        """
        return tuple(self._shapes)

    def bucket(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Padded (height, width) an image of `image_size` (height, width) is run at."""
        height, width = self.processor.padded_size([self.processor.resized_size(image_size)])
        return max(height, MIN_SIDE), max(width, MIN_SIDE)

    def warmup(
        self, sizes: Sequence[tuple[int, int]], batch_sizes: Sequence[int] | None = None
    ) -> tuple[tuple[int, int, int], ...]:
        """Compiles (or loads from the compilation cache) the programs for images of `sizes`.

        Args:
          sizes: (height, width) of input images, as they come (each maps to its bucket:
            `bucket(size)`), e.g. `[(480, 640), (1080, 1920)]`.
          batch_sizes: batch sizes to prepare per bucket; default `(1,)` (a call with one image).
            A call with n images of a bucket uses `batch_size` and the powers of two below.

        Each program is run once on a blank batch, so that later calls find it ready in
        `jax.jit`'s cache. Returns the (batch, height, width) programs prepared.
        """
        if isinstance(sizes, tuple) and len(sizes) == 2 and all(isinstance(s, int) for s in sizes):
            sizes = [sizes]  # one (height, width)
        batch_sizes = (1,) if batch_sizes is None else tuple(batch_sizes)
        for b in batch_sizes:
            if isinstance(b, bool) or int(b) != b or b < 1:
                raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes!r}")
        prepared = []
        for size in sizes:
            try:
                height, width = (int(s) for s in size)
            except (TypeError, ValueError):
                raise ValueError(f"sizes must be (height, width) pairs, got {size!r}") from None
            bucket = self.bucket((height, width))
            for b in batch_sizes:
                shape = (int(b), *bucket)
                if shape not in prepared:
                    pixels = np.zeros((*shape, 3), np.float32)
                    jax.block_until_ready(self.forward(pixels, np.ones(shape, bool)))
                    prepared.append(shape)
        return tuple(prepared)

    def model_function(self):
        """`(pixel_values, pixel_mask) -> (logits, pred_boxes)`: what `forward` compiles, as a
        plain (not jitted) function with this detector's weights, dtype and padding setting
        closed over. `[bs, height, width, 3]` float32 and `[bs, height, width]` bool in;
        `[bs, len_q, num_labels]` and `[bs, len_q, 4]` float32 out. For exporting
        (`deformable_detr_jax.export`) and for tracing under other transformations."""
        return functools.partial(
            _outputs,
            self._params,
            self._rest,
            graphdef=self._graphdef,
            dtype=self.dtype,
            padding_invariant=self.padding_invariant,
        )

    def forward(self, pixel_values: np.ndarray, pixel_mask: np.ndarray) -> tuple[Any, Any]:
        """Compiled model on a pre-processed batch: `[bs, height, width, 3]` float32 and
        `[bs, height, width]` bool -> `logits [bs, len_q, num_labels]`, `pred_boxes [bs, len_q,
        4]` float32 device arrays (dispatched, not waited for)."""
        self._shapes.setdefault(tuple(int(s) for s in pixel_values.shape[:3]))
        return _forward(
            self._params,
            self._rest,
            np.asarray(pixel_values, np.float32),
            np.asarray(pixel_mask, bool),
            graphdef=self._graphdef,
            dtype=self.dtype,
            padding_invariant=self.padding_invariant,
        )

    # ------------------------------------------------------------------ detection

    def _prepare(self, index: int, image: ImageLike) -> _Prepared:
        name = describe_image(index, image)
        array = self.processor.load_image(image, index)
        try:
            bucket = self.bucket(array.shape[:2])
        except ValueError as err:
            raise ImageError(f"{name}: {err}") from err
        return _Prepared(index, name, array, tuple(int(s) for s in array.shape[:2]), bucket)

    def _pixels(self, item: _Prepared) -> tuple[np.ndarray, np.ndarray]:
        try:
            batch = self.processor.preprocess(item.array, pad_to=item.bucket)
        except ValueError as err:  # ImageError included: name the image by its place in the call
            message = str(err)  # preprocess saw a one-image list: "image 0 ..." is this image
            message = item.name + message[7:] if message.startswith("image 0") else message
            raise ImageError(
                message if item.name in message else f"{item.name}: {message}"
            ) from err
        return batch["pixel_values"][0], batch["pixel_mask"][0]

    def __call__(
        self,
        images: ImageLike | Sequence[ImageLike],
        threshold: float = 0.5,
        *,
        on_error: str = "raise",
    ) -> list[Detections | ImageError]:
        """Detects objects in one image or a list of them (PIL, `[height, width(, 1|3|4)]` uint8 or
        float arrays in 0..255, file paths; any mix of sizes).

        Args:
          images: one image, a list, or a `[bs, height, width, channels]` array.
          threshold: keep detections with score > threshold, in [0, 1].
          on_error: `"raise"`: a bad image raises `ImageError` (naming its index and path) before
            any image is run. `"return"`: the `ImageError` takes that image's place in the
            result and the other images are still detected.

        Returns:
          One `Detections` per image, in input order (or `ImageError` with `on_error="return"`).
        """
        threshold = float(threshold)
        if not 0.0 <= threshold <= 1.0:  # also rejects NaN
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if on_error not in ("raise", "return"):
            raise ValueError(f'on_error must be "raise" or "return", got {on_error!r}')
        images = as_image_list(images)
        results: list[Detections | ImageError | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[_Prepared]] = {}
        with concurrent.futures.ThreadPoolExecutor(self._workers) as pool:
            # decoding and resizing release the GIL: images are read and pre-processed in
            # parallel, results taken in input order (so the first bad image is the one raised)
            loaded = pool.map(_capture(self._prepare), range(len(images)), images)
            for index, item in enumerate(loaded):
                if isinstance(item, Exception):
                    if on_error == "raise":
                        raise item
                    results[index] = item if isinstance(item, ImageError) else ImageError(str(item))
                else:
                    groups.setdefault(item.bucket, []).append(item)

            pending = []
            for items in groups.values():
                start = 0
                for size in _chunk_sizes(len(items), self.batch_size):
                    batch = items[start : start + size]
                    start += size
                    chunk, pixels, masks = [], [], []
                    for item, done in zip(batch, pool.map(_capture(self._pixels), batch)):
                        if isinstance(done, Exception):
                            if on_error == "raise":
                                raise done
                            results[item.index] = done
                            continue
                        item.array = None  # only its size is needed from here on
                        chunk.append(item)
                        pixels.append(done[0])
                        masks.append(done[1])
                    if chunk:  # dispatched asynchronously: the next chunk is prepared meanwhile
                        outputs = self.forward(np.stack(pixels), np.stack(masks))
                        pending.append((chunk, outputs))

        for chunk, (logits, pred_boxes) in pending:
            found = post_process_object_detection(
                np.asarray(logits),
                np.asarray(pred_boxes),
                threshold=threshold,
                target_sizes=[item.size for item in chunk],
                top_k=self.top_k,
            )
            for item, result in zip(chunk, found):
                names = tuple(self.id2label.get(int(i), f"LABEL_{i}") for i in result["labels"])
                results[item.index] = Detections(
                    boxes=result["boxes"],
                    scores=result["scores"],
                    labels=result["labels"],
                    label_names=names,
                    image_size=item.size,
                )
        return results

    def draw(self, image: ImageLike, detections: Detections, **kwargs: Any) -> PIL.Image.Image:
        """`draw_detections(image, detections)` with this detector's image loading."""
        return draw_detections(self.processor.load_image(image), detections, **kwargs)


# ----------------------------------------------------------------------------- drawing
