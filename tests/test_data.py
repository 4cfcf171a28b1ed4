"""Text loading and context windows: bundled corpora, local files, splits, BOS handling."""

from __future__ import annotations

import itertools
import json

import pytest
from omegaconf import OmegaConf

from clt_forge.config.schema import DataConfig
from clt_forge.data import load_documents, token_windows
from clt_forge.errors import CLTError
from clt_forge.models.tiny import byte_tokenizer


def data_config(**values) -> DataConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), {"name": "test", **values}))


@pytest.fixture(scope="module")
def bundled():
    cfg = data_config(source="bundled")
    return cfg, load_documents(cfg, "train"), load_documents(cfg, "held_out")


def test_bundled_corpus_has_shakespeare_and_the_bible(bundled):
    _, train, held_out = bundled
    ids = [doc.id for doc in train + held_out]
    plays = {doc_id.split("/")[1] for doc_id in ids if doc_id.startswith("shakespeare/")}
    assert len(plays) >= 37
    assert sum(doc_id.startswith("kjv/") for doc_id in ids) == 1189  # chapters of the KJV
    assert len(set(ids)) == len(ids)
    text = " ".join(doc.text for doc in train + held_out)
    assert "To be, or not to be" in text
    assert "In the beginning God created the heaven and the earth." in text
    plays = " ".join(doc.text for doc in train + held_out if doc.id.startswith("shakespeare/"))
    assert "**" not in plays  # markdown emphasis stripped


def test_split_is_deterministic_and_disjoint(bundled):
    cfg, train, held_out = bundled
    assert not {d.id for d in train} & {d.id for d in held_out}
    assert 0.005 < len(held_out) / (len(train) + len(held_out)) < 0.05
    assert [d.id for d in load_documents(cfg, "held_out")] == [d.id for d in held_out]
    reseeded = load_documents(data_config(source="bundled", seed=1), "held_out")
    assert {d.id for d in reseeded} == {d.id for d in held_out}  # split by hash, order by seed
    assert [d.id for d in reseeded] != [d.id for d in held_out]


def test_windows_start_with_bos_and_have_fixed_length(bundled):
    _, train, _ = bundled
    tokenizer = byte_tokenizer()
    windows = list(itertools.islice(token_windows(data_config(context_size=32), tokenizer, documents=train), 50))
    assert all(w.shape == (32,) and int(w[0]) == tokenizer.bos_token_id for w in windows)
    assert all(tokenizer.bos_token_id not in w[1:].tolist() for w in windows)
    # Windows are consecutive pieces of the document stream: concatenating them gives the text.
    stream = b"".join(bytes(w[1:].tolist()) for w in windows if max(w[1:].tolist()) < 256)
    assert stream.startswith(train[0].text.encode()[:100])
    plain = next(token_windows(data_config(context_size=32, prepend_bos=False), tokenizer, documents=train))
    assert bytes(plain.tolist()) == train[0].text.encode()[:32]


def test_local_files_text_json_and_parquet(tmp_path):
    (tmp_path / "txt").mkdir()
    for i in range(5):
        (tmp_path / "txt" / f"{i}.txt").write_text(f"document number {i}\nsecond line")
    docs = load_documents(data_config(source="files", path=str(tmp_path / "txt"), held_out_fraction=0.0))
    assert sorted(d.text for d in docs) == [f"document number {i}\nsecond line" for i in range(5)]

    rows = [{"body": f"row {i}"} for i in range(4)]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    docs = load_documents(
        data_config(source="files", path=str(tmp_path / "rows.jsonl"), text_column="body", held_out_fraction=0.0)
    )
    assert sorted(d.text for d in docs) == [f"row {i}" for i in range(4)]

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha", "beta"]}), tmp_path / "t.parquet")
    docs = load_documents(data_config(source="files", path=str(tmp_path / "t.parquet"), held_out_fraction=0.0))
    assert sorted(d.text for d in docs) == ["alpha", "beta"]


def test_bad_data_paths_name_the_problem(tmp_path):
    with pytest.raises(CLTError, match=r"no \.txt"):
        load_documents(data_config(source="files", path=str(tmp_path / "missing")))
    (tmp_path / "rows.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(CLTError, match=r"text_column='text'.*columns: body"):
        load_documents(data_config(source="files", path=str(tmp_path / "rows.jsonl")))


def test_bundled_corpus_has_modern_english_interleaved_from_the_start(bundled):
    """Python's own documentation (reference topics, stdlib docstrings) beside Shakespeare and
    the KJV; every short prefix of a split mixes the three families."""
    _, train, held_out = bundled
    modern = [doc for doc in train + held_out if doc.id.startswith("python3.")]
    assert {doc.id.split("/")[1] for doc in modern} == {"topics", "stdlib"}
    text = " ".join(doc.text for doc in modern)
    assert "Assignment statements are used to (re)bind names to values" in text
    assert len(text) > 1_000_000
    for split in (train, held_out):
        families = [doc.id.split("/")[0] for doc in split[:3]]
        assert sorted(f.split(".")[0] for f in families) == ["kjv", "python3", "shakespeare"]
    python_docs = load_documents(data_config(source="python_docs"), "held_out")
    assert {d.id for d in python_docs} == {d.id for d in held_out if d.id.startswith("python3.")}
    classic = load_documents(data_config(source="classic"), "train")
    assert not any(d.id.startswith("python3.") for d in classic)


def test_one_family_is_ordered_exactly_as_a_plain_shuffle():
    import random

    from clt_forge.data.text import Document, interleave_families

    docs = [Document(f"files/{i}", str(i)) for i in range(50)]
    expected = list(docs)
    random.Random("0:train").shuffle(expected)
    assert interleave_families(list(docs), random.Random("0:train")) == expected
    mixed = [Document(f"a/{i}", "") for i in range(3)] + [Document(f"b/{i}", "") for i in range(1)]
    order = [d.id.split("/")[0] for d in interleave_families(mixed, random.Random(0))]
    assert order == ["a", "b", "a", "a"]
