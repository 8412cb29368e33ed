"""The retrieval commands: `index` (encode images with early exit into an index), `index-fit` (retrieval maps
for another model) and `search`."""
from __future__ import annotations

import sys

from tgems.cli.common import logger, positive_int, show_progress, common, goal, placement
from tgems.io import write_json
from tgems.spec import INDEX_FIELDS, IndexSpec, default
from tgems.training.settings import IndexFitSettings, option


def cmd_index(args):
    from tgems.indexing import index_images

    info = index_images(IndexSpec(**{k: getattr(args, k) for k in INDEX_FIELDS}), progress=show_progress(args))
    print(f"indexed {info['images']} images into {info['index']}: {info['mean_layers']:.2f} of "
          f"{info['num_layers']} layers on average, FLOPs ratio {info['flops_ratio']:.3f}")
    if info["skipped"]:
        first = info["skipped"][0]
        print(f"tgems: skipped {len(info['skipped'])} unreadable image(s), listed in {info['index']}/index.json "
              f"(meta.skipped); first: {first['id']}: {first['reason']}", file=sys.stderr)
    if args.json:
        write_json(args.json, info)
    return 0


def cmd_index_fit(args):
    from tgems.training.index_fit import fit_and_save_index

    info = fit_and_save_index(args.model, args.data, args.out, IndexFitSettings(epochs=args.epochs, seed=args.seed,
                                                                                 readout_patch=args.readout_patch),
                              n=args.n, device=args.device, dtype=args.dtype, progress=show_progress(args))
    logger(args)(f"saved retrieval maps for {args.model} to {args.out} ({info['images']} images, "
               f"{info['fit_seconds']} s); index with `tgems index --model {args.model} --tgem {args.out}`")
    if args.json:
        write_json(args.json, {"model": args.model, "data": args.data, "seed": args.seed, **info})
    return 0


def cmd_search(args):
    from tgems.indexing import search

    res = search(args.index, args.query, image=args.image, k=args.k, model=args.model, device=args.device,
                 dtype=args.dtype)
    for h in res["hits"]:
        print(f"{h['rank']}\t{h.get('path', h['id'])}\t{h['score']:.4f}\tlayer {h['exit_layer']}")
    if args.json:
        write_json(args.json, res)
    return 0


def add_parsers(sub):
    ix = sub.add_parser("index", help="encode images with early exit into a retrieval index (searched by text)")
    ix.add_argument("--model", default=default("model", IndexSpec), help="embedded, a local HF CLIP dir or a hub id")
    ix.add_argument("--tgem", default=default("tgem", IndexSpec),
                    help="retrieval maps + scorer: embedded:retrieval, or a dir from `tgems index-fit` for "
                         "another model")
    ix.add_argument("--data", required=True, help="the images to index: folder:DIR (any layout), "
                                                  "webdataset:PATTERN, parquet:PATH or a dataset spec")
    ix.add_argument("--out", required=True, help="index directory (written atomically)")
    ix.add_argument("--n", type=positive_int, help="index the first N images")
    goal(ix)
    ix.add_argument("--rank", type=positive_int, default=default("rank", IndexSpec),
                    help="--max-drop: full CLIP's best reference text must stay in the index's top RANK (default 1)")
    ix.add_argument("--calib", help="calibration data spec (default: a random subset of --data; no labels used)")
    ix.add_argument("--n-calib", type=positive_int, default=default("n_calib", IndexSpec))
    ix.add_argument("--workers", type=int, help="image decoding processes for folder, webdataset and parquet input "
                                                "(default: as streamed jobs; 0: decode in a thread)")
    placement(ix)
    common(ix)
    ix.set_defaults(func=cmd_index)

    ixf = sub.add_parser("index-fit", help="fit retrieval maps + scorer for a model (what `tgems index --tgem` takes)")
    ixf.add_argument("--model", required=True, help="a local HF CLIP/SigLIP dir or a hub id (embedded has its maps)")
    ixf.add_argument("--data", required=True, help="training images: a dataset spec, folder:DIR (any layout), "
                                                   "webdataset:PATTERN or parquet:PATH; no labels used")
    ixf.add_argument("--out", required=True, help="directory of the maps (written atomically)")
    ixf.add_argument("--n", type=positive_int, help="a seeded random sample of N images")
    ixf.add_argument("--epochs", type=positive_int, **option(IndexFitSettings, "epochs"))
    ixf.add_argument("--no-readout-patch", dest="readout_patch", action="store_false",
                     **option(IndexFitSettings, "readout_patch"))
    placement(ixf)
    common(ixf)
    ixf.set_defaults(func=cmd_index_fit)

    se = sub.add_parser("search", help="top-k images of an index for a text (or --image)")
    se.add_argument("--index", required=True, help="index directory written by `tgems index`")
    se.add_argument("query", nargs="?", help='the text, e.g. "a small red star near the top left"')
    se.add_argument("--image", help="search by this image file instead (image-to-image)")
    se.add_argument("--k", type=int, default=10, help="number of results (default 10)")
    se.add_argument("--model", help="backbone (default: the one the index was built with)")
    placement(se)
    common(se)
    se.set_defaults(func=cmd_search)
