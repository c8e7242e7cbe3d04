"""Image stage of embedding extraction: robust image loading and ImageNet-backbone embeddings.

`build_backbone` returns a Keras model that takes raw RGB batches (0..255, uint8 or float) and
applies the backbone's own `preprocess_input` inside, so callers never preprocess.
`load_image` turns any file PIL can read into an RGB uint8 (S, S, 3) array or raises
`ImageRejected` with one of `REJECT_REASONS`. `iter_image_embeddings` decodes in a thread pool,
a few batches ahead of the model, and streams `(indices, embeddings, rejects)` per batch.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import weakref
from pathlib import Path

import keras
import numpy as np
from PIL import Image, ImageFile, ImageOps

from prodfuse.data.catalog import file_sha256
from prodfuse.encoders.views import CROP_SCALE, MAX_VIEWS  # noqa: F401  (re-exported)
from prodfuse.progress import progress_bar

log = logging.getLogger(__name__)
# Recorded as the weights when the demo could not download ImageNet weights and fell back to random ones.
RANDOM_FALLBACK = "random (fallback)"

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own Image.MAX_IMAGE_PIXELS default

REJECT_REASONS = (
    "missing_file",
    "empty_file",
    "not_an_image",
    "truncated_image",
    "too_many_pixels",
    "unreadable_file",
    "unsupported_format",
)

# The photo formats the backbone path is meant for, by PIL's format name; anything else PIL could open (EPS, which
# PIL hands to Ghostscript where it is installed, PSD, AVIF, ICO, ...) is refused before its pixels are decoded, so
# the service and extraction never run a decoder this list does not name.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# PIL's JPEG reader names a camera JPEG with embedded previews "MPO": the same file format and decoder.
_OPENED_AS = (*ALLOWED_FORMATS, "MPO")

# name -> (embedding dim, keras.applications constructor, keras.applications module with preprocess_input)
BACKBONES = {
    "resnet50": (2048, "ResNet50", "resnet50"),
    "mobilenet_v2": (1280, "MobileNetV2", "mobilenet_v2"),
    "efficientnet_b0": (1280, "EfficientNetB0", "efficientnet"),
}

PRECISIONS = ("float32", "mixed_float16")

_WEIGHTS_REMEDY = (
    "Pass --weights PATH to a local no-top ImageNet weights file (.h5 / .weights.h5) for this "
    "backbone, or --weights none for random initialisation (embeddings are then useless for accuracy)."
)


class ImageRejected(ValueError):
    """An image that cannot be embedded; `reason` is one of REJECT_REASONS, `detail` says why."""

    def __init__(self, reason, detail=""):
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}; expected one of {REJECT_REASONS}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------------------------
# Backbones


def backbone_dim(name):
    """Embedding width of backbone `name`."""
    return _backbone_spec(name)[0]


def _backbone_spec(name):
    if name not in BACKBONES:
        raise ValueError(f"Unknown image backbone {name!r}; choose one of {sorted(BACKBONES)}.")
    return BACKBONES[name]


@keras.saving.register_keras_serializable(package="prodfuse")
class ImagenetPreprocess(keras.layers.Layer):
    """Applies `keras.applications.<module>.preprocess_input` for `backbone` to raw 0..255 RGB."""

    def __init__(self, backbone, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        module_name = _backbone_spec(backbone)[2]
        self._preprocess_input = getattr(keras.applications, module_name).preprocess_input

    def call(self, inputs):
        return self._preprocess_input(keras.ops.cast(inputs, self.compute_dtype))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"backbone": self.backbone})
        return config


def _normalize_weights(weights):
    """None / "none" -> None, "imagenet" -> "imagenet", else an existing .h5 path as str."""
    if weights is None or (isinstance(weights, str) and weights.lower() == "none"):
        return None
    if isinstance(weights, str) and weights.lower() == "imagenet":
        return "imagenet"
    path = Path(weights)
    if not path.is_file():
        raise ValueError(
            f"Image backbone weights file {str(weights)!r} does not exist. "
            "Pass an existing no-top weights file, --weights imagenet, or --weights none."
        )
    if not path.name.endswith(".h5"):
        raise ValueError(
            f"Image backbone weights file {str(weights)!r} is not an .h5 / .weights.h5 file; "
            "Keras can only load no-top application weights from those."
        )
    return str(path)


def _construct(name, weights, image_size):
    constructor = getattr(keras.applications, _backbone_spec(name)[1])
    return constructor(
        include_top=False,
        weights=weights,
        input_shape=(image_size, image_size, 3),
        pooling="avg",
    )


def _seeded_random(backbone, seed: int = 0):
    """Re-draw every kernel from a local generator (He normal), so random weights are the same on every run
    without seeding Keras, NumPy and Python process-wide (a resumed extraction must not mix two networks)."""
    rng = np.random.default_rng(seed)
    for var in backbone.weights:
        if "kernel" in var.path:
            shape = tuple(var.shape)
            fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            if "depthwise" in var.path:
                fan_in = int(np.prod(shape[:2]))
            var.assign(rng.normal(0.0, np.sqrt(2.0 / max(fan_in, 1)), size=shape).astype("float32"))
    return backbone


def _construct_with_weights(name, weights, image_size, allow_random_fallback):
    """(backbone, what was actually loaded: "imagenet", "none", RANDOM_FALLBACK or the weights path)."""
    if weights == "imagenet":
        try:
            return _construct(name, "imagenet", image_size), "imagenet"
        except ValueError:
            raise  # Keras' own argument errors (bad input size, ...) are not download failures.
        except Exception as exc:  # keras.utils.get_file raises a bare Exception when offline
            message = f"Could not download ImageNet weights for image backbone {name!r} ({exc})."
            if not allow_random_fallback:
                raise ValueError(f"{message} {_WEIGHTS_REMEDY}") from exc
            log.warning(
                "%s Continuing with RANDOM weights because allow_random_fallback=True (demo mode): "
                "image embeddings carry no ImageNet knowledge.",
                message,
            )
            return _seeded_random(_construct(name, None, image_size)), RANDOM_FALLBACK
    if weights is None:
        return _seeded_random(_construct(name, None, image_size)), "none"
    try:
        return _construct(name, weights, image_size), weights
    except Exception as exc:
        raise ValueError(
            f"Weights file {weights!r} does not fit image backbone {name!r} "
            f"(include_top=False, input {image_size}x{image_size}x3): {exc}. "
            f"Pass the no-top weights file made for {name}, or --weights none."
        ) from exc


def build_backbone(
    name,
    weights="imagenet",
    image_size=224,
    precision="float32",
    allow_random_fallback=False,
):
    """Keras model: raw RGB (batch, S, S, 3) in 0..255 -> float32 (batch, dim) pooled embeddings."""
    dim = backbone_dim(name)
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; choose one of {PRECISIONS}.")
    if int(image_size) != image_size or image_size < 32:
        raise ValueError(f"image_size must be an integer >= 32 (got {image_size!r}).")
    image_size = int(image_size)
    weights = _normalize_weights(weights)

    previous_policy = keras.config.dtype_policy()
    if precision == "mixed_float16":
        # The applications construct their layers from the global policy; set it only while building.
        keras.config.set_dtype_policy("mixed_float16")
    try:
        backbone, used = _construct_with_weights(name, weights, image_size, allow_random_fallback)
    finally:
        keras.config.set_dtype_policy(previous_policy)

    inputs = keras.Input((image_size, image_size, 3), name="image")
    # float32 preprocessing: caffe-style mean subtraction loses precision in float16.
    x = ImagenetPreprocess(name, dtype="float32", name="preprocess")(inputs)
    x = backbone(x)
    if precision == "mixed_float16":
        x = keras.layers.Activation("linear", dtype="float32", name="to_float32")(x)
    model = keras.Model(inputs, x, name=f"{name}_embedder")
    model.weights_source = used  # what was loaded: the manifest records this, not what was asked for
    if model.output_shape[-1] != dim:
        raise ValueError(f"Backbone {name!r} produced width {model.output_shape[-1]}, expected {dim}.")
    return model


def backbone_from_settings(settings: dict):
    """The backbone a shard folder was embedded with, rebuilt from its manifest's settings (the same seeded random
    weights when extraction fell back to them)."""
    if "backbone" not in settings:
        raise ValueError(
            "these shards record no image backbone (not made by `prodfuse extract`); new photos cannot be embedded like them"
        )
    weights = settings["weights"]
    if weights == RANDOM_FALLBACK:
        weights = "none"
    return build_backbone(
        settings["backbone"], weights, int(settings["image_size"]), settings.get("precision") or "float32"
    )


def image_settings(name, weights, image_size, precision):
    """Manifest record of the image stage; a weights path is recorded with its file's sha256."""
    normalized = RANDOM_FALLBACK if weights == RANDOM_FALLBACK else _normalize_weights(weights)
    record = {
        "backbone": name,
        "dim": backbone_dim(name),
        "weights": "none" if normalized is None else normalized,
        "weights_sha256": None,
        "image_size": int(image_size),
        "precision": precision,
        "preprocess": f"keras.applications.{_backbone_spec(name)[2]}.preprocess_input (inside model)",
        "resize": "whole image, bilinear, no crop",
    }
    if normalized not in (None, "imagenet", RANDOM_FALLBACK):
        record["weights"] = str(Path(normalized).resolve())
        record["weights_sha256"] = file_sha256(normalized)
    return record


