"""Where a training step spends its time, and how many operators it launches: torch.profiler over forward +
backward + AdamW, for MONETA or the same-size Llama.

The reference shape of bench_model.py (d=256, 4 layers, 4 heads, d_h=64, FFN 688, vocab 4096, MONETA chunk
64), one batch of `--batch x --seq-len` tokens after one warm-up step (which also compiles, with --compile),
fp32 on the CPU. Prints the operators sorted by self CPU time, the share of the step inside MONETA's memory
op, and the operator count per layer per 1K tokens: the leaf operators that compute (ATen ops with no ATen op
inside them, views and allocations left out, plus each fused kernel of a compiled graph and each launch of the
memory's Triton kernels), the proxy for kernel launches on a GPU. The Triton path runs on the CPU under
TRITON_INTERPRET=1 (its kernels' arithmetic in numpy: minutes per step).

  python bench/profile_train_step.py --seq-len 2048 --batch 4 --rows 15
  python bench/profile_train_step.py --model llama --seq-len 8192 --batch 1 --rows 0
  TRITON_INTERPRET=1 python bench/profile_train_step.py --memory-impl triton --seq-len 2048 --batch 4 --rows 0
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import LlamaConfig, LlamaForCausalLM

import miras.modeling as modeling
from miras import MonetaConfig, MonetaForCausalLM
from miras.train.compiling import compile_for_training

SHAPE = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, intermediate_size=688)

# Operators that launch no kernel: views, metadata, allocations (their copies, when any, are their own ops).
NO_KERNEL = {
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::as_strided", "aten::transpose", "aten::t",
    "aten::permute", "aten::expand", "aten::expand_as", "aten::unsqueeze", "aten::squeeze", "aten::slice",
    "aten::select", "aten::unbind", "aten::split", "aten::split_with_sizes", "aten::chunk", "aten::narrow",
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::resize_", "aten::detach", "aten::detach_",
    "aten::alias", "aten::lift_fresh", "aten::movedim", "aten::unflatten", "aten::flatten", "aten::contiguous",
    "aten::result_type", "aten::to", "aten::_to_copy", "aten::set_", "aten::_reshape_alias", "aten::view_as",
    "aten::numpy_T", "aten::matrix_H", "aten::mT", "aten::_has_compatible_shallow_copy_type", "aten::is_nonzero",
    "aten::item", "aten::_local_scalar_dense", "aten::new_empty", "aten::new_empty_strided", "aten::zeros_like",
    "aten::ones_like", "aten::full_like", "aten::_unsafe_split", "aten::unsafe_split", "aten::record_stream",
    "aten::resolve_conj", "aten::resolve_neg", "aten::conj", "aten::_conj",
}  # fmt: skip


# Inductor's kernels, named `graph_<n>_cpp_fused_...` under `enable_kernel_profile` (`cpp_fused_...` in
# older releases), `triton_...` on a GPU.
FUSED_KERNEL = re.compile(r"(graph_\d+_)?(cpp_fused|triton_)")


def is_kernel(event) -> bool:
    """A leaf operator that computes: an ATen op with no ATen op inside, or a compiled graph's fused kernel."""
    name = event.name
    if FUSED_KERNEL.match(name):
        return True
    if not name.startswith("aten::") or name in NO_KERNEL:
        return False
    # A compiled graph's extern kernels (bmm into a preallocated buffer) carry resolve_conj children: an op
    # is a leaf when nothing inside it computes.
    return not any(child.name.startswith("aten::") and child.name not in NO_KERNEL for child in event.cpu_children)


def label_triton_launches() -> None:
    """Each launch of the memory's Triton kernels becomes one `triton_<kernel>` event: one kernel on a GPU.

    Under TRITON_INTERPRET=1 (the CPU) the interpreter runs the kernel's programs with numpy and copies the
    tensors in and out with ATen ops; those copies are the interpreter's, not the GPU's, and the count leaves
    out everything inside a launch (`kernels_of`)."""
    from miras.memory import triton_chunk

    launch = triton_chunk._launch

    def labelled_launch(name, *a, **kw):
        with record_function(f"triton_{name}"):
            return launch(name, *a, **kw)

    triton_chunk._launch = labelled_launch


def kernels_of(events) -> Counter:
    """The kernels among the profile's events: each leaf operator that computes, each fused kernel, and nothing
    inside a fused kernel (a compiled graph's kernel runs as one, a Triton launch under the interpreter runs ATen
    copies that a GPU does not)."""
    counts = Counter()
    for event in events:
        parent, inside = event.cpu_parent, False
        while parent is not None and not inside:
            inside = FUSED_KERNEL.match(parent.name) is not None
            parent = parent.cpu_parent
        if not inside and is_kernel(event):
            counts[event.name] += 1
    return counts


def build(kind: str, chunk_size: int, memory_impl: str):
    if kind == "moneta":
        config = MonetaConfig(**SHAPE, num_heads=4, chunk_size=chunk_size, memory_impl=memory_impl)
        return MonetaForCausalLM(config)
    config = LlamaConfig(
        **SHAPE, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8192,
        tie_word_embeddings=True, attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["moneta", "llama"], default="moneta")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rows", type=int, default=15, help="operators shown (0: none)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--grad-checkpoint", action="store_true", help="block activation checkpointing")
    parser.add_argument("--compile", action="store_true", help="each block through torch.compile (fullgraph)")
    parser.add_argument("--memory-impl", default="auto", help="MONETA: MonetaConfig.memory_impl")
    parser.add_argument("--json", help="append the counts as one JSON line to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.compile:
        torch._inductor.config.cpp.enable_kernel_profile = True  # fused kernels appear in the profile
    model = build(args.model, 64, args.memory_impl)
    if args.grad_checkpoint:
        model.gradient_checkpointing_enable()
    if args.compile:
        for block in model.model.layers:
            compile_for_training(block)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    memory = modeling.chunkwise_memory

    def labelled_memory(*a, **kw):
        with record_function("moneta_memory_op"):
            return memory(*a, **kw)

    modeling.chunkwise_memory = labelled_memory
    if args.memory_impl == "triton":
        label_triton_launches()
    ids = torch.randint(0, SHAPE["vocab_size"], (args.batch, args.seq_len))

    def step():
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up (and compile)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("train_step"):
            step()
    averages = prof.key_averages()
    if args.rows:
        print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    total = next(e for e in averages if e.key == "train_step").cpu_time_total
    in_memory = sum(e.cpu_time_total for e in averages if e.key == "moneta_memory_op")
    kernels = kernels_of(prof.events())
    count = sum(kernels.values())
    layers = SHAPE["num_hidden_layers"]
    per_layer_per_1k = count / layers / (args.batch * args.seq_len / 1024)
    print(f"{args.model} T={args.seq_len} batch {args.batch}: step {total / 1e6:.2f} s under the profiler")
    if args.model == "moneta":
        print(f"memory op forward (incl. its ops): {in_memory / total:.1%} of the step")
    print(f"operators launched: {count} per step, {per_layer_per_1k:.0f} per layer per 1K tokens")
    print("most launched: " + ", ".join(f"{name} {n}" for name, n in kernels.most_common(8)))
    if args.json:
        record = {**{k: v for k, v in vars(args).items() if k != "json"}, "step_s": total / 1e6, "operators": count,
                  "per_layer_per_1k_tokens": per_layer_per_1k, "by_name": dict(kernels.most_common())}  # fmt: skip
        with open(args.json, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
