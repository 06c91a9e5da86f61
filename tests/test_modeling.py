"""MonetaForCausalLM: decoding, segments, padding, save/load, training stability, config checks."""

import copy
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from miras import MonetaCache, MonetaConfig, MonetaForCausalLM, count_parameters
from miras.modeling import CausalDepthwiseConv1d


def tiny_config(**overrides):
    fields = dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_heads=4, intermediate_size=96, chunk_size=8)
    fields.update(overrides)
    return MonetaConfig(**fields)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return MonetaForCausalLM(tiny_config(**overrides)).eval()


def assert_decoding_equals_forward(model, ids, stepper=None, prompt=3):
    """A prefill of `prompt` tokens, then one-token steps through `stepper` (the model itself by default) with its
    cache: every step's logits equal the full forward's at that position."""
    stepper = model if stepper is None else stepper
    with torch.no_grad():
        full = model(ids).logits
        cache = model(ids[:, :prompt], use_cache=True).cache
        steps = [stepper(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(prompt, ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, prompt:], rtol=0, atol=1e-4)


def random_ids(batch, length, seed=1, vocab=101):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "channelwise, read_gain, update_input",
    [(False, None, True), (True, None, True), (False, 0.1, True), (False, 0.1, False)],
)
def test_decoding_with_cache_matches_full_forward_at_every_position(channelwise, read_gain, update_input):
    model = tiny_model(
        channelwise_gates=channelwise, memory_read_gain_init=read_gain, memory_update_input=update_input
    )
    ids = random_ids(2, 37)  # chunk 8: four boundaries and an open chunk
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :3], use_cache=True)
        steps, cache = [out.logits], out.cache
        assert isinstance(cache, MonetaCache)
        for t in range(3, 37):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-4)
    assert cache.get_seq_length() == 37


def test_cache_size_does_not_grow_with_context():
    model = tiny_model()
    with torch.no_grad():
        cache = model(random_ids(1, 9), use_cache=True).cache
        sizes = []
        for t in range(40):
            cache = model(random_ids(1, 1, seed=t), cache=cache, use_cache=True).cache
            sizes.append(sum(s.a1.numel() + s.buffer_k.numel() for s in cache.memory_states))
    assert len(set(sizes)) == 1


def test_generate_greedy_equals_argmax_loop_and_sampling_runs():
    model = tiny_model()
    prompt = random_ids(2, 10)
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=20, do_sample=False)
        ids = prompt
        for _ in range(20):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
        sampled = model.generate(prompt, max_new_tokens=12, do_sample=True, top_k=10)
    assert torch.equal(generated, ids)
    assert sampled.shape == (2, 22)


