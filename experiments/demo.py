"""The whole pipeline on Fashion-MNIST, as a user runs it (``make demo``).

In the working folder ``demo/`` it runs, as separate commands:

    nas-train   (the CPU demo recipe: V2 demo space, 32x32, 3 epochs)
    nas-build-lut --device local-cpu --validate 20
    nas-search --device local-cpu --latency <budget>ms --max-params <budget>
    nas-extract subnet.json

and prints a summary. Every step reuses finished work, so a second run takes well under a minute.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TRAIN = ["nas-train", "--space", "efficientformer_v2_demo", "--dataset", "fashion-mnist", "--resolution", "32",
         "--epochs", "3", "--num-random", "1", "--threads", "2", "--out", "runs/fmnist"]


def run(cmd: list[str], cwd: Path, timings: dict[str, float], label: str) -> None:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    rc = subprocess.call(cmd, cwd=cwd, env=env)
    timings[label] = time.perf_counter() - t0
    if rc != 0:
        sys.exit(f"demo: `{shlex.join(cmd)}` failed with exit code {rc}")


def choose_budgets(work: Path, resolution: int) -> tuple[str, str]:
    """A latency budget halfway between the space's smallest and largest subnets, and a matching params budget."""
    sys.path.insert(0, str(ROOT))
    from latency import LatencyTable, predict_latency
    from latency.lut import default_lut_path
    from search_spaces import count_params, lower
    from supernet.run import find_latest_run, load_run

    run_info = load_run(find_latest_run(work))
    lut = LatencyTable.load(default_lut_path("local-cpu", resolution, work))
    space = run_info.space
    lo, hi = predict_latency(space.smallest(), lut), predict_latency(space.largest(), lut)
    p_hi = count_params(lower(space.largest(), resolution=resolution, num_classes=run_info.num_classes,
                              in_chans=run_info.in_chans))
    return f"{lo + 0.5 * (hi - lo):.3f}ms", f"{int(0.8 * p_hi / 1000)}K"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "demo"), help="working folder (default: demo/)")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    run(TRAIN, work, timings, "train")
    run(["nas-build-lut", "--device", "local-cpu", "--validate", "20"], work, timings, "build-lut")
    latency, params = choose_budgets(work, 32)
    # --device: the budget comes from the local-cpu LUT, whatever other LUTs the folder holds
    run(["nas-search", "--device", "local-cpu", "--latency", latency, "--max-params", params], work, timings,
        "search")
    sub = json.loads((work / "subnet.json").read_text())
    sys.path.insert(0, str(ROOT))
    from search_spaces.subnet_file import SubnetFile

    arch_hash = SubnetFile.from_dict(sub).arch.hash
    extracted = work / "runs" / f"extract-{arch_hash}" / "extract.json"
    if extracted.is_file():
        print(f"\n(reusing {extracted.parent}: already extracted for this subnet.json)")
    else:
        run(["nas-extract", "subnet.json"], work, timings, "extract")
    ex = json.loads(extracted.read_text())["metrics"]
    trained = json.loads((work / "runs" / "fmnist" / "supernet.json").read_text())["metrics"]

    print("\n" + "=" * 78)
    print("demo summary")
    print(f"  supernet: val accuracy largest {100 * trained['val_acc_largest']:.2f}%, smallest "
          f"{100 * trained['val_acc_smallest']:.2f}%; test largest {100 * trained['test_acc_largest']:.2f}%")
    print(f"  budgets: local-cpu latency <= {latency}, params <= {params}")
    print(f"  chosen subnet: {SubnetFile.from_dict(sub).arch.to_string()}")
    print(f"  params {ex['params']:,}; val accuracy {100 * ex['val_accuracy_inherited']:.2f}% (inherited weights), "
          f"test accuracy {100 * ex['test_accuracy']:.2f}%")
    lat = ex.get("latency_ms", {}).get("local-cpu", {})
    if "measured" in lat and "lut" in lat:
        print(f"  local-cpu latency: predicted {lat['lut']:.3f} ms ({lat['lut_source']}), measured "
              f"{lat['measured']:.3f} ms (ratio {lat['measured'] / lat['lut']:.2f})")
    print(f"  files: {work}/runs/fmnist (supernet), {work}/lut-local-cpu-32.json (+ validation.json), "
          f"{work}/runs/search (pareto.csv/png/html), {work}/subnet.json, {extracted.parent} (model.*)")
    print("  step times: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
          + f"; total {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
