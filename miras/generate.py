"""`miras generate PATH_OR_URL --prompt "..."`: sample text from a checkpoint.

PATH_OR_URL is a checkpoint folder (`runs/<run>/checkpoints/step_XXXXXXXX`), a run folder or its
`checkpoints/` folder (the checkpoint `latest` names), or a storage URL of either (downloaded through
miras.storage and verified against its manifest first). The folder is an ordinary `from_pretrained`
folder: `import miras` is all AutoModelForCausalLM, AutoTokenizer and `transformers.pipeline` need.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

LATEST_NAME = "latest"
CHECKPOINTS_DIR = "checkpoints"
MANIFEST_NAME = "manifest.json"


class GenerateError(ValueError):
    """A bad argument or an unusable checkpoint: one line naming the value and what is accepted."""


def is_url(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


def is_model_folder(path: Path) -> bool:
    """config.json and weights (a run folder also has a config.json: the training arguments)."""
    weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
    return (path / "config.json").is_file() and weights


def resolve_checkpoint(path: Path) -> Path:
    """The checkpoint folder for a checkpoint, run or checkpoints folder (the one `latest` names)."""
    if path.is_file():
        raise GenerateError(f"{str(path)!r} is a file (expected a checkpoint folder, a run folder or a storage URL)")
    if not path.exists():
        raise GenerateError(
            f"{str(path)!r} does not exist (expected a checkpoint folder, a run folder or a storage URL)"
        )
    if is_model_folder(path):
        return path
    for checkpoints in (path / CHECKPOINTS_DIR, path):
        latest = checkpoints / LATEST_NAME
        if latest.is_file():
            name = latest.read_text().strip()
            if name and is_model_folder(checkpoints / name):
                return checkpoints / name
            raise GenerateError(f"{str(latest)!r} names {name!r}, which is not a checkpoint folder here")
    raise GenerateError(
        f"{str(path)!r} is not a checkpoint folder (expected a folder with config.json and weights, "
        f"a run folder with checkpoints/{LATEST_NAME}, or a storage URL)"
    )


def verify_weights(folder: Path) -> None:
    """When the folder has a manifest, the files that loading reads must match it (sizes; trainer/ ignored)."""
    if not (folder / MANIFEST_NAME).is_file():
        return
    from .checkpoint import verify_folder

    problems = [p for p in verify_folder(folder, check_hashes=False) if not p.startswith("trainer/")]
    if problems:
        raise GenerateError(f"{str(folder)!r} is an incomplete checkpoint: {problems[0]} (expected a committed one)")


def download(url: str, cache_dir: Path | None) -> Path:
    """A storage URL -> a verified local checkpoint folder (through miras.storage)."""
    try:
        from .storage import sync as storage_sync
    except ImportError:
        raise GenerateError(
            f"{url!r}: this install has no checkpoint download (miras.storage.sync); copy the folder locally"
        ) from None
    from .storage import StorageError

    target = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "miras" / "checkpoints"
    try:
        local = storage_sync.fetch_checkpoint(url, target)
    except (StorageError, OSError, ValueError) as error:
        raise GenerateError(f"{url!r}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    return Path(local)


def load(path_or_url: str, device: str = "cpu", dtype: str = "auto", cache_dir: Path | None = None):
    """(model, tokenizer) from a checkpoint folder, run folder or URL; the model in eval mode on `device`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import MonetaConfig  # noqa: F401  (registers "moneta" with the Auto classes)

    folder = download(path_or_url, cache_dir) if is_url(path_or_url) else Path(path_or_url.removeprefix("file://"))
    folder = resolve_checkpoint(folder)
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer (expected an integer >= 1)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive (expected an integer >= 1)")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (expected a number > 0)") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number > 0")
    return value


def _probability(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not in (0, 1]")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="miras generate", description=__doc__.splitlines()[0].split(": ", 1)[1])
    add = parser.add_argument
    add("checkpoint", metavar="PATH_OR_URL", help="checkpoint folder, run folder, or storage URL of either")
    add("--prompt", default="", help="text to continue (default: empty, start from the start token)")
    add("--max-new-tokens", type=_positive_int, default=100)
    add("--temperature", type=_positive_float, default=1.0, help="sampling temperature (default 1.0)")
    add("--top-p", type=_probability, default=1.0, help="nucleus sampling mass in (0, 1] (default 1.0: off)")
    add("--greedy", action="store_true", help="take the most likely token (ignores --temperature/--top-p)")
    add("--seed", type=int, default=None, help="for reproducible sampling")
    add("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    add("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 on CUDA, else fp32")
    add("--cache-dir", default=None, help="where URL checkpoints are downloaded (default ~/.cache/miras/checkpoints)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        device = pick_device(args.device)
        model, tokenizer = load(args.checkpoint, device=device, dtype=args.dtype, cache_dir=args.cache_dir)
        if args.seed is not None:
            from transformers import set_seed

            set_seed(args.seed)
        text = generate_text(
            model, tokenizer, args.prompt, args.max_new_tokens, args.greedy, args.temperature, args.top_p
        )
    except GenerateError as error:
        print(f"miras generate: error: {error} (see --help)", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
