"""The data error type and the bad-row policy shared by all sources."""

import collections
import logging

BAD_ROW_POLICIES = ("error", "skip")

# Reasons a row can be dropped for; the keys of the skipped counts.
INVALID_UTF8 = "invalid UTF-8"
NUL_BYTE = "NUL byte"
EMPTY_TEXT = "empty text"
RAGGED_ROW = "ragged row"
MISSING_LABEL = "missing label"
UNKNOWN_LABEL = "unknown label"
INVALID_JSON = "invalid JSON"
LABEL_COUNT = "label count"  # not one label per word

# Enough examples in the log to find the rows; the counts carry the rest.
_LOGGED_PER_REASON = 3


class DataError(ValueError):
  """Bad input data or a data config that cannot be satisfied."""


class RowPolicy:
  """Applies `data.bad_rows` to the rows of one file or split.

  "error" raises a `DataError` at the first bad row; "skip" drops it and counts
  it by reason (a few are also logged so they can be found).

  Args:
    mode: "error" or "skip".
    where: the file path, or a description such as "tfds glue/sst2 split
      'train'"; every message starts with it.
    unit: what a row number counts: "line" (1-based, the header included) for
      files, "row" (1-based example index) for datasets.
  """

  def __init__(self, mode, where, unit="line"):
    if mode not in BAD_ROW_POLICIES:
      raise DataError(
          f"data.bad_rows must be one of {BAD_ROW_POLICIES}, got {mode!r}")
    self.mode = mode
    self.where = where
    self.unit = unit
    self.counts = collections.Counter()

  def locate(self, row):
    """Returns the message prefix naming the file (or split) and row."""
    return f"{self.where}, {self.unit} {row}"

  def bad(self, row, reason, detail):
    """Reports one bad row: raises under "error", counts under "skip".

    Args:
      row: the row number (see `unit`).
      reason: one of the reason constants of this module (the count key).
      detail: a sentence saying what is wrong with the row.

    Raises:
      DataError: when the policy is "error".
    """
    message = f"{self.locate(row)}: {detail}"
    if self.mode == "error":
      raise DataError(message + " (set data.bad_rows='skip' to drop such rows)")
    self.counts[reason] += 1
    if self.counts[reason] <= _LOGGED_PER_REASON:
      logging.warning("Skipping %s", message)
