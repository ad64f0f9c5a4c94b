"""Sampling off the broker's loop: a process of its own samples the studies whose sampler is
slow (TPE at thousands of trials), on the broker's journal file, and hands the params back; the
loop creates the trials and goes on serving results, calls and leases meanwhile (a thread of the
broker's own was the slower choice, the GIL shared with the loop: benchmarks/report.md).

    process   the broker's handle on the process: start, requests, answers, its end
    child     the process itself
    replica   what it samples on: the journal read as it grows, the sampled trials kept aside
    messages  what the two say to each other

Light on purpose (the CLI reads `OFF_LOOP_AT_S` for its defaults): import the modules.
"""

__all__ = ["OFF_LOOP_AT_S"]

OFF_LOOP_AT_S = 0.002
"""Loop time per trial sampled (ask and `process()`, an average) above which a study samples in
the sampler process, by default (`optuna-rq broker --off-loop-above`)."""
