"""Predictor: a run loaded once, with everything needed to embed a new product exactly as its training data was.

    predictor = Predictor.from_run("runs/grocery")
    predictor.predict([{"image": "photo.jpg", "title": "oat milk 1 l"}], top_k=5)

Each item goes through the very code extraction runs (image decoding and views, the backbone, OCR with its cache,
the fitted text encoder and vocabulary), so an item gets the same probabilities here, through `prodfuse predict`
on a catalog, and through `prodfuse evaluate` on its shards.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from prodfuse.data import shards
from prodfuse.data.sequence import read_items
from prodfuse.encoders.views import recorded_crop_scale
from prodfuse.inference.forward import contributions, forward
from prodfuse.inference.predict import check_compatible, prediction_table
from prodfuse.modeling.run import Run

log = logging.getLogger(__name__)
STREAMS_TEXT = {"text", "tokens"}  # model inputs that carry text


def _materialise(image, folder: Path, i: int) -> str:
    """A file path for an item's image: paths as they are; bytes written unchanged (so the OCR cache, keyed by the
    file's bytes, hits as for the catalog's file); a PIL image or uint8 array written as PNG (lossless)."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    path = folder / f"item-{i}"
    if isinstance(image, (bytes, bytearray, memoryview)):
        path.write_bytes(bytes(image))
        return str(path)
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ValueError(
                f"an image array must be uint8 [H, W], [H, W, 3] or [H, W, 4]; got {image.dtype} {list(image.shape)}"
            )
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        path.write_bytes(buf.getvalue())
        return str(path)
    raise ValueError(f"an item's image must be a path, bytes, a PIL.Image or a uint8 array; got {type(image).__name__}")


def _check_top_k(top_k) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1; got {top_k!r}")


def check_min_confidence(run: Run, min_confidence) -> float | None:
    """`min_confidence` checked (None or a number in (0, 1]) for a run that has a category hierarchy to back off in."""
    from prodfuse.modeling.hierarchy import check_min_confidence as check

    value = check(min_confidence)
    if value is not None and run.hierarchy is None:
        raise ValueError(
            f"min_confidence {min_confidence!r} backs off along a category hierarchy, and the run "
            f"{run.path.name!r} has none; train it with --label-cols COARSE,...,FINE, or leave min_confidence out"
        )
    return value


