"""Check that the CoreML passes a block skips change nothing: every block both ways, byte for byte.

The iPhone bundle converts each block with coremltools' default pipeline minus
``latency.coreml.BLOCK_NOOP_PASSES``. This converts every distinct block of a space's LUT (or every
``--sample``-th) twice, with the full pipeline and with the lean one, in ``--jobs`` worker processes,
and compares the two ``.mlpackage`` folders file by file (all but ``Manifest.json``, whose item ids
are random). A conversion with the same pipeline is byte for byte repeatable, so any difference is
the skipped passes' doing. Prints the blocks that differ, the time of each pipeline and their
ratio, and writes ``experiments/results/coreml_passes.json``; exits with 1 if any block differs.

    python experiments/check_coreml_passes.py [--space efficientformer_v2] [--resolution 32] [--sample 1]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latency._private import build_module, entry_item, worker_init  # noqa: E402
from latency.profiles import get_profile  # noqa: E402
from latency.specs import lut_specs, resolve_setup  # noqa: E402
from search_spaces import get_space  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "coreml_passes.json"


def _both_ways(key: str, batch: int, options: dict[str, str]) -> tuple[str, bool, float, float]:
    """Convert block ``key`` with the full and the lean pipeline: (key, same bytes, seconds full, seconds lean)."""
    from latency.coreml import BLOCK_NOOP_PASSES, convert_coreml, package_files
    from search_spaces.specs import BlockSpec

    item = entry_item(BlockSpec.from_key(key), batch)
    module = build_module(item)
    folder = Path(tempfile.mkdtemp(prefix="passes-"))
    try:
        out = []
        for skip in ((), BLOCK_NOOP_PASSES):
            t0 = time.perf_counter()
            path = convert_coreml(module, item.input_shape, folder / f"{len(out)}.mlpackage",
                                  precision=options["precision"], compute_units=options["compute_units"],
                                  target=options["target"], skip_passes=skip)
            out.append((package_files(path), time.perf_counter() - t0))
        return key, out[0][0] == out[1][0], out[0][1], out[1][1]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default="efficientformer_v2", help="search space (default efficientformer_v2)")
    p.add_argument("--resolution", type=int, default=32, help="input resolution of the LUT (default 32)")
    p.add_argument("--sample", type=int, default=1, help="check every N-th block (default 1: all)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    args = p.parse_args(argv)
    space = get_space(args.space)
    profile = get_profile("iphone12")
    options = {"precision": profile.precision, "compute_units": profile.compute_units,
               "target": profile.minimum_deployment_target}
    specs = lut_specs(space, resolve_setup(space, None, resolution=args.resolution))[::max(1, args.sample)]
    print(f"{args.space} at {args.resolution} px: {len(specs)} blocks, {args.jobs} worker(s)", flush=True)
    t0 = time.perf_counter()
    rows = []
    with ProcessPoolExecutor(args.jobs, initializer=worker_init, initargs=("mlpackage",)) as pool:
        for i, row in enumerate(pool.map(_both_ways, [s.key for s in specs], [profile.batch] * len(specs),
                                         [options] * len(specs), chunksize=4), 1):
            rows.append(row)
            if i % 100 == 0 or i == len(specs):
                print(f"  {i}/{len(specs)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    differ = [key for key, same, _, _ in rows if not same]
    full, lean = sum(r[2] for r in rows), sum(r[3] for r in rows)
    for key in differ:
        print(f"DIFFERS: {key}")
    print(f"{len(rows) - len(differ)} of {len(rows)} blocks byte for byte the same; conversion {full:.1f} s with the "
          f"full pipeline, {lean:.1f} s without the skipped passes (ratio {lean / full:.3f})")
    result = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    result[f"{args.space}@{args.resolution}"] = {
        "date": date.today().isoformat(), "blocks": len(rows), "sample": args.sample, "differ": differ,
        "seconds_full": round(full, 1), "seconds_lean": round(lean, 1), "ratio": round(lean / full, 3)}
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(RESULTS)
    print("PASS" if not differ else "FAIL")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
