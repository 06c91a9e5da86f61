"""`miras generate PATH_OR_URL --prompt "..."`: sample text from a checkpoint.

PATH_OR_URL is a checkpoint folder (`runs/<run>/checkpoints/step_XXXXXXXX`), a run folder or its
`checkpoints/` folder (the checkpoint `latest` names), or a storage URL of either (downloaded through
miras.storage and verified against its manifest first). The folder is an ordinary `from_pretrained`
folder: `import miras` is all AutoModelForCausalLM, AutoTokenizer and `transformers.pipeline` need.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .argtypes import positive_float, positive_int


class GenerateError(ValueError):
    """A bad argument or an unusable checkpoint: one line naming the value and what is accepted (exit 2)."""


class RemoteError(RuntimeError):
    """A storage failure while downloading (network, permissions): one line (exit 1)."""


def verify_weights(folder: Path) -> None:
    """When the folder has a manifest, the files that loading reads must match it (sizes; trainer/ ignored)."""
    from .checkpoint import MANIFEST_NAME, verify_folder

    if not (folder / MANIFEST_NAME).is_file():
        return
    problems = [p for p in verify_folder(folder, check_hashes=False) if not p.startswith("trainer/")]
    if problems:
        raise GenerateError(f"{str(folder)!r} is an incomplete checkpoint: {problems[0]} (expected a committed one)")


def load(
    path_or_url: str,
    device: str = "cpu",
    dtype: str = "auto",
    cache_dir: Path | None = None,
    storage_options: dict[str, str] | None = None,
):
    """(model, tokenizer) from a checkpoint folder, run folder or URL; the model in eval mode on `device`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import MonetaConfig  # noqa: F401  (registers "moneta" with the Auto classes)
    from .checkpoint.resolve import CheckpointNotFound, FetchFailed, cache_folder, resolve_checkpoint

    try:
        folder = resolve_checkpoint(path_or_url, cache_folder(path_or_url, cache_dir), storage_options)
    except CheckpointNotFound as error:
        raise GenerateError(str(error)) from None
    except FetchFailed as error:
        raise RemoteError(str(error)) from None
    verify_weights(folder)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    if torch_dtype is None:  # auto: bf16 where the GPU has it, fp32 elsewhere
        cuda_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        torch_dtype = torch.bfloat16 if cuda_bf16 else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as error:  # transformers raises OSError, ValueError or hub errors depending on the miss
        raise GenerateError(
            f"{str(folder)!r}: no loadable tokenizer ({type(error).__name__}); checkpoints written by miras "
            "train include one"
        ) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    except (OSError, ValueError) as error:
        raise GenerateError(f"{str(folder)!r}: cannot load the model ({str(error).splitlines()[0]})") from None
    return model.to(device).eval(), tokenizer


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GenerateError(f"--device {name}: no CUDA device is visible (accepted here: auto, cpu)")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise GenerateError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                            f"(accepted here: cuda:0 to cuda:{torch.cuda.device_count() - 1})")  # fmt: skip
    if name == "mps" and not torch.backends.mps.is_available():
        raise GenerateError("--device mps: MPS is not available (accepted here: auto, cpu)")
    return name


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, greedy: bool, temperature: float, top_p: float):
    """The prompt followed by its sampled continuation."""
    import torch

    encoded = tokenizer(prompt, return_tensors="pt") if prompt else None
    if encoded is None or encoded["input_ids"].shape[1] == 0:  # an empty prompt starts from the start token
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = torch.tensor([[start]])
        encoded = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        skip = 1
    else:
        skip = 0
    device = next(model.parameters()).device
    inputs = {"input_ids": encoded["input_ids"].to(device), "attention_mask": encoded["attention_mask"].to(device)}
    options = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_p": top_p}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad, **options)
    return tokenizer.decode(output[0, skip:], skip_special_tokens=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise GenerateError(message)


def _device(text: str) -> str:
    if text in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device (expected auto, cpu, cuda, cuda:N or mps)")


def _probability(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not in (0, 1]")
    return value


def storage_options(pairs: list[str]) -> dict[str, str]:
    from .storage import StorageError, parse_options

    try:
        return parse_options(pairs)
    except StorageError as error:
        raise GenerateError(f"--storage-option: {error}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="miras generate", description=__doc__.splitlines()[0].split(": ", 1)[1])
    add = parser.add_argument
    add("checkpoint", metavar="PATH_OR_URL", help="checkpoint folder, run folder, or storage URL of either")
    add("--prompt", default="", help="text to continue (default: empty, start from the start token)")
    add("--max-new-tokens", type=positive_int, default=100)
    add("--temperature", type=positive_float, default=1.0, help="sampling temperature (default 1.0)")
    add("--top-p", type=_probability, default=1.0, help="nucleus sampling mass in (0, 1] (default 1.0: off)")
    add("--greedy", action="store_true", help="take the most likely token (ignores --temperature/--top-p)")
    add("--seed", type=int, default=None, help="for reproducible sampling")
    add("--device", type=_device, default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    add("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 on CUDA, else fp32")
    add("--cache-dir", default=None, help="where URL checkpoints are downloaded (default ~/.cache/miras/checkpoints)")
    add("--storage-option", action="append", default=[], metavar="KEY=VALUE", help="passed to the storage backend")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        device = pick_device(args.device)
        options = storage_options(args.storage_option)
        model, tokenizer = load(
            args.checkpoint, device=device, dtype=args.dtype, cache_dir=args.cache_dir, storage_options=options
        )
        if args.seed is not None:
            from transformers import set_seed

            set_seed(args.seed)
        text = generate_text(
            model, tokenizer, args.prompt, args.max_new_tokens, args.greedy, args.temperature, args.top_p
        )
    except GenerateError as error:
        print(f"miras generate: error: {error} (see --help)", file=sys.stderr)
        return 2
    except RemoteError as error:
        print(f"miras generate: error: {error}", file=sys.stderr)
        return 1
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
