"""One sequence of a batch cache: a TurboQuantKVCache whose stores are rows of the batch's stores.

A `BatchRow` runs the single cache's own logic (the exact phase, calibration on its own first
`quant_start` tokens and queries, sinks, the fp16 window, sliding-window rings, trim, masks) on row
`index` of the batch's `RaggedStore`s, so each sequence of a batch is stored exactly as it would be
alone.  `adopt` takes a single cache's state into a batch row (mlx-lm's merge) and `to_single` gives
it back as a TurboQuantKVCache of its own (mlx-lm's extract).
"""

from .cache import TurboQuantKVCache

STORES = ("exact", "sink", "codes", "window")
_NOT_COPIED = (*STORES, "index", "handed", "whole", "qstats")


class BatchRow(TurboQuantKVCache):
    """Row `index` of a batch cache; its stores are `RowStore`s of the batch's RaggedStores."""

    index: int = 0

    @classmethod
    def adopt(cls, single: TurboQuantKVCache, index: int, stores: dict) -> "BatchRow":
        """Row `index` with single's settings, codecs and counters; its tokens are already in `stores`."""
        row = cls.__new__(cls)
        row.__dict__.update({k: v for k, v in single.__dict__.items() if k not in _NOT_COPIED})
        row.qstats = None if single.qstats is None else single.qstats.copy()
        row.handed, row.whole = (None, None), None
        if row.shape is not None:
            row.shape = (1, *row.shape[1:])
        row.index = index
        row.bind(stores)
        return row

    def bind(self, stores: dict):
        """Point this row's stores at row `self.index` of the batch's RaggedStores."""
        for name in STORES:
            setattr(self, name, stores[name].row(self.index, self))

    def to_single(self) -> TurboQuantKVCache:
        """This sequence as a TurboQuantKVCache of its own (exactly sized copies of its stores)."""
        new = TurboQuantKVCache.__new__(TurboQuantKVCache)
        new.__dict__.update({k: v for k, v in self.__dict__.items() if k not in _NOT_COPIED})
        for name in STORES:
            setattr(new, name, getattr(self, name).copy())
        new.qstats = None if self.qstats is None else self.qstats.copy()
        new.handed, new.whole, new.pending = (None, None), None, False
        return new

    def __deepcopy__(self, memo):
        raise TypeError("a BatchRow is copied with its batch (copy.deepcopy of the BatchTurboQuantKVCache)")


def copy_rows(rows, stores: dict):
    """New rows with the same state as `rows`, on `stores` (a copied batch's)."""
    out = []
    for r in rows:
        new = BatchRow.__new__(BatchRow)
        new.__dict__.update({k: v for k, v in r.__dict__.items() if k not in STORES})
        new.qstats = None if r.qstats is None else r.qstats.copy()
        new.bind(stores)
        out.append(new)
    return out