# ----------------------------------------------------------------------------------------------
# Image loading


def _to_rgb(img):
    """Any PIL mode -> RGB; transparency is composited on white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale: PIL's convert("L") clips at 255 instead of scaling, so scale ourselves.
        arr = np.asarray(img, dtype=np.float64)
        if img.mode != "I" or (arr.size and arr.max() > 255):  # mode I also carries plain 8-bit data
            arr = arr / 257.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = arr * 255.0 if arr.size and np.nanmax(arr) <= 1.0 else arr
        img = Image.fromarray(np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8), mode="L")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path, image_size, max_pixels=DEFAULT_MAX_PIXELS, views=1, crop_scale=CROP_SCALE):
    """Decode `path` to RGB uint8 (image_size, image_size, 3), or [views, S, S, 3] with `views` > 1 (see
    `image_views`, crops of `crop_scale`); raises ImageRejected for bad files.

    Only `ALLOWED_FORMATS` are decoded (others: unsupported_format, from the header). EXIF orientation is
    applied, any mode becomes RGB (alpha composited on white), and the whole image is resized bilinearly (no
    crop). Headers over `max_pixels` are rejected before decoding; PIL itself refuses headers over twice its own
    MAX_IMAGE_PIXELS, also reported as too_many_pixels.
    """
    # Truncated files are rejected because PIL's global ImageFile.LOAD_TRUNCATED_IMAGES is False by default; a
    # library must not flip that switch behind its caller, so a process that turned it on gets padded images.
    path = os.fspath(path)
    try:
        size_bytes = os.stat(path).st_size
    except FileNotFoundError as exc:
        raise ImageRejected("missing_file", f"{path}: no such file") from exc
    except OSError as exc:
        raise ImageRejected("unreadable_file", f"{path}: {exc}") from exc
    if size_bytes == 0:
        raise ImageRejected("empty_file", f"{path}: 0 bytes")

    try:
        f = open(path, "rb")
    except FileNotFoundError as exc:  # removed between stat and open
        raise ImageRejected("missing_file", f"{path}: no such file") from exc
    except OSError as exc:  # permissions, a directory, I/O error
        raise ImageRejected("unreadable_file", f"{path}: {exc}") from exc

    with f:
        try:
            # Only the allowed formats' plugins read the header: some others decode inside open() (ICO, EPS).
            img = Image.open(f, formats=ALLOWED_FORMATS)
        except Image.DecompressionBombError as exc:  # header over 2x PIL's limit
            raise ImageRejected("too_many_pixels", f"{path}: {exc}") from exc
        except Image.UnidentifiedImageError as exc:
            other = _sniff_format(f)
            if other is not None:
                raise _unsupported(path, other, " (told from its first bytes)") from exc
            raise ImageRejected("not_an_image", f"{path}: not a recognised image format") from exc
        except OSError as exc:
            # A file cut off inside its header fails here rather than in load(): still a truncated image.
            reason = "truncated_image" if "truncat" in str(exc).lower() else "unreadable_file"
            raise ImageRejected(reason, f"{path}: {exc}") from exc
        except Exception as exc:  # malformed headers surface as assorted errors in PIL plugins
            raise ImageRejected("not_an_image", f"{path}: {type(exc).__name__}: {exc}") from exc

        with img:
            if img.format not in _OPENED_AS:  # open() was told the list; checked again before decoding
                raise _unsupported(path, img.format or "unknown")
            width, height = img.size
            # Checked on the header, before any pixel is decoded, so a decompression bomb never allocates.
            if width * height > max_pixels:
                raise ImageRejected(
                    "too_many_pixels", f"{path}: {width}x{height} = {width * height} > max_pixels={max_pixels}"
                )
            if img.format == "JPEG":
                # DCT-domain downscale (1/2, 1/4, 1/8) while staying >= image_size: big photos decode fast.
                # Crops need their crop_scale part of the photo to keep >= image_size pixels.
                side = image_size if views == 1 else int(np.ceil(image_size / crop_scale))
                img.draft("RGB", (side, side))
            try:
                img.load()
            except (OSError, ValueError, SyntaxError, EOFError, IndexError) as exc:
                raise ImageRejected("truncated_image", f"{path}: {exc}") from exc
            except Exception as exc:  # a corrupt file can surface as any error inside a decoder (RuntimeError...)
                raise ImageRejected("not_an_image", f"{path}: cannot decode: {type(exc).__name__}: {exc}") from exc
            if ImageFile.LOAD_TRUNCATED_IMAGES and _missing_end_marker(f, img.format):
                # A caller turned PIL's global switch on, so PIL padded the file silently; the switch is theirs
                # to keep, and the file is still cut off.
                raise ImageRejected("truncated_image", f"{path}: file ends before its {img.format} end marker")
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # corrupt EXIF only loses the orientation, the pixels are fine
                pass
            try:
                rgb = _to_rgb(img)
            except Exception as exc:  # as load(): a decoder may fail late, on the first pixel access
                raise ImageRejected("not_an_image", f"{path}: cannot convert mode {img.mode}: {exc}") from exc
            if views == 1:
                return np.asarray(rgb.resize((image_size, image_size), Image.Resampling.BILINEAR), dtype=np.uint8)
            return image_views(rgb, image_size, views, crop_scale)


def _unsupported(path: str, fmt: str, how: str = "") -> ImageRejected:
    allowed = ", ".join(ALLOWED_FORMATS)
    return ImageRejected("unsupported_format", f"{path}: {fmt} images are not accepted{how}; use one of {allowed}")


def _sniff_format(f) -> str | None:
    """The first format, in the order PIL tries them, whose signature the file's first bytes match (the plugins'
    prefix checks only: nothing parsed or decoded), or None; so a refused format is named in the reason."""
    f.seek(0)
    prefix = f.read(16)
    Image.init()
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        try:
            if fmt not in ALLOWED_FORMATS and accept is not None and accept(prefix) is True:
                return fmt
        except Exception:  # a plugin's check that cannot read this prefix simply does not match
            continue
    return None


def _missing_end_marker(f, fmt: str | None) -> bool:
    """True when a JPEG lacks its EOI marker or a PNG its IEND chunk near the end of the file (cut off)."""
    marker = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}.get(fmt or "")
    if marker is None:
        return False
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - 4096))
    return marker not in f.read()


def image_views(rgb, image_size, views, crop_scale=CROP_SCALE):
    """uint8 [views, S, S, 3]: the whole photo, then the corner and centre crops of `crop_scale` of each side
    (see MAX_VIEWS)."""
    if isinstance(views, bool) or int(views) != views or not 1 <= views <= MAX_VIEWS:
        raise ValueError(f"views must be an int in 1..{MAX_VIEWS}; got {views!r}")
    if not 0 < crop_scale <= 1:
        raise ValueError(f"crop_scale must be in (0, 1]; got {crop_scale!r}")
    w, h = rgb.size
    cw, ch = max(1, round(w * crop_scale)), max(1, round(h * crop_scale))
    corners = [(0, 0), (w - cw, 0), (0, h - ch), (w - cw, h - ch), ((w - cw) // 2, (h - ch) // 2)]
    boxes = [(0, 0, w, h)] + [(x, y, x + cw, y + ch) for x, y in corners]
    return np.stack(
        [
            np.asarray(rgb.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box), dtype=np.uint8)
            for box in boxes[: int(views)]
        ]
    )


# ----------------------------------------------------------------------------------------------
# Batched embedding


def _default_batch_size():
    import tensorflow as tf

    return 256 if tf.config.list_physical_devices("GPU") else 64


_PREDICT_FNS = weakref.WeakKeyDictionary()  # model -> compiled step, so each model traces once


def _predict_fn(model):
    """Compiled forward pass: uint8 batch -> float32 embeddings, without model.predict's per-call cost."""
    if keras.backend.backend() != "tensorflow":
        return lambda batch: keras.ops.convert_to_numpy(model(batch.astype(np.float32), training=False))
    if model not in _PREDICT_FNS:
        import tensorflow as tf

        # A None batch dimension: one trace serves full batches, the last one and batches with rejects.
        signature = [tf.TensorSpec((None, *model.input_shape[1:]), tf.uint8)]

        model_ref = weakref.ref(model)  # a strong reference here would keep the cache key alive forever

        @tf.function(input_signature=signature)
        def step(batch):
            return tf.cast(model_ref()(tf.cast(batch, tf.float32), training=False), tf.float32)

        _PREDICT_FNS[model] = lambda batch: step(tf.convert_to_tensor(batch, tf.uint8)).numpy()
    return _PREDICT_FNS[model]


