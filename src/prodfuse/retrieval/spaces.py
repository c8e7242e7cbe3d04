"""Product vectors in each space, for stored shards and for new queries.

- `image`: the stored image embedding (the whole photo);
- `text`: the stored text embedding (items without text have none and are left out);
- `fused`: a trained run's fusion output, the layer before its classifier, computed from the stored embeddings;
- `joint`: an align run's image tower over the stored image embedding; a text query goes through its text tower,
  so words find photos.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from prodfuse.data import shards
from prodfuse.data.catalog import file_sha256
from prodfuse.inference.predict import check_compatible

SPACE_COLUMN = {"image": "image_embedding", "text": "text_embedding"}


def items_table(folder: Path, manifest: dict, rows=None) -> pd.DataFrame:
    """id, label, text and image path of the shards' rows (what a search result shows)."""
    cols = manifest["columns"]
    present = shards.shard_columns(folder)
    want = {"id": cols["id"], "label": cols.get("label") or "label", "text": "text", "image_path": cols.get("image")}
    have = {k: v for k, v in want.items() if v and v in present}
    data = shards.read_shards(folder, list(dict.fromkeys(have.values())), rows)
    table = pd.DataFrame({k: np.asarray(data[v]) for k, v in have.items()})
    table["id"] = table["id"].astype(str)
    return table


def fused_model(model):
    """Sub-model from a classifier's inputs to the vector its classifier reads: the fusion output (or the one
    branch's output of a unimodal model; a joint head's hidden vector). A product or stacked fusion has no joint
    vector: its two streams' branch vectors, each of unit length and scaled by the square root of its share of the
    fitted weights (a stack: its mean diagonal coefficients), side by side, so the cosine of two items is the
    weighted mean of their image and text cosines (a stream an item lacks is zeros)."""
    import keras

    from prodfuse.modeling.fusion import ProductFusion
    from prodfuse.modeling.model import model_inputs
    from prodfuse.modeling.probabilities import product_parts

    parts = product_parts(model)
    if parts:
        *subs, fusion = parts
        weights = fusion.stream_weights()
        total = sum(weights) or 1.0
        vectors = []
        for stream, sub, weight in zip(("image", "text"), subs, weights):
            names = model_inputs(sub)
            branch = keras.Model(sub.input, sub.get_layer(f"{stream}_branch_out").output)(
                {k: model.input[k] for k in names}
            )
            unit = keras.layers.UnitNormalization(name=f"{stream}_unit")(branch)
            # an item without this stream (all-zero input) gets zeros here, as the product gives it no say
            there = ProductFusion.present(model.input[names[0]])
            vectors.append(keras.layers.Rescaling((weight / total) ** 0.5, name=f"{stream}_share")(unit) * there)
        return keras.Model(
            model.input, keras.layers.Concatenate(name="streams")(vectors), name=f"{model.name}_embedding"
        )
    names = [layer.name for layer in model.layers]
    head = "deep_logits" if "deep_logits" in names else "probs"
    return keras.Model(model.input, model.get_layer(head).input, name=f"{model.name}_embedding")


