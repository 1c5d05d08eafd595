"""Tuners: search plans by calling the simulator as plain functions."""