def embed_decoded(model, images, views=1, predict=None):
    """Embeddings float32 [n, D] (or [n, views, D]) of decoded photos, each as `load_image` returns it: the one
    backbone call that extraction, the Predictor and the service share."""
    dim = model.output_shape[-1]
    if not len(images):
        return np.zeros((0, dim) if views == 1 else (0, views, dim), dtype=np.float32)
    batch = np.stack(images)
    predict = predict or _predict_fn(model)
    embeddings = np.asarray(predict(batch.reshape(-1, *batch.shape[-3:])), dtype=np.float32)
    return embeddings.reshape(len(images), views, dim) if views > 1 else embeddings


def _load_or_reject(path, image_size, max_pixels, views=1, crop_scale=CROP_SCALE):
    try:
        return load_image(path, image_size, max_pixels=max_pixels, views=views, crop_scale=crop_scale)
    except ImageRejected as exc:
        return exc


def iter_image_embeddings(
    model,
    paths,
    image_size,
    batch_size=None,
    workers=None,
    progress=True,
    max_pixels=DEFAULT_MAX_PIXELS,
    prefetch_batches=2,
    views=1,
    crop_scale=CROP_SCALE,
):
    """Yield `(indices, embeddings float32 [n, D], rejects [(index, reason, detail)])` per batch of
    `batch_size` input paths, in input order. Bad images become rejects and never raise.

    With `views` > 1 the embeddings are [n, views, D] (see `image_views`; crops of `crop_scale`), and a batch holds
    `batch_size // views` photos, so the backbone still sees about `batch_size` images per call."""
    paths = [os.fspath(p) for p in paths]
    batch_size = int(batch_size or _default_batch_size())
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size}).")
    batch_size = max(1, batch_size // views)
    workers = int(workers or min(16, os.cpu_count() or 1))
    predict = _predict_fn(model)
    starts = range(0, len(paths), batch_size)

    executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="image-decode")
    pending = collections.deque()  # (start, [futures]) for batches submitted ahead of the model

    def submit(start):
        chunk = paths[start : start + batch_size]
        pending.append(
            (start, [executor.submit(_load_or_reject, p, image_size, max_pixels, views, crop_scale) for p in chunk])
        )

    bar = progress_bar(len(paths), "images", "img", enabled=progress)
    try:
        next_start = iter(starts)
        for start in next_start:
            submit(start)
            if len(pending) > prefetch_batches:
                break
        while pending:
            start, futures = pending.popleft()
            # Keep `prefetch_batches` batches decoding while the model runs on this one.
            for s in next_start:
                submit(s)
                break
            ok_rows, ok_images, rejects = [], [], []
            for offset, future in enumerate(futures):
                result = future.result()
                if isinstance(result, ImageRejected):
                    rejects.append((start + offset, result.reason, result.detail))
                else:
                    ok_rows.append(start + offset)
                    ok_images.append(result)
            embeddings = embed_decoded(model, ok_images, views, predict)
            bar.update(len(futures))
            yield np.asarray(ok_rows, dtype=np.int64), embeddings, rejects
    finally:
        bar.close()
        executor.shutdown(wait=True, cancel_futures=True)


def embed_images(model, paths, image_size, **kwargs):
    """All of `iter_image_embeddings` at once: (emb float32 [N_ok, D], ok_index int64 [N_ok], rejects)."""
    dim = model.output_shape[-1]
    chunks, indices, rejects = [], [], []
    for idx, emb, rej in iter_image_embeddings(model, paths, image_size, **kwargs):
        chunks.append(emb)
        indices.append(idx)
        rejects.extend(rej)
    if not chunks:
        return np.zeros((0, dim), np.float32), np.zeros((0,), np.int64), rejects
    return np.concatenate(chunks), np.concatenate(indices), rejects
