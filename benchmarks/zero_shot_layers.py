"""Zero-shot quality of a CLIP and how meaning builds up through depth.

For every layer l: top-1 of the readout z_l against the class text embeddings (prompt ensemble),
on the seen-combination test split and on the held-out combinations (64-way in both).

    python benchmarks/zero_shot_layers.py --model embedded --json results/zero_shot_layers.json
"""
from __future__ import annotations

import argparse

import tgems
from tgems.io import write_json
from tgems.data import load_dataset, scenes
from tgems.evaluation.harness import zero_shot_layers
from tgems.features import extract_features
from tgems.profiles import class_embeddings


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--data", default="scenes:testall")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    bb = tgems.load_backbone(args.model)
    data = load_dataset(args.data, seed=args.seed)
    feats = extract_features(bb, data)
    text = class_embeddings(bb, data.classes, scenes.PROMPT_TEMPLATES)
    rows = zero_shot_layers(bb, feats, text, data.sample_split())
    cols = [c for c in ("seen", "heldout", "all") if c in rows[0]]
    print(f"zero-shot top-1 (%) of z_l, {len(data.classes)}-way, {args.model} on {args.data} ({len(data)} images)")
    print("layer " + "".join(f"{c:>9}" for c in cols))
    for r in rows:
        print(f"{r['layer']:>5} " + "".join(f"{100 * r[c]:>9.2f}" for c in cols))
    if args.json:
        write_json(args.json, {"model": args.model, "data": args.data, "seed": args.seed,
                               "num_classes": len(data.classes), "layers": rows})


if __name__ == "__main__":
    main()
