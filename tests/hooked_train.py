"""`miras train` with the tests' hooks attached: what each rank read and logged, its final weights, the live
model's logits at each checkpoint, the gradients of one step, a poisoned loss.

    python -m tests.hooked_train [--record DIR] [--nan-at-step N] [--gradients-at-step N] -- TRAIN ARGS...

(also under torchrun: `torchrun ... -m tests.hooked_train ...`; the repository root must be importable, e.g.
PYTHONPATH). With --record, each rank writes DIR/rank{r}.json (its world size, the first 16 tokens of every
row it read, the loss of every logged row) and DIR/weights_rank{r}.pt; rank 0 writes DIR/logits_step{N}.pt
before each checkpoint; --gradients-at-step writes DIR/gradients_rank{r}.pt; once the run has returned, each rank
writes DIR/exit_rank{r}.json (how many FSDP2-wrapped modules it left alive)."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch

from miras.parallel import is_sharded, reshard
from miras.train import main
from miras.train.hooks import Hooks

PROBE = torch.arange(96)  # the token ids whose logits are compared with the checkpoint's


class Recorder(Hooks):
    def __init__(self, directory: Path | None = None, nan_at_step: int = 0, gradients_at_step: int = 0):
        self.directory, self.nan_at_step, self.gradients_at_step = directory, nan_at_step, gradients_at_step
        self.record: dict = {}

    def on_start(self, rank, world_size):
        self.record = {"rank": rank, "world_size": world_size, "rows": [], "losses": []}

    def on_batch(self, batch):
        self.record["rows"].extend(row[:16] for row in batch["input_ids"].tolist())

    def on_loss(self, step, loss):
        return loss * float("nan") if step == self.nan_at_step else loss

    def on_gradients(self, step, model):
        if step == self.gradients_at_step and self.directory is not None:
            grads = {name: p.grad.detach().float().cpu().clone() for name, p in model.named_parameters()
                     if p.grad is not None}  # fmt: skip
            self._save(grads, f"gradients_rank{self.record['rank']}.pt")

    def on_log(self, row):
        self.record["losses"].append(row["loss"])

    @torch.no_grad()
    def on_checkpoint(self, step, model):
        if self.directory is None:
            return
        probe = PROBE.remainder(model.config.vocab_size).unsqueeze(0).to(next(model.parameters()).device)
        was_training = model.training
        model.eval()
        logits = model(probe).logits.float().cpu()
        reshard(model)
        model.train(was_training)
        if self.record["rank"] == 0:
            self._save(logits, f"logits_step{step}.pt")

    def on_end(self, model):
        if self.directory is None:
            return
        from miras.checkpoint.trainer_state import full_model_state

        self.record["sharded"] = is_sharded(model)
        # Replicated (DDP): each rank's own copy, to compare ranks. Sharded: the gathered whole, on rank 0.
        if is_sharded(model):
            state = full_model_state(model)
        else:
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if state:
            self._save({k: v.float() for k, v in state.items()}, f"weights_rank{self.record['rank']}.pt")
        (self.directory / f"rank{self.record['rank']}.json").write_text(json.dumps(self.record))

    def _save(self, value, name: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        torch.save(value, self.directory / name)


def run(argv: list[str]) -> int:
    split = argv.index("--") if "--" in argv else len(argv)
    options, train_args = argv[:split], argv[split + 1 :]
    values = dict(zip(options[::2], options[1::2]))
    unknown = set(values) - {"--record", "--nan-at-step", "--gradients-at-step"}
    if unknown or len(options) % 2:
        raise SystemExit(f"tests.hooked_train: bad options {options} (see the module docstring)")
    recorder = Recorder(
        Path(values["--record"]) if "--record" in values else None,
        int(values.get("--nan-at-step", 0)),
        int(values.get("--gradients-at-step", 0)),
    )
    code = main(train_args, hooks=recorder)
    if recorder.directory is not None and recorder.record:
        from torch.distributed.fsdp import FSDPModule

        # Left alive, a sharded model keeps the process group for the interpreter's exit (miras.train.loop.run).
        alive = sum(1 for o in gc.get_objects() if isinstance(o, FSDPModule))
        exit_record = {"fsdp_modules_alive": alive}
        (recorder.directory / f"exit_rank{recorder.record['rank']}.json").write_text(json.dumps(exit_record))
    return code


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
