"""A decode step's update of a batch cache: one new token per row, stored for all rows at once.

Each row follows TurboQuantKVCache's own rules for one token (`cache._store` with n = 1, the
sliding-window rings), decided on the host from its counts: a row not calibrated yet keeps the
token exact; a calibrated one puts it into its fp16 sink while that has room, else into its fp16
window (whose oldest token is then encoded into codes), or straight into codes without a window.
The writes are then batched: at most one gather (the windows' oldest tokens), one encode (the
batch's stacked codecs) and one in-place scatter per stored array, whatever the batch size; rows
that write nothing to a store send their value to a slot nobody reads (RoPE-centred keys: each row's
token less its own mean turned to its own position, made on the host).  No host sync.
"""

import mlx.core as mx

from .rope_mean import at


def _prepare_rows(batch, keys, values):
    """Per-row bookkeeping before storing (as TurboQuantKVCache._append): what may move tokens, counters."""
    H, dk, dv = batch.shape
    for r in batch.rows:
        if r.pending and not r.calibrated:  # a layer that attends by itself (as the single cache)
            r.prepare_attention(None, 0)
        if r.shape is None:
            r.shape = (1, H, dk, dv)
        if r.max_size is not None and not r._rings_full(1):
            r._drop_front(r.held() + 1 - r.max_size)  # a row-level copy, only while a window fills
        r.offset += 1
        r.dtype = keys.dtype
        r.pending = True


def _plan(batch):
    """Where each row's token goes: {store: slots (or None: that row writes nothing there)} and, per row,
    the window slot whose token moves to codes (None: the codes get nothing, or the new token)."""
    st = batch.stores
    slots = {n: [None] * batch.batch for n in st}
    oldest = [None] * batch.batch
    for b, r in enumerate(batch.rows):
        if not r.calibrated:
            slots["exact"][b] = st["exact"].plan_append(b)
            continue
        room = r.config.fp_sink - r.sink.length if r._keeps_front else 0
        R = r.window_size
        if room > 0:
            slots["sink"][b] = st["sink"].plan_append(b)
        elif R == 0:
            slots["codes"][b] = st["codes"].plan_append(b)
        elif r.window.length == R:  # the oldest window token goes to codes, the new one takes its slot
            oldest[b] = r.window.ring[1] + r.window.start
            slots["codes"][b] = st["codes"].plan_append(b)
            slots["window"][b] = st["window"].plan_append(b)
        else:
            slots["window"][b] = st["window"].plan_append(b)
    return slots, oldest


def _code_positions(batch, code_slots) -> list:
    """The position of the token each row sends to its codes (RoPE-centred keys: after its sinks and the tokens
    encoded before), counted as encoded; rows that send none get their next one (their codes go unread)."""
    out = []
    for r, slot in zip(batch.rows, code_slots):
        out.append(r.next_position)
        r.encoded += slot is not None
    return out


def store_step(batch, keys, values):
    """keys, values (B, H, 1, d): each row's new token into its exact store, sink, window or codes."""
    _prepare_rows(batch, keys, values)
    st = batch.stores
    slots, oldest = _plan(batch)

    def filled(name):
        return [s if s is not None else st[name].spare(b) for b, s in enumerate(slots[name])]

    half = {"k": keys.astype(mx.float16), "v": values.astype(mx.float16)}
    if any(s is not None for s in slots["codes"]):
        if any(o is not None for o in oldest):  # gather before the window is written
            src = st["window"].gather([0 if o is None else o for o in oldest])
        else:
            src = {"k": keys, "v": values}
        ck, cv = batch.codecs()
        ck = at(ck, _code_positions(batch, slots["codes"]))
        enc = {f"k_{n}": a for n, a in ck.encode(src["k"]).items()}
        enc.update({f"v_{n}": a for n, a in cv.encode(src["v"]).items()})
        st["codes"].write(enc, filled("codes"))
    if any(s is not None for s in slots["window"]):
        st["window"].write(half, filled("window"))
    if any(s is not None for s in slots["sink"]):
        st["sink"].write(half, filled("sink"))
    if any(s is not None for s in slots["exact"]):
        st["exact"].write({"k": keys, "v": values}, filled("exact"))
