"""Surgery on trained models: expand, merge, transplant, extract (DESIGN.md section 6).

Every operation is a pure function on checkpoint states (the `state` item of a one_jax
checkpoint: {'params', 'batch_stats', ['gate_offset'], ['temporal_mean'], ['opt_state'],
'step'}) and model infos
(meta['model']); `run_*` wrap them with Orbax and `main` is the command line:

  python -m one_jax.surgery expand --src=CKPT --dst=OUT --branches=N [--mode=copy|fresh]
      [--from=0,1] [--fresh_gate=zero|init] [--seed=0] [--reset_optimizer]
  python -m one_jax.surgery merge --src=A --src=B --src=C --dst=OUT [--trunk_from=0|mean]
      [--slots=2,0,1] [--fresh_gate=zero|init] [--seed=0] [--reset_optimizer]
  python -m one_jax.surgery transplant --src=X --branch=I --into=Y --slot=J --dst=OUT
      [--reset_optimizer]
  python -m one_jax.surgery extract --src=CKPT --branch=I --dst=OUT [--reset_optimizer]
      [--weights=deployed|live|temporal_mean]
  python -m one_jax.surgery inspect CKPT

(the command line is __main__.py). Errors print one line `error: ...` on stderr and exit with
status 1, having written nothing.

The package: layout.py (the stacked view of any model and optimizer state), operations.py
(the pure operations), inspection.py (inspect), files.py (the same on checkpoint files) and
__main__.py (the command line). The public names are re-exported here.
"""
from one_jax.surgery.files import run_expand, run_extract, run_merge, run_transplant
from one_jax.surgery.inspection import describe_checkpoint, parameter_counts
from one_jax.surgery.layout import FRESH_GATES, SurgeryError
from one_jax.surgery.operations import expand, extract, merge, parse_trunk_from, transplant

__all__ = ["FRESH_GATES", "SurgeryError", "describe_checkpoint", "expand", "extract", "merge",
           "parameter_counts", "parse_trunk_from", "run_expand", "run_extract", "run_merge", "run_transplant",
           "transplant"]
