"""Running training plans on real hardware: the torch model built from a spec (more to come)."""
