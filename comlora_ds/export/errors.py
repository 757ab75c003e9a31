"""The one exception consolidation raises for problems the user can fix."""

from __future__ import annotations

from ..errors import InputError


class ConsolidationError(InputError, RuntimeError):
    """A checkpoint, base model or output folder that consolidation refuses. The message names the file or
    tensor, what was expected and what was found; nothing has been written when it is raised."""
