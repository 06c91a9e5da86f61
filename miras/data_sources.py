"""What `--dataset` names, and why one cannot be used, said in one line before training starts.

Names: `builtin` and `python-source` (corpora that ship with Python), `synthetic:recall`, local files
(.txt, .jsonl/.json, .parquet, globs), a local dataset folder, or a hub dataset name (streamed).

- local files: an empty file, bytes that are not UTF-8, a JSON line that does not parse, a file that is not
  parquet, a row whose text field is missing, null or not a string;
- a path that is a file of another kind (`--dataset /bin/ls`), or a path that does not exist;
- a hub dataset without the hub: with HF_HUB_OFFLINE=1 set, or when the hub does not answer within a few
  seconds (no network), rather than the hub client's minutes of retries.

Nothing here imports torch or datasets, so `miras train` says these before its heavy imports.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import threading
from pathlib import Path

BUILTIN = "builtin"
PYTHON_SOURCE = "python-source"
OFFLINE_CORPORA = (BUILTIN, PYTHON_SOURCE)
SYNTHETIC_RECALL = "synthetic:recall"
FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DEFAULT_HUB_DATASET = "HuggingFaceFW/fineweb-edu"
ACCEPTED_FILES = ".txt, .jsonl, .json or .parquet files, or a glob of them"
OFFLINE_DATA = "offline, train on --dataset builtin or on local files (--dataset 'data/*.jsonl')"
HUB_TIMEOUT = 3.0  # seconds the hub gets to answer one request before miras calls it unreachable


def hub_offline() -> str | None:
    """The variable that switches the hub off (HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1), if one does."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE"):
            return f"{name}={os.environ[name]}"
    return None


def hub_unreachable(timeout: float = HUB_TIMEOUT) -> str | None:
    """Why the Hugging Face Hub cannot be reached (None when it answers, with any HTTP status). The request
    goes through the proxy settings of the environment, and runs in a thread so that a resolver that never
    answers costs `timeout` seconds, not its own retries."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    endpoint = constants.ENDPOINT.rstrip("/")
    if endpoint in _ANSWERED:  # once per process: every rank's data and its evaluation ask
        return None
    outcome: dict[str, str | None] = {}

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(f"{endpoint}/api/datasets?limit=1", method="HEAD"),
                                   timeout=timeout).close()  # fmt: skip
            outcome["reason"] = None
        except urllib.error.HTTPError:  # the hub answered, if only to refuse
            outcome["reason"] = None
        except Exception as error:  # URLError (DNS, refused), timeout, TLS
            reason = getattr(error, "reason", error)
            outcome["reason"] = f"{endpoint} cannot be reached: {reason}"

    thread = threading.Thread(target=probe, name="miras-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if thread.is_alive():
        return f"{endpoint} did not answer within {timeout:.0f} s"
    if outcome["reason"] is None:
        _ANSWERED.add(endpoint)
    return outcome["reason"]


_ANSWERED: set[str] = set()


def missing_path(dataset: str) -> str | None:
    """The one-line reason when `dataset` is a path (not a hub name) that cannot be a corpus: a file of
    another kind, or a path that does not exist. None for anything else."""
    path = Path(dataset).expanduser()
    if path.is_file():
        return f"--dataset {dataset!r} is a {path.suffix or 'suffix-less'} file (accepted: {ACCEPTED_FILES})"
    if dataset.startswith(("/", "./", "../", "~")) and not path.exists():  # a hub name is ORG/NAME
        return f"--dataset {dataset!r}: no such file or folder (accepted: {ACCEPTED_FILES}, or a hub dataset name)"
    return None


def bad_file(files: list[str], builder: str) -> str | None:
    """The first problem of the first unreadable file (called once loading has failed), or None."""
    for name in files:
        path = Path(name)
        size = path.stat().st_size
        if size == 0 or (size <= 65536 and not path.read_bytes().strip()):
            return f"{name} is empty"
        if builder == "parquet":
            with path.open("rb") as file:
                head = file.read(4)
                file.seek(max(0, size - 4))
                tail = file.read(4)
            if head != b"PAR1" or tail != b"PAR1":
                return f"{name} is not a parquet file (no PAR1 marker)"
            continue
        problem = _text_problem(path, json_lines=builder == "json")
        if problem:
            return f"{name}, {problem}"
    return None


def _text_problem(path: Path, json_lines: bool) -> str | None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines = []
    with path.open("rb") as file:
        for number, raw in enumerate(file, 1):
            try:
                line = decoder.decode(raw)
            except UnicodeDecodeError as error:
                return f"line {number}: byte 0x{raw[error.start]:02x} is not UTF-8 text (a binary file?)"
            if json_lines:
                lines.append(line)
    if not json_lines:
        return None
    text = "".join(lines)
    try:  # a .json file may hold one document (a list of rows) rather than one row per line
        json.loads(text)
        return None
    except ValueError:
        pass
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError as error:
                return f"line {number}: not valid JSON ({error.msg}; expected one JSON object per line)"
            if not isinstance(row, dict):
                return f"line {number}: a JSON {type(row).__name__}, not an object with a text field"
    return None


def text_column_problem(table, field: str) -> str | None:
    """Rows of an Arrow-backed datasets.Dataset whose `field` is missing, null or not a string."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = table.data.column(field)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_null(column.type)):
        return f"field {field!r} holds {column.type} values, not text"
    if column.null_count:
        first = pc.index(pc.is_null(column), True).as_py()
        return (f"{column.null_count} of {len(column)} rows have no text in field {field!r} (the first is row "
                f"{first + 1}); every row needs a string there")  # fmt: skip
    return None


class DataError(ValueError):
    """A data source that cannot be used, with a one-line reason naming it."""


class HubUnreachable(DataError):
    """A hub dataset while the hub does not answer (no network): one line, and a run may try again later."""


def local_files(dataset: str) -> list[str] | None:
    """The files a --dataset names when it is a file or a glob of files; None when it is not."""
    suffix = Path(dataset).suffix.lower()
    if suffix not in FILE_BUILDERS:
        return None
    files = sorted(glob.glob(dataset)) if glob.has_magic(dataset) else ([dataset] if os.path.exists(dataset) else [])
    if not files:
        raise DataError(f"--dataset {dataset!r}: no such file (accepted: {ACCEPTED_FILES})")
    return files


def check_hub(dataset: str) -> None:
    """A hub dataset needs the hub: say so at once when it is switched off or does not answer."""
    where = f"--dataset {dataset!r} is streamed from the Hugging Face Hub"
    switch = hub_offline()
    if switch:
        raise DataError(f"{where}, which {switch} switches off; {OFFLINE_DATA}")
    reason = hub_unreachable()
    if reason:
        raise HubUnreachable(f"{where}, but {reason}; {OFFLINE_DATA}, and set HF_HUB_OFFLINE=1 so that nothing "
                             "waits for the network")  # fmt: skip


def check_source(dataset: str, synthetic: bool = False) -> None:
    """The checks of a --dataset that need no file read: a path that is no corpus, a hub dataset without the
    hub. DataError (HubUnreachable for the network) with one line."""
    if synthetic or dataset in (*OFFLINE_CORPORA, SYNTHETIC_RECALL):
        return
    if local_files(dataset) is not None:
        return
    reason = missing_path(dataset)
    if reason:
        raise DataError(reason)
    if not Path(dataset).is_dir():  # a folder is a local dataset; anything else needs the hub
        check_hub(dataset)
