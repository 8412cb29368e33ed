"""Wall-clock speed of the early-exit engine against the stock HF forward pass.

Checks that the layer-by-layer loop costs nothing over `get_image_features`
(never_exit), that exiting halfway halves the time (half_exit), that mixed
per-row exits speed up as much as their FLOPs say (mixed), and what the exit head of the default
recipe costs on top (readouts_half: every candidate layer up to the middle scores `--classes` labels
with T-GEM profiles and a distilled map of z_l and the mean-patch readout, computes the Jumper's
signals and decides; every row exits at the middle layer, as half_exit). Cases run round-robin,
one batch each per repeat, so machine noise hits them alike; the median is reported.
On a machine shared with other jobs, `--threads 1 --clock cpu` times each case by the
process's CPU time, which other processes do not inflate (with more threads it would
count OpenMP spin-waits too).

    python benchmarks/engine_speed.py [--model NAME_OR_PATH] [--batch 64] [--repeats 5] [--json PATH]
"""
import argparse
import json
import statistics
import time

import torch

from tgems.backbones import load_backbone
from tgems.backbones.hf_clip import CLIPBackbone
from tgems.engine import run_early_exit
from tgems.policies import ExitAtLayer, ExitPerRow, NeverExit

CASES = ("plain", "never_exit", "half_exit", "mixed", "readouts_half")


def vit_b32(seed=0):
    """Random-init CLIP with a ViT-B/32 vision tower and a tiny text tower (text is not timed)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        vision_config=dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072,
                           num_hidden_layers=12, num_attention_heads=12),
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2),
        projection_dim=512)
    model = CLIPModel(config).eval().requires_grad_(False)
    return CLIPBackbone("random ViT-B/32", None, model, None, None, "cpu", torch.float32)


def readout_policy(bb, classes: int, exit_layer: int, seed: int = 0):
    """A JumperPolicy of the default recipe's shape (random weights: only its cost is measured) whose Jumper
    sends every row out at `exit_layer`."""
    import math

    import torch.nn.functional as F

    from tgems.jumper import NUM_SET_SIGNALS, NUM_SIGNALS, NUM_TRAJ_SIGNALS, Jumper
    from tgems.policies import JumperPolicy
    from tgems.profiles import ClassProfiles

    L, D = bb.num_layers, bb.embed_dim
    layers, g = list(range(1, L)), torch.Generator().manual_seed(seed)
    n = len(layers)
    prof = ClassProfiles("cls", layers, F.normalize(torch.randn(n, classes, D, generator=g), dim=-1), None,
                         torch.full((n,), 20.0), F.normalize(torch.randn(classes, D, generator=g), dim=-1),
                         bb.logit_scale(), L, readout_weight=torch.randn(n, 2 * D, D, generator=g) / math.sqrt(2 * D),
                         readout_bias=torch.zeros(n, D), mix=torch.full((n, 2), 0.5),
                         patch_flops=bb.flops_patch_readout())
    bias = torch.full((n,), -30.0)
    bias[layers.index(exit_layer)] = 30.0
    jumper = Jumper(torch.zeros(n, NUM_SIGNALS + D + NUM_SET_SIGNALS + NUM_TRAJ_SIGNALS), bias)
    return JumperPolicy(prof.to(bb.device), jumper.to(bb.device), 0.5)


def make_cases(bb, pixels, seed, classes=100):
    L, n = bb.num_layers, len(pixels)
    spread = torch.arange(n) % L + 1
    mixed = spread[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    plain = lambda: bb.model.get_image_features(pixel_values=pixels)  # noqa: E731
    return {
        "plain": plain,
        "never_exit": lambda: run_early_exit(bb, pixels, NeverExit()),
        "half_exit": lambda: run_early_exit(bb, pixels, ExitAtLayer(L // 2)),
        "mixed": lambda: run_early_exit(bb, pixels, ExitPerRow(mixed)),
        "readouts_half": lambda: run_early_exit(bb, pixels, readout_policy(bb, classes, L // 2, seed)),
    }


def measure(cases, repeats, warmup, clock=time.perf_counter):
    times = {name: [] for name in cases}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in cases.values():
                fn()
        for _ in range(repeats):
            for name, fn in cases.items():
                start = clock()
                fn()
                times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="CLIP name or path (default: random-init ViT-B/32)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", type=int, default=100, help="labels the readouts_half exit head scores")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall-clock time, or process CPU time (use with --threads 1 on a busy machine)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    bb = load_backbone(args.model) if args.model else vit_b32(args.seed)
    pixels = torch.randn(args.batch, 3, bb.image_size, bb.image_size,
                         generator=torch.Generator().manual_seed(args.seed))
    cases = make_cases(bb, pixels, args.seed, args.classes)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    seconds = measure(cases, args.repeats, args.warmup, clock)
    ips = {name: args.batch / s for name, s in seconds.items()}
    with torch.no_grad():
        ratios = {name: cases[name]().flops_ratio for name in CASES[1:]}
    ratios["plain"] = 1.0

    print(f"model: {bb.name}  L={bb.num_layers}  batch={args.batch}  threads={torch.get_num_threads()}  "
          f"repeats={args.repeats} (median)  clock={args.clock}")
    print(f"{'case':<11} {'images/s':>9} {'vs plain':>9} {'FLOPs ratio':>12} {'predicted':>10}")
    for name in CASES:
        print(f"{name:<11} {ips[name]:>9.1f} {ips[name] / ips['plain']:>8.3f}x {ratios[name]:>12.3f} "
              f"{1 / ratios[name]:>9.3f}x")
    never = ips["never_exit"] / ips["plain"]
    half = ips["half_exit"] / ips["plain"]
    readouts = ips["readouts_half"] / ips["plain"]
    mixed = (ips["mixed"] / ips["plain"]) * ratios["mixed"]
    print(f"targets: never_exit overhead {100 * (1 - never):+.1f}% (<= 5%): {'ok' if never >= 0.95 else 'MISSED'}; "
          f"half_exit {half:.2f}x (>= 1.8x): {'ok' if half >= 1.8 else 'MISSED'}; "
          f"mixed at {100 * mixed:.0f}% of its predicted speed-up (>= 85%): {'ok' if mixed >= 0.85 else 'MISSED'}; "
          f"readouts_half {readouts:.2f}x (>= 1.8x): {'ok' if readouts >= 1.8 else 'MISSED'}")
    if args.json:
        record = dict(ips, mixed_flops_ratio=ratios["mixed"], half_flops_ratio=ratios["half_exit"],
                      readouts_flops_ratio=ratios["readouts_half"], classes=args.classes,
                      batch=args.batch, model=bb.name, threads=torch.get_num_threads(),
                      repeats=args.repeats, clock=args.clock, seconds=seconds)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
