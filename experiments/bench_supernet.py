"""Supernet vs static training-step time, measured side by side in one run.

For each config (largest, smallest, and an S0-shaped one) one full training step (zero_grad,
forward, cross-entropy, backward, AdamW step) of the supernet at that config is timed against
the same step of ``build_model(config)``, same batch and threads, interleaved round-robin so
drift hits both alike. Prints medians, IQRs and the ratio supernet/static (target <= 1.10) with its
95% bootstrap interval over the rounds (the measurement's own spread), plus the sandwich-rule
training throughput (images/s) of a short real training run.

    python experiments/bench_supernet.py [--threads 2] [--repeats 15] [--json experiments/results/supernet.json]
"""
from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from search_spaces import ArchConfig, BlockConfig, StageConfig, count_params, get_preset, get_space, lower
from search_spaces.fileio import atomic_write_json
from supernet import build_model
from supernet.elastic import Supernet
from supernet.optim import SharedAdamW


def s0_shaped(space_name: str) -> ArchConfig:
    """A mid-sized config of the demo space with S0's pattern: expansions 4/3, attention closing stages 3-4."""
    sp = get_space(space_name)
    return sp.check(ArchConfig(sp.family, (
        StageConfig(16, (BlockConfig("ffn", 4),)),
        StageConfig(24, (BlockConfig("ffn", 4), BlockConfig("ffn", 4))),
        StageConfig(40, (BlockConfig("ffn", 3), BlockConfig("attn", 4))),
        StageConfig(56, (BlockConfig("ffn", 3), BlockConfig("attn", 4))),
    ), sp.stem_stride))


def step_fn(model, forward, x, y, *, optimizer: bool, opt_times: list[float] | None = None):
    """One training step as nas-train runs it: the supernet with its SharedAdamW (which zeroes and
    steps only the regions a step used), a static model with torch's AdamW. Both run torch's fused
    AdamW kernel, so the ratio compares like with like (torch's default on CPU, a loop over
    tensors, is several times slower than the fused kernel and would flatter the supernet)."""
    shared = isinstance(model, Supernet)
    opt = (SharedAdamW(model.parameters(), lr=1e-4) if shared
           else torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True))

    def step() -> None:
        t0 = time.perf_counter()
        if shared:
            opt.zero_grad()
        else:
            opt.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        if optimizer:
            t2 = time.perf_counter()
            opt.step()
            if opt_times is not None:  # the optimizer's own share: zero_grad and step
                opt_times.append(1000 * (t1 - t0 + time.perf_counter() - t2))
    return step


