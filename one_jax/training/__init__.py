"""Training: `train` (the jitted steps, evaluation and the loop), `losses`, `optimizer`,
`metric_writers`, `preemption`, `voting`, `two_stage` (a step-2 variant's surgery before
training) and `config_checks` (every config field's valid values)."""