class Predictor:
    """A run's model plus its embedding pipeline, loaded once; thread-compatible, not thread-safe."""

    def __init__(
        self,
        run: Run,
        backbone,
        text_encoder,
        vocabulary,
        *,
        ocr_workers: int | None = 1,
        ocr_cache: str | None = None,
        batch_size: int = 256,
        trust_pickle: bool = False,
    ):
        self.run = run
        self.trust_pickle = trust_pickle
        self.backbone = backbone
        self.text_encoder = text_encoder
        self.vocabulary = vocabulary
        self.ocr_workers = ocr_workers
        self.ocr_cache = ocr_cache
        self.batch_size = batch_size
        settings = run.extraction["settings"]
        self.image_size = int(settings.get("image_size") or 0)
        image_record = run.extraction["encoders"].get("image", {})
        self.views = int(image_record.get("views", 1))
        self.crop_scale = recorded_crop_scale(image_record)  # the crops training saw
        self.ocr_engine = settings.get("ocr") or "none"
        self.ocr_lang = settings.get("ocr_lang")
        self.text_cols = list(run.extraction["columns"].get("text") or [])

    @classmethod
    def from_run(
        cls,
        path: str | os.PathLike,
        *,
        ocr_workers: int | None = 1,
        ocr_cache: str | None = None,
        batch_size: int = 256,
        trust_pickle: bool = False,
    ) -> "Predictor":
        """Load the run's model now; its backbone (backbone, weights and image size from the shard manifest) and
        fitted text encoder and vocabulary (from the run's training shard folder) on the first `predict` of new
        items. `predict_shards` needs neither. `trust_pickle`: also load a pre-0.2 pickled TF-IDF state (runs code)."""
        return cls(
            Run.load(path),
            None,
            None,
            None,
            ocr_workers=ocr_workers,
            ocr_cache=ocr_cache,
            batch_size=batch_size,
            trust_pickle=trust_pickle,
        )

    def load_encoders(self) -> None:
        """Build the backbone and load the fitted text encoder now (otherwise on the first new item)."""
        from prodfuse.encoders import image as image_encoders
        from prodfuse.encoders import text as text_encoders

        settings = self.run.extraction["settings"]
        if self.text_encoder is None and any(i in self.run.inputs for i in ("text", "tokens")):
            emb = Path(self.run.config["embeddings"])
            if not (emb / shards.MANIFEST).is_file():
                raise ValueError(
                    f"The run's training shards {str(emb)!r} (config.json 'embeddings') are gone; new "
                    f"items need their fitted text encoder and vocabulary. Restore the folder, or embed "
                    f"the items with `prodfuse extract --like` and use predict_shards."
                )
            self.text_encoder = text_encoders.load_text_encoder(emb, trust_pickle=self.trust_pickle)
            self.vocabulary = text_encoders.load_vocabulary(emb)
        if self.backbone is None:
            if "backbone" not in settings:
                raise ValueError(
                    f"the run {str(self.run.path)!r} records no extraction settings (shards not made "
                    f"by `prodfuse extract`): it can only predict shards"
                )
            self.backbone = image_encoders.backbone_from_settings(settings)

    # ------------------------------------------------------------------------------------------------ items

    def embed(self, items: list[dict]) -> tuple[dict[str, np.ndarray], list[int], list[dict]]:
        """(model input arrays of the items that embedded, their positions in `items`, per-item extras: ocr text,
        joined text and error). A bad image is that item's error, never the batch's."""
        from prodfuse.encoders import image as image_encoders
        from prodfuse.encoders import ocr

        self.load_encoders()
        extras = [{"ocr_text": "", "text": "", "error": None} for _ in items]
        with tempfile.TemporaryDirectory(prefix="prodfuse-predict-") as tmp:
            paths: list[str | None] = []
            for i, item in enumerate(items):
                try:
                    if not isinstance(item, dict):
                        raise ValueError(
                            f"an item must be a dict with 'image' and/or text columns; got {type(item).__name__}"
                        )
                    image = item.get("image")
                    paths.append(None if image is None else _materialise(image, Path(tmp), i))
                except ValueError as e:
                    paths.append(None)
                    extras[i]["error"] = str(e)
            with_image = [i for i, p in enumerate(paths) if p is not None]
            if "image" in self.run.inputs:
                for i in range(len(items)):
                    if paths[i] is None and extras[i]["error"] is None:
                        extras[i]["error"] = self._missing_image(items[i])
            emb = {}
            for local, vectors, bad in image_encoders.iter_image_embeddings(
                self.backbone,
                [paths[i] for i in with_image],
                self.image_size,
                batch_size=self.batch_size,
                progress=False,
                views=self.views,
                crop_scale=self.crop_scale,
            ):
                for j, v in zip(local, vectors):
                    emb[with_image[j]] = v
                for j, reason, detail in bad:
                    extras[with_image[j]]["error"] = f"{reason}: {detail}"
            if self.ocr_engine != "none":
                ocr_rows = [i for i in with_image if extras[i]["error"] is None]
                results = ocr.ocr_images(
                    [paths[i] for i in ocr_rows],
                    engine=self.ocr_engine,
                    langs=self.ocr_lang,
                    workers=self.ocr_workers,
                    cache_dir=self.ocr_cache,
                    progress=False,
                )
                for i, r in zip(ocr_rows, results):
                    extras[i]["ocr_text"] = r.text  # an OCR failure leaves the item without OCR text, as extraction
        ok = [i for i in range(len(items)) if extras[i]["error"] is None]
        return self._arrays(ok, emb, items, extras), ok, extras

    def _missing_image(self, item: dict) -> str | None:
        """None when an item without a photo can still be classified (the model also reads text, and the item has
        some: its image stream is then blank, as modality dropout showed the model in training); else why not."""
        if not STREAMS_TEXT.intersection(self.run.inputs):
            return "no image: this run's model reads only the photo ('image' key)"
        if not any(isinstance(item.get(c), str) and item.get(c).strip() for c in self.text_cols):
            return f"no image and no text: give an 'image' or one of {self.text_cols}"
        return None

    def _arrays(self, ok: list[int], embedded: dict[int, np.ndarray], items: list[dict], extras: list[dict]):
        """Model inputs of the items at positions `ok`: their photo embeddings [(views,) D] from `embedded` (zeros
        for an item without a photo: what the model saw when training dropped the image stream) and their text
        columns joined with their OCR text (each extra's "text" is set to what the text encoder read)."""
        from prodfuse.encoders import text as text_encoders

        texts = [
            text_encoders.join_text([items[i].get(c) for c in self.text_cols] + [extras[i]["ocr_text"]]) for i in ok
        ]
        for i, t in zip(ok, texts):
            extras[i]["text"] = t
        n = len(ok)
        arrays: dict[str, np.ndarray] = {}
        if "image" in self.run.inputs:
            dim = int(self.backbone.output_shape[-1])
            blank = np.zeros((self.views, dim) if self.views > 1 else (dim,), np.float32)
            image_emb = np.stack([embedded.get(i, blank) for i in ok]) if n else blank[None][:0]
            if self.views > 1:
                arrays["image"] = image_emb[:, 0]
                if "image_views" in self.run.inputs:
                    arrays["image_views"] = image_emb[:, 1:].reshape(n, (self.views - 1) * dim)
            else:
                arrays["image"] = image_emb
        if "text" in self.run.inputs:
            arrays["text"] = self.text_encoder.encode(texts)
        if "tokens" in self.run.inputs:
            arrays["tokens"] = text_encoders.tokenize(texts, self.vocabulary)
        return arrays

    def forward_items(self, items: list[dict]) -> tuple[list[int], list[dict], dict | None]:
        """(positions of the items that embedded, per-item extras with "error" and "ocr_text", and the forward
        pass over those items: calibrated "probs" over every class, ablations, gate; None when none embedded)."""
        arrays, ok, extras = self.embed(items)
        res = forward(self.run.model, arrays, self.run.temperature, self.batch_size) if ok else None
        return ok, extras, res

    def predict(self, items: list[dict], top_k: int = 5, min_confidence: float | None = None) -> list[dict]:
        """For each item (a dict with `image`: path, bytes, PIL.Image or uint8 array, and/or the run's text columns
        by name), in order: {"labels", "probs" (calibrated, top_k of them), "ocr_text", "image_contribution",
        "text_contribution", "error"}; an item that cannot be embedded has only its "error" set.

        A run trained with label_cols also gives "path": [{"level", "label", "probability"}] coarse to fine, the
        path to the most probable label, each node's probability the sum of its labels'; with `min_confidence` (in
        (0, 1]) it stops at the deepest level whose probability is at least that (empty when none is)."""
        _check_top_k(top_k)
        min_confidence = check_min_confidence(self.run, min_confidence)
        ok, extras, res = self.forward_items(list(items))
        return self._results(ok, extras, res, top_k, min_confidence)

    def predict_prepared(
        self,
        images: list[np.ndarray | None],
        items: list[dict],
        ocr_texts: list[str],
        top_k: int = 5,
        min_confidence: float | None = None,
    ) -> list[dict]:
        """`predict` for items whose photos are already decoded (each as `load_image` returns it for this run's
        image size and views, or None) and read by OCR: the same backbone call, text encoder and model, so an
        item gets the same result as through `predict`. The service gathers concurrent requests into one call."""
        _check_top_k(top_k)  # before any work
        check_min_confidence(self.run, min_confidence)
        return self.results(*self.prepare_arrays(images, items, ocr_texts), top_k, min_confidence)

    def prepare_arrays(
        self, images: list[np.ndarray | None], items: list[dict], ocr_texts: list[str]
    ) -> tuple[list[int], list[dict], dict[str, np.ndarray]]:
        """(positions of the items that can be classified, per-item extras, the model input arrays of those items)
        for decoded photos and their OCR text: what `predict_prepared` feeds the model."""
        from prodfuse.encoders import image as image_encoders

        self.load_encoders()
        extras = [{"ocr_text": t or "", "text": "", "error": None} for t in ocr_texts]
        if "image" in self.run.inputs:
            for image, item, extra in zip(images, items, extras):
                if image is None:
                    extra["error"] = self._missing_image(item)
        ok = [i for i, e in enumerate(extras) if e["error"] is None]
        embedded = {}
        if "image" in self.run.inputs:
            photos = [i for i in ok if images[i] is not None]
            embedded = dict(
                zip(photos, image_encoders.embed_decoded(self.backbone, [images[i] for i in photos], self.views))
            )
        return ok, extras, self._arrays(ok, embedded, items, extras)

    def results(
        self,
        ok: list[int],
        extras: list[dict],
        arrays: dict[str, np.ndarray],
        top_k: int = 5,
        min_confidence: float | None = None,
    ) -> list[dict]:
        """`predict`'s answers for arrays from `prepare_arrays`."""
        _check_top_k(top_k)
        min_confidence = check_min_confidence(self.run, min_confidence)
        res = forward(self.run.model, arrays, self.run.temperature, self.batch_size) if ok else None
        return self._results(ok, extras, res, top_k, min_confidence)

    def _results(
        self, ok: list[int], extras: list[dict], res: dict | None, top_k: int, min_confidence: float | None = None
    ) -> list[dict]:
        out = [
            {
                "labels": [],
                "probs": [],
                "ocr_text": e["ocr_text"],
                "image_contribution": None,
                "text_contribution": None,
                "error": e["error"],
                **({"path": []} if self.run.hierarchy is not None else {}),  # a flat run's answers stay as they were
            }
            for e in extras
        ]
        if not ok:
            return out
        if self.run.hierarchy is not None:
            from prodfuse.modeling.hierarchy import best_paths, path_records

            paths = best_paths(self.run.hierarchy, res["probs"], self.run.classes)
            for i, path in zip(ok, path_records(paths, min_confidence)):
                out[i]["path"] = path
        img_c, txt_c = contributions(res)
        k = min(top_k, len(self.run.classes))
        order = np.argsort(-res["probs"], axis=1, kind="stable")[:, :k]
        for j, i in enumerate(ok):
            out[i].update(
                {
                    "labels": [self.run.classes[c] for c in order[j]],
                    "probs": [float(res["probs"][j, c]) for c in order[j]],
                    "image_contribution": None if np.isnan(img_c[j]) else float(img_c[j]),
                    "text_contribution": None if np.isnan(txt_c[j]) else float(txt_c[j]),
                }
            )
        return out

    # ------------------------------------------------------------------------------------------------ shards

    def predict_shards(self, folder: str | os.PathLike, top_k: int = 5, min_confidence: float | None = None):
        """A DataFrame of top-k labels for every row of an already-extracted shard folder (embedded like the run's
        training data), in the format of `prodfuse predict`: id, [label], label_i, prob_i, [pred_LEVEL, prob_LEVEL
        per level of the run's hierarchy], contributions."""
        min_confidence = check_min_confidence(self.run, min_confidence)
        folder = Path(folder)
        manifest = shards.read_manifest(folder)
        check_compatible(self.run.config, manifest, folder)
        id_col, label_col = manifest["columns"]["id"], self.run.label_col
        with_label = label_col in shards.shard_columns(folder)
        data = read_items(folder, self.run.inputs, [id_col] + ([label_col] if with_label else []))
        res = forward(self.run.model, {k: data[k] for k in self.run.inputs}, self.run.temperature, self.batch_size)
        img_c, txt_c = contributions(res)
        return prediction_table(
            data[id_col],
            res["probs"],
            self.run.classes,
            top_k,
            img_c,
            txt_c,
            id_col=id_col,
            true_labels=data[label_col] if with_label else None,
            label_col=label_col,
            hierarchy=self.run.hierarchy,
            min_confidence=min_confidence,
        )
