"""Checked claims: a sentence of a notebook that states a measured result is asserted next to it.

Every notebook makes one `Claims(SMOKE, DATA)` and calls it after the cell that measures what its text says:

>>> claims = Claims(SMOKE, DATA)
>>> claims(active / K > 0.9, "the whole codebook is in use", f"{active} of {K} codes")

The text describes the default phantom (`make figures`). There, in full mode, a false claim raises `ClaimFailed`,
which stops the notebook and so `make figures`. On other data (the real slices, another phantom) it is listed as
not holding there, with a warning. In SMOKE mode (the tests' tiny runs, whose numbers mean nothing) claims are
only counted. `str(claims)` lists what was checked, for the notebook's last cell.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from .phantom import MANIFEST


class ClaimFailed(AssertionError):
    """A sentence of the text is no longer true of the run that shows it."""


def is_default_phantom(data_dir: str | Path) -> bool:
    """Whether `data_dir` holds the default phantom (seed 0, size small), the data the notebooks' text describes."""
    try:
        manifest = json.loads((Path(data_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("seed") == 0 and manifest.get("size") == "small"


class Claims:
    """The claims of one notebook run: `claims(ok, statement, evidence)` checks one (see the module docstring)."""

    def __init__(self, smoke: bool, data_dir: str | Path) -> None:
        self.smoke = bool(smoke)
        self.strict = is_default_phantom(data_dir)
        self.checked: list[tuple[str, str]] = []
        self.not_here: list[tuple[str, str]] = []
        self.skipped: list[str] = []

    def __call__(self, ok: bool, statement: str, evidence: str = "") -> None:
        """Check that `statement` holds (ok); `evidence`: the measured values, shown with it and in the error."""
        if self.smoke:
            self.skipped.append(statement)
        elif ok:
            self.checked.append((statement, evidence))
        elif self.strict:
            raise ClaimFailed(f"the text says {statement!r}, but this run measured: {evidence or 'otherwise'}")
        else:
            self.not_here.append((statement, evidence))
            warnings.warn(f"the text (written for the default phantom) says {statement!r}; on this data: "
                          f"{evidence or 'not so'}", stacklevel=2)

    def __str__(self) -> str:
        if self.smoke:
            return f"SMOKE mode: {len(self.skipped)} claims of the text not checked (they are checked in full mode)"
        lines = [f"{len(self.checked)} claims of the text checked on this run:"]
        lines += [f"  - {s}" + (f" ({e})" if e else "") for s, e in self.checked]
        if self.not_here:
            lines.append(f"{len(self.not_here)} claims of the text, written for the default phantom, do not hold "
                         "on this data:")
            lines += [f"  - {s}" + (f" ({e})" if e else "") for s, e in self.not_here]
        return "\n".join(lines)