def test_left_padded_batch_matches_each_sequence_alone():
    model = tiny_model()
    long, short = random_ids(1, 21, seed=3), random_ids(1, 13, seed=4)
    pad = torch.zeros(1, 8, dtype=torch.long)
    batch = torch.cat([long, torch.cat([pad, short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :8] = 0
    with torch.no_grad():
        logits = model(batch, attention_mask=mask).logits
        torch.testing.assert_close(logits[0], model(long).logits[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(logits[1, 8:], model(short).logits[0], rtol=0, atol=1e-5)
        together = model.generate(batch, attention_mask=mask, max_new_tokens=15, do_sample=False)
        alone = model.generate(short, max_new_tokens=15, do_sample=False)
    assert torch.equal(together[1, 8:], alone[0])


@pytest.mark.parametrize("split", [5, 8, 19])
def test_segments_with_carried_cache_equal_one_pass(split):
    model = tiny_model().train()
    ids = random_ids(2, 30)
    full = model(ids, labels=ids)
    grads_full = torch.autograd.grad(full.logits.pow(2).mean(), list(model.parameters()))
    first = model(ids[:, :split], use_cache=True)
    second = model(ids[:, split:], cache=first.cache, use_cache=True)
    logits = torch.cat([first.logits, second.logits], 1)
    torch.testing.assert_close(logits, full.logits, rtol=0, atol=1e-5)
    grads_split = torch.autograd.grad(logits.pow(2).mean(), list(model.parameters()))
    for got, want in zip(grads_split, grads_full):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_detach_state_every_changes_gradients_only():
    ids = random_ids(2, 48)
    results = []
    for every in (0, 16):
        model = tiny_model(detach_state_every=every).train()
        embeds = model.model.embed_tokens(ids).detach().requires_grad_()
        out = model(inputs_embeds=embeds)
        (grad,) = torch.autograd.grad(out.logits[:, 32:].pow(2).mean(), [embeds])
        results.append((out.logits.detach(), grad[:, :8].abs().sum()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    assert results[0][1] > 0
    assert results[1][1] == 0  # tokens 0..7 reach loss at 32+ only through the memory state, cut at 16


def test_truncated_bptt_is_on_by_default_and_saved_configs_keep_theirs(tmp_path):
    """A new model cuts the memory's gradient every 1024 tokens (a multiple of its chunk); a config saved with
    full backprop (moneta_v1_tiny's 0, or any explicit value) keeps it, through save and load."""
    import json
    from pathlib import Path

    assert MonetaConfig().detach_state_every == 1024
    assert MonetaConfig(chunk_size=48).detach_state_every == 1008  # rounded down to whole chunks
    assert MonetaConfig(chunk_size=16, detach_state_every=0).detach_state_every == 0
    saved = json.loads((Path(__file__).parent / "data" / "moneta_v1_tiny" / "config.json").read_text())
    assert saved["detach_state_every"] == 0 and MonetaConfig.from_dict(saved).detach_state_every == 0
    tiny_model().config.save_pretrained(tmp_path)
    assert MonetaConfig.from_pretrained(tmp_path).detach_state_every == 1024


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = random_ids(2, 20)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        loss = model(ids, labels=ids).loss
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("read_gain", [None, 0.1])
def test_the_mixer_keeps_for_its_backward_only_its_input_and_the_memory_operands(read_gain):
    """The stretches around the memory (conv, SiLU, norms, gate projection) are recomputed in the backward, so of
    width 3d only the q/k/v projection's output is kept (not the conv's input or output), and of width d only the
    mixer's input and o_proj's input; the gradients are those of the plain forward
    (test_gradient_checkpointing_gives_the_same_gradients: under block checkpointing nothing is recomputed inside).
    """
    model = tiny_model(memory_read_gain_init=read_gain).train()
    mixer = model.model.layers[0].mixer
    batch, length, d = 2, 24, model.config.hidden_size
    x = torch.randn(batch, length, d, requires_grad=True)
    kept = {}  # storage -> the shapes it was saved as
    weights = {p.untyped_storage().data_ptr() for p in mixer.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            kept.setdefault(t.untyped_storage().data_ptr(), set()).add(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mixer(x, None, None).sum().backward()
    rows = [shapes for shapes in kept.values() if shapes & {(batch, length, d), (batch * length, d)}]
    wide = [shapes for shapes in kept.values() if any(s[-1] == 3 * d or 3 * d in s[1:2] for s in shapes)]
    assert wide == [{(batch, length, 3 * d)}], wide  # the projection's output; not the conv's input or output
    assert len(rows) == 2, rows  # x and o_proj's input
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_sharded_save_loads_with_auto_classes(tmp_path):
    model = tiny_model()
    ids = random_ids(2, 19)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "model.safetensors.index.json").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "moneta"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, MonetaForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
        bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
        assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
        logits = bf16(ids).logits
    assert torch.isfinite(logits).all()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_bf16_autocast_training_stays_finite(chunk_size):
    torch.manual_seed(0)
    model = MonetaForCausalLM(tiny_config(chunk_size=chunk_size, num_hidden_layers=1)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        ids = torch.randint(0, 101, (2, 80), generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "field,value,accepted",
    [
        ("p", 0.5, ">= 1"),
        ("q", 1.5, ">= 2"),
        ("chunk_size", 0, "positive integer"),
        ("hidden_size", 66, "multiple of num_heads"),
        ("detach_state_every", 12, "multiple of chunk_size"),
        ("memory_checkpoint_group", -1, "integer >= 0"),
        ("memory_gain_init_spread", 0.5, ">= 1"),
        ("memory_out_init_scale", 0.0, "> 0"),
        ("memory_in_init_scale", -1.0, "> 0"),
        ("memory_read_gain_init", 0.0, "None \\(no read gain\\) or a number > 0"),
        ("memory_read_gain_init_spread", 0.9, ">= 1 \\(1 = every head starts at memory_read_gain_init\\)"),
        ("memory_impl", "cuda", "one of auto, torch, compiled, triton"),
        ("memory_init", "zeros", "'identity' or 'random'"),
        ("lq_norm", "paper", "one of inverse, scale_free"),
        ("memory_update_input", "no", "true or false"),
        ("value_norm", 1, "true or false"),
        ("value_norm_eps", 0.0, "> 0"),
        ("alpha_init_spread", 0.5, ">= 1"),
        ("alpha_init_spread", 2e4, "below 1 / \\(1 - alpha_init\\) = 10000"),
    ],
)
def test_bad_config_values_name_the_field(field, value, accepted):
    with pytest.raises(ValueError, match=rf"MonetaConfig\.{field}=.*{accepted}"):
        tiny_config(**{field: value})


def test_heads_start_at_log_spaced_read_gains_and_write_strengths_in_the_same_order():
    model = tiny_model(memory_gain_init=0.1, memory_gain_init_spread=10.0, eta_max=1.0, eta_init=0.01)
    for block in model.model.layers:
        mixer = block.mixer
        gains = mixer.memory_ln_weight.detach()
        assert torch.equal(gains, gains[:, :1].expand_as(gains))  # one gain per head
        torch.testing.assert_close(gains[:, 0], torch.tensor([0.01, 0.1 / 10 ** (1 / 3), 0.1 * 10 ** (1 / 3), 1.0]))
        etas = torch.sigmoid(mixer.eta_alpha_proj.bias[: mixer.num_heads].detach())
        torch.testing.assert_close(etas, torch.tensor([0.001, 0.01 / 10 ** (1 / 3), 0.01 * 10 ** (1 / 3), 0.1]))
    flat = tiny_model(memory_gain_init=0.3162, memory_gain_init_spread=1.0).model.layers[0].mixer.memory_ln_weight
    assert torch.all(flat == flat.new_tensor(0.3162))  # spread 1: every head at memory_gain_init
    default = tiny_model().model.layers[0].mixer  # the defaults: memory at full gain, reads 0.01-0.1, etas 0.03-1.5
    assert torch.all(default.memory_ln_weight == 1.0)
    torch.testing.assert_close(
        default.memory_read_gain.detach(), 0.03 * 3.162 ** torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0])
    )
    etas = 3.0 * torch.sigmoid(default.eta_alpha_proj.bias[: default.num_heads].detach())
    torch.testing.assert_close(etas, torch.tensor([0.03, 0.3 / 10 ** (1 / 3), 0.3 * 10 ** (1 / 3), 1.5]))
    assert tiny_model(memory_read_gain_init=None).model.layers[0].mixer.memory_read_gain is None
    parted = tiny_model(memory_read_gain_init=0.1, memory_read_gain_init_spread=1.0)
    assert torch.all(parted.model.layers[0].mixer.memory_ln_weight == 1.0)
    assert torch.all(parted.model.layers[0].mixer.memory_read_gain == 0.1)
    spread = tiny_model(memory_read_gain_init=0.1, memory_read_gain_init_spread=10.0)
    for block in spread.model.layers:  # weakest read on the weakest writer, as the gains and etas above
        torch.testing.assert_close(
            block.mixer.memory_read_gain.detach(), torch.tensor([0.01, 0.1 / 10 ** (1 / 3), 0.1 * 10 ** (1 / 3), 1.0])
        )


def mixer_reads(model, ids):
    """Each mixer's query and read (what goes into its output norm) for one forward pass."""
    captured = []
    hooks = [
        block.mixer.out_norm.register_forward_pre_hook(lambda module, args: captured.append(args[0].transpose(1, 2)))
        for block in model.model.layers
    ]
    queries = []
    for block in model.model.layers:
        original = block.mixer.read_memory

        def spy(q, *args, _original=original, **kwargs):
            queries.append(q)
            return _original(q, *args, **kwargs)

        block.mixer.read_memory = spy
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return queries, captured


def test_the_read_gain_scales_what_the_memory_adds_to_the_query_and_nothing_else():
    """q + r (M(q) - q): r = 1 is the model without a read gain (None, as saved before it existed), r = 0.25
    a quarter of the same memory's contribution, with the writes (the states after the segment) unchanged."""
    ids = random_ids(2, 21)
    one_gain = dict(memory_read_gain_init_spread=1.0)
    none, one, quarter = (tiny_model(memory_read_gain_init=r, **one_gain) for r in (None, 1.0, 0.25))
    assert none.model.layers[0].mixer.memory_read_gain is None
    assert "model.layers.0.mixer.memory_read_gain" not in none.state_dict()
    one.load_state_dict(none.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(one(ids).logits, none(ids).logits, rtol=0, atol=0)
    # The first layer sees the same input in both models, so its reads compare directly.
    (q_none, *_), (y_none, *_) = mixer_reads(none, ids)
    (q_quarter, *_), (y_quarter, *_) = mixer_reads(quarter, ids)
    torch.testing.assert_close(q_quarter, q_none, rtol=0, atol=0)
    torch.testing.assert_close(y_quarter - q_quarter, 0.25 * (y_none - q_none), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        states = [m(ids[:, :16], use_cache=True).cache.memory_states[0] for m in (none, quarter)]
    for field in ("a1", "a2"):
        torch.testing.assert_close(getattr(states[1], field), getattr(states[0], field), rtol=0, atol=0)
    # The gain learns like any other parameter.
    quarter.train()
    quarter(ids, labels=ids).loss.backward()
    assert all(block.mixer.memory_read_gain.grad.abs().min() > 0 for block in quarter.model.layers)


def test_forgetting_rates_spread_the_other_way_round_so_the_strongest_writers_keep_longest():
    model = tiny_model(alpha_init=0.99, alpha_init_spread=10.0)
    for block in model.model.layers:
        mixer = block.mixer
        alphas = torch.sigmoid(mixer.eta_alpha_proj.bias[mixer.num_heads :].detach().double())
        expected = 1 - 0.01 * torch.tensor([10.0, 10 ** (1 / 3), 10 ** (-1 / 3), 0.1], dtype=torch.float64)
        torch.testing.assert_close(alphas, expected, rtol=0, atol=1e-6)
        etas = mixer.eta_alpha_proj.bias[: mixer.num_heads].detach()
        assert torch.all(etas[1:] >= etas[:-1]) and etas[-1] > etas[0]  # slowest to forget: the strongest writer
    flat = tiny_model(alpha_init=0.99).model.layers[0].mixer.eta_alpha_proj.bias[4:].detach()
    assert torch.all(flat == flat.new_tensor(math.log(0.99 / 0.01)))  # spread 1: every head at alpha_init
    default = tiny_model().model.layers[0].mixer.eta_alpha_proj.bias[4:].detach().double()
    torch.testing.assert_close(torch.sigmoid(default), torch.full_like(default, 0.9999), rtol=0, atol=1e-7)


def test_spread_across_layers_runs_one_range_over_every_head_in_layer_order():
    model = tiny_model(
        spread_across_layers=True, memory_gain_init=0.1, memory_gain_init_spread=10.0, eta_max=1.0, eta_init=0.01
    )
    mixers = [block.mixer for block in model.model.layers]
    gains = torch.cat([m.memory_ln_weight.detach()[:, 0] for m in mixers])
    etas = torch.cat([torch.sigmoid(m.eta_alpha_proj.bias[: m.num_heads].detach()) for m in mixers])
    exponents = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64)  # 2 layers x 4 heads, one log-spaced range
    torch.testing.assert_close(gains, (0.1 * 10.0**exponents).float())
    torch.testing.assert_close(etas, (0.01 * 10.0**exponents).float())


@pytest.mark.parametrize("width,head_dim", [(128, 32), (64, 32), (96, 32)])
def test_identity_initial_memory_passes_its_input_through_the_hidden_layer(width, head_dim):
    from miras.modeling import identity_memory

    a1, a2 = identity_memory(3, head_dim, width, q=4.0)
    x = torch.randn(7, head_dim)
    z = torch.einsum("hdm,hnm->hnd", a1, torch.nn.functional.gelu(torch.einsum("hmd,nd->hnm", a2, x)))
    scale = z.norm(dim=-1, keepdim=True) / x.norm(dim=-1, keepdim=True)  # one positive factor per head
    torch.testing.assert_close(z, scale * x, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scale, scale[:, :1].expand_as(scale))
    for acc in (a1, a2):  # ||A_0||_4 = 1, so W_0 = A_0
        torch.testing.assert_close(acc.abs().pow(4).sum(dim=(1, 2)), torch.ones(3))
    assert not torch.allclose(a2[0], a2[1])  # each head draws its own basis


def test_identity_initial_read_is_the_query_whatever_the_gain():
    """M_0(q) = q + LN(q): with no writes (eta ~ 0) the read points along the centred query."""
    model = tiny_model(
        memory_init="identity", memory_gain_init=1.0, memory_gain_init_spread=1.0, eta_init=1e-9, eta_max=1e-6
    )
    mixer = model.model.layers[0].mixer
    captured = {}

    def spy(q, k, v, eta, log_alpha, state, mask, decoding, keep=False):
        y, new_state = type(mixer).read_memory(mixer, q, k, v, eta, log_alpha, state, mask, decoding, keep)
        captured.update(q=q, y=y)
        return y, new_state

    mixer.read_memory = spy
    with torch.no_grad():
        model(random_ids(2, 12))
    q, y = captured["q"], captured["y"]
    read = y - q  # gain 1, bias 0: LN of z = c q, the centred query at unit variance
    centred = q - q.mean(-1, keepdim=True)
    cosine = torch.nn.functional.cosine_similarity(read, centred, dim=-1)
    assert cosine.min() > 0.999, cosine.min()
    torch.testing.assert_close(read.pow(2).mean(-1), torch.ones_like(cosine), rtol=2e-2, atol=0)


def test_memory_out_init_scale_scales_only_the_output_matrix_and_the_inverse_normaliser_cancels_it():
    ids = random_ids(2, 20)
    base, scaled = tiny_model(), tiny_model(memory_out_init_scale=0.3)
    for block, other in zip(base.model.layers, scaled.model.layers):
        torch.testing.assert_close(other.mixer.memory_a1, 0.3 * block.mixer.memory_a1)
        assert torch.equal(other.mixer.memory_a2, block.mixer.memory_a2)
    # q = 4, the paper's normaliser: W1 = A1 / ||A1||_4^2 scales by 1 / c and the LayerNorm'd read is blind
    # to that; the writes are not quite (the gradient through the LayerNorm carries its gain), so only with weak writes
    # and small gains do the logits agree, to ~1e-7 (with the defaults they differ by ~0.1).
    weak = dict(memory_gain_init=0.1, memory_gain_init_spread=1.0, eta_max=1.0, eta_init=0.01)
    base4 = tiny_model(memory_ln_eps=1e-14, lq_norm="inverse", **weak).double()
    scaled4 = copy.deepcopy(base4)
    with torch.no_grad():
        for block in scaled4.model.layers:
            block.mixer.memory_a1.mul_(0.3)
    torch.testing.assert_close(scaled4(ids).logits, base4(ids).logits, atol=1e-5, rtol=0)
    # q = 2 (W = A) and the scale-free normaliser (W = s(A) A, s unchanged by a scale): the initial read is
    # smaller next to the writes and the outputs differ.
    for options in (dict(q=2), dict(lq_norm="scale_free")):
        base2 = tiny_model(eta_init=0.5, **options)
        scaled2 = tiny_model(eta_init=0.5, memory_out_init_scale=0.3, **options)
        assert (scaled2(ids).logits - base2(ids).logits).abs().max() > 1e-3, options


def test_memory_in_init_scale_scales_only_the_input_matrix_in_either_initial_memory():
    for memory_init in ("random", "identity"):
        base = tiny_model(memory_init=memory_init)
        scaled = tiny_model(memory_init=memory_init, memory_in_init_scale=0.3)
        for block, other in zip(base.model.layers, scaled.model.layers):
            torch.testing.assert_close(other.mixer.memory_a2, 0.3 * block.mixer.memory_a2)
            assert torch.equal(other.mixer.memory_a1, block.mixer.memory_a1)
    # The scale-free normaliser keeps the scale: W2_0 is 0.3 times as large, so the first reads differ.
    ids = random_ids(2, 20)
    base, scaled = tiny_model(lq_norm="scale_free"), tiny_model(lq_norm="scale_free", memory_in_init_scale=0.3)
    assert (scaled(ids).logits - base(ids).logits).abs().max() > 1e-3


def test_unknown_size_lists_the_sizes():
    with pytest.raises(ValueError, match="unknown model size 'xxl'.*xs, s, m, l"):
        MonetaConfig.from_size("xxl")


def test_parameter_counts_are_in_the_papers_ranges():
    millions = {size: count_parameters(MonetaConfig.from_size(size, vocab_size=32000))["total"] / 1e6 for size in "sml"}
    assert 120 <= millions["s"] <= 170
    assert 340 <= millions["m"] <= 420
    assert 760 <= millions["l"] <= 870


def test_checkpoint_saved_before_the_current_defaults_loads_and_gives_the_same_logits():
    """tests/data/moneta_v1_tiny was saved by the first released model (memory defaults of version 1).

    Defaults have changed since; a saved config.json carries the values it was trained with, and
    fields added later take the value that reproduces the old model when they are absent.
    """
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(__file__).parent / "data" / "moneta_v1_tiny"
    expected = load_file(str(folder / "expected_logits.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)


def test_a_model_saved_before_the_read_gain_defaults_loads_as_it_was_saved(tmp_path):
    """Saved with the previous memory defaults, whose config.json says `memory_read_gain_init: null` and knows
    no read-gain spread: it loads without a read gain, its gains and etas as saved, and the same logits."""
    import json

    before = dict(eta_init=0.5, memory_gain_init=0.3162, memory_gain_init_spread=3.162, memory_read_gain_init=None)
    model = tiny_model(**before)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["memory_read_gain_init_spread"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = MonetaForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.memory_read_gain_init is None and loaded.config.memory_read_gain_init_spread == 1.0
    assert loaded.config.eta_init == 0.5 and loaded.config.memory_gain_init == 0.3162
    assert all(block.mixer.memory_read_gain is None for block in loaded.model.layers)
    ids = random_ids(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_a_scale_free_model_saves_and_loads_as_scale_free(tmp_path):
    """`lq_norm` travels in config.json: a scale-free model comes back scale-free, with the same logits."""
    model = tiny_model(lq_norm="scale_free", chunk_size=4).eval()
    model.save_pretrained(tmp_path)
    loaded = MonetaForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.lq_norm == "scale_free"
    ids = random_ids(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
        # and the normaliser matters here: the same weights read with the paper's normaliser differ
        loaded.config.lq_norm = "inverse"
        other = MonetaForCausalLM(loaded.config)
        other.load_state_dict(loaded.state_dict())
        assert (other.eval()(ids).logits - model(ids).logits).abs().max() > 1e-4


def test_a_model_with_a_fixed_input_matrix_saves_and_loads_as_such(tmp_path):
    """`memory_update_input` travels in config.json; a config.json without it (saved before it existed) reads
    as the paper's memory, both matrices written."""
    import json

    model = tiny_model(memory_update_input=False, chunk_size=4).eval()
    model.save_pretrained(tmp_path)
    loaded = MonetaForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.memory_update_input is False
    assert all(not block.mixer.rule.update_input for block in loaded.model.layers)
    ids = random_ids(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["memory_update_input"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    older = MonetaForCausalLM.from_pretrained(tmp_path).eval()
    assert older.config.memory_update_input is True
    with torch.no_grad():  # the same weights with both matrices written read differently
        assert (older(ids).logits - model(ids).logits).abs().max() > 1e-4


def test_old_checkpoint_keys_map_to_todays_names():
    """moneta_v1_tiny names the mixer's eta/alpha projection `gate_proj`, as the MLP's gate: it loads whole."""
    from pathlib import Path

    folder = Path(__file__).parent / "data" / "moneta_v1_tiny"
    model, info = MonetaForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    names = [name for name, _ in model.named_modules()]
    assert all(".mlp." in name for name in names if name.endswith(".gate_proj")), names
    assert any(name.endswith(".mixer.eta_alpha_proj") for name in names)


def test_generate_from_inputs_embeds_equals_the_token_path():
    model = tiny_model()
    ids = torch.randint(0, 101, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    from_ids = model.generate(input_ids=ids, attention_mask=mask, **options)
    embeds = model.get_input_embeddings()(ids)
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=mask, **options)
    assert torch.equal(from_embeds, from_ids[:, ids.shape[1] :])  # generate returns only the new tokens here
    no_mask = model.generate(inputs_embeds=embeds, **options)
    assert torch.equal(no_mask, from_ids[:, ids.shape[1] :])


def test_the_conv_runs_through_its_module():
    model = tiny_model()
    ids = torch.randint(0, 101, (1, 9))
    calls = []
    conv = model.model.layers[0].mixer.conv
    handle = conv.register_forward_hook(lambda module, args, out: calls.append(out.shape) or out * 0)
    with torch.no_grad():
        hooked = model(ids).logits
    handle.remove()
    with torch.no_grad():
        plain = model(ids).logits
    assert calls and not torch.allclose(hooked, plain)  # the hook saw the call and its output was used


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("length", [4, 9])  # one output step (decoding's product-and-sum), then the shifted sums
@pytest.mark.parametrize("channels_last", [False, True])  # the mixer's input: a (B, C, L) view of (B, L, C)
def test_the_causal_conv_equals_a_depthwise_conv1d(bias, length, channels_last):
    torch.manual_seed(0)
    conv = CausalDepthwiseConv1d(6, 6, 4, groups=6, bias=bias).double()
    reference = torch.nn.Conv1d(6, 6, 4, groups=6, bias=bias).double()
    reference.load_state_dict(conv.state_dict())
    x = torch.randn(2, 6, length, dtype=torch.float64, requires_grad=True)
    if channels_last:
        x = torch.randn(2, length, 6, dtype=torch.float64, requires_grad=True).transpose(1, 2)
    out, expected = conv(x), reference(x)
    assert out.shape == expected.shape == (2, 6, length - 3)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    upstream = torch.randn_like(out)  # every output step its own gradient, so every tap's term shows
    # Deterministic mode fills every torch.empty with NaN: a gradient built in uninitialised memory shows
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = torch.autograd.grad((out * upstream).sum(), (x, conv.weight))
    finally:
        torch.use_deterministic_algorithms(deterministic)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (x, reference.weight))
    torch.testing.assert_close(grads, expected_grads, rtol=0, atol=1e-12)


def test_the_causal_conv_leaves_a_padded_conv_to_the_kernel():
    conv = CausalDepthwiseConv1d(6, 6, 4, groups=6, bias=False, padding=1).double()
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    assert conv(x).shape == (2, 6, 3)  # padding 1 on both sides: 4 + 2 - 3 outputs, not the one-step form's 1


def test_the_pad_token_row_learns_like_any_other():
    config = MonetaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_heads=2, intermediate_size=64,
                          pad_token_id=3)  # fmt: skip
    model = MonetaForCausalLM(config)
    assert model.model.embed_tokens.padding_idx is None
    model(torch.tensor([[3, 4, 3, 5]]), labels=torch.tensor([[3, 4, 3, 5]])).loss.backward()
    assert model.model.embed_tokens.weight.grad[3].abs().sum() > 0


@pytest.mark.parametrize("block_checkpointing", [True, False])
def test_compiled_model_equals_eager_for_a_training_step_and_for_decoding(block_checkpointing):
    """torch.compile(model, fullgraph=True): one graph, no break and no host sync, for a training step with and
    without block checkpointing (forward and the joint backward; without it the mixer recomputes the stretches
    around the memory itself) and for one-token decoding steps across a chunk boundary.

    Backend aot_eager: what can break a graph or sync the host is in the capture (Dynamo, AOTAutograd), which this
    runs in full. The memory runs the torch path: inside a compiled model "auto" would compile its steps with
    Inductor, ~25 CPU seconds of C++ code generation here; that path is checked against eager end to end by
    tests/test_train_checkpoints.py::test_compiled_training_equals_eager_and_resumes_bit_identically and against
    the token loop by tests/memory/test_chunkwise.py::test_compiled_memory_equals_token_loop.
    """
    torch._dynamo.reset()
    model = tiny_model(num_hidden_layers=1, chunk_size=4, memory_impl="torch").train()
    if block_checkpointing:
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids = random_ids(2, 10)  # two full chunks and an open one
    grads = []
    for run in (compiled, model):
        loss = run(ids, labels=ids).loss
        grads.append((loss.detach(), *torch.autograd.grad(loss, list(model.parameters()))))
    for name, c, e in zip(["loss"] + [n for n, _ in model.named_parameters()], *grads):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-6, msg=name)

    model.eval()
    assert_decoding_equals_forward(model, ids, stepper=compiled)


def test_a_model_saved_in_the_papers_form_loads_in_it(tmp_path):
    """The defaults before the memory's form changed (both matrices written, the paper's normaliser, alpha 0.99,
    read gains 0.1-1): config.json names each, so such a model comes back in that form with the same logits
    although today's defaults differ in all four; a file from before `lq_norm` and `memory_update_input`
    existed (which knows neither) reads the same way."""
    import json

    paper = dict(memory_update_input=True, lq_norm="inverse", alpha_init=0.99, memory_read_gain_init=0.3162)
    assert all(getattr(MonetaConfig(), field) != value for field, value in paper.items())
    model = tiny_model(**paper, chunk_size=4).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["lq_norm"], saved["memory_update_input"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = MonetaForCausalLM.from_pretrained(tmp_path).eval()
    assert {field: getattr(loaded.config, field) for field in paper} == paper
    assert all(block.mixer.rule.update_input and block.mixer.rule.lq_norm == "inverse" for block in loaded.model.layers)
    ids = random_ids(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
