"""`miras eval PATH_OR_URL`: score a checkpoint: perplexity, bits per byte, loss by position, lm-eval tasks.

PATH_OR_URL is what `miras generate` takes: a checkpoint folder, a run folder (its `latest` checkpoint) or a
storage URL of either. The text is `--dataset`, with the data options of `miras train`: the first
`--documents` documents (the ones training holds out with the same `--eval-documents`) are tokenized with
the checkpoint's tokenizer, joined with end-of-text and cut into windows of `--seq-len` tokens, read once.
The result is one JSON object (stdout, or `--output FILE`): the mean next-token loss in nats, perplexity,
bits per token and per byte (UTF-8 bytes of the predicted tokens), and the loss by position bucket in the
window (the long-context view, miras.evaluation). `--tasks` hands the loaded model to lm-evaluation-harness
(`pip install 'miras[eval]'`); `--plot FILE.png` draws loss against position and, for a run folder, loss
against step from its metrics.jsonl (`pip install 'miras[plot]'`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Any

from .argtypes import positive_int
from .generate import GenerateError, RemoteError, load, pick_device, storage_options

DEFAULT_SEQ_LEN = 2048


class EvalError(ValueError):
    """A bad argument or an unusable input: one line naming the value and what is accepted (exit 2)."""


def token_byte_lengths(tokenizer) -> list[int]:
    """UTF-8 bytes each token id stands for (0 for special tokens such as end-of-text).

    Byte-level BPE tokens (GPT-2's alphabet, miras' byte tokenizer) are one character per byte; other
    tokenizers are measured by decoding the token alone.
    """
    special = set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    byte_level = type(decoder).__name__ == "ByteLevel"
    lengths = []
    for index, token in enumerate(tokens):
        if index in special or token is None:
            lengths.append(0)
        elif byte_level:
            lengths.append(len(token))
        else:
            lengths.append(len(tokenizer.convert_tokens_to_string([token]).encode("utf-8")))
    return lengths


def held_out_windows(args, tokenizer):
    """(N, seq_len) token windows from the first --documents documents of --dataset, read once."""
    import torch

    from .data import DataConfig, DataError, open_documents

    config = DataConfig(
        dataset=args.dataset,
        dataset_config=args.dataset_config,
        split=args.dataset_split,
        text_field=args.text_field,
        seq_len=args.seq_len,
        eval_documents=args.documents,
    )
    try:
        documents, streaming = open_documents(config)
        if streaming:
            texts = [row[args.text_field] for row in documents.take(args.documents)]
        else:
            texts = documents.select(range(min(args.documents, len(documents))))["text"]
    except DataError as error:
        raise EvalError(str(error)) from None
    ids: list[int] = []
    limit = args.windows * args.seq_len
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= limit:
            break
    count = min(args.windows, len(ids) // args.seq_len)
    if count == 0:
        raise EvalError(
            f"--seq-len {args.seq_len}: the first {args.documents} documents of {args.dataset!r} hold only {len(ids)} "
            "tokens, less than one window (lower --seq-len or raise --documents)"
        )
    return torch.tensor(ids[: count * args.seq_len], dtype=torch.long).view(count, args.seq_len)


def position_edges(seq_len: int) -> list[int]:
    """Powers of two up to the window: the fine profile that --plot draws."""
    edges, edge = [0], 1
    while edge < seq_len:
        edges.append(edge)
        edge *= 2
    return edges + [seq_len]


def score(model, tokenizer, windows, batch_size: int, progress: bool = True) -> dict[str, Any]:
    """Loss, perplexity, bits per token/byte and the loss by position bucket over `windows`."""
    import torch
    from tqdm.auto import tqdm

    from .evaluation import LN2, PositionLoss, next_token_losses

    device = next(model.parameters()).device
    byte_lengths = torch.tensor(token_byte_lengths(tokenizer), dtype=torch.float64)
    buckets, fine = PositionLoss(), PositionLoss(position_edges(windows.shape[1]))
    total_bytes = 0.0
    with torch.no_grad(), tqdm(total=windows.shape[0], desc="eval", unit="window", disable=not progress) as bar:
        for batch in windows.split(batch_size):
            logits = model(input_ids=batch.to(device), use_cache=False).logits
            losses = next_token_losses(logits, batch.to(device)).cpu()
            buckets.add(losses)
            fine.add(losses)
            total_bytes += float(byte_lengths[batch[:, 1:]].sum())
            bar.update(batch.shape[0])
    loss = buckets.mean()
    tokens = sum(buckets.tokens().values())
    return {
        "windows": windows.shape[0],
        "seq_len": windows.shape[1],
        "tokens": tokens,
        "bytes": int(total_bytes),
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_token": loss / LN2,
        "bits_per_byte": loss * tokens / LN2 / total_bytes if total_bytes else None,
        "loss_by_position": buckets.by_bucket(),
        "tokens_by_position": buckets.tokens(),
        "loss_by_position_fine": fine.by_bucket(),
    }


def run_tasks(model, tokenizer, tasks: list[str], include_path: str | None, limit: int | None, batch_size: int):
    """lm-evaluation-harness on the loaded model: its results table, {task: {metric: value}}."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalError("--tasks needs lm-evaluation-harness: pip install 'miras[eval]'") from None
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        where = f" (tasks under --include-path {include_path!r} included)" if include_path else ""
        raise EvalError(f"--tasks: unknown task {unknown[0]!r}{where}; see lm-eval --tasks list")
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON result alone
        results = simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
            tasks=tasks,
            task_manager=manager,
            limit=limit,
            log_samples=False,
        )
    return {task: {k: v for k, v in values.items() if k != "alias"} for task, values in results["results"].items()}