def bench_sandwich(space_name: str, *, resolution: int, in_chans: int, batch: int, repeats: int, num_random: int = 2,
                   stem_stride: int | None = None) -> dict:
    """One sandwich step of the supernet against the sum of its subnets' static steps (same configs and batch)."""
    from supernet.sandwich import sandwich_archs, sandwich_step

    sp = get_space(space_name)
    if stem_stride is not None:
        sp = sp.with_stem_stride(stem_stride)
    torch.manual_seed(0)
    net = Supernet(sp, num_classes=10, resolution=resolution, in_chans=in_chans).to(memory_format=torch.channels_last)
    archs = sandwich_archs(sp, seed=0, step=0, num_random=num_random)
    statics = [build_model(a, num_classes=10, resolution=resolution, in_chans=in_chans)
               .to(memory_format=torch.channels_last).train() for a in archs]
    x = torch.randn(batch, in_chans, resolution, resolution).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    opt = SharedAdamW(net.parameters(), lr=1e-4)
    net.train()

    def sandwich() -> None:
        opt.zero_grad()
        sandwich_step(net, archs, x, y, label_smoothing=0.1, distill=True, bf16=False)
        opt.step()

    static_steps = [step_fn(m, m, x, y, optimizer=True) for m in statics]

    def all_static() -> None:
        for f in static_steps:
            f()

    for f in (sandwich, all_static):
        for _ in range(2):
            f()
    times: dict[str, list[float]] = {"sandwich": [], "statics": []}
    for _ in range(repeats):
        for k, f in (("sandwich", sandwich), ("statics", all_static)):
            t0 = time.perf_counter()
            f()
            times[k].append(1000 * (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"space": space_name, "resolution": resolution, "batch": batch, "configs": [a.to_string() for a in archs],
            "sandwich_ms": med["sandwich"], "sum_of_static_ms": med["statics"],
            "ratio": med["sandwich"] / med["statics"], "ratio_ci95": ratio_ci(times["sandwich"], times["statics"])}


def iqr(v: list[float]) -> float:
    q = statistics.quantiles(v, n=4)
    return q[2] - q[0]


def _interval(ci: list[float]) -> str:
    return f"{ci[0]:.3f}-{ci[1]:.3f}"


def ratio_ci(num: list[float], den: list[float], *, draws: int = 2000, seed: int = 0) -> list[float]:
    """95% bootstrap interval of ``median(num) / median(den)``, resampling the interleaved rounds (pairs).

    The ratio's own spread: on a shared machine two runs minutes apart differ by about 0.05, so a
    ratio next to its target means little without it.
    """
    rng = random.Random(seed)
    n = len(num)
    ratios = []
    for _ in range(draws):
        idx = [rng.randrange(n) for _ in range(n)]
        ratios.append(statistics.median(num[i] for i in idx) / statistics.median(den[i] for i in idx))
    ratios.sort()
    return [ratios[int(0.025 * draws)], ratios[int(0.975 * draws) - 1]]


def bench_pair(space_name: str, arch: ArchConfig, *, resolution: int, in_chans: int, batch: int, repeats: int,
               channels_last: bool) -> dict:
    sp = get_space(space_name).with_stem_stride(arch.stem_stride)
    torch.manual_seed(0)
    net = Supernet(sp, num_classes=10, resolution=resolution, in_chans=in_chans)
    static = build_model(arch, num_classes=10, resolution=resolution, in_chans=in_chans)
    x = torch.randn(batch, in_chans, resolution, resolution)
    y = torch.randint(0, 10, (batch,))
    if channels_last:
        net, static = net.to(memory_format=torch.channels_last), static.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    net.train(), static.train()
    opt_ms: dict[str, list[float]] = {"static": [], "supernet": []}
    steps = {
        "static": step_fn(static, static, x, y, optimizer=True, opt_times=opt_ms["static"]),
        "supernet": step_fn(net, lambda t: net(t, arch), x, y, optimizer=True, opt_times=opt_ms["supernet"]),
        "static_fb": step_fn(static, static, x, y, optimizer=False),
        "supernet_fb": step_fn(net, lambda t: net(t, arch), x, y, optimizer=False),
    }
    for f in steps.values():
        for _ in range(3):
            f()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for k, f in steps.items():
            t0 = time.perf_counter()
            f()
            times[k].append(1000 * (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "space": space_name, "arch": arch.to_string(), "resolution": resolution, "batch": batch,
        "params": count_params(lower(arch, resolution=resolution, num_classes=10, in_chans=in_chans)),
        "static_ms": med["static"], "static_iqr_ms": iqr(times["static"]),
        "supernet_ms": med["supernet"], "supernet_iqr_ms": iqr(times["supernet"]),
        "ratio": med["supernet"] / med["static"], "ratio_ci95": ratio_ci(times["supernet"], times["static"]),
        "static_fwd_bwd_ms": med["static_fb"], "supernet_fwd_bwd_ms": med["supernet_fb"],
        "ratio_fwd_bwd": med["supernet_fb"] / med["static_fb"],
        "ratio_fwd_bwd_ci95": ratio_ci(times["supernet_fb"], times["static_fb"]),
        "static_optimizer_ms": statistics.median(opt_ms["static"][3:]),
        "supernet_optimizer_ms": statistics.median(opt_ms["supernet"][3:]),
        "supernet_params": sum(p.numel() for p in net.parameters()),
    }


def train_throughput(threads: int, steps: int, space: str = "efficientformer_v2_demo", batch: int = 128) -> dict:
    """Images/s of real sandwich-rule training (largest + smallest + 1 random, distillation) at 32 px."""
    from supernet.data import load_dataset, make_loader
    from supernet.sandwich import sandwich_archs, sandwich_step

    sp = get_space(space).with_stem_stride(2)
    splits = load_dataset("synthetic:4096", resolution=32, seed=0)
    net = Supernet(sp, num_classes=10, resolution=32, in_chans=splits.in_chans).to(memory_format=torch.channels_last)
    opt = SharedAdamW(net.parameters(), lr=1e-3)
    loader = make_loader(splits.train, batch_size=batch, shuffle=True, seed=0, augment=True, channels_last=True)
    n, t0 = 0, None
    for i, (x, y) in enumerate(loader):
        if i == 2:
            t0, n = time.perf_counter(), 0
        if i >= steps + 2:
            break
        opt.zero_grad()
        sandwich_step(net, sandwich_archs(sp, seed=0, step=i, num_random=1), x, y, label_smoothing=0.1, distill=True,
                      bf16=False)
        opt.step()
        n += x.shape[0]
    return {"space": space, "images_per_s": n / (time.perf_counter() - t0), "steps": steps, "batch": batch,
            "supernet_params": sum(p.numel() for p in net.parameters()),
            "fashion_mnist_epoch_s_estimate": 55000 / (n / (time.perf_counter() - t0))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--json", default="experiments/results/supernet.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    demo = get_space("efficientformer_v2_demo")
    cases = [
        ("efficientformer_v2_demo", "largest", demo.largest(), 32, 1, 128),
        ("efficientformer_v2_demo", "smallest", demo.smallest(), 32, 1, 128),
        ("efficientformer_v2_demo", "S0-shaped", s0_shaped("efficientformer_v2_demo"), 32, 1, 128),
        ("efficientformer_v2", "efficientformerv2_s0", get_preset("efficientformerv2_s0"), 64, 3, 32),
    ]
    rows = []
    print(f"threads {args.threads}, repeats {args.repeats}, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print("step = zero_grad + forward + backward + AdamW step; fwd+bwd = without the optimizer step; optimizer ms = "
          "zero_grad + step, timed inside the full steps")
    print(f"{'space':<24} {'config':<21} {'res':>4} {'batch':>5} {'params':>9} {'static ms':>10} {'super ms':>10} "
          f"{'ratio':>6} {'95% interval':>13} {'fwd+bwd ratio':>14} {'optimizer ms (static / super)':>30}")
    for space_name, label, arch, res, chans, batch in cases:
        r = bench_pair(space_name, arch, resolution=res, in_chans=chans, batch=batch, repeats=args.repeats,
                       channels_last=True)
        r["config"] = label
        rows.append(r)
        print(f"{space_name:<24} {label:<21} {res:>4} {batch:>5} {r['params']:>9,} {r['static_ms']:>10.1f} "
              f"{r['supernet_ms']:>10.1f} {r['ratio']:>6.3f} {_interval(r['ratio_ci95']):>13} {r['ratio_fwd_bwd']:>14.3f} "
              f"{r['static_optimizer_ms']:>14.1f} / {r['supernet_optimizer_ms']:<13.1f}")
    sandwiches = [bench_sandwich("efficientformer_v2_demo", resolution=32, in_chans=1, batch=128,
                                 repeats=max(3, args.repeats // 3), stem_stride=2),
                  bench_sandwich("efficientformer_v2", resolution=64, in_chans=3, batch=32,
                                 repeats=max(3, args.repeats // 3))]
    for r in sandwiches:
        print(f"sandwich step (largest, smallest, 2 random) of {r['space']} at {r['resolution']} px, batch "
              f"{r['batch']}: {r['sandwich_ms']:.1f} ms; the same {len(r['configs'])} configs as static models, "
              f"one step each: {r['sum_of_static_ms']:.1f} ms; ratio {r['ratio']:.3f} (95% interval "
              f"{_interval(r['ratio_ci95'])})")
    tp = train_throughput(args.threads, args.train_steps)
    print(f"sandwich training (largest + smallest + 1 random, batch 128, 32 px): {tp['images_per_s']:.0f} img/s, "
          f"about {tp['fashion_mnist_epoch_s_estimate']:.0f} s per Fashion-MNIST epoch (55,000 images)")
    full = train_throughput(args.threads, max(3, args.train_steps // 4), space="efficientformer_v2", batch=64)
    print(f"sandwich training of the full default V2 space ({full['supernet_params']:,} shared parameters; largest "
          f"config above V2-L), batch 64, 32 px: {full['images_per_s']:.0f} img/s, about "
          f"{full['fashion_mnist_epoch_s_estimate']:.0f} s per Fashion-MNIST epoch")
    worst = max(rows, key=lambda r: r["ratio"])
    print(f"worst supernet/static step ratio {worst['ratio']:.3f} (target <= 1.10): "
          f"{'MET' if worst['ratio'] <= 1.10 else 'NOT MET'} (95% interval {_interval(worst['ratio_ci95'])}, from "
          f"resampling its {args.repeats} rounds); worst forward+backward ratio "
          f"{max(r['ratio_fwd_bwd'] for r in rows):.3f}")
    print("The supernet steps with SharedAdamW, which updates only the regions of the shared tensors a step used; "
          "the static model steps with torch's AdamW(fused=True); both run the same fused kernel.")
    atomic_write_json(Path(args.json), {"threads": args.threads, "repeats": args.repeats, "rows": rows,
                                        "sandwich": sandwiches,
                                        "train": tp, "train_full_v2": full, "torch": torch.__version__, "machine": platform.platform(),
                                        "date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__":
    main()
