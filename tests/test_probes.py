"""miras.probes: the recall task's layout and the memory ablation's scope."""

import torch

from miras import MonetaConfig, MonetaForCausalLM
from miras.probes import linear_attention, memory_read_off, recall_batch, train_recall


def test_recall_batch_asks_one_of_the_pairs_after_the_gap_and_labels_only_its_value():
    ids, labels = recall_batch(32, keys=8, pairs=2, generator=torch.Generator().manual_seed(0), gap=6)
    assert ids.shape == (32, 4 + 6 + 2)
    assert (ids[:, 4:10] == 16).all()  # separators
    assert (labels != -100).sum(1).eq(1).all() and (labels[:, -1] == ids[:, -1]).all()
    asked, answer = ids[:, 10], ids[:, 11]
    pairs = ids[:, :4].view(32, 2, 2)
    matches = pairs[:, :, 0] == asked[:, None]
    assert matches.sum(1).eq(1).all() and torch.equal(pairs[:, :, 1][matches], answer)


def test_memory_read_off_changes_only_the_model_it_wraps_and_only_inside_the_block():
    torch.manual_seed(0)
    config = MonetaConfig(vocab_size=17, hidden_size=32, num_hidden_layers=2, num_heads=2, intermediate_size=64)
    model, twin = MonetaForCausalLM(config).eval(), MonetaForCausalLM(config).eval()
    twin.load_state_dict(model.state_dict())
    ids = torch.randint(0, 17, (2, 24))
    with torch.no_grad():
        before = model(ids).logits
        with memory_read_off(model):
            off = model(ids).logits
            untouched = twin(ids).logits
            # Without the memory, a token sees only the conv's reach (3 back per layer): changing
            # the first token leaves the logits from position 7 on unchanged.
            changed = ids.clone()
            changed[:, 0] = (changed[:, 0] + 1) % 17
            torch.testing.assert_close(model(changed).logits[:, 7:], off[:, 7:])
        after = model(ids).logits
    assert not torch.allclose(off, before)
    torch.testing.assert_close(untouched, before)
    torch.testing.assert_close(after, before)


def test_train_recall_stops_when_asked_and_reports_its_curve():
    config = MonetaConfig(vocab_size=17, hidden_size=32, num_hidden_layers=1, num_heads=2, intermediate_size=64)
    result = train_recall(config, steps=60, batch_size=8, stop_at=0.0)
    assert result["steps_run"] == 50 and len(result["curve"]) == 1 and result["chance"] == 1 / 8


def test_linear_attention_reads_the_query_plus_every_earlier_value_weighted_by_its_key_match():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    y, state = linear_attention(q, k, v, eta=None, log_alpha=None, state="kept")
    expected = torch.stack(
        [
            q[:, :, t] + sum((q[:, :, t] * k[:, :, j]).sum(-1, keepdim=True) * v[:, :, j] for j in range(t + 1))
            for t in range(7)
        ],
        dim=2,
    )
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert state == "kept"
