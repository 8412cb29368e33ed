"""Batch jobs in stages, in the shape of clip-retrieval's reader / mapper / writer / runner.

    lister.py   what a `folder:` (or parquet / webdataset) input holds: one listing for every consumer
    readers.py  decoding AND the backbone's resize / crop in worker processes, behind a bounded queue
    writer.py   parts, errors and `_SUCCESS`, each written under a temporary name and renamed
    runner.py   the stages put together (`run_job`), with per-stage timings

Nothing is imported here, so a decoding worker that imports `tgems.jobs.readers` stays free of torch.
"""
