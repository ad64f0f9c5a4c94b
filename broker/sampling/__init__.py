"""Sampling off the broker's loop: a process of its own samples the studies whose sampler is
slow (TPE past its startup trials, GP, CMA-ES), on the broker's journal file, and hands the
params back; the loop creates the trials and goes on serving results, calls and leases
meanwhile. A process rather than a thread of the broker's own: a thread would share the GIL
with the loop, so sampling would run slower and the loop's calls would wait on it anyway.

    sampler_pool      the processes: the first started when a study first samples slowly, more
                      as the studies need them (`--sampler-processes`)
    sampler_process   the broker's handle on one process: start, requests, answers, its end
    sampler_main      the process itself
    journal_replica   what it samples on: the journal read as it grows, the sampled trials kept
                      aside
    sampler_messages  what the two send each other

Light on purpose (the CLI reads these for its defaults and help): import the modules.
"""

import os

__all__ = ["OFF_LOOP_AT_S", "PROCESSES_BY_DEFAULT", "SAMPLES_TO_DECIDE"]

OFF_LOOP_AT_S = 0.002
"""Loop CPU time per trial sampled (ask and `process()`, the median of the last
`SAMPLES_TO_DECIDE`) above which a study samples in the sampler process, by default
(`optuna-rq broker --off-loop-above`)."""

SAMPLES_TO_DECIDE = 9
"""The loop's last trials sampled of a study whose median CPU time decides: a median, since the
first ask pays for what is done once (a sampler's set-up, first reads: many times a later ask,
even for RandomSampler) and a garbage collection can land in any ask; neither makes a sampler
slow, and a mean would move a fast one off the loop for them."""

PROCESSES_BY_DEFAULT = min(
    8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
)
"""The most sampler processes a broker starts (`optuna-rq broker --sampler-processes`): its cores,
up to 8. Each costs the memory of a Python that imported Optuna (about 100 MB) and starts only
when the studies need it, so a broker whose studies all sample fast starts none."""
