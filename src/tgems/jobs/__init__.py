"""Batch jobs in stages, in the shape of clip-retrieval's reader / mapper / writer / runner.

    lister.py   what a `folder:` (or parquet / webdataset) input holds: one listing for every consumer
    sources.py  the streamed inputs (`open_source`): a folder, webdataset tar shards, parquet; cut in shards
    readers.py  decoding AND the backbone's resize / crop in worker processes, behind a bounded queue
    stages.py   what the encoder stage runs (micro-batches, depth queues, Ray's actors alike)
    depth.py    the encoder stage through depth queues (`--scheduler depth`)
    writer.py   parts, errors and `_SUCCESS`, each written under a temporary name and renamed
    runner.py   the stages put together (`run_job`), with per-stage timings

Nothing is imported here, so a decoding worker that imports `tgems.jobs.readers` stays free of torch.
"""
