"""Look at a recorded session afterwards: a report, a comparison, a picture.

Everything here works on plain inputs: a ``Recording`` (an iterable of
``diskwatch.events.Request`` plus what is known about where it came from)
and an optional ``BlockMap``. Where the requests came from (diskwatch's own
recording, its older JSON lines, nbd-server's transaction log, nbdkit's log
filter) is decided once, in ``inputs.py``; the analysis, the text, the JSON
and the SVG never ask.

    recording.py  Recording: requests and what is known of their origin
    inputs.py     open a file of any known kind as a Recording
    importers.py  nbd-server transaction log, nbdkit log filter, JSON lines
    analysis.py   one pass over the requests -> Analysis; two -> Comparison
    render.py     Analysis/Comparison -> text for a person, JSON for scripts
    svg.py        offset x time picture with partitions, busy files, throughput
    picture.py    that picture of a live session, fed as a sink (the UI's p key)
"""
