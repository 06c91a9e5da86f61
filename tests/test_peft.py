"""PEFT on MONETA: LoRA on `gate_proj` adapts the MLP's gate only, and prompt tuning's cached generation
equals the full recomputation."""

import peft  # miras[test] installs it: missing is a failure, not a skip
import torch

from miras import MonetaConfig, MonetaForCausalLM


def tiny(seed=0):
    torch.manual_seed(seed)
    config = MonetaConfig(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_heads=4, intermediate_size=96,
                          chunk_size=8, initializer_range=0.3)  # fmt: skip  (a wide init: varied greedy tokens)
    return MonetaForCausalLM(config).eval()


def test_lora_on_gate_proj_adapts_only_the_mlp_gate():
    model = peft.get_peft_model(tiny(), peft.LoraConfig(target_modules=["gate_proj"], r=2))
    adapted = [name for name, _ in model.named_modules() if name.endswith(".lora_A")]
    assert adapted == [f"base_model.model.model.layers.{i}.mlp.gate_proj.lora_A" for i in range(2)]


def test_prompt_tuning_cached_generation_equals_recomputing_the_whole_sequence():
    model = tiny()
    tuned = peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)).eval()
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(1))
    cached = tuned.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                            pad_token_id=0)  # fmt: skip
    prompts = tuned.get_prompt(batch_size=2)
    sequence = ids
    with torch.no_grad():
        for _ in range(6):  # greedy by hand: virtual tokens + everything so far, no cache
            embeds = torch.cat([prompts, model.get_input_embeddings()(sequence)], dim=1)
            token = model(inputs_embeds=embeds, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, token], dim=1)
    assert torch.equal(cached, sequence)
    assert len(set(sequence[0, 7:].tolist())) > 1  # not a degenerate repetition