def space_vectors(folder, space: str, run=None, batch_size: int = 1024) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """(vectors [n, d], items table of those n rows, description for the index manifest) of a shard folder."""
    folder = Path(folder)
    manifest = shards.read_manifest(folder)
    present = shards.shard_columns(folder)
    info = {
        "space": space,
        "embeddings": str(folder.resolve()),
        "shards_manifest_sha256": file_sha256(folder / shards.MANIFEST),
        # what a served run checks the index against (check_index_for_run), without the shards at hand
        "extraction": {
            "columns": manifest["columns"],
            "encoders": manifest["encoders"],
            "like": manifest.get("settings", {}).get("like"),
        },
    }
    if space in SPACE_COLUMN:
        col = SPACE_COLUMN[space]
        if col not in present:
            raise ValueError(f"shards {str(folder)!r} have no {col} column, so no {space!r} space; they have {present}")
        data = shards.read_shards(folder, [col] + (["has_text"] if space == "text" else []))
        keep = np.ones(len(data[col]), bool)
        if space == "text":
            keep = np.asarray(data["has_text"], bool) & (np.linalg.norm(data[col], axis=1) > 0)
        vectors = data[col][keep]
        info["left_out"] = {"without_text": int((~keep).sum())} if space == "text" else {}
        return vectors, items_table(folder, manifest, np.flatnonzero(keep)), info
    if space == "fused":
        from prodfuse.data.sequence import read_items, with_view
        from prodfuse.modeling.probabilities import model_outputs
        from prodfuse.modeling.run import Run

        r = run if isinstance(run, Run) else Run.load(run)
        check_compatible(r.config, manifest, folder, strict=True)
        data = read_items(folder, r.inputs)
        x = with_view({k: data[k] for k in r.inputs}, 0)  # the whole photo
        vectors = model_outputs(fused_model(r.model), x, batch_size) if len(x[r.inputs[0]]) else np.zeros((0, 1))
        info.update(run=str(r.path.resolve()), run_model_sha256=r.fingerprint)
        return vectors, items_table(folder, manifest), info
    if space == "joint":
        from prodfuse.retrieval.align import embed_side, load_align_run

        towers, config = load_align_run(run)
        check_compatible(config, manifest, folder, strict=True)
        data = shards.read_shards(folder, ["image_embedding"])
        info.update(run=str(Path(run).resolve()), run_model_sha256=config["model_sha256"], side="image")
        return embed_side(towers, "image", data["image_embedding"]), items_table(folder, manifest), info
    raise ValueError(f"space must be one of image, text, fused, joint; got {space!r}")


class QueryEmbedder:
    """Embeds a new photo or text into an index's space, with the encoders the index's vectors came from (the
    run's Predictor for `fused`); loaded once, on the first query."""

    def __init__(self, manifest: dict, ocr_workers: int = 1, trust_pickle: bool = False):
        self.manifest = manifest
        self.trust_pickle = trust_pickle
        self.space = manifest["space"]
        self.ocr_workers = ocr_workers
        self._predictor = None
        self._backbone = None
        self._text_encoder = None
        self._towers = None
        self._shard_settings = None

    def _shards(self) -> Path:
        return Path(self.manifest["embeddings"])

    def _settings(self) -> dict:
        if self._shard_settings is None:  # read once, not per query
            self._shard_settings = shards.read_manifest(self._shards())["settings"]
        return self._shard_settings

    def _photo_embedding(self, image) -> np.ndarray:
        from prodfuse.encoders import image as image_encoders
        from prodfuse.encoders.image import ImageRejected, load_image

        settings = self._settings()
        if self._backbone is None:
            self._backbone = image_encoders.backbone_from_settings(settings)
        try:
            photo = load_image(image, int(settings["image_size"]))
        except ImageRejected as e:
            raise ValueError(f"query image {str(image)!r} cannot be used: {e.reason}: {e.detail}") from None
        return image_encoders.embed_decoded(self._backbone, [photo])[0]

    def _text_embedding(self, text: str) -> np.ndarray:
        from prodfuse.encoders import text as text_encoders

        if not text_encoders.has_text([text])[0]:
            raise ValueError(f"query text {text!r} is empty")
        if self._text_encoder is None:
            self._text_encoder = text_encoders.load_text_encoder(self._shards(), trust_pickle=self.trust_pickle)
        return self._text_encoder.encode([text])[0]

    def embed(self, image=None, text: str | None = None) -> np.ndarray:
        """One vector [d] in the index's space for a photo (path or bytes) or a text."""
        if (image is None) == (text is None):
            raise ValueError("give a query image or a query text, not both or neither")
        if self.space == "image":
            if image is None:
                raise ValueError(
                    "an image index is searched with an image or an id; for words use a text or joint index"
                )
            return self._photo_embedding(image)
        if self.space == "text":
            if text is None:
                raise ValueError("a text index is searched with text or an id; for photos use an image or joint index")
            return self._text_embedding(text)
        if self.space == "joint":
            from prodfuse.retrieval.align import embed_side, load_align_run

            if self._towers is None:
                self._towers = load_align_run(self.manifest["run"])[0]
            side = "image" if image is not None else "text"
            x = self._photo_embedding(image) if image is not None else self._text_embedding(text)
            return embed_side(self._towers, side, x[None])[0]
        # fused: the run's own pipeline (OCR included), an item with only a photo or only text
        from prodfuse.inference.predictor import Predictor

        if self._predictor is None:
            self._predictor = Predictor.from_run(
                self.manifest["run"], ocr_workers=self.ocr_workers, trust_pickle=self.trust_pickle
            )
        p = self._predictor
        p.load_encoders()
        item = {"image": image} if image is not None else {c: text for c in p.text_cols[:1]}
        if image is None and not p.text_cols:
            raise ValueError("this fused index's run reads no text columns; query it with an image or an id")
        arrays, ok, extras = p.embed([item])
        if not ok:
            raise ValueError(f"the query cannot be embedded: {extras[0]['error']}")
        from prodfuse.data.sequence import with_view
        from prodfuse.modeling.probabilities import model_outputs

        return model_outputs(fused_model(p.run.model), with_view(arrays, 0), 1)[0]


