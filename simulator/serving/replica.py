"""A replica with one static layout: a simpy process that plans, runs and commits steps.

The replica sleeps while it has nothing to do and is woken by the router when a request
arrives. Each step lasts the iteration model's time for the works the scheduler planned,
after any KV swaps it needed have crossed PCIe.
"""

from __future__ import annotations

import simpy

from simulator.serving.iteration import IterationModel
from simulator.serving.recorder import Recorder
from simulator.serving.schedulers import StaticScheduler
from simulator.serving.sequence import Seq


class Replica:
    def __init__(self, env: simpy.Environment, index: int, scheduler: StaticScheduler,
                 model: IterationModel, recorder: Recorder, host_link_bytes_per_s: float):
        self.env, self.index, self.sched, self.model, self.rec = env, index, scheduler, model, recorder
        self.swap_s_per_token = model.kv_bytes_per_token_per_device() / host_link_bytes_per_s
        self.wake = env.event()
        self.outstanding = 0
        self.process = env.process(self.run())

    def submit(self, seq: Seq) -> None:
        self.sched.add(seq)
        self.outstanding += 1
        if not self.wake.triggered:
            self.wake.succeed()

    def run(self):
        env = self.env
        while True:
            step = None if self.sched.idle else self.sched.plan()
            if step is None:
                if not self.sched.idle and not self.sched.running and not self.sched.prefilling:
                    raise RuntimeError(f"replica {self.index}: waiting requests never fit in the KV cache")
                self.wake = env.event()
                yield self.wake
                continue
            start = env.now
            swap_s = self.sched.take_swapped_tokens() * self.swap_s_per_token  # swaps stall the step
            self.rec.box(self.index, "kv", "swap", start, start + swap_s)
            draft_s = self.sched.speculator.draft_s(step.works, step.k) if step.k else 0.0
            self.rec.box(self.index, "compute", f"draft x{step.k}", start + swap_s, start + swap_s + draft_s)
            yield env.timeout(swap_s + draft_s + self.model.step_s(step.works))
            finished = self.sched.commit(step, env.now)
            self.outstanding -= len(finished)
            self.rec.step(self.index, step.kind, start, env.now, len(step.seqs), sum(step.chunks),
                          self.sched.kv.utilization)
