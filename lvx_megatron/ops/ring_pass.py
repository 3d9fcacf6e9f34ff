"""The one loop every ring strategy runs.

Each rank owns one block of travelling inputs (the *payload*: query rows for the query ring,
key/value rows for the KV ring). At step ``t`` rank ``r`` works on the payload of rank
``j = (r - t) mod n``. While it computes, the payload of step ``t + 1`` is already in flight.

Some strategies also carry an accumulator with the payload (the running output and LSE of a
query block, or the running dK/dV of a key/value block). Rank ``r`` receives the carry of block
``j`` from the previous rank, folds in its own contribution and sends it on. After ``n`` steps
the carry has visited every rank and its last hop lands on the block's owner, so every rank
ends holding the finished carry of its own block, whatever the parity of ``n``.
"""

from collections.abc import Callable, Sequence

from torch import Tensor

from .ring import PendingExchange, Ring, TensorSpec

SpecsFn = Callable[[int], list[TensorSpec]]


def ring_pass(
    ring: Ring,
    payload: Sequence[Tensor],
    payload_specs: SpecsFn,
    compute: Callable[[int, list[Tensor]], list[Tensor] | None],
    combine: Callable[[list[Tensor], list[Tensor]], list[Tensor]] | None = None,
    carry_specs: SpecsFn | None = None,
) -> list[Tensor] | None:
    """Run ``compute`` on every rank's payload, one ring step each.

    Args:
        ring: the ring.
        payload: this rank's travelling tensors.
        payload_specs: shapes/dtypes of rank ``j``'s payload (blocks may differ in size).
        compute: ``compute(j, payload_j)``; returns this rank's contribution to block ``j``'s
            carry, or None for strategies without a carry (it then accumulates locally).
        combine: ``combine(carry_in, contribution) -> carry_out``; None for no carry.
        carry_specs: shapes/dtypes of rank ``j``'s carry.

    Returns:
        The finished carry of this rank's own block, or None without a carry.
    """
    if (combine is None) != (carry_specs is None):
        raise ValueError("combine and carry_specs must be given together")
    n, r = ring.world_size, ring.rank
    current = list(payload)
    carry_in: PendingExchange | None = None
    carry: list[Tensor] | None = None
    for t in range(n):
        j = (r - t) % n
        next_payload = None
        if t + 1 < n:
            next_payload = ring.exchange("payload", current, payload_specs((j - 1) % n))
        contribution = compute(j, current)
        if combine is not None:
            carry = contribution if carry_in is None else combine(carry_in.wait(), contribution)
            # After the last step this hop delivers block (r + 1)'s carry to its owner, and
            # this rank receives its own block's carry from the previous rank.
            carry_in = ring.exchange("carry", carry, carry_specs((j - 1) % n))
        if next_payload is not None:
            current = next_payload.wait()
    return None if carry_in is None else carry_in.wait()
