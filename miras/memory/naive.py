"""A plain token-by-token loop with the chunk approximation: the reference the tests compare against.

Nothing here is fast or batched cleverly; each line is one equation of the token-by-token form
(docs/model.md, "Chunks: the dual form"): at a chunk start the anchor W = s(A) * A is frozen; each
token's gradient is taken at that anchor; the accumulators decay and step (A2 only with
rule.update_input); the token reads
M(q; s_anchor * A_t). Masked tokens are skipped entirely (they do not count toward the chunk position).
"""

from __future__ import annotations

import torch

from .rule import RuleConfig, anchor_gradients, gelu, layer_norm, lq_scale


def memory_read(x, w1, w2, gamma, beta, rule: RuleConfig):
    """M(x; W) = x + LN(W1 gelu(W2 x)) for a single vector x (d_h,)."""
    z = w1 @ gelu(w2 @ x)
    u, _, _ = layer_norm(z, gamma, beta, rule.ln_eps)
    return x + u


def naive_memory(q, k, v, eta, log_alpha, a1, a2, gamma, beta, rule: RuleConfig, mask=None):
    """Token loop over (B, H, T, d_h) inputs; a1, a2 (B, H, ...). Returns y, running (a1, a2), anchor (a1, a2)."""
    batch, heads, length, _ = q.shape
    ys = torch.zeros_like(q)
    final_running, final_anchor = [], []
    for bi in range(batch):
        row_running, row_anchor = [], []
        for hi in range(heads):
            acc1, acc2 = a1[bi, hi], a2[bi, hi]
            anchor1, anchor2 = acc1, acc2
            count = 0
            outputs = []
            for t in range(length):
                if mask is not None and not bool(mask[bi, t]):
                    outputs.append(torch.zeros_like(q[bi, hi, t]))
                    continue
                if count % rule.chunk_size == 0:
                    anchor1, anchor2 = acc1, acc2
                    s1, s2 = lq_scale(anchor1, rule), lq_scale(anchor2, rule)
                grads = anchor_gradients(
                    k[bi, hi, t : t + 1], v[bi, hi, t : t + 1], s1 * anchor1, s2 * anchor2, gamma[hi], beta[hi], rule
                )
                gz, act, gh = grads.gz[0], grads.act[0], grads.gh[0]
                alpha, step = log_alpha[bi, hi, t].exp(), eta[bi, hi, t]
                if alpha.dim() == 0:  # per-head gates
                    acc1 = alpha * acc1 - step * torch.outer(gz, act)
                    if rule.update_input:
                        acc2 = alpha * acc2 - step * torch.outer(gh, k[bi, hi, t])
                else:  # channel-wise over d_h: rows of A1, columns of A2
                    acc1 = alpha[:, None] * acc1 - torch.outer(step * gz, act)
                    if rule.update_input:
                        acc2 = alpha[None, :] * acc2 - torch.outer(gh, step * k[bi, hi, t])
                count += 1
                outputs.append(memory_read(q[bi, hi, t], s1 * acc1, s2 * acc2, gamma[hi], beta[hi], rule))
            ys[bi, hi] = torch.stack(outputs)
            if count % rule.chunk_size == 0:
                anchor1, anchor2 = acc1, acc2
            row_running.append((acc1, acc2))
            row_anchor.append((anchor1, anchor2))
        final_running.append(row_running)
        final_anchor.append(row_anchor)

    def stack(rows, i):
        return torch.stack([torch.stack([pair[i] for pair in row]) for row in rows])

    return ys, (stack(final_running, 0), stack(final_running, 1)), (stack(final_anchor, 0), stack(final_anchor, 1))