def check_index_for_run(manifest: dict, run) -> None:
    """An index whose vectors a run's model inputs can reproduce: the run itself for `fused`, else shards (and an
    align run) embedded like the run's training data."""
    space = manifest.get("space")
    if space == "fused":
        if manifest.get("run_model_sha256") != run.fingerprint:
            raise ValueError(
                f"the fused index was built from the run {manifest.get('run')!r}, not from the served run "
                f"{str(run.path)!r} (model fingerprints differ); rebuild it with `prodfuse index --space fused --run "
                f"{run.path}`"
            )
        return
    ex = manifest.get("extraction", {})
    recorded = {"encoders": ex.get("encoders", {}), "settings": {"like": ex.get("like")}}
    streams = {"image": ("image",), "text": ("text",), "joint": ("image", "text")}[space]
    check_compatible(run.config, recorded, manifest["embeddings"], streams, strict=True)


class ArraysToSpace:
    """Model input arrays of new items (as `Predictor.prepare_arrays` gives them) -> their vectors in an index's
    space, for items the service has just classified. Rows that have no vector there (no text in the text space,
    no photo in an image space) come back as None."""

    def __init__(self, manifest: dict, run):
        check_index_for_run(manifest, run)
        self.space = manifest["space"]
        self.run = run
        self._model = fused_model(run.model) if self.space == "fused" else None
        self._towers = None
        if self.space == "joint":
            from prodfuse.retrieval.align import load_align_run

            self._towers = load_align_run(manifest["run"])[0]
        needs = {"image": "image", "joint": "image", "text": "text"}.get(self.space)
        if needs and needs not in run.inputs:
            raise ValueError(f"the served run reads no {needs} input, so it cannot query a {self.space} index")

    def __call__(self, arrays: dict[str, np.ndarray]) -> list[np.ndarray | None]:
        from prodfuse.data.sequence import with_view
        from prodfuse.modeling.probabilities import model_outputs

        if not arrays:
            return []
        x = with_view(arrays, 0)
        if self.space == "fused":
            v = model_outputs(self._model, x, 1024)
        elif self.space == "joint":
            from prodfuse.retrieval.align import embed_side

            v = embed_side(self._towers, "image", x["image"])
        else:
            v = x[self.space]
        norms = np.linalg.norm(x["image"] if self.space in ("image", "joint") else v, axis=1)
        return [row if n > 0 else None for row, n in zip(v, norms)]
