"""Scheduling rows of images through an early-exit encoder, for batch jobs and the server alike.

    driver.py  what every scheduler shares: the answered row (`RowResult`), `QueueFull`, the stepping
               loop in a background thread or in the caller's, the stats and occupancy
    depth.py   depth queues: one queue of hidden states per layer, every block on a full batch, refilled
               at layer 0 (`tgems serve`, `--scheduler depth` jobs), with the live audit
    drop.py    exit-and-drop micro-batches through `engine.run_early_exit` (`tgems serve --scheduler drop`)

Nothing is imported here: each module imports torch.
"""
