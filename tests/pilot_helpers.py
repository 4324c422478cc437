"""Helpers for tests that drive diskwatch's Textual apps with the Pilot."""

from __future__ import annotations

import time


async def play_to_end(app, pilot, player, timeout: float = 60) -> None:
    """Let a ReplayApp play its recording to the end, then bring every view
    up to date (the pump and the views' refresh run on timers otherwise)."""
    deadline = time.monotonic() + timeout
    while not player.finished:
        assert time.monotonic() < deadline, "the replay did not reach its end"
        await pilot.pause(0.05)
    app.pump()
    app._refresh_views(force=True)
    await pilot.pause()
