"""`python -m fedsafe.supernode`: Flower's SuperNode, run through the two changes fedsafe makes to it.

`fedsafe node` starts the SuperNode this way. The changes themselves, and why, are in the SuperNode
adapter, fedsafe/flower/supernode.py (the only place that patches Flower's SuperNode):

* **Only approved app packages run** (`--fedsafe-allow-app SHA256`, repeatable, as `fedsafe node
  --allow-app` passes it): a run whose app package's content hashes to anything else is refused with an
  error reply before anything of it is stored, installed or run. `--fedsafe-allow-any-app` turns this off.
* **Pace** (`--fedsafe-poll-interval S`): the SuperNode's hard-coded 3 s idle wait between pulls becomes S,
  its 0.5 s wait for the ClientApp's reply 0.1 s; the price is one authenticated pull per node every S
  seconds instead of every 3 s (`fedsafe node --poll-interval 3` restores Flower's pace).

    python -m fedsafe.supernode [--fedsafe-poll-interval 0.5] (--fedsafe-allow-app SHA256 ... |
                                --fedsafe-allow-any-app) <flower-supernode arguments>
"""

from __future__ import annotations

import sys

from fedsafe.flower.supernode import pace, pin_apps

OPTION = "--fedsafe-poll-interval"
ALLOW_APP_OPTION = "--fedsafe-allow-app"
ALLOW_ANY_APP_OPTION = "--fedsafe-allow-any-app"


def _take(args: list[str], option: str, with_value: bool) -> list[str]:
    """Remove every `option` (and its value) from `args`; return the values (or one '' per bare flag)."""
    values = []
    while option in args:
        at = args.index(option)
        values.append(args[at + 1] if with_value else "")
        del args[at:at + (2 if with_value else 1)]
    return values


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    for interval in _take(args, OPTION, with_value=True):
        pace(float(interval))
    allowed = _take(args, ALLOW_APP_OPTION, with_value=True)
    any_app = _take(args, ALLOW_ANY_APP_OPTION, with_value=False)
    if not any_app:
        try:
            pin_apps(allowed)
        except ValueError as err:
            sys.exit(f"fedsafe node: error: {err}")
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *args]
    flower_supernode()


if __name__ == "__main__":
    main()
