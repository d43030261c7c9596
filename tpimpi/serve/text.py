"""Text of one generated sequence, released to the client only once no stop string can still begin in it."""

from __future__ import annotations


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the start of a stop string (and so may become one)."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


class StopText:
    """Accumulates decoded text; `add` returns the part that is safe to send and whether a stop string
    ended the sequence (the stop string itself and what follows it are never sent, as OpenAI's API does)."""

    def __init__(self, stops: tuple[str, ...] = ()):
        self.stops = tuple(s for s in stops if s)
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of text already released
        self.stopped = False

    def add(self, new: str, final: bool = False) -> str:
        """Append decoded text; return what may be released now (everything left when final)."""
        if self.stopped:
            return ""
        self.text += new
        if self.stops:
            start = max(0, self.sent - max(len(s) for s in self.stops))
            hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
            if hits:
                end, self.stopped = min(hits), True
                out, self.sent = self.text[self.sent : end], end
                self.text = self.text[:end]
                return out
        end = len(self.text) if final else len(self.text) - held_back(self.text, self.stops)
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out
