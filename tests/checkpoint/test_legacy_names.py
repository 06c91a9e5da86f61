"""Checkpoints saved before the mixer's gate projection was renamed (gate_proj -> eta_alpha_proj) and before
the byte tokenizer had its own pad token still resume: the optimizer state maps to today's parameter names,
and a resumed run keeps its checkpoint's tokenizer (and so its vocabulary size)."""

from types import SimpleNamespace

import torch
import torch.distributed.checkpoint as dcp
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
from transformers import PreTrainedTokenizerFast

from miras import MonetaConfig, MonetaForCausalLM
from miras.checkpoint.trainer_state import OPTIMIZER_DIR, load_optimizer
from miras.tokenizer import END_OF_TEXT, byte_tokenizer
from miras.train.build import build_model_config, resumed_tokenizer


def model_and_optimizer(seed):
    torch.manual_seed(seed)
    config = MonetaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_heads=2, intermediate_size=64)
    model = MonetaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 64, (2, 12))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    return model, optimizer


def test_an_optimizer_state_saved_under_the_old_gate_name_loads(tmp_path):
    model, optimizer = model_and_optimizer(0)
    state = get_optimizer_state_dict(model, optimizer)
    old = {name: name.replace(".mixer.eta_alpha_proj.", ".mixer.gate_proj.") for name in state["state"]}
    assert any(".mixer.gate_proj." in name for name in old.values())
    legacy = {
        "state": {old[name]: value for name, value in state["state"].items()},
        "param_groups": [{**g, "params": [old[n] for n in g["params"]]} for g in state["param_groups"]],
    }
    dcp.save({"optimizer": legacy}, checkpoint_id=str(tmp_path / OPTIMIZER_DIR), no_dist=True)

    fresh, fresh_optimizer = model_and_optimizer(1)
    load_optimizer(fresh, fresh_optimizer, tmp_path)
    loaded = get_optimizer_state_dict(fresh, fresh_optimizer)
    for name, value in state["state"].items():
        for key, tensor in value.items():
            assert torch.equal(loaded["state"][name][key], tensor), (name, key)


def test_a_resumed_run_keeps_the_tokenizer_its_checkpoint_saved(tmp_path):
    old = byte_tokenizer()
    assert len(old) == 258
    # A tokenizer as saved before <|pad|> existed: 257 tokens, pad = end-of-text.
    vocab = {token: index for token, index in old.get_vocab().items() if index < 257}
    legacy_core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    legacy_core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    legacy_core.decoder = decoders.ByteLevel()
    legacy_core.add_special_tokens([END_OF_TEXT])
    legacy = PreTrainedTokenizerFast(tokenizer_object=legacy_core, eos_token=END_OF_TEXT, bos_token=END_OF_TEXT,
                                     pad_token=END_OF_TEXT)  # fmt: skip
    legacy.save_pretrained(tmp_path)
    args = SimpleNamespace(seq_len=48, dry_run=False, model_size="xs", moneta_detach_state_every=0,
                           moneta_checkpoint_group=0, moneta_lq_norm=None, moneta_update_input=None,
                           moneta_alpha_init=None)  # fmt: skip
    kept = resumed_tokenizer(args, tmp_path, byte_tokenizer())
    assert len(kept) == 257 and kept.pad_token_id == kept.eos_token_id == 256
    assert kept.padding_side == "left" and kept.model_max_length == 48
    assert kept("abc")["input_ids"] == byte_tokenizer()("abc")["input_ids"]  # text encodes the same
    assert build_model_config(args, kept).vocab_size == 257
    assert resumed_tokenizer(args, tmp_path / "nothing", old) is old
