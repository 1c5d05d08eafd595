"""Speculative decoding with batching: the step-cost model and the choice of k (`model`), steps
and acceptance measured on a real machine (`measured`), and its tables and plots for notebooks and the README (`plots`, imported on its own: it needs pandas).

The model's public names are re-exported here, so `from simulator.speculation import X` reads
as before the package existed.
"""

from simulator.speculation.measured import (
    MeasuredStepCost,
    acceptance_of_measurement,
    compare_with_measurement,
    measurement_view,
    monotone_fit,
    policy_from_measurement,
    policy_table_of_measurement,
)
from simulator.speculation.model import (
    BETA_GRID,
    NGRAM,
    TABLE_BATCH_SIZES,
    ModelStepCost,
    PolicyRow,
    PolicyTable,
    Speculator,
    StepCost,
    acceptance_rate,
    draft_model_of,
    expected_tokens,
    goodput_k,
    max_batch_in_kv,
    mean_expected_tokens,
    policy_table,
    sample_accepted,
    sample_rates,
    steady_tokens_per_step,
    step_s,
    throughput,
)

__all__ = [
    "BETA_GRID",
    "NGRAM",
    "TABLE_BATCH_SIZES",
    "MeasuredStepCost",
    "ModelStepCost",
    "PolicyRow",
    "PolicyTable",
    "Speculator",
    "StepCost",
    "acceptance_of_measurement",
    "acceptance_rate",
    "compare_with_measurement",
    "draft_model_of",
    "expected_tokens",
    "goodput_k",
    "max_batch_in_kv",
    "mean_expected_tokens",
    "measurement_view",
    "monotone_fit",
    "policy_from_measurement",
    "policy_table",
    "policy_table_of_measurement",
    "sample_accepted",
    "sample_rates",
    "step_s",
    "steady_tokens_per_step",
    "throughput",
]
