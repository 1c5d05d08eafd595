"""Discrete-event engine (simpy): pipeline schedules, streams, Chrome traces."""
