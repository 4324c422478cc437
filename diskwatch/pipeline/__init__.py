"""The pipeline: what carries requests from a feed (a live server's bus, or
a recording's player) to the sinks, whatever the sinks are.

    sink.py     the Sink protocol, the shape of what it is fed, SinkBase
    session.py  LiveFeed, the Pump (one drain loop, one map lookup per
                request) and the Session (what sinks and views read; the
                one map swap)
    loop.py     the headless loop and signal handling, shared by a live
                session (runner.py) and a replay (replay.py); the UI's
                start-up

It knows the events (``diskwatch.events``) and nothing of the server, the
sources, the sinks or the views: they import it, never the other way.
Nothing is imported here, so ``late.py`` (a sink the session adds) can
import ``pipeline.sink`` while ``pipeline.session`` imports it.
"""
