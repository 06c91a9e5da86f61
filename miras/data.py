"""Data: sources -> documents -> packed token windows -> batches, with a resumable per-rank position.

Sources (`--dataset`):
- `builtin`: the standard library's documentation (`pydoc_data.topics`, ships with Python), one
  document per topic, with the byte tokenizer by default: trains on a fresh machine, offline.
- `python-source`: the standard library's own `.py` files (~12 MB, ~730 files, half of them over 8 KB),
  one document per file: a long-document corpus that needs no download, where identifiers recur
  thousands of bytes apart (what a recurrent memory is for). Byte tokenizer by default.
- `synthetic:recall`: associative-recall sequences (key-value pairs, then queries); the labels
  mark only the answers, so the loss and the logged accuracy measure recall.
- local files (`.txt`, `.jsonl`/`.json`, `.parquet`, or a glob of them): loaded through
  `datasets` into an Arrow table.
- anything else is a hub dataset name (or a local dataset folder), streamed with `datasets`.
`--data-source random` (seed compatibility) replaces the dataset with uniformly random tokens.

Documents are tokenized, joined with EOS between them and cut into windows of `seq_len` tokens;
a document's tail continues in the next window (the memory is not reset at document boundaries).
Each rank reads a disjoint part: every `world_size`-th document of a finite corpus, or its
`split_dataset_by_node` share of a stream. A finite corpus repeats in epochs, each reshuffled from
(seed, epoch); the first `eval_documents` documents are held out for evaluation.

The position (`state_dict()`) is exact: epoch and document index for finite corpora (random
access, nothing replayed), the `datasets` stream state for streams, plus the tokens already cut
from a document but not yet emitted.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data_sources import (  # noqa: F401  (the names --dataset accepts, re-exported)
    BUILTIN,
    DEFAULT_HUB_DATASET,
    FILE_BUILDERS,
    OFFLINE_CORPORA,
    OFFLINE_DATA,
    PYTHON_SOURCE,
    SYNTHETIC_RECALL,
    DataError,
    HubUnreachable,
    bad_file,
    check_source,
    local_files,
    text_column_problem,
)
from .tokenizer import BYTE_TOKENIZER


@dataclass
class DataConfig:
    dataset: str = BUILTIN
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    seq_len: int = 4096
    batch_size: int = 1
    seed: int = 1337
    rank: int = 0
    world_size: int = 1
    eval_documents: int = 32
    random_tokens: bool = False  # --data-source random


def default_tokenizer_name(dataset: str) -> str:
    """The byte tokenizer for the offline sources, gpt2 (as the seed) for everything else."""
    return BYTE_TOKENIZER if dataset in (*OFFLINE_CORPORA, SYNTHETIC_RECALL) else "gpt2"


def builtin_documents() -> list[str]:
    import pydoc_data.topics

    return [text for _, text in sorted(pydoc_data.topics.topics.items())]


# Folders of the standard library that are not the library itself: its tests (half the files, and
# machine-generated data in places), third-party packages, bytecode caches.
_NOT_STDLIB = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def python_source_documents() -> list[str]:
    """The `.py` files of this interpreter's standard library, one document per file.

    The order is fixed by a hash of each file's path (not alphabetical), so the documents held out
    for evaluation (the first ones) are spread over the library rather than all from one package.
    The corpus is the running Python's: 3.11 and 3.12 differ slightly, so results name the version.
    """
    import hashlib
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if name not in _NOT_STDLIB)
        files += [os.path.relpath(os.path.join(folder, name), root) for name in names if name.endswith(".py")]
    files.sort(key=lambda path: hashlib.sha256(Path(path).as_posix().encode()).hexdigest())
    # A few files carry latin-1 bytes in comments; replacing them keeps every file a valid document.
    return [Path(root, path).read_bytes().decode("utf-8", errors="replace") for path in files]


@contextlib.contextmanager
def _datasets_quiet():
    """datasets logs a failed file at ERROR level before raising (the one-line DataError says it instead), and
    draws its progress bars into logs and captured output too: only a terminal gets them."""
    import logging
    import sys

    from datasets.utils import logging as datasets_logging

    logger = logging.getLogger("datasets")
    level, bars = logger.level, datasets_logging.is_progress_bar_enabled()
    logger.setLevel(logging.CRITICAL)
    if not sys.stderr.isatty():
        datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets_logging.enable_progress_bar()


def open_documents(config: DataConfig):
    """(documents, streaming): an indexable datasets.Dataset of texts, or an IterableDataset stream."""
    import datasets

    if config.dataset == BUILTIN:
        return datasets.Dataset.from_dict({"text": builtin_documents()}), False
    if config.dataset == PYTHON_SOURCE:
        return datasets.Dataset.from_dict({"text": python_source_documents()}), False
    check_source(config.dataset)
    files = local_files(config.dataset)
    if files is not None:
        builder = FILE_BUILDERS[Path(files[0]).suffix.lower()]
        try:
            with _datasets_quiet():
                table = datasets.load_dataset(builder, data_files=files, split="train")
        except Exception as error:
            problem = bad_file(files, builder) or f"cannot be read ({type(error).__name__}: {_root_cause(error)})"
            raise DataError(f"--dataset {config.dataset!r}: {problem}") from None
        return _text_column(table, config), False
    try:
        stream = datasets.load_dataset(config.dataset, config.dataset_config, split=config.split, streaming=True)
    except Exception as error:
        hint = (
            OFFLINE_DATA
            if "connect" in str(error).lower() or "offline" in str(error).lower()
            else "check the name, --dataset-config and --dataset-split"
        )
        raise DataError(f"--dataset {config.dataset!r}: cannot be loaded ({type(error).__name__}); {hint}") from None
    return stream, True


def _text_column(table, config: DataConfig):
    if config.text_field not in table.column_names:
        raise DataError(
            f"--text-field {config.text_field!r} is not a column of {config.dataset!r} "
            f"(columns: {', '.join(table.column_names)})"
        )
    problem = text_column_problem(table, config.text_field)
    if problem:
        raise DataError(f"--dataset {config.dataset!r}: {problem}")
    table = table.select_columns([config.text_field])
    return table if config.text_field == "text" else table.rename_column(config.text_field, "text")


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return " ".join(str(error).split())[:200]


class PackedTokenStream:
    """Windows of seq_len tokens cut from this rank's documents, with an exact resumable position."""

    def __init__(self, config: DataConfig, tokenizer, *, evaluation: bool = False):
        self.config = config
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        self.evaluation = evaluation
        documents, self.streaming = open_documents(config)
        held_out = config.eval_documents
        if self.streaming:
            from datasets.distributed import split_dataset_by_node

            part = documents.take(held_out) if evaluation else documents.skip(held_out)
            if config.text_field != "text":
                part = part.rename_column(config.text_field, "text")
            self.stream = split_dataset_by_node(part, rank=config.rank, world_size=config.world_size)
            self.iterator = None
        else:
            if held_out >= len(documents) + evaluation:  # training needs one document left; evaluation may take all
                raise DataError(
                    f"--dataset {config.dataset!r} has {len(documents)} documents, too few to hold out "
                    f"{held_out} for evaluation"
                )
            self.documents = documents.select(range(held_out) if evaluation else range(held_out, len(documents)))
        self.epoch = 0
        self.position = 0  # documents of this rank's epoch order already tokenized
        self.pending: list[int] = []

    # -- finite corpora: this rank's documents of an epoch, reshuffled from (seed, epoch)
    def _epoch_order(self):
        order = self.documents if self.evaluation else self.documents.shuffle(seed=self.config.seed + self.epoch)
        return order.shard(num_shards=self.config.world_size, index=self.config.rank, contiguous=False)

    def _next_document(self) -> str:
        if self.streaming:
            for _ in range(10_000):  # a stream is not checked in advance: rows without text are skipped
                text = self._next_streamed()
                if isinstance(text, str):
                    return text
            raise DataError(f"--dataset {self.config.dataset!r}: 10000 rows in a row have no text in field "
                            f"{self.config.text_field!r}")  # fmt: skip
        if not hasattr(self, "_order") or self._order_epoch != self.epoch:
            self._order, self._order_epoch = self._epoch_order(), self.epoch
            if len(self._order) == 0:
                raise DataError(f"--dataset {self.config.dataset!r}: rank {self.config.rank} has no documents")
        if self.position >= len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            return self._next_document()
        text = self._order[self.position]["text"]
        self.position += 1
        return text

    def _next_streamed(self):
        if self.iterator is None:
            self.iterator = iter(self.stream)
        try:
            return next(self.iterator)["text"]
        except StopIteration:
            self.epoch += 1
            self.stream.set_epoch(self.epoch)
            self.iterator = iter(self.stream)
            return next(self.iterator)["text"]

    def next_window(self) -> list[int]:
        length = self.config.seq_len
        while len(self.pending) < length:
            text = self._next_document()
            # verbose=False: documents are longer than model_max_length (the window) by design; no warning.
            self.pending.extend(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
            self.pending.append(self.eos)
        window, self.pending = self.pending[:length], self.pending[length:]
        return window

    def next_batch(self) -> dict[str, torch.Tensor]:
        ids = torch.tensor([self.next_window() for _ in range(self.config.batch_size)], dtype=torch.long)
        return {"input_ids": ids, "labels": ids}

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self.epoch, "pending": list(self.pending)}
        if self.streaming:
            state["stream"] = self.stream.state_dict()
        else:
            state["position"] = self.position
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self.pending = list(state["pending"])
        if self.streaming:
            self.stream.set_epoch(self.epoch)
            self.stream.load_state_dict(state["stream"])
            self.iterator = None
        else:
            self.position = state["position"]


