"""Shared by the profiler tests: cut every op family's sweep to its first shapes, so a
measuring command runs its whole path (sweep, measure, store, fit, report) in seconds."""

from __future__ import annotations

import profiler.run


def cut_sweeps(monkeypatch, shapes_per_op: int) -> None:
    original = profiler.run.op_module

    def short(op):
        module = original(op)

        class Short:
            sweep = staticmethod(lambda ctx: module.sweep(ctx)[:shapes_per_op])
            measure, fit = staticmethod(module.measure), staticmethod(module.fit)

        return Short

    monkeypatch.setattr(profiler.run, "op_module", short)
