"""Task accuracy of a sentence-embedding model: what "accuracy" means when we compare TARDIS with pruning.

Output-cosine to the original (what :mod:`tardis_compile.verify` measures) says how far a model moved, not
whether it still does its job. For a sentence-embedding model like all-MiniLM-L6-v2 the job is
embeddings that separate meanings, so this module measures, on labelled documents:

* **zero-shot topic accuracy**: each document gets the topic whose short description ("This news article
  is about business.") is nearest in cosine — embedded by the *same* model under test;
* **nearest-centroid accuracy**: topic centroids are the mean embeddings of labelled training documents
  (in the bench: the 128 calibration articles), each evaluation document gets the nearest centroid;
* **embedding cosine** to reference embeddings (the original model's, same documents).

Embeddings follow sentence-transformers' all-MiniLM-L6-v2 pipeline: masked mean pooling over tokens, then
L2 normalisation. A model that already outputs a pooled ``[batch, dim]`` embedding (our MiniLM export
does) is only re-normalised (a no-op up to rounding). It lives in the library, not in ``bench/``, so that
it is unit-tested in CI and usable on any exported embedding model; it needs only NumPy and ORT.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from tardis_compile.errors import CalibrationDataError
from tardis_compile.feeds import FeedSource, from_text, input_specs, mask_rows, validated

#: Zero-shot descriptions of the five BBC News topics (``tardis_compile.models.corpora.TOPICS``).
BBC_TOPIC_PROMPTS: dict[str, str] = {
    "business": "This news article is about business.",
    "entertainment": "This news article is about entertainment.",
    "politics": "This news article is about politics.",
    "sports": "This news article is about sport.",
    "tech": "This news article is about technology.",
}


def normalize(e: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    e = np.asarray(e, np.float64)
    n = np.linalg.norm(e, axis=-1, keepdims=True)
    return e / np.where(n > 0, n, 1.0)


def pool(out: np.ndarray, feed: dict[str, np.ndarray], mask_input: str | None = None) -> np.ndarray:
    """Sentence embeddings of one batch: masked mean over tokens for ``[batch, seq, dim]``, then L2."""
    out = np.asarray(out, np.float64)
    if out.ndim == 2:
        return normalize(out)
    if out.ndim != 3:
        raise CalibrationDataError(f"embedding output has shape {list(out.shape)}; expected [batch, dim] or "
                                   "[batch, seq, dim]")
    keep = mask_rows(feed, out.shape[0] * out.shape[1], mask_input)
    w = np.ones(out.shape[:2]) if keep is None else keep.reshape(out.shape[:2]).astype(np.float64)
    mean = np.einsum("bs,bsd->bd", w, out) / np.maximum(w.sum(axis=1, keepdims=True), 1e-9)
    return normalize(mean)


def _session(model: str | os.PathLike, threads: int, options: ort.SessionOptions | None) -> ort.InferenceSession:
    so = options or ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])


def _embed(session: ort.InferenceSession, source: FeedSource, output: str | None,
           mask_input: str | None) -> np.ndarray:
    names = [o.name for o in session.get_outputs()]
    if output is not None and output not in names:
        raise CalibrationDataError(f"the model has no output '{output}' (outputs: {names})")
    name = output or names[0]
    parts = [pool(session.run([name], feed)[0], feed, mask_input)
             for feed in validated(source, input_specs(session), "evaluation data")()]
    return np.concatenate(parts)


def embed(model: str | os.PathLike, source: FeedSource, *, output: str | None = None,
          mask_input: str | None = None, threads: int = 0,
          session_options: ort.SessionOptions | None = None) -> np.ndarray:
    """Normalised sentence embeddings ``[documents, dim]`` of ``model`` over every feed of ``source``.

    ``output``: the output to pool (default: the model's first). ``session_options``: e.g.
    :func:`tardis_compile.session_options` to run rewritten models with the compiled kernels.
    """
    return _embed(_session(model, threads, session_options), source, output, mask_input)


def embed_texts(model: str | os.PathLike, texts: Sequence[str], tokenizer: str | os.PathLike, *,
                batch_size: int = 32, max_length: int = 128, output: str | None = None, threads: int = 0,
                session_options: ort.SessionOptions | None = None) -> np.ndarray:
    """:func:`embed` over texts tokenized with a Hugging Face ``tokenizer.json`` (or its folder)."""
    tok = Path(tokenizer)
    tok = tok / "tokenizer.json" if tok.is_dir() else tok
    session = _session(model, threads, session_options)
    source = from_text(list(texts), tok, [i.name for i in session.get_inputs()], batch_size=batch_size,
                       max_length=max_length)
    return _embed(session, source, output, None)


def zero_shot_accuracy(docs: np.ndarray, labels: Sequence[str], prompts: np.ndarray,
                       topics: Sequence[str]) -> float:
    """Share of documents whose nearest prompt embedding (cosine) is their own topic's."""
    pred = np.argmax(normalize(docs) @ normalize(prompts).T, axis=1)
    return float(np.mean(np.asarray(topics)[pred] == np.asarray(labels)))


def nearest_centroid_accuracy(train: np.ndarray, train_labels: Sequence[str], test: np.ndarray,
                              test_labels: Sequence[str]) -> float:
    """Share of test documents nearest (cosine) to their own topic's training centroid."""
    train_labels = np.asarray(train_labels)
    topics = sorted(set(train_labels.tolist()))
    missing = sorted(set(test_labels) - set(topics))
    if missing:
        raise CalibrationDataError(f"nearest-centroid: no training documents for topics {missing}")
    centroids = np.stack([normalize(train)[train_labels == t].mean(axis=0) for t in topics])
    pred = np.argmax(normalize(test) @ normalize(centroids).T, axis=1)
    return float(np.mean(np.asarray(topics)[pred] == np.asarray(test_labels)))


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean row-wise cosine similarity of two embedding matrices of the same documents."""
    if a.shape != b.shape:
        raise CalibrationDataError(f"embeddings of different shapes {list(a.shape)} and {list(b.shape)}")
    return float(np.mean(np.sum(normalize(a) * normalize(b), axis=1)))