class _CountedBatches:
    """Batches that are a pure function of (seed, rank, split, index): the position is the index."""

    def __init__(self, config: DataConfig, evaluation: bool):
        self.config = config
        self.index = 0
        self.salt = 1 if evaluation else 0

    def _generator(self) -> torch.Generator:
        c = self.config
        generator = torch.Generator().manual_seed(hash((c.seed, c.rank, self.salt, self.index)) % 2**63)
        self.index += 1
        return generator

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = state["index"]


class RecallStream(_CountedBatches):
    """Associative recall: `k1 v1 ... kn vn SEP q1 a1 ...`, labels only on the answers.

    Keys and values are byte ids (keys 0..63, values 64..127, SEP 128), so the byte tokenizer
    saves and decodes them. Batches are a pure function of (seed, rank, index): the position
    is the number of batches drawn.
    """

    KEYS, VALUES, SEP = 64, 64, 128

    def __init__(self, config: DataConfig, *, evaluation: bool = False):
        super().__init__(config, evaluation)
        self.pairs = max(1, min(self.KEYS, (config.seq_len - 1) // 4))

    def next_batch(self) -> dict[str, torch.Tensor]:
        c, generator = self.config, self._generator()
        pairs, rows, labels = self.pairs, [], []
        for _ in range(c.batch_size):
            keys = torch.randperm(self.KEYS, generator=generator)[:pairs]
            values = torch.randint(0, self.VALUES, (pairs,), generator=generator) + self.KEYS
            asked = torch.randperm(pairs, generator=generator)
            context = torch.stack([keys, values], 1).flatten()
            queries = torch.stack([keys[asked], values[asked]], 1).flatten()
            ids = torch.cat([context, torch.tensor([self.SEP]), queries])
            ids = torch.cat([ids, torch.full((c.seq_len - len(ids),), self.SEP)])[: c.seq_len]
            label = torch.full_like(ids, -100)
            answers = torch.arange(2 * pairs + 2, min(4 * pairs + 1, c.seq_len), 2)
            label[answers] = ids[answers]
            rows.append(ids)
            labels.append(label)
        return {"input_ids": torch.stack(rows), "labels": torch.stack(labels)}


class RandomTokenStream(_CountedBatches):
    """Uniformly random tokens (the seed's --data-source random): a speed and memory probe."""

    def __init__(self, config: DataConfig, vocab_size: int, *, evaluation: bool = False):
        super().__init__(config, evaluation)
        self.vocab_size = vocab_size

    def next_batch(self) -> dict[str, torch.Tensor]:
        c = self.config
        ids = torch.randint(0, self.vocab_size, (c.batch_size, c.seq_len), generator=self._generator())
        return {"input_ids": ids, "labels": ids}


def open_stream(config: DataConfig, tokenizer, *, evaluation: bool = False):
    """The batch stream for this rank: `next_batch()`, `state_dict()`, `load_state_dict()`."""
    if config.random_tokens:
        return RandomTokenStream(config, len(tokenizer), evaluation=evaluation)
    if config.dataset == SYNTHETIC_RECALL:
        return RecallStream(config, evaluation=evaluation)
    return PackedTokenStream(config, tokenizer, evaluation=evaluation)


def recall_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of answer positions (labels != -100) whose argmax prediction is right."""
    predictions = logits[:, :-1].argmax(-1)
    targets = labels[:, 1:]
    answered = targets != -100
    return float((predictions[answered] == targets[answered]).float().mean()) if answered.any() else float("nan")
