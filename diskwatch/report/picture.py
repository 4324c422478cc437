"""The picture of a session still going on: what the UI's p key saves.

A ``SessionPicture`` is one of the session's sinks (the pump feeds it every
request, binned and bounded as ``PictureBins`` are) that draws, when asked,
the picture ``diskwatch report --svg`` draws of a recording. The UI knows it
only as something that is fed and answers ``svg()``: it draws nothing, and
whoever builds the app may hand it another picture."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .svg import PictureBins, busiest_files, render_svg


class SessionPicture(PictureBins):
    """Offset x time of everything fed so far, for a live session."""

    def svg(self, *, title: str, blockmap: Any = None,
            traffic: Iterable[tuple[Any, int]] = ()) -> str:
        """The picture as SVG text; ``traffic``: (block-map object, bytes read
        and written) of every object seen, from which the busiest files are
        marked."""
        return render_svg(self, title=title, blockmap=blockmap, files=busiest_files(traffic))
