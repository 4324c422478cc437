"""Recordings: a session kept in a file and played again.

    format.py  the file format (frames, columns, the header) and its codec
    writer.py  the Recorder: a sink that writes a live session (--record)
    reader.py  open_recording: the header, batches, events, columns, maps
    maps.py    which block map names which request (choose_map, maps_for)
    player.py  the Player: a recording as the pump's feed, on a virtual clock

A replay (replay.py) plays a recording into the same pipeline and sinks as
a live session; a report (report/) reads it. Nothing here knows the UI.
"""
