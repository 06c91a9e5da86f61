"""Data sources, packing, rank splits and exact stream positions."""

import json

import pytest
import torch

from miras.data import (
    DataConfig,
    DataError,
    PackedTokenStream,
    RecallStream,
    default_tokenizer_name,
    open_stream,
    python_source_documents,
)
from miras.tokenizer import byte_tokenizer

DOCS = [f"<doc {i:03d}> " + "lorem ipsum " * (i % 7 + 1) for i in range(60)]


def write_corpus(tmp_path, kind):
    if kind == "txt":
        path = tmp_path / "corpus.txt"
        path.write_text("\n".join(DOCS) + "\n")
    elif kind == "jsonl":
        path = tmp_path / "corpus.jsonl"
        path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    else:
        import datasets

        path = tmp_path / "corpus.parquet"
        datasets.Dataset.from_dict({"body": DOCS}).to_parquet(str(path))
    return str(path)


def stream(path, text_field="text", rank=0, world=1, **kw):
    config = DataConfig(
        dataset=path,
        text_field=text_field,
        seq_len=32,
        batch_size=2,
        seed=5,
        rank=rank,
        world_size=world,
        eval_documents=4,
        **kw,
    )
    return open_stream(config, byte_tokenizer())


def doc_ids(batches):
    tokenizer = byte_tokenizer()
    text = "".join(tokenizer.decode(row) for b in batches for row in b["input_ids"].tolist())
    return {int(part[:3]) for part in text.split("<doc ")[1:] if part[:3].isdigit()}


@pytest.mark.parametrize("kind,field", [("txt", "text"), ("jsonl", "body"), ("parquet", "body")])
def test_local_files_give_full_windows(tmp_path, kind, field):
    batches = [stream(write_corpus(tmp_path, kind), field).next_batch() for _ in range(3)]
    assert all(b["input_ids"].shape == (2, 32) for b in batches)
    assert doc_ids(batches)


@pytest.mark.parametrize("kind", ["txt", "folder"])
def test_restoring_the_position_gives_the_same_next_batches(tmp_path, kind):
    if kind == "folder":  # the hub code path (streaming load_dataset by name), on a local folder
        folder = tmp_path / "hubcopy"
        folder.mkdir()
        (folder / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
        path = str(folder)
    else:
        path = write_corpus(tmp_path, "txt")
    first = stream(path)
    assert isinstance(first, PackedTokenStream) and first.streaming == (kind == "folder")
    for _ in range(7):
        first.next_batch()
    state = first.state_dict()
    expected = [first.next_batch()["input_ids"] for _ in range(30)]  # crosses an epoch boundary
    second = stream(path)
    second.load_state_dict(state)
    for want in expected:
        assert second.next_batch()["input_ids"].equal(want)


def test_ranks_read_disjoint_documents_and_eval_is_held_out(tmp_path):
    path = write_corpus(tmp_path, "txt")
    seen = []
    for rank in (0, 1):
        s = stream(path, rank=rank, world=2)
        seen.append(doc_ids([s.next_batch() for _ in range(12)]))
    assert seen[0] and seen[1] and not (seen[0] & seen[1])
    evaluation = PackedTokenStream(stream(path).config, byte_tokenizer(), evaluation=True)
    held_out = doc_ids([evaluation.next_batch()])
    assert held_out <= {0, 1, 2, 3}
    assert not (held_out & (seen[0] | seen[1]))


def test_epochs_are_reshuffled_from_the_seed(tmp_path):
    path = write_corpus(tmp_path, "txt")
    s = stream(path)
    order = [s._epoch_order()["text"] for s.epoch in (0, 1)]
    assert order[0] != order[1] and sorted(order[0]) == sorted(order[1])
    again = stream(path)
    again.epoch = 1
    assert again._epoch_order()["text"] == order[1]


def test_builtin_corpus_needs_no_download():
    s = open_stream(DataConfig(dataset="builtin", seq_len=64, batch_size=2), byte_tokenizer())
    assert s.next_batch()["input_ids"].max() < 257


def test_python_source_corpus_is_long_documents_of_the_standard_library():
    documents = python_source_documents()
    assert len(documents) > 300
    assert sum(len(d) >= 8192 for d in documents) > 100  # long enough for 4K-token windows and beyond
    assert any("def " in d and "import " in d for d in documents[:10])
    config = DataConfig(dataset="python-source", seq_len=256, batch_size=2, eval_documents=4)
    assert default_tokenizer_name(config.dataset) == "byte"
    train, held_out = open_stream(config, byte_tokenizer()), open_stream(config, byte_tokenizer(), evaluation=True)
    first = train.next_batch()["input_ids"]
    assert first.shape == (2, 256) and first.max() < 257
    state = train.state_dict()
    expected = train.next_batch()["input_ids"]
    again = open_stream(config, byte_tokenizer())
    again.load_state_dict(state)
    assert torch.equal(again.next_batch()["input_ids"], expected)  # resumable like every finite corpus
    assert not torch.equal(held_out.next_batch()["input_ids"], first)


def test_recall_labels_only_the_answers():
    s = RecallStream(DataConfig(dataset="synthetic:recall", seq_len=41, batch_size=3, seed=1))
    batch = s.next_batch()
    labelled = batch["labels"] != -100
    assert labelled.sum(1).tolist() == [10, 10, 10]
    assert (batch["labels"][labelled] >= 64).all()  # answers are values
    state = s.state_dict()
    nxt = s.next_batch()
    s.load_state_dict(state)
    assert s.next_batch()["input_ids"].equal(nxt["input_ids"])


def test_missing_file_and_unknown_column_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        stream(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="--text-field 'content' is not a column"):
        stream(write_corpus(tmp_path, "jsonl"), "content")