def run_folder_of(path: str) -> Path | None:
    """The run folder a local PATH names (itself, or above a checkpoint), when it has a metrics.jsonl."""
    for folder in (Path(path), Path(path).parent, Path(path).parent.parent):
        if (folder / "metrics.jsonl").is_file():
            return folder
    return None


def plot(result: dict[str, Any], run_folder: Path | None, path: str) -> None:
    """Loss against position in the window and, for a run, training and held-out loss against step."""
    try:
        import matplotlib
    except ImportError:
        raise EvalError("--plot needs matplotlib: pip install 'miras[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    if run_folder is not None:
        for line in (run_folder / "metrics.jsonl").read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: the rows before it still count
                continue
    figure, axes = plt.subplots(1, 2 if rows else 1, figsize=(11 if rows else 6, 4), squeeze=False)
    by_position = result["loss_by_position_fine"]
    ends = [int(name.split("-")[1]) for name in by_position]
    axes[0][0].plot(ends, list(by_position.values()), marker="o")
    axes[0][0].set(xscale="log", xlabel="position in window (bucket end, tokens)", ylabel="loss (nats)",
                   title=f"loss by position ({result['windows']} windows)")  # fmt: skip
    if rows:
        for key, label in (("loss", "train"), ("eval_loss", "held out")):
            points = [(row["step"], row[key]) for row in rows if row.get(key) is not None and "step" in row]
            if points:
                axes[0][1].plot(*zip(*points), label=label, marker="." if key == "eval_loss" else None)
        axes[0][1].set(xlabel="step", ylabel="loss (nats)", title=f"{run_folder.name}: loss by step")
        axes[0][1].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise EvalError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="miras eval", description=__doc__.splitlines()[0].split(": ", 1)[1])
    add = parser.add_argument
    add("checkpoint", metavar="PATH_OR_URL", help="checkpoint folder, run folder, or storage URL of either")
    add("--dataset", default="builtin", help="builtin, python-source, local .txt/.jsonl/.json/.parquet, or a hub name")
    add("--dataset-config", default=None)
    add("--dataset-split", default="train")
    add("--text-field", default="text")
    add("--documents", type=positive_int, default=32, help="the first N documents (training holds out 32)")
    add("--seq-len", type=positive_int, default=None,
        help=f"window length (default: the tokenizer's model_max_length, else {DEFAULT_SEQ_LEN})")  # fmt: skip
    add("--windows", type=positive_int, default=16, help="at most this many windows")
    add("--batch-size", type=positive_int, default=1)
    add("--tasks", default=None, help="comma-separated lm-eval tasks (needs miras[eval])")
    add("--include-path", default=None, help="a folder of lm-eval task YAML files for --tasks")
    add("--limit", type=positive_int, default=None, help="lm-eval: at most N examples per task")
    add("--output", default=None, help="write the JSON here (default: stdout)")
    add("--plot", default=None, metavar="FILE.png", help="draw loss by position (and by step for a run folder)")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    add("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 on CUDA, else fp32")
    add("--cache-dir", default=None, help="where URL checkpoints are downloaded (default ~/.cache/miras/checkpoints)")
    add("--storage-option", action="append", default=[], metavar="KEY=VALUE", help="passed to the storage backend")
    return parser


def evaluate_checkpoint(args) -> dict[str, Any]:
    if args.plot is not None and not args.plot.lower().endswith(".png"):
        raise EvalError(f"--plot {args.plot!r}: expected a .png file name")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise EvalError(f"--include-path {args.include_path!r}: no such folder (expected a folder of task YAML)")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar here (the windows'); loading a small model needs none
    device = pick_device(args.device)
    options = storage_options(args.storage_option)
    model, tokenizer = load(args.checkpoint, device=device, dtype=args.dtype, cache_dir=args.cache_dir,
                            storage_options=options)  # fmt: skip
    if args.seq_len is None:
        saved = getattr(tokenizer, "model_max_length", None)
        args.seq_len = saved if isinstance(saved, int) and 1 < saved < 10**7 else DEFAULT_SEQ_LEN
    windows = held_out_windows(args, tokenizer)
    result = {"checkpoint": args.checkpoint, "dataset": args.dataset, "documents": args.documents}
    result.update(score(model, tokenizer, windows, args.batch_size, progress=not args.no_progress))
    if args.tasks:
        tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
        result["tasks"] = run_tasks(model, tokenizer, tasks, args.include_path, args.limit, args.batch_size)
    if args.plot:
        plot(result, run_folder_of(args.checkpoint), args.plot)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        result = evaluate_checkpoint(args)
    except (EvalError, GenerateError) as error:
        print(f"miras eval: error: {error} (see --help)", file=sys.stderr)
        return 2
    except RemoteError as error:
        print(f"miras eval: error: {error}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=1, default=float)
    if args.output:
        Path(args.output).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
