import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MOBILENET_WEIGHTS = SHARED / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


@pytest.fixture
def tiny_catalog(tmp_path):
    """12 products in 3 classes with small PNGs, some without title; returns the CSV path."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    rows = ["product_id,image_path,title,description,label,group"]
    colours = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200)}
    for i in range(12):
        label = list(colours)[i % 3]
        arr = np.clip(np.array(colours[label]) + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(tmp_path / "img" / f"{i}.png")
        title = "" if i % 4 == 0 else f"{label} thing number {i}"
        rows.append(f"p{i},img/{i}.png,{title},,{label},{'a' if i < 6 else 'b'}")
    path = tmp_path / "catalog.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_st_model(tmp_path_factory):
    """A 32-d, 1-layer BERT sentence-transformers model built and saved locally (no download)."""
    pytest.importorskip("sentence_transformers")
    torch = pytest.importorskip("torch")
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # older sentence-transformers
        from sentence_transformers.models import Pooling, Transformer

    root = tmp_path_factory.mktemp("tiny_st")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
        "red blue black white shirt shoe bag watch men women cotton leather steel canvas".split()
    )
    (root / "vocab.txt").write_text("\n".join(tokens) + "\n")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(root / "hf")
    BertTokenizerFast(vocab_file=str(root / "vocab.txt"), do_lower_case=True).save_pretrained(root / "hf")
    transformer = Transformer(str(root / "hf"), max_seq_length=32)
    SentenceTransformer(modules=[transformer, Pooling(32)], device="cpu").save(str(root / "st"))
    return root / "st"


@pytest.fixture
def eager():
    """tf.functions run eagerly: on a few dozen rows graph tracing is most of the time (the numbers are the same)."""
    import tensorflow as tf

    tf.config.run_functions_eagerly(True)
    try:
        yield
    finally:
        tf.config.run_functions_eagerly(False)
