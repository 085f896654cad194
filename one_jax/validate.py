"""Validation helpers that every layer uses for integer arguments, and nothing else: a leaf
module (imports nothing of one_jax), so that the modules below the config table can check
their own arguments without importing it."""
from typing import List, Optional

import numpy as np

# The CIFAR ResNets halve the image twice (stride-2 stages): 4 x 4 pixels leave one pixel for
# the global average pooling. Smaller images (0 x 0 included) are refused with the data.
MIN_IMAGE_SIZE = 4


def is_int(value) -> bool:
  """An integer (Python or numpy), not a bool (True is an int to Python, never to a user)."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value, minimum: Optional[int] = None,
              maximum: Optional[int] = None, why: str = "") -> int:
  """Returns int(value), or raises `name=value is invalid: it must be ...` (one line)."""
  if not is_int(value) or (minimum is not None and value < minimum) or (
      maximum is not None and value > maximum):
    raise ValueError(f"{name}={value!r} is invalid: " + (why or "it must be " + _int_range(
        minimum, maximum)))
  return int(value)


def _int_range(minimum, maximum) -> str:
  if minimum == 1 and maximum is None:
    return "a positive integer"
  if minimum == 0 and maximum is None:
    return "an integer >= 0"
  if maximum is None:
    return f"an integer >= {minimum}"
  return f"an integer in [{minimum}, {maximum}]"


def comma_list(text) -> List[str]:
  """'a, b,,c' -> ['a', 'b', 'c']: the items of a comma-separated config or flag value."""
  return [part.strip() for part in str(text).split(",") if part.strip()]
