"""Data: read rows (hub, local, bundled), turn them into Examples, tokenize with masking and truncation."""

from __future__ import annotations

from lexfine.config import DataArgs
from lexfine.data.example import Example
from lexfine.errors import DataError


def load_examples(args: DataArgs, seed: int = 0) -> list[Example]:
    from lexfine.data import chat, sjp
    from lexfine.data.sources import read_rows

    fmt = args.format
    if fmt == "sjp":
        return sjp.load_examples(args, seed)
    if fmt == "auto":
        if args.train == sjp.HUB_ID or args.train.startswith("bundled:sjp"):
            return sjp.load_examples(args, seed)
        rows = read_rows(args.train, split=args.split, hub_config=args.hub_config)
        if not rows:
            raise DataError(f"{args.train!r} holds no rows")
        fmt = chat.detect_format(rows[0])
        if fmt == "sjp":
            return sjp.load_examples(args, seed)
    else:
        rows = read_rows(args.train, split=args.split, hub_config=args.hub_config)
    if not rows:
        raise DataError(f"{args.train!r} holds no rows")
    return chat.to_examples(rows, fmt, args, seed)


__all__ = ["Example", "load_examples"]
