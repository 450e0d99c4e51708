"""The native layout with the forward cut to one layer of each kind, against the whole forward watched.

For every zoo row (the decoder types and variants of ``ppzoo.testing.tiny_configs``, the
vision-language tiny configs of ``ppzoo.testing.tiny_vision_configs``) and the real-size configs of
``tests/test_real_size_plans.py``, the layout is discovered twice in this process
(``native.layout._discover``): as ppzoo does (``native.prefix`` may cut the forward), and with the
whole model watched (``prefix.observe`` answering None). One JSON line a row: ``equal`` (the two
``NativeLayout`` objects, or lists of problems, compare equal), ``cut`` (whether the cut was
taken), ``refused``. See docs/benchmarks.md §4.

    python -m benchmarks.prefix_layouts --out /tmp/prefix-layouts.jsonl [NAME ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _names() -> list[str]:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_real_size_plans import MODELS

    from ppzoo.testing.tiny_configs import VARIANTS, decoder_model_types
    from ppzoo.testing.tiny_vision_configs import VISION_TYPES

    return [
        *decoder_model_types(),
        *VARIANTS,
        *(f"vision:{t}" for t in VISION_TYPES),
        *(f"real:{m}" for m in MODELS),
    ]


def _config(name: str):
    if name.startswith("vision:"):
        from ppzoo.testing.tiny_vision_configs import tiny_vision_config

        return tiny_vision_config(name.removeprefix("vision:"))
    if name.startswith("real:"):
        sys.path.insert(0, str(ROOT / "tests"))
        from test_real_size_plans import config_of

        return config_of(name.removeprefix("real:"))
    from ppzoo.testing.tiny_configs import tiny_config

    return tiny_config(name)


def compare(name: str) -> dict:
    """One row: the layout of ``name``'s config with the cut and with the whole model watched."""
    from ppzoo.architectures.native import layout, prefix

    observe, answers = prefix.observe, []

    def spy(*args, **kwargs):
        answers.append(observe(*args, **kwargs))
        return answers[-1]

    start = time.perf_counter()
    row: dict = {"name": name}
    try:
        config = _config(name)
        prefix.observe = spy
        cut = layout._discover(config)
        prefix.observe = lambda *args, **kwargs: None
        whole = layout._discover(config)
        row |= {
            "equal": cut == whole,
            "cut": any(a is not None for a in answers),
            "refused": [p.code for p in whole] if isinstance(whole, list) else False,
        }
        if cut != whole:
            row |= {"with_cut": repr(cut)[:4000], "whole": repr(whole)[:4000]}
    except Exception as exc:  # noqa: BLE001 - a row that cannot be compared says why
        row |= {"equal": None, "error": f"{type(exc).__name__}: {exc}"[:400]}
    finally:
        prefix.observe = observe
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="rows to compare (default: all)")
    parser.add_argument("--out", default=None, help="append the rows here as JSON lines")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    rows = []
    for name in args.names or _names():
        rows.append(compare(name))
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("with_cut", "whole")}), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    equal = sum(r["equal"] is True for r in rows)
    print(f"{equal} of {len(rows)} equal; the cut taken for {sum(r.get('cut', False) for r in rows)}")
    return 0 if equal == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
