"""Evaluation helpers: masked mean pooling + L2 (sentence-transformers' recipe), the accuracy metrics, and
text → embeddings through ORT on a tiny in-process embedding-table model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tardis_compile import evaluate
from tardis_compile.errors import CalibrationDataError

VOCAB = ["[PAD]", "[UNK]", "market", "shares", "film", "actor", "vote", "party", "goal", "match", "chip", "phone"]


def _table_model(tmp_path, dim: int = 6, seed: int = 0):
    """``input_ids → Gather(table)`` [batch, seq, dim]; attention_mask is an input (used by pooling only)."""
    table = np.random.default_rng(seed).standard_normal((len(VOCAB), dim)).astype(np.float32)
    mask_f = helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT)
    gather = helper.make_node("Gather", ["table", "input_ids"], ["emb"])
    keep = helper.make_node("Unsqueeze", ["mask_f", "axis"], ["mask3"])
    out = helper.make_node("Mul", ["emb", "mask3"], ["hidden"])
    graph = helper.make_graph(
        [mask_f, gather, keep, out], "table",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["b", "s", dim])],
        initializer=[numpy_helper.from_array(table, "table"),
                     numpy_helper.from_array(np.array([-1], np.int64), "axis")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    path = tmp_path / "table.onnx"
    onnx.save(model, path)
    return path, table


def _tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_pool_masked_mean_then_l2():
    out = np.random.default_rng(0).standard_normal((2, 4, 3))
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    got = evaluate.pool(out, {"attention_mask": mask})
    ref = np.stack([out[0].mean(axis=0), out[1, :2].mean(axis=0)])
    np.testing.assert_allclose(got, ref / np.linalg.norm(ref, axis=1, keepdims=True))
    pooled = np.array([[3.0, 4.0]])
    np.testing.assert_allclose(evaluate.pool(pooled, {}), [[0.6, 0.8]])  # already pooled: only normalised
    with pytest.raises(CalibrationDataError, match="expected"):
        evaluate.pool(np.zeros((1, 2, 3, 4)), {})


def test_metrics():
    topics = ["a", "b", "c"]
    prompts = np.eye(3)
    docs = np.array([[1.0, 0.1, 0], [0, 2.0, 0.5], [0.2, 0, 1.0], [0.9, 1.0, 0]])
    assert evaluate.zero_shot_accuracy(docs, ["a", "b", "c", "a"], prompts, topics) == pytest.approx(0.75)
    train = np.array([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1.0, 0], [0, 0, 1.0]])
    assert evaluate.nearest_centroid_accuracy(train, ["a", "a", "b", "c"], docs, ["a", "b", "c", "a"]) == 0.75  # the last is nearer b
    with pytest.raises(CalibrationDataError, match="no training documents"):
        evaluate.nearest_centroid_accuracy(train, ["a", "a", "b", "b"], docs, ["a", "b", "c", "b"])
    assert evaluate.mean_cosine(docs, 2 * docs) == pytest.approx(1.0)
    assert evaluate.mean_cosine(np.array([[1.0, 0]]), np.array([[0, 1.0]])) == pytest.approx(0.0)
    with pytest.raises(CalibrationDataError, match="different shapes"):
        evaluate.mean_cosine(docs, docs[:2])


def test_embed_texts_through_ort(tmp_path):
    path, table = _table_model(tmp_path)
    tok = _tokenizer(tmp_path)
    texts = ["market shares", "film actor actor", "vote", "goal match match match chip"]
    got = evaluate.embed_texts(path, texts, tok, batch_size=3, max_length=4)
    ref = []
    for t in texts:
        ids = [VOCAB.index(w) for w in t.split()][:4]
        ref.append(table[ids].astype(np.float64).mean(axis=0))
    ref = np.stack(ref)
    np.testing.assert_allclose(got, ref / np.linalg.norm(ref, axis=1, keepdims=True), rtol=1e-6)
    with pytest.raises(CalibrationDataError, match="no output 'nope'"):
        evaluate.embed_texts(path, texts, tok, output="nope")


def test_bbc_prompts_cover_the_corpus_topics():
    from tardis_compile.models.corpora import TOPICS

    assert tuple(evaluate.BBC_TOPIC_PROMPTS) == TOPICS
